"""`rlhf-pipeline launch`: profile names resolve to the package's accelerate_configs/ (also after a plain
`pip install .`), and the command it would run is exactly `accelerate launch --config_file ... -m rlhf_pipeline
STAGE RECIPE ...` (nothing launched)."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from rlhf_pipeline import launch
from rlhf_pipeline.cli import main
from rlhf_pipeline.errors import PipelineError

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "rlhf_pipeline" / "accelerate_configs"
# What `launch --list` must run without: a plain install may sit in an environment without them.
HEAVY_MODULES = ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "deepspeed")


def test_shipped_profiles_are_the_package_files_and_the_checkout_folder_links_to_them() -> None:
    assert launch.CONFIGS_DIR == CONFIGS
    assert (REPO / "accelerate_configs").resolve() == CONFIGS  # one copy: the top-level folder is a symlink
    assert launch.shipped_configs() == {path.stem: path for path in sorted(CONFIGS.glob("*.yaml"))}
    assert {"multi_gpu", "deepspeed_zero3", "cpu_multi_process"} <= set(launch.shipped_configs())


def test_resolve_name_name_with_suffix_or_path(tmp_path: Path) -> None:
    assert launch.resolve_config("deepspeed_zero3") == CONFIGS / "deepspeed_zero3.yaml"
    assert launch.resolve_config("deepspeed_zero3.yaml") == CONFIGS / "deepspeed_zero3.yaml"
    own = tmp_path / "mine.yaml"
    own.write_text("distributed_type: MULTI_GPU\n")
    assert launch.resolve_config(str(own)) == own.resolve()
    with pytest.raises(PipelineError, match=r"'zero9' is neither a file nor a shipped profile; profiles: .*multi_gpu"):
        launch.resolve_config("zero9")
    with pytest.raises(PipelineError, match="neither a file nor a shipped profile"):
        launch.resolve_config("elsewhere/multi_gpu.yaml")  # a path that does not exist is not a name


def test_a_plain_pip_install_lists_the_profiles(tmp_path: Path) -> None:
    """`pip install .` (not -e) into a target, then `rlhf-pipeline launch --list` from outside the checkout."""
    pytest.importorskip("setuptools", minversion="77")  # the build backend (pyproject.toml), from this environment
    source = tmp_path / "source"  # a copy: the in-tree build writes build/ and *.egg-info next to the sources
    shutil.copytree(REPO / "rlhf_pipeline", source / "rlhf_pipeline", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index",
                    "--no-build-isolation", "--target", str(target), "."], cwd=source, check=True)
    blocked = tmp_path / "blocked"  # shadows the heavy packages: importing one fails the command
    blocked.mkdir()
    for module in HEAVY_MODULES:
        (blocked / f"{module}.py").write_text(f"raise ImportError('launch --list imported {module}')\n")
    workdir = tmp_path / "elsewhere"
    workdir.mkdir()
    done = subprocess.run([str(target / "bin" / "rlhf-pipeline"), "launch", "--list"], cwd=workdir,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join([str(target), str(blocked)])},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    listed = dict(line.split() for line in done.stdout.splitlines())
    assert set(listed) == set(launch.shipped_configs())
    installed = (target / "rlhf_pipeline" / "accelerate_configs").resolve()
    assert listed == {name: str(installed / f"{name}.yaml") for name in listed}
    assert (installed / "README.md").is_file()


def test_constructed_command() -> None:
    config = CONFIGS / "deepspeed_zero2.yaml"
    assert launch.launch_command(config, "rm", "recipe.yaml", ["training.learning_rate=1e-4"], 4, 0) == [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
        "--num_processes", "4", "--main_process_port", "0",
        "-m", "rlhf_pipeline", "rm", "recipe.yaml", "training.learning_rate=1e-4"]
    assert launch.launch_command(config, "sft", "r.yaml") == [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
        "-m", "rlhf_pipeline", "sft", "r.yaml"]


def test_cli_dry_run_prints_the_command(capsys, monkeypatch) -> None:
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    assert main(["launch", "--config", "multi_gpu", "--num-processes", "4", "--dry-run", "sft",
                 "recipes/smollm2-135m/sft.yaml", "training.learning_rate=1e-4", "model.lora.r=8"]) == 0
    printed = shlex.split(capsys.readouterr().out)
    assert printed == launch.launch_command(CONFIGS / "multi_gpu.yaml", "sft", "recipes/smollm2-135m/sft.yaml",
                                            ["training.learning_rate=1e-4", "model.lora.r=8"], num_processes=4)


def test_cli_list_and_missing_arguments(capsys) -> None:
    assert main(["launch", "--list"]) == 0
    listed = capsys.readouterr().out
    assert "deepspeed_zero3_cpu" in listed and str(CONFIGS / "deepspeed_zero3_cpu.yaml") in listed
    assert main(["launch", "--config", "multi_gpu"]) == 2
    assert "give --config NAME_OR_PATH, a STAGE and a RECIPE" in capsys.readouterr().err


def test_use_cpu_environment_would_silently_drop_deepspeed() -> None:
    with pytest.raises(PipelineError, match=r"ACCELERATE_USE_CPU is set.*without DeepSpeed"):
        launch.check_environment(CONFIGS / "deepspeed_zero2_cpu.yaml", {"ACCELERATE_USE_CPU": "true"})
    launch.check_environment(CONFIGS / "cpu_multi_process.yaml", {"ACCELERATE_USE_CPU": "true"})
    launch.check_environment(CONFIGS / "deepspeed_zero2_cpu.yaml", {})

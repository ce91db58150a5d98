"""`rlhf-pipeline launch`: profile names resolve to the repository's accelerate_configs/, and the command it
would run is exactly `accelerate launch --config_file ... -m rlhf_pipeline STAGE RECIPE ...` (nothing launched)."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import pytest

from rlhf_pipeline import launch
from rlhf_pipeline.cli import main
from rlhf_pipeline.errors import PipelineError

CONFIGS = Path(__file__).resolve().parent.parent / "accelerate_configs"


def test_shipped_profiles_are_the_repository_files() -> None:
    assert launch.configs_dir() == CONFIGS
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


def test_without_the_repository_folder_a_path_is_needed(monkeypatch, capsys) -> None:
    monkeypatch.setattr(launch, "configs_dir", lambda: None)  # a wheel install: no accelerate_configs/ beside it
    with pytest.raises(PipelineError, match=r"no shipped profiles were found: .*not in the wheel.*pass the path"):
        launch.resolve_config("multi_gpu")
    assert launch.resolve_config(str(CONFIGS / "multi_gpu.yaml")) == CONFIGS / "multi_gpu.yaml"
    assert main(["launch", "--list"]) == 2
    assert "not in the wheel" in capsys.readouterr().err


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

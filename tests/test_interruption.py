"""Interruptions lose nothing: a stage killed with SIGKILL is never taken as finished and resumes where it was.

SFT, RM and PPO each run as `python -m rlhf_pipeline <stage> recipe.yaml` on the tiny model, with many short
steps and a checkpoint every two steps. As soon as the first checkpoint is complete the process is killed
with -9 (no chance to clean up); the folder must then count as unfinished, and the same command must resume
from the newest complete checkpoint and finish. A crash inside the final save must leave no half-written
adapter where a finished one would be.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from rlhf_pipeline.outputs import CHECKPOINT_STATE, MARKER, last_checkpoint, read_manifest
from rlhf_pipeline.stages import load_recipe
from tests.stages.conftest import preference_rows, sft_rows, write_card

LORA = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0}
STEPS = 12
TRAINER = {"per_device_train_batch_size": 2, "per_device_eval_batch_size": 8, "learning_rate": 1e-3,
           "logging_steps": 1, "save_steps": 2, "seed": 0, "eval_strategy": "no", "report_to": "none",
           "disable_tqdm": True}


def _recipe(folder: Path, model_dir: Path, stage: str, **training: Any) -> Path:
    cards = {"sft": "chat", "rm": "pairs", "ppo": "prompts"}
    recipe = {"stage": stage, "model": {"name_or_path": str(model_dir), "lora": LORA},
              "data": {"train": [cards[stage]], "eval_split": 0.0, "max_length": 96},
              "training": {"output_dir": str(folder / "outputs" / stage)} | training}
    path = folder / f"{stage}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def _stage_recipe(stage: str, folder: Path, model_dir: Path, request: pytest.FixtureRequest) -> Path:
    """A recipe of STEPS steps with a checkpoint every 2: long enough to kill, short enough to finish fast."""
    if stage == "sft":
        write_card(folder, "chat", sft_rows(32), "messages", ["sft"])
        return _recipe(folder, model_dir, "sft", max_steps=STEPS, **TRAINER)
    if stage == "rm":
        write_card(folder, "pairs", preference_rows(32), "prompt_chosen_rejected", ["rm"])
        return _recipe(folder, model_dir, "rm", max_steps=STEPS, **TRAINER)
    write_card(folder, "prompts", [{"prompt": f"Say something about topic {i}."} for i in range(24)],
               "prompt_only", ["ppo"])
    return _recipe(folder, model_dir, "ppo", reward_model_path=str(request.getfixturevalue("finished_rm")),
                   per_device_train_batch_size=2, total_episodes=2 * STEPS, response_length=6, num_ppo_epochs=1,
                   learning_rate=1e-3, logging_steps=1, save_steps=2, seed=0, num_sample_generations=0,
                   disable_tqdm=True)


@pytest.fixture(scope="module")
def finished_rm(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    """A finished (one-step) reward model on the tiny base, for PPO to score with."""
    from rlhf_pipeline.stages import rm

    folder = tmp_path_factory.mktemp("rm-for-ppo")
    write_card(folder, "pairs", preference_rows(8), "prompt_chosen_rejected", ["rm"])
    recipe = load_recipe(_recipe(folder, tiny_model_dir, "rm", max_steps=1, **TRAINER))
    rm.run(recipe)
    return recipe.output_dir


def _command(stage: str, recipe: Path) -> list[str]:
    return [sys.executable, "-m", "rlhf_pipeline", stage, str(recipe)]


def _environment() -> dict[str, str]:
    return os.environ | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
                         "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def _complete(checkpoint: Path) -> bool:
    try:
        json.loads((checkpoint / CHECKPOINT_STATE).read_text())
    except (OSError, ValueError):
        return False
    return True


def _kill_after_first_checkpoint(stage: str, recipe: Path, out: Path, log: Path) -> Path:
    """Start the stage, SIGKILL it once a checkpoint is complete, and return that checkpoint."""
    with log.open("wb") as sink:
        process = subprocess.Popen(_command(stage, recipe), stdout=sink, stderr=subprocess.STDOUT,
                                   env=_environment(), cwd=recipe.parent)
        deadline = time.monotonic() + 120
        try:
            while time.monotonic() < deadline:
                done = [c for c in out.glob("checkpoint-*") if _complete(c)] if out.is_dir() else []
                if done:
                    os.kill(process.pid, signal.SIGKILL)
                    break
                assert process.poll() is None, f"{stage} ended before its first checkpoint:\n{log.read_text()}"
                time.sleep(0.02)
            else:
                raise AssertionError(f"no checkpoint within 120 s:\n{log.read_text()}")
        finally:
            process.kill()
            process.wait()
    assert process.returncode == -signal.SIGKILL
    return done[0]


@pytest.mark.parametrize("stage", ["sft", "rm", "ppo"])
def test_killed_stage_is_unfinished_then_resumes(stage: str, tmp_path: Path, tiny_model_dir: Path,
                                                 request: pytest.FixtureRequest,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    from rlhf_pipeline.cli import main
    from rlhf_pipeline.stages.common import finished_run

    recipe_path = _stage_recipe(stage, tmp_path, tiny_model_dir, request)
    recipe = load_recipe(recipe_path)
    out = recipe.output_dir
    first = _kill_after_first_checkpoint(stage, recipe_path, out, tmp_path / "killed.log")

    assert not (out / MARKER).exists()
    assert read_manifest(out) is None
    assert finished_run(recipe) is None  # so `run` and the stage command run it again, never skip it
    assert not (out / "adapter_model.safetensors").exists()
    resume_from = last_checkpoint(out)  # the newest complete one: the first, or a later one finished before the kill
    assert resume_from is not None and _complete(resume_from)
    assert int(resume_from.name.split("-")[1]) >= int(first.name.split("-")[1])
    before = json.loads((resume_from / CHECKPOINT_STATE).read_text())["log_history"]

    # The same command again; in this process, which spares a second start of torch and TRL.
    assert main(_command(stage, recipe_path)[3:]) == 0, capsys.readouterr().err
    manifest = read_manifest(out)
    assert manifest is not None and manifest.stage == stage
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["resumed_from"] == str(resume_from)
    assert metrics["global_steps"] == STEPS
    history = [entry for entry in metrics["log_history"] if "loss" in entry or "objective/scores" in entry]
    assert [entry["step"] for entry in history] == list(range(1, STEPS + 1))  # nothing lost, nothing done twice
    assert metrics["log_history"][: len(before)] == before  # the killed run's log continues
    assert (out / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("failing", ["weights", "tokenizer", "metrics"])
def test_crash_in_final_save_leaves_no_finished_looking_adapter(failing: str, tmp_path: Path, tiny_model_dir: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from rlhf_pipeline import outputs
    from rlhf_pipeline.stages.common import finish, load_for_training

    write_card(tmp_path, "chat", sft_rows(8), "messages", ["sft"])
    recipe = load_recipe(_recipe(tmp_path, tiny_model_dir, "sft", max_steps=2, **TRAINER))
    loaded = load_for_training(recipe)
    out = recipe.output_dir
    checkpoint = out / "checkpoint-2"
    checkpoint.mkdir(parents=True)
    (checkpoint / CHECKPOINT_STATE).write_text(json.dumps({"global_step": 2, "log_history": []}))

    def half_written(real: Any, name: str) -> Any:
        def save(folder: Any, *args: Any, **kwargs: Any) -> Any:
            if real:
                real(folder, *args, **kwargs)
            target = Path(folder) / name if Path(folder).is_dir() else Path(folder)
            target.write_bytes(b"\x00" * 10)  # a file cut short, as by a crash
            raise OSError(errno.EIO, "Input/output error")
        return save

    if failing == "weights":
        monkeypatch.setattr(loaded.model, "save_pretrained", half_written(None, "adapter_model.safetensors"))
    elif failing == "tokenizer":
        monkeypatch.setattr(loaded.tokenizer, "save_pretrained",
                            half_written(loaded.tokenizer.save_pretrained, "tokenizer.json"))
    else:
        real_write = outputs.write_text_atomic

        def write(path: Path, text: str) -> None:
            if path.name == "metrics.json":
                path.write_text(text[: len(text) // 2])
                raise OSError(errno.EIO, "Input/output error")
            real_write(path, text)

        monkeypatch.setattr(outputs, "write_text_atomic", write)

    with pytest.raises(OSError, match="Input/output error"):
        finish(recipe, loaded, loaded.model, {"global_steps": 2})
    assert read_manifest(out) is None
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-2"]  # nothing half-written, no scratch left
    assert last_checkpoint(out) == checkpoint

    monkeypatch.undo()
    finish(recipe, loaded, loaded.model, {"global_steps": 2})  # the re-run's save completes
    assert read_manifest(out) is not None
    assert (out / "adapter_model.safetensors").stat().st_size > 1000


def test_half_written_checkpoint_is_passed_over(tmp_path: Path) -> None:
    """A checkpoint folder whose trainer state is missing or cut short was still being written at the kill."""
    for step, state in ((2, '{"global_step": 2}'), (4, '{"global_st'), (6, None)):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        (folder / "adapter_model.safetensors").write_bytes(b"weights")
        if state is not None:
            (folder / CHECKPOINT_STATE).write_text(state)
    (tmp_path / "checkpoint-x").mkdir()
    assert last_checkpoint(tmp_path) == tmp_path / "checkpoint-2"
    assert last_checkpoint(str(tmp_path)) == tmp_path / "checkpoint-2"
    assert last_checkpoint(tmp_path / "missing") is None

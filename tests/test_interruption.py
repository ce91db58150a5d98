"""Interruptions lose nothing: a stage killed with SIGKILL is never taken as finished and resumes where it was.

Each stage runs as `python -m rlhf_pipeline <stage> recipe.yaml` on the tiny model, with many short
steps and a checkpoint every two steps. As soon as the first checkpoint is complete the process is killed
with -9 (no chance to clean up); the folder must then count as unfinished, and the same command must resume
from the newest complete checkpoint and finish. A crash inside the final save must leave no half-written
adapter where a finished one would be.
"""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from rlhf_pipeline.errors import PipelineError
from rlhf_pipeline.locks import LOCK_FILE
from rlhf_pipeline.outputs import CHECKPOINT_STATE, MARKER, last_checkpoint, read_manifest
from rlhf_pipeline.stages import load_recipe
from tests.stages.conftest import preference_rows, sft_rows, stepwise_rows, write_card

LORA = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0}
STEPS = 12
TRAINER = {"per_device_train_batch_size": 2, "per_device_eval_batch_size": 8, "learning_rate": 1e-3,
           "logging_steps": 1, "save_steps": 2, "seed": 0, "eval_strategy": "no", "report_to": "none",
           "disable_tqdm": True}


def _recipe(folder: Path, model_dir: Path, stage: str, sections: dict[str, Any] | None = None,
            **training: Any) -> Path:
    cards = {"sft": "chat", "rm": "pairs", "prm": "steps", "ppo": "prompts", "dpo": "pairs", "kto": "pairs",
             "grpo": "prompts", "rloo": "prompts"}
    recipe = {"stage": stage, "model": {"name_or_path": str(model_dir), "lora": LORA},
              "data": {"train": [cards[stage]], "eval_split": 0.0, "max_length": 96, "unpair": stage == "kto"},
              "training": {"output_dir": str(folder / "outputs" / stage)} | training} | (sections or {})
    path = folder / f"{stage}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def _stage_recipe(stage: str, folder: Path, model_dir: Path, request: pytest.FixtureRequest) -> Path:
    """A recipe of STEPS steps with a checkpoint every 2: long enough to kill, short enough to finish fast."""
    if stage == "sft":
        write_card(folder, "chat", sft_rows(32), "messages", ["sft"])
        return _recipe(folder, model_dir, "sft", max_steps=STEPS, **TRAINER)
    if stage == "prm":
        write_card(folder, "steps", stepwise_rows(32), "stepwise", ["prm"])
        return _recipe(folder, model_dir, "prm", max_steps=STEPS, **TRAINER)
    if stage in ("rm", "dpo", "kto"):
        write_card(folder, "pairs", preference_rows(32), "prompt_chosen_rejected", ["rm", "dpo", "kto"])
        return _recipe(folder, model_dir, stage, max_steps=STEPS, **TRAINER)
    if stage in ("grpo", "rloo"):
        write_card(folder, "prompts", [{"prompt": f"Say something about topic {i}."} for i in range(24)],
                   "prompt_only", ["grpo", "rloo"])
        return _recipe(folder, model_dir, stage, {"reward": {"model": str(request.getfixturevalue("finished_rm"))}},
                       max_steps=STEPS, num_generations=2, max_completion_length=6, beta=0.1, **TRAINER)
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


def _signal_after_first_checkpoint(stage: str, recipe: Path, out: Path, log: Path, signum: int) -> tuple[int, Path]:
    """Start the stage, send `signum` once a checkpoint is complete; its exit status and that checkpoint."""
    with log.open("wb") as sink:
        process = subprocess.Popen(_command(stage, recipe), stdout=sink, stderr=subprocess.STDOUT,
                                   env=_environment(), cwd=recipe.parent)
        deadline = time.monotonic() + 120
        try:
            while time.monotonic() < deadline:
                done = [c for c in out.glob("checkpoint-*") if _complete(c)] if out.is_dir() else []
                if done:
                    os.kill(process.pid, signum)
                    break
                assert process.poll() is None, f"{stage} ended before its first checkpoint:\n{log.read_text()}"
                time.sleep(0.02)
            else:
                raise AssertionError(f"no checkpoint within 120 s:\n{log.read_text()}")
            process.wait(timeout=60)
        finally:
            process.kill()
            process.wait()
    return process.returncode, done[0]


# rm's run is slow-marked (opt-in, like the TRL-trainer stages below): it resumes through sft's code path, and the
# default suite must stay under 20 minutes on 2 cores.
@pytest.mark.parametrize("stage", ["sft", "ppo", pytest.param("rm", marks=pytest.mark.slow)])
def test_killed_stage_is_unfinished_then_resumes(stage: str, tmp_path: Path, tiny_model_dir: Path,
                                                 request: pytest.FixtureRequest,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    from rlhf_pipeline.cli import main
    from rlhf_pipeline.stages.common import finished_run

    recipe_path = _stage_recipe(stage, tmp_path, tiny_model_dir, request)
    recipe = load_recipe(recipe_path)
    out = recipe.output_dir
    status, first = _signal_after_first_checkpoint(stage, recipe_path, out, tmp_path / "killed.log", signal.SIGKILL)
    assert status == -signal.SIGKILL

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
    assert _trained_steps(metrics) == list(range(1, STEPS + 1))  # nothing lost, nothing done twice
    assert metrics["log_history"][: len(before)] == before  # the killed run's log continues
    assert (out / "adapter_model.safetensors").is_file()


def _trained_steps(metrics: dict[str, Any]) -> list[int]:
    return [entry["step"] for entry in metrics["log_history"] if "loss" in entry or "objective/scores" in entry]


# dpo, kto, grpo and rloo resume through the same TRL Trainer path (train_resuming) as sft, rm and prm: slow-marked
# (opt-in) to keep the default suite under 20 minutes on 2 cores.
@pytest.mark.parametrize("stage", ["sft", "rm", "prm", "ppo", *(pytest.param(name, marks=pytest.mark.slow)
                                                               for name in ("dpo", "kto", "grpo", "rloo"))])
def test_sigterm_saves_the_current_step_and_the_rerun_resumes_there(stage: str, tmp_path: Path,
                                                                     tiny_model_dir: Path,
                                                                     request: pytest.FixtureRequest,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """Pre-emption: the step under way finishes and is saved, the stage is not finished, the re-run resumes."""
    from rlhf_pipeline.cli import main

    recipe_path = _stage_recipe(stage, tmp_path, tiny_model_dir, request)
    out = load_recipe(recipe_path).output_dir
    log = tmp_path / "stopped.log"
    status, first = _signal_after_first_checkpoint(stage, recipe_path, out, log, signal.SIGTERM)
    said = log.read_text()
    assert status == 128 + signal.SIGTERM, said
    stopped = re.search(r"^stopped by SIGTERM after step (\d+); checkpoint saved in (\S+); re-run the same "
                        r"command to resume from it$", said, re.MULTILINE)
    assert stopped is not None, said
    step = int(stopped[1])
    assert int(first.name.split("-")[1]) < step < STEPS  # the step under way at the signal, not a save_steps one
    assert Path(stopped[2]) == out / f"checkpoint-{step}" == last_checkpoint(out)
    state = json.loads((out / f"checkpoint-{step}" / CHECKPOINT_STATE).read_text())
    assert state["global_step"] == step and state["log_history"][-1]["step"] == step  # nothing trained is lost
    assert read_manifest(out) is None and not (out / "adapter_model.safetensors").exists()

    assert main(_command(stage, recipe_path)[3:]) == 0, capsys.readouterr().err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["resumed_from"] == str(out / f"checkpoint-{step}")
    assert _trained_steps(metrics) == list(range(1, STEPS + 1))
    assert metrics["log_history"][: len(state["log_history"])] == state["log_history"]
    if stage == "ppo":  # exact: the same numbers as a run that was never stopped
        straight = tmp_path / "straight"
        assert main([*_command(stage, recipe_path)[3:], f"training.output_dir={straight}"]) == 0
        expected = json.loads((straight / "metrics.json").read_text())["log_history"]
        for mine, theirs in zip(metrics["log_history"], expected, strict=True):
            assert mine.keys() == theirs.keys()
            for key, value in mine.items():
                if isinstance(value, float) and not key.startswith("time/"):  # time/*: wall clock, never equal
                    assert value == pytest.approx(theirs[key], rel=1e-4, abs=1e-6), (mine["step"], key)


def test_a_running_stage_locks_its_folder_until_it_is_gone(tmp_path: Path, tiny_model_dir: Path,
                                                            request: pytest.FixtureRequest,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    """The stage command and the pipeline runner refuse a folder in use at once; a killed holder's lock is taken."""
    from rlhf_pipeline.cli import main
    from rlhf_pipeline.pipeline import run_pipeline

    recipe_path = _stage_recipe("sft", tmp_path, tiny_model_dir, request)
    out = load_recipe(recipe_path).output_dir
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text(yaml.safe_dump({"name": "locked", "stages": [{"stage": "sft", "recipe": "sft.yaml"}]}))
    with (tmp_path / "first.log").open("wb") as sink:
        first = subprocess.Popen(_command("sft", recipe_path), stdout=sink, stderr=subprocess.STDOUT,
                                 env=_environment(), cwd=tmp_path)
    try:
        deadline = time.monotonic() + 60
        while not (out / LOCK_FILE).is_file() or not (out / LOCK_FILE).read_text():
            assert first.poll() is None and time.monotonic() < deadline, (tmp_path / "first.log").read_text()
            time.sleep(0.02)
        started = time.monotonic()
        second = subprocess.run(_command("sft", recipe_path), capture_output=True, text=True, env=_environment(),
                                cwd=tmp_path, check=False)
        assert time.monotonic() - started < 2  # refused before torch is even imported
        assert second.returncode == 2, second.stderr
        assert second.stderr.startswith(f"error: {out}: in use by PID {first.pid} on host ")
        assert f"(sft stage of {recipe_path})" in second.stderr
        assert first.poll() is None  # the first run goes on, its checkpoints untouched

        with pytest.raises(PipelineError, match=f"in use by PID {first.pid} "):
            run_pipeline(pipeline)
    finally:
        first.kill()
        first.wait()
    assert main(_command("sft", recipe_path)[3:]) == 0  # the dead holder's lock is taken over
    assert f"took over the lock left by PID {first.pid} on host " in caplog.text
    assert read_manifest(out) is not None and not (out / LOCK_FILE).exists()


def test_disk_full_while_ppo_saves_a_checkpoint_keeps_the_previous_one_newest(
        tmp_path: Path, tiny_model_dir: Path, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """PPO writes its own checkpoints: one cut short by a full disk is neither kept nor resumed from."""
    from rlhf_pipeline.cli import main
    from rlhf_pipeline.ppo import checkpoints

    recipe_path = _stage_recipe("ppo", tmp_path, tiny_model_dir, request)
    out = load_recipe(recipe_path).output_dir
    real_write_state = checkpoints.write_state

    def disk_full_at_step_4(folder: Path, state: dict[str, Any]) -> None:
        if state["global_step"] == 4:  # weights, optimizer and RNG written; the trainer state is cut short
            (folder / CHECKPOINT_STATE).write_text('{"global_step": 4, "log_hi')
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write_state(folder, state)

    monkeypatch.setattr(checkpoints, "write_state", disk_full_at_step_4)
    assert main(["ppo", str(recipe_path)]) == 2
    assert capsys.readouterr().err.splitlines()[-1].startswith(f"error: {out}: No space left on device; free space")
    assert sorted(p.name for p in out.iterdir() if "checkpoint" in p.name) == ["checkpoint-2"]  # no half of 4 left
    assert read_manifest(out) is None and last_checkpoint(out) == out / "checkpoint-2"

    monkeypatch.undo()
    assert main(["ppo", str(recipe_path)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["resumed_from"] == str(out / "checkpoint-2")
    assert _trained_steps(metrics) == list(range(1, STEPS + 1))


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

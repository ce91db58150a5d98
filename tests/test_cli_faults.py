"""The command line under faults it does not cause: another run's outputs in the way, a folder it cannot
write, a full disk, the Hub out of reach. Each is one line on stderr naming the path and the fix, exit 2,
never a traceback, and nothing finished is lost."""

from __future__ import annotations

import errno
import json
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml

from rlhf_pipeline.cli import main
from rlhf_pipeline.outputs import CHECKPOINT_STATE, MARKER, last_checkpoint, read_manifest
from tests.stages.conftest import sft_rows, write_card

TRAINING = {"per_device_train_batch_size": 4, "learning_rate": 1e-3, "logging_steps": 1, "save_steps": 1,
            "seed": 0, "eval_strategy": "no", "report_to": "none", "disable_tqdm": True}


def _recipe(folder: Path, model: str | Path, output_dir: Path, name: str = "sft", stage: str = "sft",
            **training: Any) -> Path:
    if stage == "sft":
        write_card(folder, "chat", sft_rows(16), "messages", ["sft"])
    else:
        write_card(folder, "pairs", [{"prompt": "Hi?", "chosen": "Hello there!", "rejected": "No."}] * 4,
                   "prompt_chosen_rejected", ["rm"])
    recipe = {"stage": stage, "model": {"name_or_path": str(model), "lora": {"r": 4, "lora_alpha": 8}},
              "data": {"train": ["chat" if stage == "sft" else "pairs"], "eval_split": 0.0, "max_length": 96},
              "training": {"output_dir": str(output_dir), "max_steps": 2} | TRAINING | training}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def _one_line(capsys: pytest.CaptureFixture[str]) -> str:
    """The error: one line, the last on stderr (progress bars of the work before it may precede it)."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and err.strip().splitlines()[-1] == errors[0], err
    return errors[0]


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_another_runs_outputs_are_not_overwritten_silently(tmp_path: Path, tiny_model_dir: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "outputs" / "sft"
    first = _recipe(tmp_path, tiny_model_dir, out, name="first")
    assert main(["sft", str(first)]) == 0
    finished = _snapshot(out)
    fingerprint = read_manifest(out).fingerprint

    other = _recipe(tmp_path, tiny_model_dir, out, name="other", learning_rate=5e-4)
    capsys.readouterr()
    assert main(["sft", str(other)]) == 2
    line = _one_line(capsys)
    assert line.startswith(f"error: {other}: training.output_dir: {out} holds a finished 'sft' run of a different "
                           "recipe; pass --overwrite")
    assert _snapshot(out) == finished  # not one byte changed

    reward = _recipe(tmp_path, tiny_model_dir, out, name="reward", stage="rm")  # another stage, same folder
    assert main(["rm", str(reward)]) == 2
    assert "holds a finished 'sft' run" in _one_line(capsys)
    assert _snapshot(out) == finished

    assert main(["sft", str(other), "--overwrite"]) == 0
    assert read_manifest(out).fingerprint not in (None, fingerprint)
    assert yaml.safe_load((out / "recipe.yaml").read_text())["training"]["learning_rate"] == 5e-4


def test_output_dir_under_a_regular_file(tmp_path: Path, tiny_model_dir: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "results.txt"
    blocker.write_text("not a folder")
    recipe = _recipe(tmp_path, tiny_model_dir, blocker / "sft")
    assert main(["sft", str(recipe)]) == 2
    line = _one_line(capsys)
    assert line.startswith(f"error: {blocker / 'sft'}: Not a directory; part of the path is a file")
    assert blocker.read_text() == "not a folder"


def test_output_dir_not_writable(tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    """Tests run as root, which ignores permissions: the refusal is simulated where files are created."""
    out = tmp_path / "outputs" / "sft"
    recipe = _recipe(tmp_path, tiny_model_dir, out)

    def refuse(*args: Any, dir: Any = None, **kwargs: Any) -> Any:  # mkstemp's own keyword
        raise PermissionError(errno.EACCES, "Permission denied", str(dir))

    from rlhf_pipeline.distributed import process_state
    from rlhf_pipeline.stages import common, sft  # noqa: F401 - imported before the patch, never under it

    process_state()  # torch and accelerate, too
    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    assert main(["sft", str(recipe)]) == 2
    line = _one_line(capsys)
    assert line == (f"error: {out}: Permission denied; fix the folder's permissions or choose another output_dir")
    assert not (out / MARKER).exists()


def test_disk_full_while_saving_keeps_earlier_checkpoints(tmp_path: Path, tiny_model_dir: Path,
                                                          monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    import peft.peft_model

    out = tmp_path / "outputs" / "sft"
    recipe = _recipe(tmp_path, tiny_model_dir, out, max_steps=3)
    real_save = peft.peft_model.safe_save_file

    def disk_full_at_second_checkpoint(tensors: Any, filename: str, *args: Any, **kwargs: Any) -> None:
        if "checkpoint-2" in str(filename):
            Path(filename).write_bytes(b"\x00" * 64)  # what fitted before the disk filled up
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(peft.peft_model, "safe_save_file", disk_full_at_second_checkpoint)
    assert main(["sft", str(recipe)]) == 2
    line = _one_line(capsys)
    assert line.startswith(f"error: {out}: No space left on device; free space")
    assert "re-run the same command" in line
    assert read_manifest(out) is None and not (out / "adapter_model.safetensors").exists()
    assert (out / "checkpoint-2").is_dir() and not (out / "checkpoint-2" / CHECKPOINT_STATE).exists()
    assert last_checkpoint(out) == out / "checkpoint-1"  # intact, and what the re-run resumes from
    assert json.loads((out / "checkpoint-1" / CHECKPOINT_STATE).read_text())["global_step"] == 1

    monkeypatch.undo()
    assert main(["sft", str(recipe)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["resumed_from"] == str(out / "checkpoint-1") and metrics["global_steps"] == 3
    assert read_manifest(out) is not None


def test_hub_model_offline(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = _recipe(tmp_path, "nobody-here/not-a-cached-model", tmp_path / "outputs" / "sft")
    assert main(["sft", str(recipe)]) == 2
    line = _one_line(capsys)
    assert line.startswith("error: model.name_or_path: 'nobody-here/not-a-cached-model' is not in the local "
                           "Hugging Face cache and HF_HUB_OFFLINE=1 forbids downloading it")

"""Push plans and pushes up to huggingface_hub's API boundary, on the tiny model under a Hub id.

No test reaches the Hub: the three HfApi methods a push calls are replaced by recorders
(tests/hub_stages.py).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from rlhf_pipeline import hub
from rlhf_pipeline.card import CARD_MARKER
from rlhf_pipeline.cli import main
from rlhf_pipeline.errors import PipelineError
from tests.hub_stages import FAKE_TOKEN, HUB_BASE, REPO, Stages, front_matter, record_api, run_snippet, snapshot

pytestmark = pytest.mark.usefixtures("hub_cache")

UPLOADED = {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "tokenizer_config.json",
            "recipe.yaml", "metrics.json", "README.md"}


def test_finish_pushes_when_the_recipe_asks(hub_stages: Stages) -> None:
    calls = hub_stages.chain_push
    assert calls.named("create_repo") == [("me/tiny-chain", {"private": True, "exist_ok": True})]
    assert calls.named("create_branch") == [("me/tiny-chain", {"branch": "exp", "exist_ok": True})]
    ((repo, commit),) = calls.named("create_commit")
    assert repo == "me/tiny-chain" and commit["revision"] == "exp"
    assert commit["commit_message"].startswith("rlhf-pipeline sft (recipe ")
    assert {"adapter_model.safetensors", "adapter_config.json", "README.md"} <= set(commit["files"])
    assert "stage.json" not in commit["files"]


def test_dry_run_writes_the_exact_upload_folder_and_commit_plan(hub_stages: Stages, tiny_model_dir: Path,
                                                                capsys) -> None:
    before = snapshot(hub_stages.sft, skip=hub.DEFAULT_PLAN_DIR)
    assert main(["push", str(hub_stages.sft), "--repo-id", REPO, "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert f"-> {REPO} (private)" in printed and "not uploaded: stage.json" in printed
    assert snapshot(hub_stages.sft, skip=hub.DEFAULT_PLAN_DIR) == before

    plan_dir = hub_stages.sft / hub.DEFAULT_PLAN_DIR
    upload = plan_dir / "upload"
    names = {p.name for p in upload.iterdir()}
    assert names >= UPLOADED
    assert not names & {"stage.json", "eval_before_training.json"}
    assert not any(name.startswith("checkpoint-") for name in names)
    assert any((hub_stages.sft / name).is_dir() for name in ("checkpoint-1", "checkpoint-2"))  # they exist, stay local
    assert all(p.is_file() for p in upload.iterdir())

    plan = json.loads((plan_dir / "commit_plan.json").read_text())
    assert plan["repo_id"] == REPO and plan["private"] is True and plan["revision"] is None
    assert plan["commit_message"].startswith("rlhf-pipeline sft (recipe ")
    assert {f["path"]: (f["size"], f["sha256"]) for f in plan["files"]} == {
        p.name: (p.stat().st_size, hashlib.sha256(p.read_bytes()).hexdigest()) for p in upload.iterdir()}
    assert "stage.json" in plan["left_local"]

    card = (upload / "README.md").read_text()
    meta = front_matter(card)
    assert (meta["base_model"], meta["library_name"], meta["pipeline_tag"]) == (HUB_BASE, "peft", "text-generation")
    assert {"rlhf", "trl", "peft", "lora", "sft"} <= set(meta["tags"])
    assert f"ADAPTER = {REPO!r}" in card
    run_snippet(card, {REPO: str(upload), HUB_BASE: str(tiny_model_dir)}, capsys)

    # A second plan replaces the first; a folder that is not a plan is never deleted.
    assert main(["push", str(hub_stages.sft), "--repo-id", REPO, "--dry-run", "--revision", "v2"]) == 0
    assert json.loads((plan_dir / "commit_plan.json").read_text())["revision"] == "v2"
    other = hub_stages.root / "not-a-plan"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    capsys.readouterr()
    assert main(["push", str(hub_stages.sft), "--repo-id", REPO, "--dry-run", "--plan-dir", str(other)]) == 2
    assert "is not a push plan" in capsys.readouterr().err and (other / "keep.txt").is_file()


def test_push_goes_through_the_hub_api_privately_without_the_token(hub_stages: Stages, monkeypatch, capsys) -> None:
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    calls = record_api(monkeypatch)
    before = snapshot(hub_stages.sft)
    assert main(["push", str(hub_stages.sft), "--repo-id", REPO, "--revision", "v1",
                 "--commit-message", "first adapter"]) == 0
    assert calls.named("create_repo") == [(REPO, {"private": True, "exist_ok": True})]
    assert calls.named("create_branch") == [(REPO, {"branch": "v1", "exist_ok": True})]
    ((repo, commit),) = calls.named("create_commit")
    assert repo == REPO and commit["revision"] == "v1" and commit["commit_message"] == "first adapter"
    assert "token" not in commit and all("token" not in kwargs for _, _, kwargs in calls.calls)
    files = commit["files"]
    assert set(files) >= UPLOADED and "stage.json" not in files
    assert not any("checkpoint" in name or "/" in name for name in files)
    assert files["adapter_model.safetensors"] == (hub_stages.sft / "adapter_model.safetensors").read_bytes()
    assert f"ADAPTER = {REPO!r}" in files["README.md"].decode() and "revision='v1'" in files["README.md"].decode()

    assert main(["push", str(hub_stages.sft), "--repo-id", REPO, "--public"]) == 0
    assert calls.named("create_repo")[-1] == (REPO, {"private": False, "exist_ok": True})
    assert len(calls.named("create_branch")) == 1 and calls.named("create_commit")[-1][1]["revision"] is None

    printed = capsys.readouterr()
    assert "pushed to https://huggingface.co/me/tiny-sft" in printed.out
    assert FAKE_TOKEN not in printed.out + printed.err
    assert all(FAKE_TOKEN.encode() not in data for _, _, kw in calls.calls for data in kw.get("files", {}).values())
    assert snapshot(hub_stages.sft) == before  # a push writes nothing locally
    for folder in (hub_stages.sft, hub_stages.chain):
        assert all(FAKE_TOKEN.encode() not in p.read_bytes() for p in folder.rglob("*") if p.is_file())


def test_failed_push_leaves_outputs_alone_and_says_how_to_retry(hub_stages: Stages, monkeypatch, capsys) -> None:
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    before = snapshot(hub_stages.sft)
    record_api(monkeypatch, fail=True)
    assert main(["push", str(hub_stages.sft), "--repo-id", REPO, "--commit-message", "try it"]) == 2
    err = capsys.readouterr().err
    assert f"retry: rlhf-pipeline push {hub_stages.sft} --repo-id {REPO} --private --commit-message 'try it'" in err
    assert "500 Server Error" in err and FAKE_TOKEN not in err and "hf_***" in err
    assert snapshot(hub_stages.sft) == before

    with pytest.raises(PipelineError, match="the local output is unchanged"):
        hub.push(hub_stages.sft, REPO)
    monkeypatch.setattr(hub, "hub_offline", lambda: True)
    with pytest.raises(PipelineError, match=r"HF_HUB_OFFLINE=1 .* rlhf-pipeline push "):
        hub.push(hub_stages.sft, REPO)
    assert snapshot(hub_stages.sft) == before


def test_push_keeps_an_edited_card_and_only_the_main_process_pushes(hub_stages: Stages, tmp_path: Path,
                                                                     monkeypatch) -> None:
    import rlhf_pipeline.distributed

    edited = tmp_path / "edited"
    shutil.copytree(hub_stages.sft, edited, ignore=shutil.ignore_patterns("checkpoint-*", ".push-plan"))
    (edited / "README.md").write_text("---\nlicense: mit\n---\n# My own words\n")
    plan = hub.plan_push(edited, REPO)
    (card,) = [f for f in plan.files if f.path_in_repo == "README.md"]
    assert card.source == edited / "README.md" and card.content is None  # uploaded as the user wrote it
    (edited / "README.md").write_text("---\nlibrary_name: peft\n---\n\n# Model Card for Model ID\n")
    (card,) = [f for f in hub.plan_push(edited, REPO).files if f.path_in_repo == "README.md"]
    assert card.source is None and CARD_MARKER in card.content.decode()  # PEFT's blank template: ours instead

    calls = record_api(monkeypatch)
    monkeypatch.setattr(rlhf_pipeline.distributed, "is_main_process", lambda: False)
    assert hub.push(hub_stages.sft, REPO) is None and hub.push(hub_stages.sft, REPO, dry_run=True) is None
    assert calls.calls == []


def test_push_refuses_what_is_not_a_finished_model_stage(hub_stages: Stages, tmp_path: Path, capsys) -> None:
    unfinished = tmp_path / "unfinished"
    shutil.copytree(hub_stages.sft, unfinished, ignore=shutil.ignore_patterns("stage.json", ".push-plan"))
    assert main(["push", str(unfinished), "--repo-id", REPO, "--dry-run"]) == 2
    assert "no finished stage here (no stage.json)" in capsys.readouterr().err
    assert main(["push", str(hub_stages.sft), "--repo-id", "not a/valid--id", "--dry-run"]) == 2
    assert "--repo-id" in capsys.readouterr().err
    assert main(["push", str(hub_stages.sft), "--repo-id", REPO, "--plan-dir", str(tmp_path / "p")]) == 2
    assert "only with --dry-run" in capsys.readouterr().err

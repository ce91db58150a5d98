"""Model cards, push plans, pushes (up to huggingface_hub's API boundary) and merges, on the tiny model.

The base is named by a Hub id (`test-org/tiny-llama`) served from a fake local Hugging Face cache, so the
cards, adapter configs and snippets meet a real Hub id while everything stays offline. No test reaches
the Hub: the three HfApi methods a push calls are replaced by recorders.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import yaml

from rlhf_pipeline import hub
from rlhf_pipeline.cli import main
from rlhf_pipeline.errors import PipelineError
from rlhf_pipeline.recipe import load_recipe
from rlhf_pipeline.stages import rm, sft
from tests.stages.conftest import preference_rows, sft_rows, write_card

HUB_BASE = "test-org/tiny-llama"
REPO = "me/tiny-sft"
FAKE_TOKEN = "hf_FAKEtoken0123456789abcdefABCDEF"
IDS = torch.tensor([[1, 5, 17, 42, 99, 7, 2, 30]])


# ------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Any:
    """The tiny model as the cached Hub repo test-org/tiny-llama (offline loads resolve it from here)."""
    import huggingface_hub.constants

    cache = tmp_path_factory.mktemp("hf-cache")
    repo = cache / "models--test-org--tiny-llama"
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(tiny_model_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    patch = pytest.MonkeyPatch()
    patch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    yield cache
    patch.undo()


def _recipe(root: Path, name: str, model: str, hub_section: dict[str, Any] | None = None,
            stage: str = "sft", cards: tuple[str, ...] = ("chat",)) -> Path:
    recipe: dict[str, Any] = {
        "stage": stage,
        "model": {"name_or_path": model, "lora": {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0}},
        "data": {"train": list(cards), "eval_split": 0.25, "max_length": 128},
        "training": {"output_dir": str(root / "outputs" / name), "max_steps": 2, "per_device_train_batch_size": 4,
                     "per_device_eval_batch_size": 8, "learning_rate": 5e-3, "logging_steps": 1, "save_steps": 1,
                     "seed": 0, "eval_strategy": "no", "report_to": "none"},
    }
    if hub_section:
        recipe["hub"] = hub_section
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


@dataclass
class ApiCalls:
    """What the (replaced) huggingface_hub API was asked to do."""

    calls: list[tuple[str, str, dict[str, Any]]] = field(default_factory=list)

    def named(self, name: str) -> list[tuple[str, dict[str, Any]]]:
        return [(repo, kwargs) for call, repo, kwargs in self.calls if call == name]


def record_api(patch: pytest.MonkeyPatch, fail: bool = False) -> ApiCalls:
    """Replace the three HfApi methods a push calls by recorders (optionally failing the commit)."""
    from huggingface_hub import HfApi

    recorded = ApiCalls()

    def create_repo(self: Any, repo_id: str, **kwargs: Any) -> str:
        recorded.calls.append(("create_repo", repo_id, kwargs))
        return f"https://huggingface.co/{repo_id}"

    def create_branch(self: Any, repo_id: str, **kwargs: Any) -> None:
        recorded.calls.append(("create_branch", repo_id, kwargs))

    def create_commit(self: Any, repo_id: str, operations: Any, **kwargs: Any) -> Any:
        files = {}
        for op in operations:
            data = op.path_or_fileobj
            files[op.path_in_repo] = data if isinstance(data, bytes) else Path(data).read_bytes()
        recorded.calls.append(("create_commit", repo_id, {**kwargs, "files": files}))
        if fail:
            raise RuntimeError(f"500 Server Error: upload refused (Authorization: Bearer {FAKE_TOKEN})")
        return SimpleNamespace(commit_url=f"https://huggingface.co/{repo_id}/commit/0abc")

    patch.setattr(HfApi, "create_repo", create_repo)
    patch.setattr(HfApi, "create_branch", create_branch)
    patch.setattr(HfApi, "create_commit", create_commit)
    patch.setattr(hub, "_hub_offline", lambda: False)  # tests run with HF_HUB_OFFLINE=1
    return recorded


@dataclass
class Stages:
    root: Path
    sft: Path
    chain: Path  # a second SFT on top of the first: its manifest lists the first in merged_adapters
    chain_push: ApiCalls  # what finishing the chain stage pushed (its recipe has hub.push: true)


@pytest.fixture(scope="module")
def stages(tmp_path_factory: pytest.TempPathFactory, hub_cache: Path) -> Stages:
    root = tmp_path_factory.mktemp("hub-stages")
    write_card(root, "chat", sft_rows(16), "messages", ["sft"])
    first = load_recipe(_recipe(root, "sft", HUB_BASE))
    sft.run(first)
    with pytest.MonkeyPatch.context() as patch:
        calls = record_api(patch)
        chain = load_recipe(_recipe(root, "chain", str(first.output_dir),
                                    {"push": True, "repo_id": "me/tiny-chain", "revision": "exp"}))
        sft.run(chain)
    return Stages(root, first.output_dir, chain.output_dir, calls)


# -------------------------------------------------------------------------------------------- helpers


def front_matter(card: str) -> dict[str, Any]:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---", 2)[1])


def code_block(card: str, language: str) -> str:
    blocks = re.findall(rf"```{language}\n(.*?)```", card, flags=re.S)
    assert len(blocks) == 1, blocks
    return blocks[0]


def snapshot(folder: Path, skip: str | None = None) -> dict[str, str]:
    """Every file under `folder` with its sha256 (optionally skipping one top-level entry)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*"))
            if p.is_file() and (skip is None or p.relative_to(folder).parts[0] != skip)}


def run_snippet(card: str, replacements: dict[str, str], capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    code = code_block(card, "python")
    for old, new in replacements.items():
        assert repr(old) in code
        code = code.replace(repr(old), repr(new))
    namespace: dict[str, Any] = {"__name__": "model_card_snippet"}
    exec(compile(code, "model-card-snippet", "exec"), namespace)
    assert "output" in namespace or "reward" in namespace  # it ran to the end: generated, or scored
    capsys.readouterr()
    return namespace


def logits(model: Any) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def short_sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12]


# ---------------------------------------------------------------------------------------------- cards


def test_finish_writes_a_model_card_and_names_the_base_by_hub_id(stages: Stages) -> None:
    config = json.loads((stages.sft / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == HUB_BASE  # models.record_origin, never a cache path

    card = (stages.sft / "README.md").read_text()
    meta = front_matter(card)
    assert meta["base_model"] == HUB_BASE and meta["base_model_relation"] == "adapter"
    assert meta["library_name"] == "peft" and meta["pipeline_tag"] == "text-generation"
    assert {"rlhf", "trl", "peft", "lora", "sft"} <= set(meta["tags"])
    assert meta["license"] == "apache-2.0"  # the only data card's license, as a Hub license id
    assert "datasets" not in meta  # the card's source is a local file, not a Hub dataset

    assert hub.CARD_MARKER in card
    adapter_sha = short_sha(stages.sft / "adapter_model.safetensors")
    assert f"| sft adapter (this model) | {hub.shown_path(stages.sft)} | `{adapter_sha}` |" in card
    assert yaml.safe_load(code_block(card, "yaml")) == yaml.safe_load((stages.sft / "recipe.yaml").read_text())
    metrics = json.loads((stages.sft / "metrics.json").read_text())
    assert f"| global_steps | {metrics['global_steps']} |" in card
    assert "| data.rows_kept | 16 |" in card and "log_history" not in card
    assert "### chat" in card and "- license: Apache-2.0" in card and "- format: messages" in card
    assert f"| torch | {torch.__version__} |" in card
    for library in ("transformers", "trl", "peft", "accelerate", "rlhf-pipeline"):
        assert re.search(rf"\| {library} \| \d", card), library


def test_chain_card_loads_the_chain_with_its_own_adapter_alone(stages: Stages, tiny_model_dir: Path,
                                                                capsys) -> None:
    from rlhf_pipeline.adapters import load_frozen_roles
    from rlhf_pipeline.models import load_tokenizer, resolve_source
    from rlhf_pipeline.recipe import ModelSpec

    card = (stages.chain / "README.md").read_text()
    assert front_matter(card)["base_model"] == HUB_BASE
    assert "started as a copy of it" in card
    assert f"`{short_sha(stages.sft / 'adapter_model.safetensors')}`" in card
    code = code_block(card, "python")
    assert code.count("PeftModel.from_pretrained") == 1 and "merge" not in code
    assert "revision='exp'" in code  # the recipe pushes it to me/tiny-chain@exp
    namespace = run_snippet(card, {"me/tiny-chain": str(stages.chain), HUB_BASE: str(tiny_model_dir)}, capsys)

    spec = ModelSpec(name_or_path=str(stages.chain))
    source = resolve_source(spec)
    assert source.adapter == str(stages.chain.resolve())
    assert source.lineage == [str(stages.sft.resolve()), str(stages.chain.resolve())]
    shared = load_frozen_roles({"chain": source}, spec, load_tokenizer(source, spec))["chain"]
    torch.testing.assert_close(logits(namespace["model"]), logits(shared.use("chain")), atol=1e-5, rtol=0)


def test_finish_pushes_when_the_recipe_asks(stages: Stages) -> None:
    calls = stages.chain_push
    assert calls.named("create_repo") == [("me/tiny-chain", {"private": True, "exist_ok": True})]
    assert calls.named("create_branch") == [("me/tiny-chain", {"branch": "exp", "exist_ok": True})]
    ((repo, commit),) = calls.named("create_commit")
    assert repo == "me/tiny-chain" and commit["revision"] == "exp"
    assert commit["commit_message"].startswith("rlhf-pipeline sft (recipe ")
    assert {"adapter_model.safetensors", "adapter_config.json", "README.md"} <= set(commit["files"])
    assert "stage.json" not in commit["files"]


# ---------------------------------------------------------------------------------------------- push


UPLOADED = {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "tokenizer_config.json",
            "recipe.yaml", "metrics.json", "README.md"}


def test_dry_run_writes_the_exact_upload_folder_and_commit_plan(stages: Stages, tiny_model_dir: Path, capsys) -> None:
    before = snapshot(stages.sft, skip=hub.DEFAULT_PLAN_DIR)
    assert main(["push", str(stages.sft), "--repo-id", REPO, "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert f"-> {REPO} (private)" in printed and "not uploaded: stage.json" in printed
    assert snapshot(stages.sft, skip=hub.DEFAULT_PLAN_DIR) == before

    plan_dir = stages.sft / hub.DEFAULT_PLAN_DIR
    upload = plan_dir / "upload"
    names = {p.name for p in upload.iterdir()}
    assert names >= UPLOADED
    assert not names & {"stage.json", "eval_before_training.json"}
    assert not any(name.startswith("checkpoint-") for name in names)
    assert any((stages.sft / name).is_dir() for name in ("checkpoint-1", "checkpoint-2"))  # they exist, stay local
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
    assert main(["push", str(stages.sft), "--repo-id", REPO, "--dry-run", "--revision", "v2"]) == 0
    assert json.loads((plan_dir / "commit_plan.json").read_text())["revision"] == "v2"
    other = stages.root / "not-a-plan"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    capsys.readouterr()
    assert main(["push", str(stages.sft), "--repo-id", REPO, "--dry-run", "--plan-dir", str(other)]) == 2
    assert "is not a push plan" in capsys.readouterr().err and (other / "keep.txt").is_file()


def test_push_goes_through_the_hub_api_privately_without_the_token(stages: Stages, monkeypatch, capsys) -> None:
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    calls = record_api(monkeypatch)
    before = snapshot(stages.sft)
    assert main(["push", str(stages.sft), "--repo-id", REPO, "--revision", "v1",
                 "--commit-message", "first adapter"]) == 0
    assert calls.named("create_repo") == [(REPO, {"private": True, "exist_ok": True})]
    assert calls.named("create_branch") == [(REPO, {"branch": "v1", "exist_ok": True})]
    ((repo, commit),) = calls.named("create_commit")
    assert repo == REPO and commit["revision"] == "v1" and commit["commit_message"] == "first adapter"
    assert "token" not in commit and all("token" not in kwargs for _, _, kwargs in calls.calls)
    files = commit["files"]
    assert set(files) >= UPLOADED and "stage.json" not in files
    assert not any("checkpoint" in name or "/" in name for name in files)
    assert files["adapter_model.safetensors"] == (stages.sft / "adapter_model.safetensors").read_bytes()
    assert f"ADAPTER = {REPO!r}" in files["README.md"].decode() and "revision='v1'" in files["README.md"].decode()

    assert main(["push", str(stages.sft), "--repo-id", REPO, "--public"]) == 0
    assert calls.named("create_repo")[-1] == (REPO, {"private": False, "exist_ok": True})
    assert len(calls.named("create_branch")) == 1 and calls.named("create_commit")[-1][1]["revision"] is None

    printed = capsys.readouterr()
    assert "pushed to https://huggingface.co/me/tiny-sft" in printed.out
    assert FAKE_TOKEN not in printed.out + printed.err
    assert all(FAKE_TOKEN.encode() not in data for _, _, kw in calls.calls for data in kw.get("files", {}).values())
    assert snapshot(stages.sft) == before  # a push writes nothing locally
    for folder in (stages.sft, stages.chain):
        assert all(FAKE_TOKEN.encode() not in p.read_bytes() for p in folder.rglob("*") if p.is_file())


def test_failed_push_leaves_outputs_alone_and_says_how_to_retry(stages: Stages, monkeypatch, capsys) -> None:
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    before = snapshot(stages.sft)
    record_api(monkeypatch, fail=True)
    assert main(["push", str(stages.sft), "--repo-id", REPO, "--commit-message", "try it"]) == 2
    err = capsys.readouterr().err
    assert f"retry: rlhf-pipeline push {stages.sft} --repo-id {REPO} --private --commit-message 'try it'" in err
    assert "500 Server Error" in err and FAKE_TOKEN not in err and "hf_***" in err
    assert snapshot(stages.sft) == before

    with pytest.raises(PipelineError, match="the local output is unchanged"):
        hub.push(stages.sft, REPO)
    monkeypatch.setattr(hub, "_hub_offline", lambda: True)
    with pytest.raises(PipelineError, match=r"HF_HUB_OFFLINE=1 .* rlhf-pipeline push "):
        hub.push(stages.sft, REPO)
    assert snapshot(stages.sft) == before


def test_push_keeps_an_edited_card_and_only_the_main_process_pushes(stages: Stages, tmp_path: Path,
                                                                     monkeypatch) -> None:
    import rlhf_pipeline.distributed

    edited = tmp_path / "edited"
    shutil.copytree(stages.sft, edited, ignore=shutil.ignore_patterns("checkpoint-*", ".push-plan"))
    (edited / "README.md").write_text("---\nlicense: mit\n---\n# My own words\n")
    plan = hub.plan_push(edited, REPO)
    (card,) = [f for f in plan.files if f.path_in_repo == "README.md"]
    assert card.source == edited / "README.md" and card.content is None  # uploaded as the user wrote it
    (edited / "README.md").write_text("---\nlibrary_name: peft\n---\n\n# Model Card for Model ID\n")
    (card,) = [f for f in hub.plan_push(edited, REPO).files if f.path_in_repo == "README.md"]
    assert card.source is None and hub.CARD_MARKER in card.content.decode()  # PEFT's blank template: ours instead

    calls = record_api(monkeypatch)
    monkeypatch.setattr(rlhf_pipeline.distributed, "is_main_process", lambda: False)
    assert hub.push(stages.sft, REPO) is None and hub.push(stages.sft, REPO, dry_run=True) is None
    assert calls.calls == []


def test_push_refuses_what_is_not_a_finished_model_stage(stages: Stages, tmp_path: Path, capsys) -> None:
    unfinished = tmp_path / "unfinished"
    shutil.copytree(stages.sft, unfinished, ignore=shutil.ignore_patterns("stage.json", ".push-plan"))
    assert main(["push", str(unfinished), "--repo-id", REPO, "--dry-run"]) == 2
    assert "no finished stage here (no stage.json)" in capsys.readouterr().err
    assert main(["push", str(stages.sft), "--repo-id", "not a/valid--id", "--dry-run"]) == 2
    assert "--repo-id" in capsys.readouterr().err
    assert main(["push", str(stages.sft), "--repo-id", REPO, "--plan-dir", str(tmp_path / "p")]) == 2
    assert "only with --dry-run" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------- merge


def test_merge_gives_plain_weights_with_the_same_logits(stages: Stages, tiny_model_dir: Path, tmp_path: Path,
                                                        capsys) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    merged = tmp_path / "merged"
    assert main(["merge", str(stages.sft), "--output", str(merged)]) == 0
    names = {p.name for p in merged.iterdir()}
    assert "model.safetensors" in names and "config.json" in names and "tokenizer.json" in names
    assert "adapter_config.json" not in names and not any(n.startswith(".") for n in names)
    assert not list(tmp_path.glob(".merged.tmp-*"))
    plain = AutoModelForCausalLM.from_pretrained(merged).eval()
    assert AutoTokenizer.from_pretrained(merged).pad_token_id == plain.config.pad_token_id
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), stages.sft).eval()
    torch.testing.assert_close(logits(plain), logits(adapted), atol=1e-5, rtol=0)
    assert not torch.allclose(logits(plain), logits(AutoModelForCausalLM.from_pretrained(tiny_model_dir)))

    # The chain: its adapter continued the first SFT's, so base + the chain's adapter is the whole model.
    chain = tmp_path / "merged-chain"
    assert main(["merge", str(stages.chain), "--output", str(chain)]) == 0
    step = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), stages.chain).eval()
    torch.testing.assert_close(logits(AutoModelForCausalLM.from_pretrained(chain)), logits(step), atol=1e-5, rtol=0)
    sources = json.loads((chain / "merged_from.json").read_text())
    assert sources["base_model"] == HUB_BASE and sources["lineage"] == [hub.shown_path(str(stages.sft.resolve()))]
    assert sources["adapter"]["sha256"] == short_sha(stages.chain / "adapter_model.safetensors")

    capsys.readouterr()
    assert main(["merge", str(stages.sft), "--output", str(merged)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["merge", str(stages.chain), "--output", str(merged), "--overwrite"]) == 0
    torch.testing.assert_close(logits(AutoModelForCausalLM.from_pretrained(merged)), logits(step), atol=1e-5, rtol=0)


def test_merge_refuses_a_quantized_stage_and_offers_full_precision(stages: Stages, tmp_path: Path, capsys) -> None:
    from transformers import AutoModelForCausalLM

    qlora = tmp_path / "qlora-sft"
    shutil.copytree(stages.sft, qlora, ignore=shutil.ignore_patterns("checkpoint-*", ".push-plan"))
    recipe = yaml.safe_load((qlora / "recipe.yaml").read_text())
    recipe["model"]["quantization"]["load_in_4bit"] = True
    (qlora / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))

    out = tmp_path / "merged"
    assert main(["merge", str(qlora), "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert "model.quantization.load_in_4bit" in err and "4-bit base" in err
    assert f"rlhf-pipeline merge {qlora} --output OUT --full-precision" in err
    assert not out.exists()

    assert main(["merge", str(qlora), "--output", str(out), "--full-precision"]) == 0
    reference = tmp_path / "reference"
    assert main(["merge", str(stages.sft), "--output", str(reference)]) == 0
    torch.testing.assert_close(logits(AutoModelForCausalLM.from_pretrained(out)),
                               logits(AutoModelForCausalLM.from_pretrained(reference)), atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------------- reward model


def test_reward_model_card_snippet_and_merge(stages: Stages, tiny_model_dir: Path, tmp_path: Path, capsys) -> None:
    from transformers import AutoModelForSequenceClassification

    from rlhf_pipeline.reward import RewardModel

    write_card(stages.root, "pairs", preference_rows(16), "prompt_chosen_rejected", ["rm"])
    recipe = load_recipe(_recipe(stages.root, "rm", str(stages.sft), stage="rm", cards=("pairs",)))
    rm.run(recipe)
    card = (recipe.output_dir / "README.md").read_text()
    meta = front_matter(card)
    assert meta["pipeline_tag"] == "text-classification" and "reward-model" in meta["tags"]
    assert "AutoModelForSequenceClassification.from_pretrained(BASE, num_labels=1)" in card
    assert "Reward statistics over the training answers" in card
    local = hub.shown_path(recipe.output_dir, home=False)
    namespace = run_snippet(card, {local: str(recipe.output_dir), HUB_BASE: str(tiny_model_dir)}, capsys)

    scorer = RewardModel.from_stage(recipe.output_dir)
    prompt = [{"role": "user", "content": "Describe a rainy Monday."}]
    expected = scorer.score([prompt], ["Cosy blankets, warm tea and the sound of rain on the window: lovely!"])[0]
    assert namespace["reward"] == pytest.approx(expected, abs=1e-4)

    merged = tmp_path / "merged-rm"
    assert main(["merge", str(recipe.output_dir), "--output", str(merged)]) == 0
    plain = AutoModelForSequenceClassification.from_pretrained(merged).eval()
    with torch.no_grad():
        score = plain(input_ids=torch.tensor([namespace["ids"]])).logits[0, 0].item()
    assert score == pytest.approx(expected, abs=1e-4)

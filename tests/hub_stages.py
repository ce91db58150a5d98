"""Finished stages on a base named by a Hub id, for the card, push and merge tests, and their helpers.

The base is named by a Hub id (`test-org/tiny-llama`) served from a fake local Hugging Face cache, so the
cards, adapter configs and snippets meet a real Hub id while everything stays offline. No test reaches
the Hub: the three HfApi methods a push calls are replaced by recorders. The stages are built once per
session (the fixtures are in tests/conftest.py); each test module switches the fake cache on with the
`hub_cache` fixture.
"""

from __future__ import annotations

import hashlib
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import yaml

from rlhf_pipeline import hub
from rlhf_pipeline.stages import load_recipe, rm, sft
from tests.stages.conftest import preference_rows, sft_rows, write_card

HUB_BASE = "test-org/tiny-llama"
REPO = "me/tiny-sft"
FAKE_TOKEN = "hf_FAKEtoken0123456789abcdefABCDEF"
IDS = torch.tensor([[1, 5, 17, 42, 99, 7, 2, 30]])
# What a reward model card's snippet scores.
SNIPPET_PROMPT = [{"role": "user", "content": "Describe a rainy Monday."}]
SNIPPET_ANSWER = "Cosy blankets, warm tea and the sound of rain on the window: lovely!"


def build_hub_cache(cache: Path, tiny_model_dir: Path) -> Path:
    """The tiny model as the cached Hub repo test-org/tiny-llama (offline loads resolve it from here)."""
    repo = cache / "models--test-org--tiny-llama"
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(tiny_model_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return cache


@contextmanager
def using_hub_cache(cache: Path) -> Iterator[Path]:
    """huggingface_hub (and transformers through it) look up cached repos in `cache` until the block ends."""
    import huggingface_hub.constants

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
        yield cache


def write_recipe(root: Path, name: str, model: str, hub_section: dict[str, Any] | None = None,
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
    patch.setattr(hub, "hub_offline", lambda: False)  # tests run with HF_HUB_OFFLINE=1
    return recorded


@dataclass
class Stages:
    root: Path
    sft: Path
    chain: Path  # a second SFT on top of the first: its adapter started as a copy of the first's
    chain_push: ApiCalls  # what finishing the chain stage pushed (its recipe has hub.push: true)


def build_stages(root: Path) -> Stages:
    """An SFT on the Hub base, and a second SFT on top of it whose recipe pushes it (to recorders)."""
    write_card(root, "chat", sft_rows(16), "messages", ["sft"])
    first = load_recipe(write_recipe(root, "sft", HUB_BASE))
    sft.run(first)
    with pytest.MonkeyPatch.context() as patch:
        calls = record_api(patch)
        chain = load_recipe(write_recipe(root, "chain", str(first.output_dir),
                                         {"push": True, "repo_id": "me/tiny-chain", "revision": "exp"}))
        sft.run(chain)
    return Stages(root, first.output_dir, chain.output_dir, calls)


def build_reward_model(stages: Stages) -> Path:
    """A reward model trained on top of the first SFT; returns its output folder."""
    write_card(stages.root, "pairs", preference_rows(16), "prompt_chosen_rejected", ["rm"])
    recipe = load_recipe(write_recipe(stages.root, "rm", str(stages.sft), stage="rm", cards=("pairs",)))
    rm.run(recipe)
    return recipe.output_dir


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
    assert {"output", "reward", "probabilities"} & namespace.keys()  # it ran to the end: generated, or scored
    capsys.readouterr()
    return namespace


def logits(model: Any) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def short_sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12]

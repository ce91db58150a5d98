"""Merging a finished stage's adapter into plain weights: same logits as base + adapter, chains, reward
models, quantized stages (on the tiny model under a Hub id; see tests/hub_stages.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from rlhf_pipeline.cli import main
from rlhf_pipeline.outputs import shown_path
from tests.hub_stages import (
    HUB_BASE,
    SNIPPET_ANSWER,
    SNIPPET_PROMPT,
    Stages,
    logits,
    run_snippet,
    short_sha,
)

pytestmark = pytest.mark.usefixtures("hub_cache")


def test_merge_gives_plain_weights_with_the_same_logits(hub_stages: Stages, tiny_model_dir: Path, tmp_path: Path,
                                                        capsys) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    merged = tmp_path / "merged"
    assert main(["merge", str(hub_stages.sft), "--output", str(merged)]) == 0
    names = {p.name for p in merged.iterdir()}
    assert "model.safetensors" in names and "config.json" in names and "tokenizer.json" in names
    assert "adapter_config.json" not in names and not any(n.startswith(".") for n in names)
    assert not list(tmp_path.glob(".merged.tmp-*"))
    plain = AutoModelForCausalLM.from_pretrained(merged).eval()
    assert AutoTokenizer.from_pretrained(merged).pad_token_id == plain.config.pad_token_id
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), hub_stages.sft).eval()
    torch.testing.assert_close(logits(plain), logits(adapted), atol=1e-5, rtol=0)
    assert not torch.allclose(logits(plain), logits(AutoModelForCausalLM.from_pretrained(tiny_model_dir)))

    # The chain: its adapter continued the first SFT's, so base + the chain's adapter is the whole model.
    chain = tmp_path / "merged-chain"
    assert main(["merge", str(hub_stages.chain), "--output", str(chain)]) == 0
    step = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), hub_stages.chain).eval()
    torch.testing.assert_close(logits(AutoModelForCausalLM.from_pretrained(chain)), logits(step), atol=1e-5, rtol=0)
    sources = json.loads((chain / "merged_from.json").read_text())
    assert sources["base_model"] == HUB_BASE and sources["lineage"] == [shown_path(str(hub_stages.sft.resolve()))]
    assert sources["adapter"]["sha256"] == short_sha(hub_stages.chain / "adapter_model.safetensors")

    capsys.readouterr()
    assert main(["merge", str(hub_stages.sft), "--output", str(merged)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["merge", str(hub_stages.chain), "--output", str(merged), "--overwrite"]) == 0
    torch.testing.assert_close(logits(AutoModelForCausalLM.from_pretrained(merged)), logits(step), atol=1e-5, rtol=0)


def test_merge_refuses_a_quantized_stage_and_offers_full_precision(hub_stages: Stages, tmp_path: Path, capsys) -> None:
    from transformers import AutoModelForCausalLM

    qlora = tmp_path / "qlora-sft"
    shutil.copytree(hub_stages.sft, qlora, ignore=shutil.ignore_patterns("checkpoint-*", ".push-plan"))
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
    assert main(["merge", str(hub_stages.sft), "--output", str(reference)]) == 0
    torch.testing.assert_close(logits(AutoModelForCausalLM.from_pretrained(out)),
                               logits(AutoModelForCausalLM.from_pretrained(reference)), atol=1e-6, rtol=0)


def test_merged_reward_model_scores_like_the_stage(hub_reward_model: Path, tiny_model_dir: Path, tmp_path: Path,
                                                   capsys) -> None:
    from transformers import AutoModelForSequenceClassification

    from rlhf_pipeline.reward import RewardModel

    card = (hub_reward_model / "README.md").read_text()
    local = shown_path(hub_reward_model, home=False)
    namespace = run_snippet(card, {local: str(hub_reward_model), HUB_BASE: str(tiny_model_dir)}, capsys)
    expected = RewardModel.from_stage(hub_reward_model).score([SNIPPET_PROMPT], [SNIPPET_ANSWER])[0]

    merged = tmp_path / "merged-rm"
    assert main(["merge", str(hub_reward_model), "--output", str(merged)]) == 0
    plain = AutoModelForSequenceClassification.from_pretrained(merged).eval()
    with torch.no_grad():
        score = plain(input_ids=torch.tensor([namespace["ids"]])).logits[0, 0].item()
    assert score == pytest.approx(expected, abs=1e-4)

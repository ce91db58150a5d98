"""PPO's cross-stage checks, before any weights load: the reward model is a finished RM stage and reads
token ids exactly as the policy does."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from transformers import AutoTokenizer

from rlhf_pipeline.cli import main
from rlhf_pipeline.errors import PipelineError, RecipeError
from rlhf_pipeline.outputs import StageManifest, mark_complete
from rlhf_pipeline.pipeline import validate_pipeline
from rlhf_pipeline.stages import load_recipe
from tests.stages.conftest import preference_rows, rm_with_another_tokenizer, write_card

LORA = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0}


def _fake_stage(folder: Path, stage: str, base: Path, tokenizer: Any) -> Path:
    """A folder that looks like a finished stage (its manifest and tokenizer); no weights are needed here."""
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(folder)
    mark_complete(folder, StageManifest(stage=stage, fingerprint="f" * 16, adapter=True,
                                        task="reward" if stage == "rm" else "causal-lm",
                                        base_model={"path": str(base), "revision": None, "origin": str(base),
                                                    "origin_revision": None},
                                        extra={"reward_stats": {"mean": 0.0, "std": 1.0}}))
    return folder


def _ppo_recipe(tmp_path: Path, model_dir: Path, reward_model_path: Path, name: str = "ppo") -> Path:
    write_card(tmp_path, "prompts", [{"prompt": f"Say something about topic {i}."} for i in range(8)],
               "prompt_only", ["ppo"])
    recipe = {"stage": "ppo", "model": {"name_or_path": str(model_dir), "lora": LORA},
              "data": {"train": ["prompts"], "eval_split": 0.0, "max_length": 64},
              "training": {"output_dir": str(tmp_path / "outputs" / name),
                           "reward_model_path": str(reward_model_path), "response_length": 4}}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_tokenizer_mismatch_stops_ppo_before_weights_load(tmp_path: Path, tiny_model_dir: Path,
                                                          weights_forbidden: None,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    rm_dir = rm_with_another_tokenizer(tmp_path / "outputs" / "rm", tiny_model_dir)
    recipe = _ppo_recipe(tmp_path, tiny_model_dir, rm_dir)
    assert main(["ppo", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {recipe}: training.reward_model_path: the reward model at {rm_dir} uses a "
                          "different tokenizer")
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("kind", ["sft", "unfinished"])
def test_reward_model_path_must_be_a_finished_rm_stage(kind: str, tmp_path: Path, tiny_model_dir: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "outputs" / "not-an-rm"
    if kind == "sft":
        _fake_stage(folder, "sft", tiny_model_dir, AutoTokenizer.from_pretrained(tiny_model_dir))
        words = "holds a finished 'sft' stage, not a reward model"
    else:
        (folder / "checkpoint-4").mkdir(parents=True)  # an rm stage that was interrupted
        words = "is not a finished rm or prm stage (no stage.json)"
    recipe = _ppo_recipe(tmp_path, tiny_model_dir, folder)
    with pytest.raises(PipelineError) as info:
        load_recipe(recipe)  # at validate time: no torch, no weights
    assert str(info.value).startswith(f"{recipe}: training.reward_model_path: {folder} {words}")

    assert main(["validate", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "training.reward_model_path" in err and len(err.strip().splitlines()) == 1


def test_an_rm_the_pipeline_will_finish_first_is_allowed(tmp_path: Path, tiny_model_dir: Path) -> None:
    """In a chain the RM folder may hold an interrupted run: the pipeline's rm step finishes it before PPO."""
    rm_out = tmp_path / "outputs" / "rm"
    (rm_out / "checkpoint-2").mkdir(parents=True)
    write_card(tmp_path, "pairs", preference_rows(8), "prompt_chosen_rejected", ["rm"])
    rm_recipe = {"stage": "rm", "model": {"name_or_path": str(tiny_model_dir), "lora": LORA},
                 "data": {"train": ["pairs"], "max_length": 64}, "training": {"output_dir": str(rm_out)}}
    (tmp_path / "rm.yaml").write_text(yaml.safe_dump(rm_recipe))
    ppo = _ppo_recipe(tmp_path, tiny_model_dir, rm_out)
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text(yaml.safe_dump({"stages": [{"stage": "rm", "recipe": "rm.yaml"},
                                                   {"stage": "ppo", "recipe": ppo.name}]}))
    assert [r.stage for r in validate_pipeline(pipeline)] == ["rm", "ppo"]
    with pytest.raises(RecipeError, match="is not a finished rm or prm stage"):
        load_recipe(ppo)  # on its own, the same recipe cannot run yet


def test_normalising_rewards_needs_the_rm_stages_statistics(tmp_path: Path, tiny_model_dir: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    rm_dir = _fake_stage(tmp_path / "outputs" / "rm", "rm", tiny_model_dir, tokenizer)
    manifest = json.loads((rm_dir / "stage.json").read_text())
    manifest["extra"] = {}
    (rm_dir / "stage.json").write_text(json.dumps(manifest))
    recipe = _ppo_recipe(tmp_path, tiny_model_dir, rm_dir)
    assert main(["ppo", str(recipe), "training.normalize_reward=true"]) == 2
    err = capsys.readouterr().err
    assert "training.normalize_reward: the rm stage in" in err and "set normalize_reward: false" in err


def test_ptx_needs_both_its_coefficient_and_sft_format_demonstrations(tmp_path: Path, tiny_model_dir: Path) -> None:
    from tests.stages.conftest import sft_rows

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    rm = _fake_stage(tmp_path / "rm", "rm", tiny_model_dir, tokenizer)
    path = _ppo_recipe(tmp_path, tiny_model_dir, rm)
    write_card(tmp_path, "demos", sft_rows(8), "messages", ["sft"])
    write_card(tmp_path, "pairs", preference_rows(8), "prompt_chosen_rejected", ["rm"])
    with pytest.raises(RecipeError, match=r"data\.ptx: training\.ptx_coef > 0 mixes in the SFT loss"):
        load_recipe(path, ["training.ptx_coef=0.5"])
    with pytest.raises(RecipeError, match=r"training\.ptx_coef: data\.ptx lists demonstrations but ptx_coef is 0"):
        load_recipe(path, ["data.ptx=[demos]"])
    with pytest.raises(RecipeError, match=r"data\.ptx\[0\]: card 'pairs' has format 'prompt_chosen_rejected', but "
                                          r"the ppo stage takes messages, prompt_completion there"):
        load_recipe(path, ["data.ptx=[pairs]", "training.ptx_coef=0.5"])
    recipe = load_recipe(path, ["data.ptx=[demos]", "training.ptx_coef=0.5"])
    assert [card.name for card in recipe.cards] == ["prompts", "demos"]
    sft = tmp_path / "sft.yaml"
    sft.write_text(yaml.safe_dump({"stage": "sft", "model": {"name_or_path": str(tiny_model_dir)},
                                   "data": {"train": ["demos"], "ptx": ["demos"]},
                                   "training": {"output_dir": str(tmp_path / "out")}}))
    with pytest.raises(RecipeError, match=r"data\.ptx: the sft stage does not take ptx cards; remove the key"):
        load_recipe(sft)

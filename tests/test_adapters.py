"""One base, every stage an adapter on it: what later stages load keeps what earlier stages learned.

The chain runs for real on the tiny model: an SFT stage, then reward models trained from it in full
precision and in 4-bit (QLoRA). Later stages must see the SFT adapter unmerged: merging it into a 4-bit
base re-quantises the weights and erases an update smaller than a quantisation step, which is what the
merge-into-4-bit helper below (the loading the pipeline used to do) shows against the new loading.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from rlhf_pipeline.adapters import SharedBase, load_frozen_roles
from rlhf_pipeline.models import (
    REWARD,
    keep_4bit_gradients_exact,
    load_base,
    load_tokenizer,
    trainable_model,
)
from rlhf_pipeline.ppo.roles import CRITIC, POLICY, REFERENCE, build_ppo_model
from rlhf_pipeline.recipe import ModelSpec, QuantizationSpec
from rlhf_pipeline.reward import RewardModel
from rlhf_pipeline.sources import resolve_source
from rlhf_pipeline.stages import load_recipe, rm, sft
from tests.stages.conftest import preference_rows, sft_rows, write_card

pytestmark = pytest.mark.filterwarnings(
    "ignore:`(gradient_checkpointing_enable|is_gradient_checkpointing)` is deprecated:FutureWarning")

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
LORA = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0}
NF4 = {"load_in_4bit": True, "bnb_4bit_compute_dtype": "float32"}
IDS = torch.tensor([[1, 50, 60, 70, 80, 90, 100, 2], [1, 110, 120, 130, 140, 150, 160, 2]])


def _recipe(folder: Path, stage: str, model: dict[str, Any], training: dict[str, Any], cards: list[str]) -> Path:
    trainer = {} if stage == "ppo" else {"num_train_epochs": 2, "per_device_eval_batch_size": 8,
                                          "eval_strategy": "no", "report_to": "none"}
    recipe = {"stage": stage, "model": {"lora": LORA} | model,
              "data": {"train": cards, "eval_split": 0.0 if stage == "ppo" else 0.25, "max_length": 128},
              "training": {"per_device_train_batch_size": 8, "logging_steps": 1, "save_steps": 100, "seed": 0}
              | trainer | training}
    path = folder / f"{Path(training['output_dir']).name}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


@dataclasses.dataclass
class Chain:
    base: Path
    sft: Path
    rm: Path
    rm_4bit: Path
    rm_4bit_metrics: dict[str, Any]
    sft_strong: Path  # trained at a high rate: an SFT whose KL to the base sampling can measure


@pytest.fixture(scope="module")
def chain(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Chain:
    """SFT (fp32), then an RM from it in fp32 and one in 4-bit: the real stages, as a user runs them."""
    folder = tmp_path_factory.mktemp("one-base")
    write_card(folder, "chat", sft_rows(48), "messages", ["sft"])
    write_card(folder, "pairs", preference_rows(64), "prompt_chosen_rejected", ["rm"])
    out = folder / "outputs"
    sft_training = {"output_dir": str(out / "sft"), "learning_rate": 2e-4}  # the demo's SFT rate: a small update
    sft.run(load_recipe(_recipe(folder, "sft", {"name_or_path": str(tiny_model_dir)}, sft_training, ["chat"])))
    rm_training = {"learning_rate": 1e-2, "num_train_epochs": 3}
    rm.run(load_recipe(_recipe(folder, "rm", {"name_or_path": str(out / "sft")},
                               rm_training | {"output_dir": str(out / "rm")}, ["pairs"])))
    metrics = rm.run(load_recipe(_recipe(folder, "rm", {"name_or_path": str(out / "sft"), "quantization": NF4},
                                         rm_training | {"output_dir": str(out / "rm-4bit")}, ["pairs"])))
    strong = {"output_dir": str(out / "sft-strong"), "learning_rate": 5e-3, "num_train_epochs": 3}
    sft.run(load_recipe(_recipe(folder, "sft", {"name_or_path": str(tiny_model_dir)}, strong, ["chat"])))
    return Chain(tiny_model_dir, out / "sft", out / "rm", out / "rm-4bit", metrics, out / "sft-strong")


def _spec(name: str | Path, quantized: bool) -> ModelSpec:
    quantization = QuantizationSpec(**NF4) if quantized else QuantizationSpec()
    return ModelSpec(name_or_path=str(name), quantization=quantization)


def _logits(model: Any) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS, attention_mask=torch.ones_like(IDS)).logits.float()


def _base_and_sft_logits(chain: Chain, quantized: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The base's logits and the SFT stage's, as a later stage loads it (a role on the base, unmerged)."""
    spec = _spec(chain.sft, quantized)
    source = resolve_source(spec)
    shared = load_frozen_roles({"base": resolve_source(_spec(chain.base, quantized)), "sft": source}, spec,
                               load_tokenizer(source, spec))
    assert shared["base"] is shared["sft"]  # one base in memory for both
    return _logits(shared["base"].use("base")), _logits(shared["sft"].use("sft"))


def _merged_into_4bit(chain: Chain) -> torch.Tensor:
    """What loading did before: the SFT LoRA merged into the NF4 base (dequantise, add, re-quantise)."""
    spec = _spec(chain.sft, quantized=True)
    source = resolve_source(spec)
    base = load_base(source, spec, load_tokenizer(source, spec))
    return _logits(PeftModel.from_pretrained(base, chain.sft).merge_and_unload())


def _kept(effect: torch.Tensor, reference: torch.Tensor) -> float:
    """The share of `reference` (the fp32 SFT effect on the logits) that `effect` carries: its projection on it.

    A projection, not a ratio of sizes: re-quantising a merged block also moves logits at random, which a
    ratio of sizes would count as kept update.
    """
    return float((effect * reference).sum() / (reference * reference).sum())


def test_4bit_later_stages_keep_the_sft_update_that_a_merge_erases(chain: Chain) -> None:
    base_fp32, sft_fp32 = _base_and_sft_logits(chain, quantized=False)
    base_nf4, sft_nf4 = _base_and_sft_logits(chain, quantized=True)
    effect = sft_fp32 - base_fp32
    assert effect.abs().max() > 1e-3  # a thousand times float noise: SFT changed the model
    kept = _kept(sft_nf4 - base_nf4, effect)
    merged = _kept(_merged_into_4bit(chain) - base_nf4, effect)
    print(f"SFT effect {effect.abs().mean():.5f}; kept in 4-bit: unmerged {kept:.3f}, merged into NF4 {merged:.3f}")
    assert kept >= 0.8
    assert merged < 0.5


def test_4bit_reward_backbone_and_ppo_reference_start_from_the_sft_model(chain: Chain) -> None:
    """The rm stage's model and PPO's reference, as each stage builds them in 4-bit, carry the SFT update."""
    spec = dataclasses.replace(_spec(chain.sft, quantized=True), lora=dataclasses.replace(
        ModelSpec(name_or_path="x").lora, **LORA))
    source = resolve_source(spec)
    tokenizer = load_tokenizer(source, spec)
    reward_model = trainable_model(load_base(source, spec, tokenizer, task=REWARD), spec, REWARD,
                                   continues=source.adapter).eval()
    base = load_base(source, spec, tokenizer).eval()
    with torch.no_grad():
        hidden = reward_model.get_base_model().model(input_ids=IDS).last_hidden_state
        base_hidden = base.model(input_ids=IDS).last_hidden_state
    fp32 = dataclasses.replace(spec, quantization=QuantizationSpec())
    fp32_base = load_base(source, fp32, tokenizer).eval()
    fp32_sft = PeftModel.from_pretrained(load_base(source, fp32, tokenizer), chain.sft).eval()
    with torch.no_grad():
        fp32_effect = (fp32_sft.get_base_model().model(input_ids=IDS).last_hidden_state
                       - fp32_base.model(input_ids=IDS).last_hidden_state).abs().mean()
    assert (hidden - base_hidden).abs().mean() / fp32_effect >= 0.8

    reward_source = resolve_source(dataclasses.replace(spec, name_or_path=str(chain.rm_4bit)))
    model = build_ppo_model(source, reward_source, spec, tokenizer).eval()
    _, sft_fp32 = _base_and_sft_logits(chain, quantized=False)
    base_fp32 = _logits(fp32_base)
    reference = model(REFERENCE, IDS, torch.ones_like(IDS))
    assert (reference - _logits(base)).abs().mean() / (sft_fp32 - base_fp32).abs().mean() >= 0.8


def _held_out_pairs(recipe_path: Path, tokenizer: Any) -> Any:
    from rlhf_pipeline.data.loading import load_datasets
    from rlhf_pipeline.stages.rm import _encode_pairs

    recipe = load_recipe(recipe_path)
    datasets, _ = load_datasets(recipe, tokenizer)
    return _encode_pairs(datasets["eval"], tokenizer)


def test_4bit_rm_accuracy_is_the_accuracy_of_the_rm_ppo_loads(chain: Chain) -> None:
    metrics = chain.rm_4bit_metrics
    spec = _spec(chain.sft, quantized=True)
    source, reward_source = resolve_source(spec), resolve_source(_spec(chain.rm_4bit, quantized=True))
    tokenizer = load_tokenizer(source, spec)
    lora_spec = dataclasses.replace(spec, lora=dataclasses.replace(spec.lora, **LORA))
    model = build_ppo_model(source, reward_source, lora_spec, tokenizer).eval()
    pairs = _held_out_pairs(chain.rm_4bit / "recipe.yaml", tokenizer)
    scorer = RewardModel(lambda ids, mask: model.last_scores("reward", ids, mask), tokenizer)
    chosen = scorer.score_ids(list(pairs["chosen_ids"]))
    rejected = scorer.score_ids(list(pairs["rejected_ids"]))
    accuracy = sum(c > r for c, r in zip(chosen, rejected, strict=True)) / len(chosen)
    assert accuracy == metrics["eval_accuracy"]
    torch.testing.assert_close(torch.tensor(chosen), torch.tensor(metrics["eval"]["chosen_rewards"]),
                               atol=1e-4, rtol=1e-4)


def test_full_precision_roles_equal_the_merged_models(chain: Chain) -> None:
    """Reference, policy at step 0 and reward model: the same numbers as the models merged in fp32."""
    spec = dataclasses.replace(_spec(chain.sft, quantized=False), lora=dataclasses.replace(
        ModelSpec(name_or_path="x").lora, **LORA))
    source, reward_source = resolve_source(spec), resolve_source(_spec(chain.rm, quantized=False))
    tokenizer = load_tokenizer(source, spec)
    stats = json.loads((chain.rm / "stage.json").read_text())["extra"]["reward_stats"]
    model = build_ppo_model(source, reward_source, spec, tokenizer, (stats["mean"], stats["std"])).eval()
    mask = torch.ones_like(IDS)

    merged_sft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(chain.base), chain.sft)
    expected = _logits(merged_sft.merge_and_unload().eval())
    with torch.no_grad():
        torch.testing.assert_close(model(REFERENCE, IDS, mask), expected, atol=1e-4, rtol=0)
        torch.testing.assert_close(model(POLICY, IDS, mask), expected, atol=1e-4, rtol=0)

    classifier = AutoModelForSequenceClassification.from_pretrained(chain.base, num_labels=1)
    classifier.config.pad_token_id = tokenizer.pad_token_id
    merged_rm = PeftModel.from_pretrained(classifier, chain.rm).merge_and_unload().eval()
    with torch.no_grad():
        scores = merged_rm(input_ids=IDS, attention_mask=mask).logits.squeeze(-1)
        torch.testing.assert_close(model.last_scores("reward", IDS, mask), scores, atol=1e-4, rtol=0)
        values = model(CRITIC, IDS, mask)[:, -1]  # the critic's value at the last token, before any PPO step
        torch.testing.assert_close(values, (scores - stats["mean"]) / stats["std"], atol=1e-4, rtol=0)


def test_ppo_holds_one_copy_of_the_base(chain: Chain) -> None:
    spec = dataclasses.replace(_spec(chain.sft, quantized=False), lora=dataclasses.replace(
        ModelSpec(name_or_path="x").lora, **LORA))
    source, reward_source = resolve_source(spec), resolve_source(_spec(chain.rm, quantized=False))
    model = build_ppo_model(source, reward_source, spec, load_tokenizer(source, spec))
    base_numel = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(chain.base).parameters())
    frozen = {p.untyped_storage().data_ptr(): p.numel() for name, p in model.named_parameters()
              if "lora_" not in name and not name.startswith("heads.")}
    assert sum(frozen.values()) == base_numel
    assert sorted(model.roles) == sorted([REFERENCE, POLICY, "reward", CRITIC]) and sorted(model.trainable) == [
        CRITIC, POLICY]


@pytest.mark.parametrize("checkpointing", [False, True])
def test_ppo_checkpoints_activations_of_a_full_precision_base_when_asked(chain: Chain, checkpointing: bool) -> None:
    """Activation checkpointing reaches PPO's base whatever its precision (k-bit preparation turned it on only for
    quantized bases)."""
    spec = dataclasses.replace(_spec(chain.sft, quantized=False), lora=dataclasses.replace(
        ModelSpec(name_or_path="x").lora, **LORA))
    source, reward_source = resolve_source(spec), resolve_source(_spec(chain.rm, quantized=False))
    model = build_ppo_model(source, reward_source, spec, load_tokenizer(source, spec),
                            gradient_checkpointing=checkpointing)
    assert model.model.get_base_model().is_activation_checkpointing == checkpointing


def test_4bit_lora_gradients_match_a_dequantised_fp32_model(chain: Chain) -> None:
    """bitsandbytes repacks 4-bit weights for a bf16 kernel on its first no-grad eval forward (on CPUs with
    AVX512-BF16); the training paths switch that off, so LoRA gradients stay those of the dequantised model."""
    import bitsandbytes as bnb

    sys.path.insert(0, str(BENCHMARKS))
    from gpu_probes import dequantised_twin  # the GPU check (benchmarks/gpu_check.py) makes this check on GPUs

    spec = dataclasses.replace(_spec(chain.base, quantized=True), lora=dataclasses.replace(
        ModelSpec(name_or_path="x").lora, **LORA))
    source = resolve_source(spec)
    tokenizer = load_tokenizer(source, spec)
    quantized = trainable_model(load_base(source, spec, tokenizer), spec)
    dense = dequantised_twin(quantized, str(chain.base), spec)

    grads = []
    for model in (quantized, dense):
        model.eval()
        _logits(model)  # a no-grad eval pass first, as the SFT stage's evaluation before training does
        model.train()
        model(input_ids=IDS, labels=IDS).loss.backward()
        grads.append(torch.cat([p.grad.flatten() for n, p in model.named_parameters() if p.grad is not None]))
    cosine = torch.nn.functional.cosine_similarity(grads[0], grads[1], dim=0)
    assert cosine > 0.999, cosine
    keep_4bit_gradients_exact(quantized)  # idempotent
    assert all(not m.support_avx512bf16_for_cpu for m in quantized.modules() if isinstance(m, bnb.nn.Linear4bit))


def test_a_reward_role_on_a_base_without_an_rm_stage_is_refused(chain: Chain) -> None:
    from rlhf_pipeline.errors import PipelineError

    spec = _spec(chain.sft, quantized=False)
    with pytest.raises(PipelineError, match="not a finished rm stage"):
        load_frozen_roles({"reward": resolve_source(spec)}, spec, load_tokenizer(resolve_source(spec), spec),
                          scorers=frozenset({"reward"}))


def test_shared_base_switches_roles_and_keeps_trainable_grads(chain: Chain) -> None:
    spec = _spec(chain.sft, quantized=False)
    source = resolve_source(spec)
    shared = SharedBase(load_base(source, spec, load_tokenizer(source, spec)))
    shared.add_role("bare")
    shared.add_role("sft", chain.sft)
    shared.add_role("copy", chain.sft, trainable=True)
    bare, sft_logits = _logits(shared.use("bare")), _logits(shared.use("sft"))
    assert not torch.allclose(bare, sft_logits)
    torch.testing.assert_close(_logits(shared.use("copy")), sft_logits)
    torch.testing.assert_close(_logits(shared.use("bare")), bare)
    trainable = {n for n, p in shared.named_parameters() if p.requires_grad}
    assert trainable and all(".copy." in n for n in trainable)
    with pytest.raises(ValueError, match="exists already"):
        shared.add_role("sft", chain.sft)


def test_saving_a_role_never_looks_its_base_up_on_the_hub(chain: Chain, tmp_path: Path) -> None:
    """A finished stage's adapter names its base by Hub id; the role names the folder the base was loaded from,
    so PEFT's save does not look the id up (or fetch its config) to decide about embedding layers."""
    import shutil
    import warnings

    published = tmp_path / "sft"
    shutil.copytree(chain.sft, published)
    config = json.loads((published / "adapter_config.json").read_text())
    (published / "adapter_config.json").write_text(json.dumps(config | {"base_model_name_or_path": "org/published"}))
    spec = _spec(chain.sft, quantized=False)
    source = resolve_source(spec)
    shared = SharedBase(load_base(source, spec, load_tokenizer(source, spec)))
    shared.add_role("reference", published)
    shared.add_role("policy", published, trainable=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        shared.save_adapter("policy", tmp_path / "saved")
    assert not [w for w in caught if "org/published" in str(w.message)], [str(w.message) for w in caught]
    assert shared.model.peft_config["policy"].base_model_name_or_path == str(source.path)


def test_eval_in_4bit_measures_the_sft_models_kl_to_the_base(chain: Chain, tmp_path: Path) -> None:
    """`rlhf-pipeline eval` with a 4-bit base: base vs the SFT stage, KL(SFT ‖ base) as in full precision."""
    from rlhf_pipeline.cli import main

    topics = ("tea", "rain", "my cake", "the park", "dinner", "the train")
    write_card(tmp_path, "prompts", [{"prompt": f"Tell me about {t}, part {i}."} for t in topics for i in range(8)],
               "prompt_only", ["eval"])
    recipe = {"stage": "eval", "model": {"name_or_path": str(chain.base)},
              "data": {"train": ["prompts"], "eval_split": 0.0, "max_length": 64}, "judge": {"type": "vader"},
              "evaluation": {"output_dir": str(tmp_path / "eval"), "policy": str(chain.sft_strong),
                             "max_new_tokens": 12, "temperature": 1.0, "bootstrap_samples": 100}}
    path = tmp_path / "eval.yaml"
    path.write_text(yaml.safe_dump(recipe))
    kl = {}
    for name, overrides in (("fp32", []), ("nf4", ["model.quantization.load_in_4bit=true",
                                                   "model.quantization.bnb_4bit_compute_dtype=float32"])):
        assert main(["eval", str(path), f"evaluation.output_dir={tmp_path / name}", *overrides]) == 0
        kl[name] = json.loads((tmp_path / name / "eval.json").read_text())["policies"]["policy"]["kl"]["mean"]
    print(f"KL(SFT || base) per answer: fp32 {kl['fp32']:.5f}, 4-bit {kl['nf4']:.5f}")
    assert kl["fp32"] > 0
    assert kl["nf4"] >= 0.8 * kl["fp32"]


def test_pushed_ppo_policy_loads_alone_on_the_plain_base(chain: Chain, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The PPO stage's pushed folder is the whole policy: one PeftModel.from_pretrained on the plain base."""
    from rlhf_pipeline.cli import main
    from rlhf_pipeline.stages import common, ppo

    trained: dict[str, torch.Tensor] = {}
    finish = common.finish

    def finish_and_probe(recipe: Any, loaded: Any, model: SharedBase, *args: Any, **kwargs: Any) -> Any:
        with torch.no_grad():
            trained["logits"] = model(POLICY, IDS, torch.ones_like(IDS))
        return finish(recipe, loaded, model, *args, **kwargs)

    monkeypatch.setattr(common, "finish", finish_and_probe)
    write_card(tmp_path, "prompts", [{"prompt": f"How was {t}?"} for t in ("tea", "rain", "my cake", "the park",
                                                                           "dinner", "the train", "work", "lunch")],
               "prompt_only", ["ppo"])
    out = tmp_path / "ppo"
    ppo.run(load_recipe(_recipe(tmp_path, "ppo", {"name_or_path": str(chain.sft)}, {
        "output_dir": str(out), "reward_model_path": str(chain.rm), "per_device_train_batch_size": 4,
        "total_episodes": 8, "response_length": 6, "learning_rate": 1e-2, "normalize_reward": True,
        "disable_tqdm": True}, ["prompts"])))
    assert main(["push", str(out), "--repo-id", "me/tiny-ppo", "--dry-run", "--plan-dir", str(tmp_path / "plan")]) == 0
    upload = tmp_path / "plan" / "upload"
    config = json.loads((upload / "adapter_config.json").read_text())
    assert config["task_type"] == "CAUSAL_LM" and not (upload / "value_model").exists()
    policy = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(chain.base), upload).eval()
    torch.testing.assert_close(_logits(policy), trained["logits"], atol=1e-5, rtol=0)
    sft_only = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(chain.base), chain.sft).eval()
    assert not torch.allclose(_logits(sft_only), trained["logits"], atol=1e-4)  # PPO moved the policy

"""The memory model's rows: LoRA counts against PEFT's, quantized weights, activations per kernel, ZeRO-3,
and PPO's one base copy with four adapters."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from rlhf_pipeline.estimate import (
    GIB,
    Architecture,
    Setup,
    estimate,
    estimate_recipe,
    lora_params,
    parse_memory,
    targeted_linears,
)
from tests.estimate.conftest import LLAMA2_7B, LLAMA31_8B, REPO, SMOLLM2, hub_cache

# PEFT itself still calls these transformers methods by their old names.
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")


def test_lora_count_is_rank_times_in_plus_out_per_targeted_linear(tiny_model_dir: Path) -> None:
    """Checked against PEFT's own count on the tiny model, for all-linear and for a name list."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    arch = Architecture.from_config(json.loads((tiny_model_dir / "config.json").read_text()))
    for targets in ("all-linear", ["q_proj", "v_proj"]):
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                               LoraConfig(r=8, target_modules=targets, task_type="CAUSAL_LM"))
        trainable, _ = model.get_nb_trainable_parameters()
        setup = Setup(stage="sft", arch=arch, lora_r=8, lora_targets=targets)
        assert lora_params(setup, arch, "lm") == trainable
    smol = Architecture.from_config(SMOLLM2)
    assert lora_params(Setup(stage="sft", arch=smol, lora_r=16), smol, "lm") == 4_884_480
    assert {lin.name for lin in targeted_linears(smol, ".*self_attn\\.(q|v)_proj")} == {"q_proj", "v_proj"}


def test_layers_to_transform_counts_only_the_adapted_blocks(tiny_model_dir: Path) -> None:
    """The adapter's size follows PEFT's count (through our trainable_model); saved activations stop at the
    lowest adapted block, and blocks between adapted ones keep less than adapted ones."""
    from transformers import AutoModelForCausalLM

    from rlhf_pipeline.models import trainable_model
    from rlhf_pipeline.recipe import LoraSpec, ModelSpec

    arch = Architecture.from_config(json.loads((tiny_model_dir / "config.json").read_text()))
    spec = ModelSpec(name_or_path=str(tiny_model_dir), lora=LoraSpec(r=8, layers_to_transform=[1]))
    model = trainable_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), spec)
    trainable, _ = model.get_nb_trainable_parameters()
    assert lora_params(Setup(stage="sft", arch=arch, lora_r=8, lora_layers=(1,)), arch, "lm") == trainable
    assert 2 * trainable == lora_params(Setup(stage="sft", arch=arch, lora_r=8), arch, "lm")

    smol = Architecture.from_config(SMOLLM2)
    base = Setup(stage="sft", arch=smol, device="cpu", dtype="float32", mixed_precision=False, micro_batch=4,
                 seq_len=256, lora_dropout=0.0)
    act = {layers: next(r.bytes for r in estimate(dataclasses.replace(base, lora_layers=layers)).rows
                        if r.name == "activations")
           for layers in (None, tuple(range(10, 30)), tuple(range(20, 30)), (20, 29), (28, 29))}
    ten_blocks = act[None] - act[tuple(range(10, 30))]
    assert ten_blocks > 0 and act[tuple(range(10, 30))] - act[tuple(range(20, 30))] == pytest.approx(ten_blocks)
    assert act[(28, 29)] < act[(20, 29)] < act[tuple(range(20, 30))]


def test_nf4_with_double_quantization_costs_4_127_bits_per_weight() -> None:
    arch = Architecture.from_config(LLAMA2_7B)
    setup = Setup(stage="sft", arch=arch, quantization="4bit", double_quant=True)
    linear_row = estimate(setup).rows[0]
    assert linear_row.bytes * 8 / arch.block_linear_params == pytest.approx(4.127, abs=0.001)
    no_dq = estimate(Setup(stage="sft", arch=arch, quantization="4bit", double_quant=False)).rows[0]
    assert no_dq.bytes * 8 / arch.block_linear_params == pytest.approx(4.5)
    # embeddings and lm_head stay unquantized and k-bit preparation makes them fp32: 2 × 131M × 4 B
    assert estimate(setup).rows[1].bytes == pytest.approx((2 * 32000 * 4096 + 65 * 4096) * 4)


def test_attention_kernels_and_packing_change_what_each_layer_keeps() -> None:
    """SDPA keeps a float copy of the mask in every layer (b·s² per micro-batch padded, (b·s)² packed, since
    padding-free packing is one flattened row) and repeats k/v to all heads; flash attention keeps neither."""
    arch = Architecture.from_config(SMOLLM2)
    base = Setup(stage="sft", arch=arch, device="gpu", micro_batch=4, seq_len=1024, lora_dropout=0.0)
    act = {name: next(r.bytes for r in estimate(setup).rows if r.name == "activations") for name, setup in {
        "padded": base, "packed": dataclasses.replace(base, packing=True),
        "flash": dataclasses.replace(base, attn="flash_attention_2", packing=True)}.items()}
    layers, ab = 30, 2
    assert act["packed"] - act["padded"] == pytest.approx(layers * ab * (4 * 1024) ** 2 - layers * ab * 4 * 1024**2)
    repeated_kv = layers * 4 * 1024 * ab * 2 * (arch.q_dim - arch.kv_dim)
    assert act["padded"] - act["flash"] == pytest.approx(layers * ab * 4 * 1024**2 + repeated_kv)


def test_zero3_shards_weights_and_states_over_the_gpus() -> None:
    arch = Architecture.from_config(LLAMA2_7B)
    alone = estimate(Setup(stage="sft", arch=arch, lora_r=None))
    sharded = estimate(Setup(stage="sft", arch=arch, lora_r=None, zero=3, num_devices=8))
    by_name = {r.name: r.bytes for r in sharded.rows}
    assert by_name["weights"] == pytest.approx(alone.rows[0].bytes / 8)
    assert by_name["optimizer"] == pytest.approx(arch.total_params() * (8 + 4) / 8)  # fp32 m, v + master
    assert by_name["gradients"] == pytest.approx(arch.total_params() * 2 / 8)


def test_ppo_holds_one_base_copy_four_adapters_and_a_kv_cache_per_rollout_chunk() -> None:
    arch = Architecture.from_config(SMOLLM2)
    setup = Setup(stage="ppo", arch=arch, device="cpu", dtype="float32", mixed_precision=False, lora_dropout=0.0,
                  lora_r=16, micro_batch=8, seq_len=96, response_length=32, rollout_batch=16, forward_chunk=16)
    result = estimate(setup)
    rows = {r.name: r.bytes for r in result.rows}
    assert [name for name in rows if name.startswith("weights")] == ["weights base (all four roles)"]
    assert rows["weights base (all four roles)"] == pytest.approx(arch.total_params("lm") * 4)
    adapter = lora_params(setup, arch, "lm")
    assert rows["frozen adapters (reference, reward model)"] == pytest.approx((2 * adapter + 576 + 1) * 4)
    assert rows["optimizer critic (+ value head)"] == pytest.approx((adapter + 577) * 8)
    kv_cache = 2 * 30 * 3 * 64 * 96 * 16 * 4  # 2 · layers · kv heads · head dim · tokens · rows · fp32
    assert result.phases["generation"] > kv_cache
    assert set(result.phases) == {"generation", "scoring", "optimisation"}
    # one role's activations at a time: the policy's backward runs before the critic's forward
    sft = estimate(dataclasses.replace(setup, stage="sft", seq_len=96))
    assert result.phase == "optimisation"
    assert result.phases["optimisation"] < 1.5 * sum(r.bytes for r in sft.rows if r.name == "activations")


def test_ppo_under_zero3_gathers_the_whole_base_for_generation() -> None:
    """The base is sharded for training and scoring, and whole on every GPU while generate() samples."""
    arch = Architecture.from_config(LLAMA31_8B)
    setup = Setup(stage="ppo", arch=arch, lora_r=16, num_devices=8, zero=2, micro_batch=4, seq_len=1024,
                  response_length=256, rollout_batch=32, forward_chunk=8)
    zero2, zero3 = estimate(setup), estimate(dataclasses.replace(setup, zero=3))
    base = arch.total_params("lm") * 2  # bf16
    rows = {r.name: r.bytes for r in zero3.rows}
    assert rows["weights base (all four roles)"] == pytest.approx(base / 8)
    assert zero3.phases["generation"] - zero2.phases["generation"] == pytest.approx(base * 7 / 8)
    assert zero3.phases["optimisation"] == pytest.approx(zero2.phases["optimisation"])
    offloaded = estimate(dataclasses.replace(setup, zero=3, offload_params=True, offload_optimizer=True))
    assert offloaded.phases["generation"] - zero2.phases["generation"] == pytest.approx(base)


def test_the_8b_qlora_ppo_recipe_holds_one_4bit_base_per_gpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The shipped QLoRA PPO recipe: one NF4 copy of Llama 3.1 8B per GPU, far under an 80 GB GPU."""
    monkeypatch.setenv("HF_HUB_CACHE", str(hub_cache(tmp_path / "hub", "meta-llama/Llama-3.1-8B-Instruct",
                                                      LLAMA31_8B)))
    result = estimate_recipe(REPO / "recipes" / "llama-3.1-8b-qlora" / "ppo.yaml", device="gpu", num_devices=8,
                             device_memory=parse_memory("80GB"), zero=2, base="meta-llama/Llama-3.1-8B-Instruct")
    weights = [r for r in result.rows if r.name.startswith("weights")]
    assert all("base (all four roles)" in r.name for r in weights)  # NF4 linears + fp32 embeddings/head, once
    assert sum(r.bytes for r in weights) < 8 * GIB
    assert result.fits and result.peak < 40 * GIB

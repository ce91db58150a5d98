"""The memory estimator: parameter arithmetic, the verdict, config lookup, and predictions against measured peaks.

The measured tests run `benchmarks/memory_probe.py` in a subprocess: one SFT optimizer step of the stage at
the recipe's micro-batch with rows that fill `data.max_length`, peak RSS minus the process baseline (libraries
imported before any weights load). glibc is told to return freed blocks at once (MALLOC_MMAP_THRESHOLD_), so
RSS follows the live tensors — the weights, states and activations the estimate predicts; with the default
allocator the heap keeps 0-1.7× the activations on top (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from rlhf_pipeline import cli, embedded
from rlhf_pipeline.errors import PipelineError
from rlhf_pipeline.estimate import (
    GIB,
    Architecture,
    Setup,
    cheapest_fix,
    estimate,
    estimate_recipe,
    find_config,
    lora_params,
    parse_memory,
    targeted_linears,
)

# PEFT itself still calls these transformers methods by their old names.
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")

REPO = Path(__file__).resolve().parent.parent
PROBE = REPO / "benchmarks" / "memory_probe.py"
SMOLLM2 = {"model_type": "llama", "hidden_size": 576, "intermediate_size": 1536, "num_attention_heads": 9,
           "num_hidden_layers": 30, "num_key_value_heads": 3, "head_dim": 64, "vocab_size": 49152,
           "tie_word_embeddings": True}
LLAMA2_7B = {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008, "num_attention_heads": 32,
             "num_hidden_layers": 32, "num_key_value_heads": 32, "vocab_size": 32000, "tie_word_embeddings": False}


def _hub_cache(root: Path, repo_id: str, config: dict) -> Path:
    """A Hugging Face cache holding only `config.json` of repo_id (what the estimator reads)."""
    folder = root / f"models--{repo_id.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text("0" * 40)
    snapshot = folder / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text(json.dumps(config))
    return root


def _sft_recipe(folder: Path, model: str, training: dict | None = None, **model_keys: object) -> Path:
    recipe = {
        "stage": "sft",
        "model": {"name_or_path": model, "lora": {"r": 16, "lora_alpha": 32, "lora_dropout": 0.05}, **model_keys},
        "data": {"train": [str(REPO / "data_cards" / "demo_sft.yaml")], "eval_split": 0.0, "max_length": 1024},
        "training": {"output_dir": str(folder / "out"), "per_device_train_batch_size": 4,
                     "gradient_accumulation_steps": 4, **(training or {})},
    }
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


# ------------------------------------------------------------------------------------ arithmetic

def test_parameter_count_of_smollm2_matches_the_published_135m() -> None:
    arch = Architecture.from_config(SMOLLM2)
    assert arch.total_params() == 134_515_008  # what torch counts after loading (tied embeddings)
    assert Architecture.from_config(LLAMA2_7B).total_params() == 6_738_415_616  # Llama-2-7b


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


LLAMA31_8B = {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32,
              "num_key_value_heads": 8, "num_hidden_layers": 32, "vocab_size": 128256, "tie_word_embeddings": False,
              "torch_dtype": "bfloat16"}


def test_the_8b_qlora_ppo_recipe_holds_one_4bit_base_per_gpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The shipped QLoRA PPO recipe: one NF4 copy of Llama 3.1 8B per GPU, far under an 80 GB GPU."""
    monkeypatch.setenv("HF_HUB_CACHE", str(_hub_cache(tmp_path / "hub", "meta-llama/Llama-3.1-8B-Instruct",
                                                      LLAMA31_8B)))
    result = estimate_recipe(REPO / "recipes" / "llama-3.1-8b-qlora" / "ppo.yaml", device="gpu", num_devices=8,
                             device_memory=parse_memory("80GB"), zero=2, base="meta-llama/Llama-3.1-8B-Instruct")
    weights = [r for r in result.rows if r.name.startswith("weights")]
    assert all("base (all four roles)" in r.name for r in weights)  # NF4 linears + fp32 embeddings/head, once
    assert sum(r.bytes for r in weights) < 8 * GIB
    assert result.fits and result.peak < 40 * GIB


# ------------------------------------------------------------------------------------------ verdict

def test_7b_qlora_fits_on_a_24gb_gpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(_hub_cache(tmp_path / "hub", "meta-llama/Llama-2-7b-hf", LLAMA2_7B)))
    recipe = _sft_recipe(tmp_path, "meta-llama/Llama-2-7b-hf", {"activation_checkpointing": True},
                         quantization={"load_in_4bit": True}, dtype="bfloat16")
    result = estimate_recipe(recipe, device_memory=parse_memory("24GB"))
    assert result.fits
    assert 5 * GIB < result.peak < 12 * GIB
    assert result.setup.quantization == "4bit" and result.setup.micro_batch == 4


def test_7b_full_fine_tuning_does_not_fit_on_24gb_and_the_fix_is_sensible(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(_hub_cache(tmp_path / "hub", "meta-llama/Llama-2-7b-hf", LLAMA2_7B)))
    recipe = _sft_recipe(tmp_path, "meta-llama/Llama-2-7b-hf", {"activation_checkpointing": True},
                         dtype="bfloat16")
    result = estimate_recipe(recipe, ["model.lora=null"], device_memory=24 * GIB)
    assert not result.fits
    assert result.peak > 2 * 24 * GIB  # bf16 weights + gradients + AdamW states: 8 bytes per parameter
    changes, fixed = cheapest_fix(result.setup)
    assert fixed.fits and fixed.peak <= 24 * GIB
    assert [c.text.split(" ")[0] for c in changes] == ["LoRA"]  # one change: train an adapter, not 7B weights
    # With LoRA forbidden (more GPUs are the only way), the search shards the full model with ZeRO-3.
    eight = estimate_recipe(recipe, ["model.lora=null"], num_devices=8, device_memory=24 * GIB)
    fix = cheapest_fix(eight.setup)
    assert fix is not None and fix[1].fits


def test_a_small_change_is_preferred_when_it_is_enough(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """LoRA 7B at 4 × 4096 tokens without checkpointing: checkpointing or a smaller micro-batch, not QLoRA/GPUs."""
    monkeypatch.setenv("HF_HUB_CACHE", str(_hub_cache(tmp_path / "hub", "meta-llama/Llama-2-7b-hf", LLAMA2_7B)))
    recipe = _sft_recipe(tmp_path, "meta-llama/Llama-2-7b-hf", {"activation_checkpointing": False},
                         dtype="bfloat16")
    result = estimate_recipe(recipe, ["data.max_length=4096"], device_memory=40 * GIB)
    assert not result.fits
    changes, fixed = cheapest_fix(result.setup)
    assert all("checkpointing" in c.text or "micro-batch" in c.text for c in changes)
    assert fixed.setup.micro_batch * fixed.setup.grad_accum == 16  # the global batch is kept


# ------------------------------------------------------------------------------------- config lookup

def test_config_comes_from_folders_finished_stages_and_the_hub_cache(tiny_model_dir: Path, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from rlhf_pipeline.outputs import StageManifest, mark_complete

    assert find_config(str(tiny_model_dir))[0]["hidden_size"] == 64
    stage = tmp_path / "sft"
    stage.mkdir()
    mark_complete(stage, StageManifest(stage="sft", fingerprint="x", base_model={"path": str(tiny_model_dir)},
                                       adapter=True))
    assert find_config(str(stage))[0]["hidden_size"] == 64  # a finished stage: its base's config
    monkeypatch.setenv("HF_HUB_CACHE", str(_hub_cache(tmp_path / "hub", "org/Model-1.5B", LLAMA2_7B)))
    assert find_config("org/Model-1.5B")[0]["hidden_size"] == 4096  # a dot in the name is still a Hub id
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(PipelineError, match=r"not in the local Hugging Face cache.*HF_HUB_OFFLINE"):
        find_config("org/not-downloaded")
    with pytest.raises(PipelineError, match="--base"):
        find_config("outputs/model/sft")


def test_embedded_alias_needs_the_converted_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RLHF_PIPELINE_CACHE", str(tmp_path))
    with pytest.raises(PipelineError, match="not converted yet"):
        find_config("smollm2-135m-instruct")
    folder = embedded.model_dir("smollm2-135m-instruct")
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(SMOLLM2))
    assert find_config("smollm2-135m-instruct")[0]["vocab_size"] == 49152


def test_command_prints_a_table_or_json_and_exits_1_when_it_does_not_fit(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(_hub_cache(tmp_path / "hub", "meta-llama/Llama-2-7b-hf", LLAMA2_7B)))
    recipe = _sft_recipe(tmp_path, "meta-llama/Llama-2-7b-hf", dtype="bfloat16")
    assert cli.main(["estimate", str(recipe), "model.quantization.load_in_4bit=true", "--gpu-memory", "24GB"]) == 0
    table = capsys.readouterr().out
    assert "weights (linears, 4-bit NF4 + double-quant)" in table and "verdict: fits" in table
    assert cli.main(["estimate", str(recipe), "model.lora=null", "--gpu-memory", "24GB", "--json"]) == 1
    out = json.loads(capsys.readouterr().out)
    assert out["fits"] is False and out["suggestion"]["changes"]
    assert out["peak_bytes"] > out["device_memory_bytes"]
    assert cli.main(["estimate", str(recipe), "--gpu-memory", "lots"]) == 2
    assert "--gpu-memory" in capsys.readouterr().err


# ------------------------------------------------------------------------------- measured on this CPU

def _probe(recipe: Path | str, overrides: list[str], timeout: int) -> dict:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1"}
    done = subprocess.run([sys.executable, str(PROBE), str(recipe), *overrides, "--json"], capture_output=True,
                          text=True, env=env, cwd=REPO, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_tiny_model_estimate_is_within_25_percent_of_the_measured_sft_peak(tiny_model_dir: Path,
                                                                          tmp_path: Path) -> None:
    recipe = _sft_recipe(tmp_path, str(tiny_model_dir), {"per_device_train_batch_size": 32,
                                                         "gradient_accumulation_steps": 1})
    result = _probe(recipe, ["data.max_length=512"], timeout=600)
    assert result["batch_shapes"][0] == [32, 512]
    assert result["measured_mib"] > 100  # activations dominate at this shape, not the constant noise
    assert 0.75 <= result["measured_mib"] / result["predicted_mib"] <= 1.25, result


@pytest.mark.slow
@pytest.mark.parametrize("overrides, rows, most_tokens", [
    ([], 1, 4 * 128),  # the demo SFT recipe as shipped: 4 rows of 128 tokens packed into one padding-free row
    (["training.packing=false", "training.per_device_train_batch_size=8",
      "model.lora.layers_to_transform=[20,21,22,23,24,25,26,27,28,29]"], 8, 128),  # adapter on the top 10 blocks
], ids=["packed", "top-10-blocks"])
def test_smollm2_estimate_is_within_25_percent_of_the_measured_sft_peak(overrides: list[str], rows: int,
                                                                       most_tokens: int) -> None:
    """The demo SFT recipe (LoRA r=16 all-linear, dropout 0.05) on the embedded model, ~1 min each."""
    result = _probe(REPO / "recipes" / "smollm2-135m" / "sft.yaml", overrides, timeout=1800)
    batch, tokens = result["batch_shapes"][0]
    assert batch == rows and 0.8 * most_tokens <= tokens <= most_tokens
    assert 0.75 <= result["measured_mib"] / result["predicted_mib"] <= 1.25, result

"""Model loading: QLoRA on CPU, refusals before any weights load, the pad policy, sources, origins, merges.

Everything runs on the tiny random Llama from conftest (hidden 64, which suits bitsandbytes' 64-value
blocks), so the whole file stays in seconds on two CPU cores.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
import warnings
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from rlhf_pipeline.adapters import load_frozen_roles
from rlhf_pipeline.errors import PipelineError, RecipeError
from rlhf_pipeline.models import (
    REWARD,
    check_hardware,
    ensure_distinct_pad_token,
    load_adapter_weights,
    load_base,
    load_tokenizer,
    merged_model,
    record_origin,
    trainable_model,
)
from rlhf_pipeline.outputs import StageManifest, mark_complete
from rlhf_pipeline.recipe import LoraSpec, ModelSpec, QuantizationSpec
from rlhf_pipeline.schema import build_section
from rlhf_pipeline.sources import ModelSource, resolve_source

# PEFT itself still calls these transformers methods by their old names.
pytestmark = pytest.mark.filterwarnings(
    "ignore:`(gradient_checkpointing_enable|is_gradient_checkpointing)` is deprecated:FutureWarning")

PUBLIC_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
# Two padded rows; every row ends in <|im_end|> (id 2), which pad == eos would hide.
IDS = torch.tensor([[1, 50, 60, 70, 2, 0, 0], [1, 80, 90, 100, 110, 120, 2]])
MASK = torch.tensor([[1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 1]])


def _spec(folder: Path | str, **kwargs: object) -> ModelSpec:
    return ModelSpec(name_or_path=str(folder), lora=LoraSpec(r=4, lora_dropout=0.0), **kwargs)


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS, attention_mask=MASK).logits


def _hidden(backbone: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return backbone(input_ids=IDS, attention_mask=MASK).last_hidden_state


# --- 1. k-bit bases train a LoRA on CPU -------------------------------------------------------------


@pytest.mark.parametrize(("quantization", "layer_class", "bits", "checkpointing"), [
    (QuantizationSpec(load_in_4bit=True), "Linear4bit", 4, True),
    (QuantizationSpec(load_in_8bit=True), "Linear8bitLt", 8, False),
], ids=["nf4-checkpointing", "int8"])
def test_quantized_base_trains_lora_on_cpu(tiny_model_dir: Path, caplog: pytest.LogCaptureFixture,
                                           quantization: QuantizationSpec, layer_class: str, bits: int,
                                           checkpointing: bool) -> None:
    """NF4 also runs with activation checkpointing, which k-bit preparation turns on (non-reentrant)."""
    import bitsandbytes as bnb

    caplog.set_level(logging.ERROR, logger="bitsandbytes")  # 8-bit logs a cast notice on every matmul
    spec = _spec(tiny_model_dir, quantization=quantization)
    source = resolve_source(spec)
    tokenizer = load_tokenizer(source, spec)
    torch.manual_seed(0)
    model = trainable_model(load_base(source, spec, tokenizer), spec, gradient_checkpointing=checkpointing)
    assert model.base_model.model.is_activation_checkpointing == checkpointing

    bases = {name: module.base_layer for name, module in model.named_modules() if isinstance(module, LoraLayer)}
    assert len(bases) == 2 * 7  # all-linear: q, k, v, o, gate, up, down in both layers; never the head
    for layer in bases.values():
        assert type(layer) is getattr(bnb.nn, layer_class)
        stored_bits = layer.weight.numel() * layer.weight.element_size() * 8
        assert stored_bits == bits * layer.in_features * layer.out_features
    if bits == 4:
        assert {layer.weight.quant_type for layer in bases.values()} == {"nf4"}

    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    assert all(".lora_A." in name or ".lora_B." in name for name in trainable)
    assert sum(p.numel() for p in trainable.values()) == 4 * sum(
        layer.in_features + layer.out_features for layer in bases.values())
    frozen = {name: p.detach().clone() for name, p in model.named_parameters() if not p.requires_grad}
    lora_before = {name: p.detach().clone() for name, p in trainable.items()}

    batch = tokenizer(["The sun rises in the morning.", "I like tea."], padding=True, return_tensors="pt")
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    optimizer = torch.optim.AdamW(trainable.values(), lr=1e-2)
    model.train()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*use_reentrant.*")  # checkpointing mode must be explicit
        loss = model(**batch, labels=labels).loss
        assert torch.isfinite(loss)
        loss.backward()
    optimizer.step()

    lora_b = [name for name in trainable if ".lora_B." in name]
    assert len(lora_b) == len(bases)
    assert all(not torch.equal(trainable[name], lora_before[name]) for name in lora_b)
    after = dict(model.named_parameters())
    assert all(torch.equal(after[name], value) for name, value in frozen.items())
    model.eval()
    with torch.no_grad():
        assert model(**batch, labels=labels).loss < loss


# --- 2. combinations that cannot run fail before anything loads -----------------------------------


@pytest.fixture
def cpu_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.mark.usefixtures("cpu_only")
@pytest.mark.parametrize(("spec_kwargs", "training", "key", "advice"), [
    ({"attn_implementation": "flash_attention_2"}, {}, "model.attn_implementation", "use sdpa"),
    ({}, {"fp16": True}, "training.fp16", "remove it"),
])
def test_check_hardware_refuses_gpu_only_settings_on_cpu(spec_kwargs: dict, training: dict, key: str,
                                                          advice: str) -> None:
    """The model path does not exist: the refusal must come before anything looks at it."""
    spec = ModelSpec(name_or_path="./nope/model", **spec_kwargs)
    with pytest.raises(PipelineError) as caught:
        check_hardware(spec, training)
    assert str(caught.value).startswith(f"{key}: ")
    assert advice in str(caught.value)


@pytest.mark.usefixtures("cpu_only")
def test_check_hardware_accepts_cpu_settings_and_warns_about_bf16() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_hardware(ModelSpec(name_or_path="./nope/model", attn_implementation="sdpa"), {"fp16": False})
    with pytest.warns(UserWarning, match="20x slower"):
        check_hardware(ModelSpec(name_or_path="./nope/model"), {"bf16": True})


@pytest.mark.parametrize("quantization", [QuantizationSpec(load_in_4bit=True), QuantizationSpec(load_in_8bit=True)])
def test_full_fine_tuning_of_a_quantized_base_is_refused(quantization: QuantizationSpec) -> None:
    with pytest.raises(ValueError, match="QLoRA"):
        ModelSpec(name_or_path="./nope/model", quantization=quantization, lora=None)
    data = {"name_or_path": "./nope/model", "quantization": {"load_in_4bit": True}, "lora": None}
    with pytest.raises(RecipeError, match=r"^sft\.yaml: model\.quantization: .*QLoRA"):
        build_section(ModelSpec, data, Path("sft.yaml"), "model")


def test_layers_to_transform_adapts_every_linear_of_the_chosen_blocks_only(tiny_model_dir: Path) -> None:
    spec = ModelSpec(name_or_path=str(tiny_model_dir), lora=LoraSpec(r=4, layers_to_transform=[1]))
    model = trainable_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), spec)
    adapted = {name for name, module in model.named_modules() if isinstance(module, LoraLayer)}
    assert {name.split(".layers.")[1] for name in adapted} == {
        f"1.{part}" for part in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
    loss = model(input_ids=IDS, attention_mask=MASK).logits.sum()
    loss.backward()
    trained = {name for name, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert trained and all(".layers.1." in name and "lora_" in name for name in trained)


def test_layers_to_transform_outside_the_model_fails_with_the_block_count(tiny_model_dir: Path) -> None:
    spec = ModelSpec(name_or_path=str(tiny_model_dir), lora=LoraSpec(r=4, layers_to_transform=[1, 2, 5]))
    with pytest.raises(PipelineError, match=r"model\.lora\.layers_to_transform: .* has 2 blocks \(0\.\.1\); "
                                            r"\[2, 5\] do not exist"):
        trainable_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), spec)


@pytest.mark.parametrize("layers", [[], [-1, 3]])
def test_layers_to_transform_must_name_blocks(layers: list[int]) -> None:
    data = {"name_or_path": "./nope/model", "lora": {"layers_to_transform": layers}}
    with pytest.raises(RecipeError, match=r"^sft\.yaml: model\.lora\.layers_to_transform: a non-empty list"):
        build_section(ModelSpec, data, Path("sft.yaml"), "model")


# --- 3. pad policy ------------------------------------------------------------------------------------


def test_tokenizers_differing_in_special_tokens_or_pad_are_not_the_same(tiny_model_dir: Path) -> None:
    from rlhf_pipeline.models import same_tokenizer

    policy = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert same_tokenizer(policy, AutoTokenizer.from_pretrained(tiny_model_dir))
    extra_special = AutoTokenizer.from_pretrained(tiny_model_dir)
    extra_special.add_special_tokens({"additional_special_tokens": ["<|reward|>"]})
    other_pad = AutoTokenizer.from_pretrained(tiny_model_dir)
    other_pad.pad_token = "<|endoftext|>"  # same vocabulary, a different pad token
    assert not same_tokenizer(policy, extra_special) and not same_tokenizer(policy, other_pad)


def test_pad_token_is_borrowed_without_growing_the_vocab(tiny_model_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert tokenizer.pad_token_id == tokenizer.eos_token_id == 2
    ensure_distinct_pad_token(tokenizer)
    assert (tokenizer.pad_token, tokenizer.pad_token_id) == ("<|endoftext|>", 0)
    assert (tokenizer.eos_token, tokenizer.eos_token_id) == ("<|im_end|>", 2)
    assert len(tokenizer) == 400
    ensure_distinct_pad_token(tokenizer)
    assert tokenizer.pad_token_id == 0 and len(tokenizer) == 400

    chats = [[{"role": "user", "content": "Hi"}],
             [{"role": "user", "content": "Where is the station?"}, {"role": "assistant", "content": "Left."}]]
    texts = [tokenizer.apply_chat_template(chat, tokenize=False) for chat in chats]
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    kept = batch["input_ids"][batch["input_ids"] != tokenizer.pad_token_id]
    assert (kept == 2).sum() == sum(text.count("<|im_end|>") for text in texts) == 5


def test_loaded_models_mirror_the_borrowed_pad_and_score_the_real_last_token(tiny_model_dir: Path) -> None:
    spec = _spec(tiny_model_dir)
    source = resolve_source(spec)
    tokenizer = load_tokenizer(source, spec)
    assert (tokenizer.pad_token_id, tokenizer.padding_side) == (0, "right")
    model = load_base(source, spec, tokenizer)
    assert model.config.pad_token_id == model.generation_config.pad_token_id == 0
    assert model.get_input_embeddings().weight.shape[0] == 400

    reward = load_base(source, spec, tokenizer, task=REWARD).eval()
    assert reward.config.pad_token_id == 0
    with torch.no_grad():
        scores = reward(input_ids=IDS, attention_mask=MASK).logits[:, 0]
        hidden = reward.model(input_ids=IDS, attention_mask=MASK).last_hidden_state
        at_im_end = reward.score(hidden[[0, 1], [4, 6]])[:, 0]
    torch.testing.assert_close(scores, at_im_end)


def test_tokenizer_without_a_borrowable_token_gets_pad_added_and_embeddings_resized(
        tiny_model_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "no-spare-token"
    shutil.copytree(tiny_model_dir, folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        path = folder / name
        path.write_text(path.read_text(encoding="utf-8").replace("<|endoftext|>", "<|reserved|>"), encoding="utf-8")
    spec = _spec(folder)
    source = resolve_source(spec)
    tokenizer = load_tokenizer(source, spec)
    assert (tokenizer.pad_token, tokenizer.pad_token_id, len(tokenizer)) == ("<|pad|>", 400, 401)
    assert tokenizer.eos_token_id == 2

    model = load_base(source, spec, tokenizer)
    assert model.get_input_embeddings().weight.shape == (401, 64)
    assert model.get_output_embeddings().weight.shape == (401, 64)
    assert model.config.vocab_size == 401
    assert model.config.pad_token_id == model.generation_config.pad_token_id == 400
    padded = tokenizer(["Hi", "The cat is sleeping."], padding=True, return_tensors="pt")
    assert padded["input_ids"][0, -1] == 400
    with torch.no_grad():
        assert model(**padded).logits.shape[-1] == 401


# --- 4. sources -----------------------------------------------------------------------------------------


def test_plain_local_folder_is_its_own_source(tiny_model_dir: Path) -> None:
    source = resolve_source(_spec(tiny_model_dir))
    assert source == ModelSource(str(tiny_model_dir), None, str(tiny_model_dir), None, str(tiny_model_dir))


def test_offline_hub_id_missing_from_the_cache_fails_fast_with_the_fix(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    assert constants.HF_HUB_OFFLINE  # set by conftest before the Hub library loaded
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    started = time.perf_counter()
    with pytest.raises(PipelineError) as caught:
        resolve_source(_spec("someone/not-downloaded"))
    assert time.perf_counter() - started < 1.0
    message = str(caught.value)
    assert message.startswith("model.name_or_path: 'someone/not-downloaded' is not in the local Hugging Face cache")
    assert "HF_HUB_OFFLINE=1" in message
    assert "unset HF_HUB_OFFLINE, download it first, or point name_or_path at a local folder" in message


def test_offline_hub_id_in_the_cache_resolves(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    repo = tmp_path / "models--someone--downloaded"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0123abc")
    (repo / "snapshots" / "0123abc").mkdir(parents=True)
    (repo / "snapshots" / "0123abc" / "config.json").write_text("{}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    source = resolve_source(_spec("someone/downloaded"))
    assert source == ModelSource("someone/downloaded", "main", "someone/downloaded", "main", "someone/downloaded")


def test_a_hub_id_with_dots_is_a_hub_id_not_a_missing_file(monkeypatch: pytest.MonkeyPatch) -> None:
    """`meta-llama/Llama-3.1-8B-Instruct` has a "suffix" (.1-8B-Instruct) but names a Hub repo."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(PipelineError, match=r"'meta-llama/Llama-3\.1-8B-Instruct' is not in the local Hugging Face"):
        resolve_source(_spec("meta-llama/Llama-3.1-8B-Instruct"))


@pytest.mark.parametrize("name", ["./nope/model", "/no/such/folder", "nope/deeper/model", "model.gguf"])
def test_missing_local_path_is_not_found(name: str) -> None:
    with pytest.raises(PipelineError, match=f"^model.name_or_path: folder '{name}' not found$"):
        resolve_source(_spec(name))


@pytest.mark.parametrize("marker", ["adapter_config.json", "checkpoint-40"])
def test_unfinished_stage_folder_is_refused(tmp_path: Path, marker: str) -> None:
    if marker.startswith("checkpoint-"):
        folder = tmp_path / marker
        folder.mkdir()
    else:
        folder = tmp_path / "sft"
        folder.mkdir()
        (folder / marker).write_text("{}")
    with pytest.raises(PipelineError, match="holds no finished stage") as caught:
        resolve_source(_spec(folder))
    assert "re-run it to resume" in str(caught.value)


def test_finished_stage_folder_is_its_base_plus_its_own_adapter(tmp_path: Path) -> None:
    base = ModelSource("/models/base", "abc", PUBLIC_ID, "abc", "/models/base")
    adapter_stage = tmp_path / "rm"
    mark_complete(adapter_stage, StageManifest("rm", "f", base.as_dict(), adapter=True, lineage=["/outputs/sft"]))
    source = resolve_source(_spec(adapter_stage))
    assert source == ModelSource("/models/base", "abc", PUBLIC_ID, "abc", str(adapter_stage),
                                 str(adapter_stage.resolve()), ["/outputs/sft", str(adapter_stage.resolve())])

    full_stage = tmp_path / "full"
    mark_complete(full_stage, StageManifest("sft", "f", base.as_dict(), adapter=False))
    assert resolve_source(_spec(full_stage)) == ModelSource(str(full_stage), None, PUBLIC_ID, "abc", str(full_stage),
                                                            lineage=[str(full_stage.resolve())])


def test_a_stage_json_of_the_merging_releases_is_refused_with_the_fix(tmp_path: Path) -> None:
    old = tmp_path / "ppo"
    old.mkdir()
    (old / "stage.json").write_text(json.dumps({"stage": "ppo", "fingerprint": "f", "base_model": {},
                                                "adapter": True, "merged_adapters": ["/outputs/sft"]}))
    with pytest.raises(PipelineError, match="re-run that stage"):
        resolve_source(_spec(old))


# --- 5 and 6. adapters: recorded origin, merges into either head ------------------------------------------


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A causal-LM LoRA on the tiny model with random, non-zero B matrices (so it changes the outputs)."""
    folder = tmp_path_factory.mktemp("sft-adapter")
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM")
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), config)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_B." in name:
                param.normal_(0.0, 0.5)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(folder)
    return folder


def test_record_origin_names_the_public_base(adapter_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "out"
    shutil.copytree(adapter_dir, folder)
    before = json.loads((folder / "adapter_config.json").read_text())
    assert before["base_model_name_or_path"] != PUBLIC_ID
    record_origin(folder, ModelSource("/cache/snapshots/0123", None, PUBLIC_ID, "0123abc", "/cache/snapshots/0123"))
    after = json.loads((folder / "adapter_config.json").read_text())
    assert after["base_model_name_or_path"] == PUBLIC_ID
    assert after["revision"] == "0123abc"
    assert {k: v for k, v in after.items() if k not in ("base_model_name_or_path", "revision")} == {
        k: v for k, v in before.items() if k not in ("base_model_name_or_path", "revision")}

    empty = tmp_path / "full-model"
    empty.mkdir()
    record_origin(empty, ModelSource("x", None, PUBLIC_ID, None, "x"))
    assert list(empty.iterdir()) == []


def test_merged_model_matches_the_peft_model(tiny_model_dir: Path, adapter_dir: Path) -> None:
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), adapter_dir).eval()
    merged = merged_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(adapter_dir)).eval()
    assert not isinstance(merged, PeftModel)
    assert not any(isinstance(module, LoraLayer) for module in merged.modules())
    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    assert (_logits(reference) - _logits(plain)).abs().max() > 0.1  # the adapter does change the outputs
    torch.testing.assert_close(_logits(merged), _logits(reference), atol=1e-5, rtol=0)


def test_causal_lm_adapter_merges_into_a_reward_model_backbone(tiny_model_dir: Path, adapter_dir: Path) -> None:
    merged_lm = merged_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(adapter_dir)).eval()
    reward = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
    reward = merged_model(reward, str(adapter_dir)).eval()
    assert type(reward).__name__ == "LlamaForSequenceClassification"
    assert reward.score.weight.shape == (1, 64)
    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    assert (_hidden(reward.model) - _hidden(plain.model)).abs().max() > 0.1
    torch.testing.assert_close(_hidden(reward.model), _hidden(merged_lm.model), atol=1e-5, rtol=0)


def test_merging_into_a_quantized_base_is_refused(tiny_model_dir: Path, adapter_dir: Path) -> None:
    spec = _spec(tiny_model_dir, quantization=QuantizationSpec(load_in_4bit=True))
    source = resolve_source(spec)
    with pytest.raises(PipelineError, match="refusing to merge an adapter into a 4/8-bit base"):
        merged_model(load_base(source, spec, load_tokenizer(source, spec)), adapter_dir)


@pytest.fixture
def sft_stage(tiny_model_dir: Path, adapter_dir: Path, tmp_path: Path) -> Path:
    stage = tmp_path / "sft"
    shutil.copytree(adapter_dir, stage)
    base = ModelSource(str(tiny_model_dir), None, PUBLIC_ID, None, str(tiny_model_dir))
    mark_complete(stage, StageManifest("sft", "f", base.as_dict(), adapter=True))
    return stage


def test_finished_stage_loads_as_its_adapter_on_the_base_never_merged(tiny_model_dir: Path, adapter_dir: Path,
                                                                      sft_stage: Path) -> None:
    spec = ModelSpec(name_or_path=str(sft_stage))
    source = resolve_source(spec)
    shared = load_frozen_roles({"sft": source}, spec, load_tokenizer(source, spec))["sft"]
    assert isinstance(shared.model, PeftModel)
    assert not any(getattr(module, "merged", False) for module in shared.modules())
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), adapter_dir).eval()
    torch.testing.assert_close(_logits(shared.use("sft")), _logits(reference), atol=1e-5, rtol=0)


@pytest.mark.parametrize("task", ["causal-lm", REWARD])
def test_a_later_stage_trains_a_copy_of_the_adapter_it_starts_from(tiny_model_dir: Path, adapter_dir: Path,
                                                                    sft_stage: Path, task: str) -> None:
    """At step 0 the next stage's model (policy or reward backbone) is the SFT model, on an unmerged base."""
    spec = ModelSpec(name_or_path=str(sft_stage), lora=LoraSpec(r=4, lora_alpha=8, lora_dropout=0.0))
    source = resolve_source(spec)
    model = trainable_model(load_base(source, spec, load_tokenizer(source, spec), task=task), spec, task,
                            continues=source.adapter).eval()
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), adapter_dir).eval()
    backbone = model.get_base_model().model
    torch.testing.assert_close(_hidden(backbone), _hidden(reference.get_base_model().model), atol=1e-5, rtol=0)
    trainable = [name for name, param in model.named_parameters() if param.requires_grad]
    assert any("lora_A" in name for name in trainable)
    assert ("score" in " ".join(trainable)) == (task == REWARD)


def test_a_later_stage_with_another_lora_shape_fails_before_loading(sft_stage: Path) -> None:
    from rlhf_pipeline.models import check_continued_lora

    with pytest.raises(PipelineError, match=r"model.lora.r: 16, but this stage continues the adapter .* has r 4; "
                                            r"set model.lora.r to 4"):
        check_continued_lora(LoraSpec(r=16, lora_alpha=8), sft_stage)
    check_continued_lora(LoraSpec(r=4, lora_alpha=8, lora_dropout=0.3, target_modules=["q_proj", "k_proj", "v_proj",
                                  "o_proj", "gate_proj", "up_proj", "down_proj"]), sft_stage)


def test_an_adapter_of_another_shape_does_not_load_half_way(tiny_model_dir: Path, adapter_dir: Path) -> None:
    other = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"]))
    with pytest.raises(PipelineError, match="does not fit this model"):
        load_adapter_weights(other, adapter_dir)

"""Model and tokenizer loading for every stage: sources, dtype, quantization, adapters, pad tokens.

One place decides how a recipe's `model` section becomes weights in memory, so SFT, RM, PPO, labelling
and evaluation load the same way. A `name_or_path` may be a Hub id, a local folder, the embedded
default (`smollm2-135m-instruct`) or a finished stage's output folder. A finished stage is the base plus
that stage's one adapter (and, for a reward model, its score head): every stage continues a trainable
copy of the adapter it starts from, so its own adapter carries the whole lineage. Adapters are never
merged into a quantized base at load time, where re-quantising would erase their update; only
full fine-tuning from an adapter merges it, in full precision.
"""

from __future__ import annotations

import json
import logging
import os
import re
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlhf_pipeline.errors import PipelineError
from rlhf_pipeline.sources import ModelSource

if TYPE_CHECKING:
    import torch
    from peft import PeftModel
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from rlhf_pipeline.recipe import LoraSpec, ModelSpec

logger = logging.getLogger(__name__)

# Distinct pad tokens to borrow, best first, when a tokenizer pads with its EOS (SmolLM2, Llama 3):
# masks built from `ids != pad` would otherwise hide real end-of-turn tokens.
_PAD_CANDIDATES = ("<|finetune_right_pad_id|>", "<|pad|>", "<pad>", "[PAD]", "<|endoftext|>", "<unk>")
CAUSAL_LM = "causal-lm"
REWARD = "reward"


def load_tokenizer(source: ModelSource, spec: ModelSpec) -> PreTrainedTokenizerBase:
    """Load the tokenizer and apply the pad-token and chat-template policy every stage relies on."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source.tokenizer_path, revision=source.revision
                                              if source.tokenizer_path == source.path else None,
                                              trust_remote_code=spec.trust_remote_code)
    if spec.chat_template:
        template = Path(spec.chat_template)
        tokenizer.chat_template = template.read_text() if template.suffix == ".jinja" else spec.chat_template
    if tokenizer.chat_template is None:
        raise PipelineError(f"model.chat_template: {spec.name_or_path} has no chat template; set "
                            "model.chat_template to a Jinja template string or a .jinja file")
    ensure_distinct_pad_token(tokenizer)
    tokenizer.padding_side = "right"
    return tokenizer


def same_tokenizer(first: PreTrainedTokenizerBase, second: PreTrainedTokenizerBase) -> bool:
    """Whether two tokenizers read token ids the same way (vocabulary, special tokens, pad): models that
    score or compare each other's answers as ids must."""
    return (first.get_vocab() == second.get_vocab() and first.all_special_tokens == second.all_special_tokens
            and first.pad_token_id == second.pad_token_id)


def ensure_distinct_pad_token(tokenizer: PreTrainedTokenizerBase) -> None:
    """Give the tokenizer a pad token different from EOS, borrowing an unused special token if possible."""
    if tokenizer.pad_token is not None and tokenizer.pad_token_id != tokenizer.eos_token_id:
        return
    vocab = tokenizer.get_vocab()
    for candidate in _PAD_CANDIDATES:
        if candidate in vocab and vocab[candidate] != tokenizer.eos_token_id:
            tokenizer.pad_token = candidate
            return
    tokenizer.add_special_tokens({"pad_token": "<|pad|>"})


def resolve_dtype(name: str) -> torch.dtype:
    """`auto` is fp32 on CPU (bf16 is ~20x slower without AMX) and bf16 on GPUs that support it."""
    import torch

    if name != "auto":
        return getattr(torch, name)
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def check_hardware(spec: ModelSpec, training: dict[str, Any]) -> None:
    """Refuse combinations this machine cannot run, before any weights are read."""
    import torch

    if torch.cuda.is_available():
        return
    if spec.attn_implementation and spec.attn_implementation.startswith("flash_attention"):
        raise PipelineError(f"model.attn_implementation: {spec.attn_implementation} needs a CUDA GPU; "
                            "use sdpa (or remove the key) on this machine")
    if training.get("fp16"):
        raise PipelineError("training.fp16: fp16 mixed precision needs a GPU; remove it on CPU "
                            "(fp32 is the CPU default)")
    if spec.dtype == "bfloat16" or training.get("bf16"):
        warnings.warn("bf16 on a CPU without AMX/AVX512-bf16 is about 20x slower than fp32", stacklevel=2)


def _quantization_config(spec: ModelSpec) -> Any:
    from transformers import BitsAndBytesConfig

    quant = spec.quantization
    if not quant.enabled:
        return None
    if quant.load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    storage = resolve_dtype(quant.bnb_4bit_quant_storage) if quant.bnb_4bit_quant_storage else None
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant.bnb_4bit_quant_type,
        bnb_4bit_use_double_quant=quant.bnb_4bit_use_double_quant,
        bnb_4bit_compute_dtype=compute_dtype(spec),
        bnb_4bit_quant_storage=storage or "uint8",
    )


def compute_dtype(spec: ModelSpec) -> torch.dtype:
    """The dtype the model computes in: the 4-bit compute dtype when set, else the model's own."""
    quant = spec.quantization
    if quant.load_in_4bit and quant.bnb_4bit_compute_dtype != "auto":
        return resolve_dtype(quant.bnb_4bit_compute_dtype)
    return resolve_dtype(spec.dtype)


def match_compute_dtype(model: torch.nn.Module, spec: ModelSpec) -> None:
    """Keep a quantized model's trainable weights in its compute dtype, after a TRL trainer is built.

    TRL's SFT and reward trainers store QLoRA's trainable weights in bf16 (the QLoRA paper's choice). LoRA
    layers cast their input, but a reward model's score head does not: with an fp32 compute dtype (the CPU
    default) its first forward fails on fp32 hidden states. The optimizer is made later, at `train()`.
    """
    if not spec.quantization.enabled:
        return
    dtype = compute_dtype(spec)
    for param in model.parameters():
        if param.requires_grad and param.dtype != dtype:
            param.data = param.data.to(dtype)


def _device_map(quantized: bool) -> dict[str, Any] | None:
    """bitsandbytes needs weights placed at load time; each process takes its own device.

    Never under ZeRO-3 / FSDP, which shard the (4-bit, float-stored) weights themselves: there QLoRA loads
    without a device map, as PEFT's DeepSpeed and FSDP QLoRA recipes do.
    """
    from rlhf_pipeline.distributed import read_launch

    if not quantized or read_launch().shards_parameters:
        return None
    return {"": process_device()}


def process_device() -> Any:
    """This process's device: its GPU (LOCAL_RANK) when there are GPUs, else the CPU."""
    import torch

    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if torch.cuda.is_available() \
        else torch.device("cpu")


def load_base(source: ModelSource, spec: ModelSpec, tokenizer: PreTrainedTokenizerBase,
              task: str = CAUSAL_LM) -> PreTrainedModel:
    """Load the base weights alone (quantized if asked) and sync its special tokens with the tokenizer."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    dtype = resolve_dtype(spec.dtype)
    quantization = _quantization_config(spec)
    model_class = AutoModelForCausalLM if task == CAUSAL_LM else AutoModelForSequenceClassification
    extra = {"num_labels": 1} if task == REWARD else {}
    if spec.trust_remote_code:
        warnings.warn(f"trust_remote_code is on: code from {source.origin} runs on this machine",
                      stacklevel=2)
    try:
        model = model_class.from_pretrained(
            source.path,
            revision=source.revision,
            dtype=dtype,
            quantization_config=quantization,
            device_map=_device_map(quantization is not None),
            attn_implementation=spec.attn_implementation,
            trust_remote_code=spec.trust_remote_code,
            use_safetensors=None if spec.allow_unsafe_weights else True,
            **extra,
        )
    except OSError as err:
        if spec.allow_unsafe_weights or "safetensors" not in str(err):
            raise
        raise PipelineError(_unsafe_weights_message(source)) from None
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def _unsafe_weights_message(source: ModelSource) -> str:
    """Why pickle-only weights are refused, and the two ways on."""
    folder = Path(source.path)
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt")) \
        if folder.is_dir() else []
    found = f" (found {', '.join(pickles)})" if pickles else ""
    return (f"model.allow_unsafe_weights: {source.origin} has no safetensors weights{found}; pickle weights can "
            "run code when loaded, so they are refused. Convert them to safetensors (load and save_pretrained "
            "once, somewhere safe), or set model.allow_unsafe_weights: true if you trust the source")


def keep_4bit_gradients_exact(model: torch.nn.Module) -> None:
    """Stop bitsandbytes repacking 4-bit weights for its CPU bf16 kernel, which has no autograd.

    On a CPU with AVX512-BF16, the first no-grad eval forward (an evaluation before training, a PPO
    rollout) repacks every Linear4bit for inference; gradients through those layers are garbage from then
    on, with nothing but a PyTorch warning (measured: cosine 0.5 to the true gradient). Every training path
    over a 4-bit base calls this.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def read_adapter_config(adapter_dir: str | Path) -> dict[str, Any]:
    """A finished stage's `adapter_config.json`, as PEFT wrote it."""
    return json.loads((Path(adapter_dir) / "adapter_config.json").read_text(encoding="utf-8"))


def check_continued_lora(lora: LoraSpec, adapter_dir: str | Path) -> None:
    """A stage continues the adapter it starts from, so its recipe's LoRA shape must be that adapter's.

    `target_modules: all-linear` matches whatever the earlier adapter targets (it was resolved to names);
    dropout and modules_to_save are this stage's own.
    """
    saved = read_adapter_config(adapter_dir)
    wanted: dict[str, Any] = {"r": lora.r, "lora_alpha": lora.lora_alpha, "bias": lora.bias,
                              "layers_to_transform": lora.layers_to_transform}
    if lora.target_modules != "all-linear":
        targets = [lora.target_modules] if isinstance(lora.target_modules, str) else lora.target_modules
        wanted["target_modules"] = sorted({name.rsplit(".", 1)[-1] for name in targets})
    have = {key: saved.get(key) for key in wanted}
    have["target_modules"] = sorted({name.rsplit(".", 1)[-1] for name in saved.get("target_modules") or []})
    for key, value in wanted.items():
        if value != have[key]:
            raise PipelineError(f"model.lora.{key}: {value!r}, but this stage continues the adapter of {adapter_dir}, "
                                f"which has {key} {have[key]!r}; set model.lora.{key} to {have[key]!r} (every "
                                "stage trains a copy of the adapter it starts from, so the shapes must agree)")


def lora_config(spec: ModelSpec, task: str, model: PreTrainedModel, continues: str | None = None) -> Any:
    """The stage's LoRA: the shape of the adapter it continues, or the recipe's.

    Callers check the recipe against a continued adapter's shape (`check_continued_lora`) before any weights
    load. Dropout and modules_to_save are always this stage's. A reward task adds its score head to the
    modules PEFT saves with the adapter, so the reward model's folder holds its whole head.
    """
    from peft import LoraConfig, TaskType

    lora = spec.lora
    assert lora is not None
    task_type = TaskType.CAUSAL_LM if task == CAUSAL_LM else TaskType.SEQ_CLS
    if continues is not None:
        saved = read_adapter_config(continues)
        return LoraConfig(r=saved["r"], lora_alpha=saved["lora_alpha"], target_modules=saved["target_modules"],
                          layers_to_transform=saved.get("layers_to_transform"), bias=saved.get("bias", "none"),
                          use_rslora=saved.get("use_rslora", False), lora_dropout=lora.lora_dropout,
                          modules_to_save=lora.modules_to_save, task_type=task_type)
    targets = lora.target_modules
    if lora.layers_to_transform is not None:
        _check_layer_indices(model, lora.layers_to_transform)
        if targets == "all-linear":  # PEFT takes layers_to_transform only with explicit module names
            targets = _block_linear_names(model)
    return LoraConfig(r=lora.r, lora_alpha=lora.lora_alpha, lora_dropout=lora.lora_dropout, target_modules=targets,
                      layers_to_transform=lora.layers_to_transform, modules_to_save=lora.modules_to_save,
                      bias=lora.bias, task_type=task_type)


def load_adapter_weights(model: PeftModel, adapter_dir: str | Path, adapter_name: str = "default") -> None:
    """Copy a finished stage's adapter weights into `adapter_name`, every LoRA tensor accounted for.

    Score heads are the one thing allowed to differ: a saved head the model has no slot for is dropped (a
    reward adapter on a causal-LM base), and a head slot the folder has no weights for keeps its new
    initialisation (an SFT adapter continued as a reward model). Any other mismatch is an error, so a
    wrong folder never loads half-way.
    """
    from peft import get_peft_model_state_dict, set_peft_model_state_dict
    from peft.utils import load_peft_weights

    weights = load_peft_weights(str(adapter_dir), device="cpu")
    expected = get_peft_model_state_dict(model, adapter_name=adapter_name)
    weights = {key: value for key, value in weights.items() if key in expected or not _is_head_key(key)}
    weights |= {key: value for key, value in expected.items() if key not in weights and _is_head_key(key)}
    result = set_peft_model_state_dict(model, weights, adapter_name=adapter_name)
    missing = [key for key in expected if key not in weights and "lora_" in key]
    if missing or result.unexpected_keys:
        raise PipelineError(f"{adapter_dir}: its adapter does not fit this model (missing {missing[:3]}, "
                            f"unexpected {list(result.unexpected_keys)[:3]}); was it trained on another base, or "
                            "with other model.lora.modules_to_save?")


HEAD_NAMES = ("score", "classifier")  # what PEFT keeps whole beside a reward model's LoRA
SCORER_STAGES = ("rm", "prm")  # stages whose output is a score head on the base: a reward model, a process RM


def _is_head_key(key: str) -> bool:
    return any(f".{name}." in key for name in HEAD_NAMES)


def read_score_head(adapter_dir: str | Path) -> torch.Tensor:
    """The reward model's score head ([1, hidden], saved beside its LoRA as a module PEFT keeps whole)."""
    from peft.utils import load_peft_weights

    weights = load_peft_weights(str(adapter_dir), device="cpu")
    heads = {key: value for key, value in weights.items() if _is_head_key(key)}
    weight = [value for key, value in heads.items() if key.endswith(".weight")]
    if len(weight) != 1 or len(heads) != 1:
        raise PipelineError(f"{adapter_dir}: expected one bias-free score head in its adapter, found "
                            f"{sorted(heads)}; is it the output of an rm stage?")
    return weight[0]


def prepare_base(base: PreTrainedModel, spec: ModelSpec, gradient_checkpointing: bool) -> PreTrainedModel:
    """A loaded base ready for adapters to train on: k-bit preparation when it is quantized, and activation
    checkpointing when asked, whatever its precision.

    Checkpointing is non-reentrant and said so explicitly: PEFT's k-bit preparation otherwise enables it with
    empty kwargs, so torch warns on every checkpointed layer call (and plans to make it an error).
    """
    from peft import prepare_model_for_kbit_training

    if spec.quantization.enabled:
        keep_4bit_gradients_exact(base)
        return prepare_model_for_kbit_training(base, use_gradient_checkpointing=gradient_checkpointing,
                                               gradient_checkpointing_kwargs={"use_reentrant": False})
    if gradient_checkpointing:
        if hasattr(base, "activation_checkpointing_enable"):
            base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:  # transformers < 5.20, as vLLM's CPU build pins it
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return base


def trainable_model(base: PreTrainedModel, spec: ModelSpec, task: str = CAUSAL_LM, continues: str | None = None,
                    gradient_checkpointing: bool = False) -> PeftModel | PreTrainedModel:
    """The stage's trainable weights on a loaded base: a copy of the adapter in the `continues` folder (the
    finished stage it starts from), a new LoRA, or all weights.

    Continuing the adapter the stage starts from (rather than stacking a new one on it) makes this stage's
    adapter a complete model on the base: `PeftModel.from_pretrained(base, folder)` alone loads it.
    """
    from peft import get_peft_model

    if spec.lora is None:  # full fine-tuning (never on a quantized base: the recipe check refuses it)
        return base if continues is None else merged_model(base, continues)
    base = prepare_base(base, spec, gradient_checkpointing)
    model = get_peft_model(base, lora_config(spec, task, base, continues=continues))
    if continues is not None:
        load_adapter_weights(model, continues)
    return model


def merged_model(base: PreTrainedModel, adapter_dir: str | Path) -> PreTrainedModel:
    """A full-precision base with a finished stage's adapter (and its head, when `base` has one) folded in.

    Never into 4/8-bit weights: merging there re-quantises, and updates below a quantisation step vanish
    (the demo's SFT kept 0.0024 of its 0.35 nats/token of KL to the base).
    """
    from peft import PeftConfig, PeftModel

    if getattr(base, "is_quantized", False):
        raise PipelineError(f"{adapter_dir}: refusing to merge an adapter into a 4/8-bit base (re-quantising erases "
                            "small updates); load the base in full precision to merge")
    config = PeftConfig.from_pretrained(str(adapter_dir))
    if (config.task_type == "CAUSAL_LM") != hasattr(base, "lm_head"):  # another head: merge the shared layers
        config.task_type = None
        config.modules_to_save = None
    return PeftModel.from_pretrained(base, str(adapter_dir), config=config).merge_and_unload()


def _block_linear_names(model: PreTrainedModel) -> list[str]:
    """The names of the linear layers inside the numbered transformer blocks: what `all-linear` adapts."""
    import torch

    return sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                   if isinstance(module, torch.nn.Linear) and re.search(r"\.\d+\.", name)})


def _check_layer_indices(model: PreTrainedModel, indices: list[int]) -> None:
    blocks = model.config.num_hidden_layers
    outside = sorted(i for i in indices if i >= blocks)
    if outside:
        raise PipelineError(f"model.lora.layers_to_transform: {model.config.name_or_path or 'the model'} has "
                            f"{blocks} blocks (0..{blocks - 1}); {outside} do not exist")


def record_origin(output_dir: Path, source: ModelSource) -> None:
    """Name the base by its public Hub id in adapter_config.json, never by a local cache path."""
    config_path = output_dir / "adapter_config.json"
    if not config_path.is_file():
        return
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["base_model_name_or_path"] = source.origin
    if source.origin_revision:
        config["revision"] = source.origin_revision
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")

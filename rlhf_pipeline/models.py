"""Model and tokenizer loading for every stage: sources, dtype, quantization, adapters, pad tokens.

One place decides how a recipe's `model` section becomes weights in memory, so SFT, RM, PPO, labelling
and evaluation load the same way. A `name_or_path` may be a Hub id, a local folder, the embedded
default (`smollm2-135m-instruct`) or a finished stage's output folder, in which case the base is
loaded and the stage's adapters are merged in (the RM starts from the SFT model, never the raw base).
"""

from __future__ import annotations

import json
import logging
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlhf_pipeline import embedded
from rlhf_pipeline.errors import PipelineError
from rlhf_pipeline.outputs import read_manifest

if TYPE_CHECKING:
    import torch
    from peft import PeftModel
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from rlhf_pipeline.recipe import ModelSpec

logger = logging.getLogger(__name__)

# Distinct pad tokens to borrow, best first, when a tokenizer pads with its EOS (SmolLM2, Llama 3):
# masks built from `ids != pad` would otherwise hide real end-of-turn tokens.
_PAD_CANDIDATES = ("<|finetune_right_pad_id|>", "<|pad|>", "<pad>", "[PAD]", "<|endoftext|>", "<unk>")
CAUSAL_LM = "causal-lm"
REWARD = "reward"


@dataclass
class ModelSource:
    """Where weights come from, and the public name to record in model cards and adapter configs."""

    path: str
    revision: str | None
    origin: str
    origin_revision: str | None
    tokenizer_path: str
    adapters: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"path": self.path, "revision": self.revision, "origin": self.origin,
                "origin_revision": self.origin_revision}


def resolve_source(spec: ModelSpec, progress: Any = print) -> ModelSource:
    """Turn `name_or_path` into a loadable source; finished stage outputs expand into base + adapters."""
    name = spec.name_or_path
    if embedded.is_embedded(name):
        folder = str(embedded.materialise(name, progress=progress))
        return ModelSource(folder, None, embedded.origin(name), None, folder)
    path = Path(name).expanduser()
    if path.is_dir():
        manifest = read_manifest(path)
        if manifest is None:
            if (path / "adapter_config.json").is_file() or path.name.startswith("checkpoint-"):
                raise PipelineError(f"model.name_or_path: {path} holds no finished stage (no stage.json); "
                                    "let the stage finish, or re-run it to resume from its checkpoint")
            folder = str(path.resolve())
            return ModelSource(folder, None, folder, None, folder)
        base = manifest.base_model
        if not manifest.adapter:
            return ModelSource(str(path), None, base["origin"], base.get("origin_revision"), str(path),
                               [])
        return ModelSource(base["path"], base.get("revision"), base["origin"], base.get("origin_revision"),
                           str(path), [*manifest.merged_adapters, str(path.resolve())])
    if path.suffix or name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise PipelineError(f"model.name_or_path: folder '{name}' not found")
    _check_hub_reachable(name, spec.revision)
    return ModelSource(name, spec.revision, name, spec.revision, name)


def _check_hub_reachable(repo_id: str, revision: str) -> None:
    """Offline, a Hub id must already be in the local cache; say so before anything loads."""
    from huggingface_hub import constants, try_to_load_from_cache

    if constants.HF_HUB_OFFLINE and not isinstance(try_to_load_from_cache(repo_id, "config.json",
                                                                          revision=revision), str):
        raise PipelineError(f"model.name_or_path: '{repo_id}' is not in the local Hugging Face cache and "
                            "HF_HUB_OFFLINE=1 forbids downloading it; unset HF_HUB_OFFLINE, download it "
                            "first, or point name_or_path at a local folder")


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


def is_distributed() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _quantization_config(spec: ModelSpec, compute_dtype: torch.dtype) -> Any:
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
        bnb_4bit_compute_dtype=resolve_dtype(quant.bnb_4bit_compute_dtype)
        if quant.bnb_4bit_compute_dtype != "auto" else compute_dtype,
        bnb_4bit_quant_storage=storage or "uint8",
    )


def _device_map(quantized: bool) -> dict[str, Any] | None:
    """bitsandbytes needs weights placed at load time; each process takes its own device.

    Never under ZeRO-3 / FSDP, which shard the (4-bit, float-stored) weights themselves: there QLoRA loads
    without a device map, as PEFT's DeepSpeed and FSDP QLoRA recipes do.
    """
    import torch

    from rlhf_pipeline.preflight import read_launch

    if not quantized or read_launch().shards_parameters:
        return None
    if torch.cuda.is_available():
        return {"": int(os.environ.get("LOCAL_RANK", "0"))}
    return {"": "cpu"}


def load_model(source: ModelSource, spec: ModelSpec, tokenizer: PreTrainedTokenizerBase,
               task: str = CAUSAL_LM) -> PreTrainedModel:
    """Load the base (quantized if asked), merge the source's stage adapters, and sync special tokens."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    dtype = resolve_dtype(spec.dtype)
    quantization = _quantization_config(spec, dtype)
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
    for adapter in source.adapters:
        model = merge_adapter(model, adapter)
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


def merge_adapter(model: PreTrainedModel, adapter_dir: str) -> PreTrainedModel:
    """Fold a finished stage's LoRA into the weights, so the next stage starts from that stage's model.

    The task type is cleared when the adapter was trained on another head (the SFT adapter merged into
    the reward model's backbone): only the shared backbone's LoRA weights matter for the merge.
    """
    from peft import PeftConfig, PeftModel

    config = PeftConfig.from_pretrained(adapter_dir)
    if (config.task_type == "CAUSAL_LM") != hasattr(model, "lm_head"):
        config.task_type = None
    return PeftModel.from_pretrained(model, adapter_dir, config=config, is_trainable=False).merge_and_unload()


def attach_lora(model: PreTrainedModel, spec: ModelSpec, task: str = CAUSAL_LM,
                gradient_checkpointing: bool = False) -> PeftModel | PreTrainedModel:
    """Add the stage's trainable LoRA (after k-bit preparation for QLoRA); full fine-tuning without one.

    k-bit preparation is told `use_reentrant=False` explicitly: PEFT otherwise enables checkpointing with
    empty kwargs, so torch warns on every checkpointed layer call (and plans to make it an error).
    """
    from peft import LoraConfig, TaskType, get_peft_model, prepare_model_for_kbit_training

    if spec.lora is None:
        return model
    if spec.quantization.enabled:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    lora = spec.lora
    targets = lora.target_modules
    if lora.layers_to_transform is not None:
        _check_layer_indices(model, lora.layers_to_transform)
        if targets == "all-linear":  # PEFT takes layers_to_transform only with explicit module names
            targets = _block_linear_names(model)
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.lora_alpha,
        lora_dropout=lora.lora_dropout,
        target_modules=targets,
        layers_to_transform=lora.layers_to_transform,
        modules_to_save=lora.modules_to_save,
        bias=lora.bias,
        task_type=TaskType.CAUSAL_LM if task == CAUSAL_LM else TaskType.SEQ_CLS,
    )
    return get_peft_model(model, config)


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

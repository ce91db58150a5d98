"""How a policy version reaches a vLLM engine, never through the training base.

The engine holds a full-precision base of its own (`engine_base`): the model's folder when the training base is
full precision, or a dequantized copy of a 4/8-bit training base, so the engine computes what the quantized
model computes. A policy version is then either its LoRA adapter saved as a folder (`save_policy_adapter`, loaded
under a new LoRA id) or merged weights (`write_merged`): each adapted weight is the engine base's weight plus the
adapter's delta (B·A·scale, PEFT's `get_delta_weight`), written as a complete checkpoint for `reload_weights`.
The training base is only read: nothing is merged into it or re-quantized.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlhf_pipeline.errors import PipelineError

if TYPE_CHECKING:
    import torch

    from rlhf_pipeline.adapters import SharedBase

WEIGHTS_FILE = "model.safetensors"
_PEFT_PREFIX = "base_model.model."


def checkpoint_name(module_name: str) -> str:
    """A module's name as the model's checkpoint spells it: PEFT's wrapper prefix and `base_layer` removed."""
    return module_name.removeprefix(_PEFT_PREFIX).replace(".base_layer", "")


def _plain_weight(module: torch.nn.Module, name: str, tensor: torch.Tensor) -> torch.Tensor:
    """A parameter in full precision: 4-bit and 8-bit bitsandbytes weights dequantized (read, never changed)."""
    import torch

    if type(tensor).__name__ == "Params4bit":
        from bitsandbytes.functional import dequantize_4bit

        return dequantize_4bit(tensor.data, tensor.quant_state).float()
    if type(tensor).__name__ == "Int8Params" and getattr(tensor, "SCB", None) is not None:
        return tensor.data.float() * tensor.SCB.float().unsqueeze(1) / 127.0
    if getattr(module, "is_quantized", False) or tensor.dtype in (torch.uint8, torch.int8):
        raise PipelineError(f"{name}: a quantized weight of type {type(tensor).__name__} that this pipeline cannot "
                            "dequantize for the vLLM engine; use generation.engine: hf for this model")
    return tensor.detach()


def full_precision_state(shared: SharedBase) -> dict[str, torch.Tensor]:
    """The base's weights under checkpoint names, dequantized, without any adapter (LoRA layers skipped)."""
    state: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for module_name, module in shared.model.named_modules():
        if ".lora_" in f".{module_name}" or "modules_to_save" in module_name:
            continue
        for name, tensor in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
            if "lora_" in name or id(tensor) in seen or name in ("inv_freq", "original_inv_freq"):
                continue
            seen.add(id(tensor))
            key = f"{checkpoint_name(module_name)}.{name}"
            state[key] = _plain_weight(module, key, tensor).to("cpu").contiguous()
    return state


def _config(shared: SharedBase) -> dict[str, Any]:
    config = shared.model.get_base_model().config.to_dict() if hasattr(shared.model, "get_base_model") \
        else shared.model.config.to_dict()
    config.pop("quantization_config", None)
    return config


def local_folder(base_path: str | Path, revision: str | None = None) -> Path:
    """The base's folder on disk: a local folder as it is, a Hub id's snapshot in the Hugging Face cache."""
    if Path(base_path).is_dir():
        return Path(base_path)
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(str(base_path), revision=revision))


def engine_base(shared: SharedBase, base_path: str | Path, scratch: Path) -> Path:
    """The folder the engine starts from: the base's own folder in full precision, else a dequantized copy.

    A base whose embeddings were resized for a pad token no longer matches its folder: written out too.
    """
    from safetensors.torch import save_file

    base_path = local_folder(base_path)
    model = shared.model.get_base_model() if hasattr(shared.model, "get_base_model") else shared.model
    on_disk = json.loads((Path(base_path) / "config.json").read_text(encoding="utf-8")).get("vocab_size")
    if not getattr(model, "is_quantized", False) and on_disk == model.get_input_embeddings().weight.shape[0]:
        return Path(base_path)
    folder = scratch / "engine-base"
    folder.mkdir(parents=True, exist_ok=True)
    state = full_precision_state(shared)
    if _config(shared).get("tie_word_embeddings"):
        state.pop("lm_head.weight", None)
    save_file(state, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
    _write_config(shared, folder, base_path)
    return folder


def _write_config(shared: SharedBase, folder: Path, base_path: str | Path) -> None:
    config = _config(shared)
    config["torch_dtype"] = config["dtype"] = "float32"
    (folder / "config.json").write_text(json.dumps(config, indent=2, default=str), encoding="utf-8")
    source = Path(base_path) / "generation_config.json"
    if source.is_file():
        shutil.copy(source, folder / "generation_config.json")


def lora_deltas(shared: SharedBase, role: str) -> dict[str, torch.Tensor]:
    """Checkpoint weight name -> the role's adapter delta (B·A·scale) for every layer its LoRA adapts."""
    adapter = shared.roles[role]
    if adapter is None:
        return {}
    config = shared.model.peft_config[adapter]
    if config.modules_to_save:
        raise PipelineError(f"the {role} adapter also trains whole modules ({config.modules_to_save}); the vLLM "
                            "engine takes LoRA layers only: use generation.engine: hf")
    deltas = {}
    for module_name, module in shared.model.named_modules():
        if hasattr(module, "get_delta_weight") and adapter in getattr(module, "lora_A", {}):
            deltas[f"{checkpoint_name(module_name)}.weight"] = module.get_delta_weight(adapter).detach().float().cpu()
    return deltas


def write_merged(shared: SharedBase, role: str, base_dir: Path, folder: Path) -> Path:
    """A complete checkpoint of `role` for `reload_weights`: the engine base's weights plus the role's deltas."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    deltas = lora_deltas(shared, role)
    folder.mkdir(parents=True, exist_ok=True)
    state: dict[str, torch.Tensor] = {}
    for path in sorted(base_dir.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as weights:
            for key in weights.keys():  # noqa: SIM118 (safe_open has no __iter__)
                tensor = weights.get_tensor(key)
                delta = deltas.pop(key, None)
                state[key] = tensor if delta is None else tensor.float() + delta  # full precision: the delta kept whole
    if deltas:
        raise PipelineError(f"{base_dir}: no base weight for the adapted layer(s) {sorted(deltas)[:3]}; the engine's "
                            "base is not the base the adapter was trained on")
    save_file(state, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
    shutil.copy(base_dir / "config.json", folder / "config.json")
    return folder


def save_policy_adapter(shared: SharedBase, role: str, folder: Path) -> Path:
    """The role's adapter as a standalone PEFT folder (what vLLM's LoRARequest loads)."""
    import torch

    if shared.roles[role] is None:
        raise PipelineError(f"the {role} role is the bare base: there is no adapter to load (use sync: merged)")
    with torch.no_grad():
        shared.save_adapter(role, folder)
    return folder

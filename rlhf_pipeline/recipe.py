"""Recipes: strict YAML files, one per stage, checked completely before any weights load.

A recipe has a `stage`, a `model` section, a `data` section, the stage's config section (`training` for
the trainers) whose keys are the config class's own field names (TRL's SFTConfig/RewardConfig, our
PPOConfig), an optional `hub` section, and any extra sections the stage declares. Every key is checked
against its schema: a misspelt key fails with the file, the key path and the closest valid key. Nothing
here imports torch.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from rlhf_pipeline.data.cards import DataCard, DataSpec
from rlhf_pipeline.errors import RecipeError
from rlhf_pipeline.outputs import MARKER, read_manifest
from rlhf_pipeline.schema import (
    coerce,
    describe,
    dotted_key,
    finite,
    matches,
    shown_key,
    suggest,
)

_SPECIAL_TOKEN_KEYS = {"pad_token", "eos_token", "bos_token", "unk_token", "sep_token", "cls_token",
                       "mask_token", "stop_token", "stop_token_id"}
_SECRET_KEY = re.compile(r"(^|_)(token|api_key|apikey|password|passwd|secret|secret_key|private_key|access_key)$")
_DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass
class QuantizationSpec:
    """bitsandbytes loading of the frozen base: 4-bit NF4 (QLoRA) or 8-bit."""

    load_in_4bit: bool = False
    load_in_8bit: bool = False
    bnb_4bit_quant_type: str = "nf4"
    bnb_4bit_use_double_quant: bool = True
    bnb_4bit_compute_dtype: str = "auto"
    bnb_4bit_quant_storage: str | None = None

    def __post_init__(self) -> None:
        if self.load_in_4bit and self.load_in_8bit:
            raise ValueError("load_in_8bit: choose one of load_in_4bit and load_in_8bit, not both")
        if self.bnb_4bit_quant_type not in ("nf4", "fp4"):
            raise ValueError("bnb_4bit_quant_type: must be nf4 or fp4")
        if self.bnb_4bit_compute_dtype not in _DTYPES:
            raise ValueError(f"bnb_4bit_compute_dtype: must be one of {', '.join(_DTYPES)}")

    @property
    def enabled(self) -> bool:
        return self.load_in_4bit or self.load_in_8bit


@dataclass
class LoraSpec:
    """The trainable adapter. `target_modules: all-linear` adapts every linear layer but the head.

    `layers_to_transform` (PEFT's knob: block indices, 0 = nearest the embeddings) limits the adapter to
    those transformer blocks; adapting only the top blocks makes the backward pass stop there.
    """

    r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    target_modules: str | list[str] = "all-linear"
    layers_to_transform: list[int] | None = None
    modules_to_save: list[str] | None = None
    bias: str = "none"

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ValueError("r: the LoRA rank must be at least 1")
        if self.lora_alpha <= 0:
            raise ValueError("lora_alpha: must be positive")
        if not 0 <= self.lora_dropout < 1:
            raise ValueError("lora_dropout: must be in [0, 1)")
        if self.bias not in ("none", "all", "lora_only"):
            raise ValueError("bias: must be none, all or lora_only")
        if self.layers_to_transform is not None and (
                not self.layers_to_transform or min(self.layers_to_transform) < 0):
            raise ValueError("layers_to_transform: a non-empty list of block indices (0, 1, ...), or omit it "
                             "to adapt every block")


@dataclass
class ModelSpec:
    """What to load: a Hub id, a local folder, a finished stage's output, or an embedded alias."""

    name_or_path: str
    revision: str = "main"
    dtype: str = "auto"
    attn_implementation: str | None = None
    trust_remote_code: bool = False
    allow_unsafe_weights: bool = False
    chat_template: str | None = None
    quantization: QuantizationSpec = field(default_factory=QuantizationSpec)
    lora: LoraSpec | None = field(default_factory=LoraSpec)

    def __post_init__(self) -> None:
        if not self.name_or_path.strip():
            raise ValueError("name_or_path: must name a model (Hub id, folder or smollm2-135m-instruct)")
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype: must be one of {', '.join(_DTYPES)}")
        if self.quantization.enabled and self.lora is None:
            raise ValueError(
                "quantization: a 4/8-bit base cannot be fully fine-tuned; add a lora section "
                "(QLoRA) or turn quantization off"
            )


@dataclass
class HubSpec:
    """Push the stage's adapter to the Hub when it finishes; the token comes from the environment."""

    push: bool = False
    repo_id: str | None = None
    private: bool = True
    revision: str | None = None
    commit_message: str | None = None

    def __post_init__(self) -> None:
        if self.push and not self.repo_id:
            raise ValueError("repo_id: set it (e.g. me/my-model) when push is true")


# Keys of a trainer config that the recipe owns elsewhere, and where to set them instead.
_RESERVED_TRAINING_KEYS = {
    "max_length": "data.max_length",
    "trust_remote_code": "model.trust_remote_code",
    "model_init_kwargs": "the model section",
    "chat_template_path": "model.chat_template",
    "push_to_hub": "hub.push",
    "hub_model_id": "hub.repo_id",
    "hub_private_repo": "hub.private",
    "resume_from_checkpoint": "nothing: re-running the same command resumes from the last checkpoint",
}
# Trainer keys with a range a recipe can get wrong; checked here because the trainers check them
# only after torch is imported.
_POSITIVE_TRAINING_KEYS = ("learning_rate", "num_train_epochs", "per_device_train_batch_size",
                           "per_device_eval_batch_size", "gradient_accumulation_steps", "response_length",
                           "num_ppo_epochs", "num_mini_batches", "temperature", "save_steps", "logging_steps")


@dataclass
class Recipe:
    """A validated recipe: typed sections plus the trainer's own keys, ready for a stage to wire."""

    path: Path
    stage: str
    model: ModelSpec
    data: DataSpec
    config: dict[str, Any]
    config_section: str
    hub: HubSpec
    sections: dict[str, Any]
    # Folders earlier stages of the pipeline being validated will (re)write: checks of their contents wait.
    pending_outputs: list[Path] = field(default_factory=list)
    cards: list[DataCard] = field(default_factory=list)  # the data cards named, loaded and checked (none pending)
    settings: Any = None  # the stage's typed config when it is one of ours (PPOConfig...), built once

    @property
    def output_dir(self) -> Path:
        return Path(self.config["output_dir"])

    def check_finished_stage(self, key: str, folder: str | Path, stages: tuple[str, ...], fix: str) -> None:
        """Before any weights load: a folder the recipe points at holds a finished stage of one of `stages`.

        A folder an earlier pipeline stage will still write, or one that does not exist yet, is checked
        when the stage starts (the loaders refuse it then).
        """
        folder = Path(folder)
        if not folder.is_dir() or any(folder.resolve() == p.resolve() for p in self.pending_outputs):
            return
        manifest = read_manifest(folder)
        if manifest is None:
            raise RecipeError(self.path, key, f"{folder} is not a finished {' or '.join(stages)} stage (no {MARKER}); "
                              "run that stage to the end first (re-running it resumes)")
        if manifest.stage not in stages:
            raise RecipeError(self.path, key, f"{folder} holds a finished '{manifest.stage}' stage, {fix}")

    def resolved(self) -> dict[str, Any]:
        """The recipe with every default filled in: what is saved next to the outputs."""
        out: dict[str, Any] = {"stage": self.stage, "model": dataclasses.asdict(self.model),
                               "data": dataclasses.asdict(self.data), self.config_section: dict(self.config),
                               "hub": dataclasses.asdict(self.hub)}
        out.update({name: dataclasses.asdict(spec) for name, spec in self.sections.items()})
        return out

    def upstream(self) -> dict[str, str]:
        """Finished stage outputs this recipe reads (a path in any value), with their fingerprints."""
        found: dict[str, str] = {}

        def visit(value: Any) -> None:
            if isinstance(value, dict):
                for item in value.values():
                    visit(item)
            elif isinstance(value, list):
                for item in value:
                    visit(item)
            elif isinstance(value, str) and value and value != self.config.get("output_dir"):
                path = Path(value)
                for folder in (path, path.parent):
                    if (manifest := read_manifest(folder)) is not None:
                        found[str(folder.resolve())] = f"{manifest.fingerprint}@{manifest.finished_at}"
                        break

        visit(self.resolved())
        return found

    def fingerprint(self) -> str:
        """A hash of the resolved recipe and its upstream outputs: a finished stage re-runs when either changes."""
        text = json.dumps([self.resolved(), self.upstream()], sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def _snake(key: str) -> str:
    """`hfToken`, `HF-Token` and `hf token` all become `hf_token`, so every spelling meets the same check."""
    split = re.sub(r"([a-z0-9])([A-Z])|([A-Z])([A-Z][a-z])", r"\1\3_\2\4", key)
    return re.sub(r"[^a-z0-9]+", "_", split.lower())


def check_secrets(data: Any, path: Path, prefix: str = "") -> None:
    """Refuse keys that look like credentials: they belong in the environment, never in a file."""
    if isinstance(data, list):
        for index, item in enumerate(data):
            check_secrets(item, path, f"{prefix.removesuffix('.')}[{index}].")
    if isinstance(data, dict):
        for key, value in data.items():
            key_path = f"{prefix}{shown_key(key)}"
            if isinstance(key, str) and _snake(key) not in _SPECIAL_TOKEN_KEYS and _SECRET_KEY.search(_snake(key)):
                raise RecipeError(path, key_path, "looks like a secret; recipes are saved next to outputs "
                                  "and pushed to the Hub, so set it in the environment instead "
                                  "(HF_TOKEN for the Hub, WANDB_API_KEY for wandb)")
            check_secrets(value, path, f"{key_path}.")


def check_config(values: Any, fields: dict[str, str], path: Path, section: str) -> dict[str, Any]:
    """Check the stage's config section against its config class's own fields (names, types, ranges)."""
    if not isinstance(values, dict):
        raise RecipeError(path, section, "must be a mapping of the stage's arguments")
    values = {key: coerce(value, fields[key]) if key in fields else value for key, value in values.items()}
    for key, value in values.items():
        key_path = dotted_key(section, key)
        if key in _RESERVED_TRAINING_KEYS:
            raise RecipeError(path, key_path, f"set by the recipe; use {_RESERVED_TRAINING_KEYS[key]}")
        if key not in fields:
            raise RecipeError(path, key_path, f"unknown key{suggest(str(key), fields)}")
        if not matches(value, fields[key]):
            raise RecipeError(path, key_path, f"expected {describe(fields[key])}, got {value!r}")
        if not finite(value):
            raise RecipeError(path, key_path, f"must be a finite number, got {value}")
        if key in _POSITIVE_TRAINING_KEYS and isinstance(value, (int, float)) and value <= 0:
            raise RecipeError(path, key_path, f"must be positive, got {value}")
    if not values.get("output_dir"):
        raise RecipeError(path, f"{section}.output_dir", "required key is missing (where the stage writes)")
    return dict(values)


def parse_override(text: str, path: Path | None = None) -> tuple[list[str], Any]:
    """Split a command-line override `section.key=value`; the value is read as YAML."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise RecipeError(path, text, "an override must look like section.key=value")
    try:
        parsed = yaml.safe_load(value) if value else None
    except yaml.YAMLError as err:
        raise RecipeError(path, key.strip(), f"the override value {value!r} is not valid YAML "
                          f"({getattr(err, 'problem', err)}); quote it or fix the brackets") from None
    return key.strip().split("."), parsed


def override_text(value: Any) -> str:
    """A value as the right-hand side of a `key=value` override (YAML flow style, read back by parse_override)."""
    return yaml.safe_dump(value, default_flow_style=True, width=2**31).strip().removesuffix("...").strip()


def apply_overrides(data: dict[str, Any], overrides: list[str], path: Path | None = None) -> dict[str, Any]:
    """Apply `a.b.c=value` overrides onto a recipe mapping, creating sections as needed."""
    for text in overrides:
        keys, value = parse_override(text, path)
        target = data
        for key in keys[:-1]:
            target = target.setdefault(key, {})
            if not isinstance(target, dict):
                raise RecipeError(path, text, f"'{key}' is not a section, so '{text}' cannot be set")
        target[keys[-1]] = value
    return data

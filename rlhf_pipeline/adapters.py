"""Several models on one frozen base: each a named LoRA adapter, scorers with a scalar head on top.

PPO's four roles (reference, policy, reward model, critic), evaluation's baseline, policy and reward
model, and labelling's policy are all loaded this way: the base once, quantized if the recipe asks, and
each finished stage's adapter under a role name, never merged into it. A role is switched on with
`use(role)` before its forward pass; gradients stay on the trainable roles whichever role is active.

    shared = load_frozen_roles({"sft": resolve_source(spec)}, spec, tokenizer)["sft"]
    logits = shared("sft", input_ids=ids, attention_mask=mask)

PEFT's own switch (`PeftModel.set_adapter`) makes the adapter it activates trainable and freezes the
others, and leaving `disable_adapter()` re-runs it; `use` restores the trainable set after every switch.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from rlhf_pipeline.errors import PipelineError
from rlhf_pipeline.models import (
    CAUSAL_LM,
    HEAD_NAMES,
    REWARD,
    SCORER_STAGES,
    load_adapter_weights,
    load_base,
    process_device,
    read_score_head,
)
from rlhf_pipeline.outputs import ADAPTER_WEIGHTS, read_manifest
from rlhf_pipeline.sources import ModelSource

if TYPE_CHECKING:
    from peft import LoraConfig
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from rlhf_pipeline.recipe import ModelSpec



class SharedBase(torch.nn.Module):
    """One base model and the roles played on it: adapter name (or the bare base) and optional scalar head.

    As a Module it is what accelerate prepares for training: DDP and DeepSpeed see every trainable
    adapter and head as parameters of one model, and `forward(role, ...)` is the pass they hook into.
    """

    def __init__(self, model: PreTrainedModel) -> None:
        super().__init__()
        self.model: Any = model
        self.heads = torch.nn.ModuleDict()
        self.roles: dict[str, str | None] = {}
        self.trainable: list[str] = []
        self._active: str | None = None

    # ---------------------------------------------------------------- building

    def add_role(self, name: str, adapter_dir: str | Path | None = None, *, trainable: bool = False,
                 config: LoraConfig | None = None, head: torch.nn.Module | None = None) -> None:
        """A role from a finished stage's adapter (`adapter_dir`), a new adapter (`config`), or the bare base.

        A trainable role from `adapter_dir` is a copy of that adapter that training changes; the same folder
        can be added again, frozen, under another name (PPO's policy and reference).
        """
        from peft import PeftModel, get_peft_model

        if name in self.roles:
            raise ValueError(f"role {name!r} exists already")
        if adapter_dir is not None or config is not None:
            config = config or _adapter_config(adapter_dir)
            config.inference_mode = not trainable
            # The folder the base was loaded from, not the Hub id a finished stage's adapter names: saving
            # the adapter with an unknown base makes PEFT look the id up on the Hub (and fetch its config).
            config.base_model_name_or_path = self.model.name_or_path or config.base_model_name_or_path
            if isinstance(self.model, PeftModel):
                self.model.add_adapter(name, config)
            else:
                self.model = get_peft_model(self.model, config, adapter_name=name)
            if adapter_dir is not None:
                load_adapter_weights(self.model, adapter_dir, name)
        elif trainable:
            raise ValueError(f"role {name!r}: the bare base is frozen; give an adapter to train")
        self.roles[name] = name if adapter_dir is not None or config is not None else None
        if head is not None:
            head.requires_grad_(trainable)
            self.heads[name] = head
        if trainable:
            self.trainable.append(name)
        self._active = None
        self.use(name)

    def role_parameters(self, role: str) -> list[torch.nn.Parameter]:
        """The trainable parameters of one role: its adapter's (PEFT names them `...<adapter>...`) and its head's."""
        adapter = self.roles[role]
        params = [p for name, p in self.model.named_parameters()
                  if p.requires_grad and adapter is not None and f".{adapter}." in f"{name}."]
        if role in self.heads:
            params += [p for p in self.heads[role].parameters() if p.requires_grad]
        return params

    # ---------------------------------------------------------------- passes

    def use(self, role: str) -> Any:
        """Activate `role` and return the model to call (for `generate`, say); trainable roles keep their grads."""
        if role == self._active:
            return self.model
        adapter = self.roles[role]
        tuner = self.model.base_model if self.adapters_loaded else None
        if adapter is None:
            if tuner is not None:
                tuner.disable_adapter_layers()
        else:
            if self._active is None or self.roles[self._active] is None:
                tuner.enable_adapter_layers()
            tuner.set_adapter(adapter, inference_mode=True)
        if self.trainable:
            tuner.set_requires_grad(self.trainable, True)
        self._active = role
        return self.model

    def forward(self, role: str, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                position_ids: torch.Tensor | None = None, logits_to_keep: int = 0) -> torch.Tensor:
        """A language-model role's logits ([batch, positions, vocab]); a scorer's score at every position."""
        model = self.use(role)
        if role in self.heads:
            hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                   use_cache=False).last_hidden_state
            head = self.heads[role]
            return head(hidden.to(head.weight.dtype)).squeeze(-1).float()
        return model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                     logits_to_keep=logits_to_keep, use_cache=False).logits

    @property
    def adapters_loaded(self) -> bool:
        return any(adapter is not None for adapter in self.roles.values())

    @property
    def backbone(self) -> torch.nn.Module:
        """The transformer without its output head (LoRA layers included): hidden states, no vocabulary logits."""
        from peft import PeftModel

        model = self.model.get_base_model() if isinstance(self.model, PeftModel) else self.model
        return getattr(model, model.base_model_prefix)

    def last_scores(self, role: str, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """A scorer's one number per right-padded row: its head at the row's last real token."""
        scores = self(role, input_ids, attention_mask)
        last = attention_mask.sum(dim=1) - 1
        return scores[torch.arange(len(last), device=scores.device), last]

    # ------------------------------------------------------------------ saving

    def adapter_state(self, role: str, state_dict: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """The role's adapter weights under PEFT's standard keys (as if it were the only adapter).

        `state_dict`: the adapters' model's state to take them from instead of the live one (e.g. tensors that
        were gathered whole under ZeRO-3, see stages.common.gathered_state_dict).
        """
        from peft import get_peft_model_state_dict

        return get_peft_model_state_dict(self.model, state_dict=state_dict, adapter_name=self.roles[role])

    def save_adapter(self, role: str, folder: Path, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """Write the role's adapter as a standalone PEFT folder: `PeftModel.from_pretrained(base, folder)` loads it."""
        import copy

        from safetensors.torch import save_file

        folder.mkdir(parents=True, exist_ok=True)
        state = {key: value.detach().to("cpu").contiguous()
                 for key, value in self.adapter_state(role, state_dict).items()}
        save_file(state, str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        config = copy.deepcopy(self.model.peft_config[self.roles[role]])
        config.inference_mode = True
        config.save_pretrained(str(folder))


def _adapter_config(adapter_dir: str | Path | None) -> LoraConfig:
    """A saved adapter's config for a causal-LM base: a reward model's head is loaded apart, as a role head."""
    from peft import LoraConfig

    config = LoraConfig.from_pretrained(str(adapter_dir))
    config.modules_to_save = [m for m in config.modules_to_save or [] if m not in HEAD_NAMES] or None
    config.task_type = "CAUSAL_LM"
    return config


def score_head(adapter_dir: str | Path, mean: float = 0.0, std: float = 1.0) -> torch.nn.Linear:
    """A reward model's score head as an fp32 Linear on hidden states; with (mean, std) it gives (score − mean)/std.

    The rescaled form is the critic's start when PPO normalises rewards: its values then begin on the scale of
    the returns they are trained to predict.
    """
    weight = read_score_head(adapter_dir).float()
    head = torch.nn.Linear(weight.shape[1], 1, bias=True)
    with torch.no_grad():
        head.weight.copy_(weight / std)
        head.bias.fill_(-mean / std)
    return head


def load_frozen_roles(sources: dict[str, ModelSource], spec: ModelSpec, tokenizer: PreTrainedTokenizerBase,
                      scorers: frozenset[str] = frozenset()) -> dict[str, SharedBase]:
    """Each named source as a frozen role, one base in memory per distinct base; roles in `scorers` get a head.

    A scorer is a finished rm (or prm) stage: its adapter on the base and its score head, or (a fully fine-tuned
    reward model) its own weights with their head. Every scorer is checked before any weights load. Bases go
    to this process's device (a 4-bit or 8-bit one is placed there as it loads).
    """
    for name in scorers & sources.keys():
        _require_reward_stage(sources[name])
    loaded: dict[tuple[str, str | None, str], SharedBase] = {}
    out: dict[str, SharedBase] = {}
    for name, source in sources.items():
        task = REWARD if name in scorers and source.adapter is None else CAUSAL_LM
        key = (source.path, source.revision, task)
        if key not in loaded:
            loaded[key] = SharedBase(load_base(source, spec, tokenizer, task=task).eval())
        shared = loaded[key]
        head = None
        if name in scorers:
            head = shared.model.score if task == REWARD else score_head(source.adapter)
        shared.add_role(name, source.adapter, head=head)
        out[name] = shared.eval()
    for shared in loaded.values():
        (shared.heads if spec.quantization.enabled else shared).to(process_device())
    return out


def load_scorer_stage(output_dir: str | Path, model_spec: ModelSpec | None,
                      role: str) -> tuple[SharedBase, PreTrainedTokenizerBase]:
    """A finished rm or prm stage alone, as a frozen scorer role on its base (with the recipe's model settings,
    4-bit and so on, when given), and its tokenizer."""
    import dataclasses

    from rlhf_pipeline.models import load_tokenizer
    from rlhf_pipeline.recipe import ModelSpec
    from rlhf_pipeline.sources import resolve_source

    spec = (dataclasses.replace(model_spec, name_or_path=str(output_dir)) if model_spec is not None
            else ModelSpec(name_or_path=str(output_dir)))
    source = resolve_source(spec)
    tokenizer = load_tokenizer(source, spec)
    return load_frozen_roles({role: source}, spec, tokenizer, scorers=frozenset({role}))[role], tokenizer


def _require_reward_stage(source: ModelSource) -> None:
    folder = source.lineage[-1] if source.lineage else source.path
    manifest = read_manifest(Path(folder))
    if manifest is None or manifest.stage not in SCORER_STAGES:
        raise PipelineError(f"{folder}: not a finished {' or '.join(SCORER_STAGES)} stage, so it has no score head "
                            "to score with")

"""A model's shapes, as far as memory depends on them, read from its config.json without loading weights."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlhf_pipeline.errors import PipelineError
from rlhf_pipeline.sources import is_hub_id, resolve_source


@dataclass(frozen=True)
class Linear:
    """One linear layer of a decoder block, as PEFT sees it (`name` is the module's own name)."""

    name: str
    path: str  # e.g. self_attn.q_proj, for regex target_modules
    n_in: int
    n_out: int
    copies: int = 1  # MoE experts


@dataclass(frozen=True)
class Architecture:
    """What memory depends on, read from config.json (decoder-only, Llama-style blocks)."""

    model_type: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool
    num_experts: int = 1
    experts_per_token: int = 1
    fused_projections: bool = False  # phi3: qkv_proj and gate_up_proj
    source: str = ""

    @classmethod
    def from_config(cls, config: dict[str, Any], source: str = "") -> Architecture:
        """Read the fields every Llama-family config.json has (text_config for multimodal ones)."""
        text = config.get("text_config") or config
        try:
            hidden = int(text["hidden_size"])
            heads = int(text["num_attention_heads"])
            return cls(
                model_type=str(text.get("model_type") or config.get("model_type", "unknown")),
                hidden_size=hidden,
                num_layers=int(text["num_hidden_layers"]),
                num_heads=heads,
                num_kv_heads=int(text.get("num_key_value_heads") or heads),
                head_dim=int(text.get("head_dim") or hidden // heads),
                intermediate_size=int(text.get("intermediate_size") or 4 * hidden),
                vocab_size=int(text["vocab_size"]),
                tie_word_embeddings=bool(config.get("tie_word_embeddings", text.get("tie_word_embeddings", False))),
                num_experts=int(text.get("num_local_experts") or text.get("num_experts") or 1),
                experts_per_token=int(text.get("num_experts_per_tok") or 1),
                fused_projections=str(text.get("model_type", "")).startswith("phi3"),
                source=source,
            )
        except KeyError as err:
            raise PipelineError(f"{source or 'config.json'}: no {err.args[0]}; the estimator reads decoder-only "
                                "transformer configs (Llama, Mistral, Qwen, Gemma, Phi-3, ...)") from None

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    def block_linears(self) -> list[Linear]:
        """The linear layers of one decoder block, with PEFT's module names."""
        h, inter, experts = self.hidden_size, self.intermediate_size, self.num_experts
        if self.fused_projections:
            attention = [Linear("qkv_proj", "self_attn.qkv_proj", h, self.q_dim + 2 * self.kv_dim),
                         Linear("o_proj", "self_attn.o_proj", self.q_dim, h)]
            mlp = [Linear("gate_up_proj", "mlp.gate_up_proj", h, 2 * inter),
                   Linear("down_proj", "mlp.down_proj", inter, h)]
        else:
            attention = [Linear("q_proj", "self_attn.q_proj", h, self.q_dim),
                         Linear("k_proj", "self_attn.k_proj", h, self.kv_dim),
                         Linear("v_proj", "self_attn.v_proj", h, self.kv_dim),
                         Linear("o_proj", "self_attn.o_proj", self.q_dim, h)]
            mlp = [Linear(name, f"mlp.{name}", n_in, n_out, experts)
                   for name, n_in, n_out in (("gate_proj", h, inter), ("up_proj", h, inter), ("down_proj", inter, h))]
            if experts > 1:
                mlp.append(Linear("gate", "mlp.gate", h, experts))  # the router
        return attention + mlp

    @property
    def block_linear_params(self) -> int:
        return self.num_layers * sum(lin.n_in * lin.n_out * lin.copies for lin in self.block_linears())

    @property
    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def norm_params(self) -> int:
        return (2 * self.num_layers + 1) * self.hidden_size

    def total_params(self, head: str = "lm") -> int:
        """All parameters; head: 'lm' (causal LM, lm_head unless tied) or 'score' (one-label classifier)."""
        head_params = (0 if self.tie_word_embeddings else self.embedding_params) if head == "lm" else self.hidden_size
        return self.block_linear_params + self.embedding_params + self.norm_params + head_params


def targeted_linears(arch: Architecture, targets: str | list[str]) -> list[Linear]:
    """The block linears a LoRA `target_modules` selects (PEFT: `all-linear`, names by suffix, or a regex)."""
    linears = arch.block_linears()
    if targets == "all-linear":
        return linears
    if isinstance(targets, str):
        pattern = re.compile(targets)
        return [lin for lin in linears if pattern.fullmatch(f"model.layers.0.{lin.path}")]
    return [lin for lin in linears if lin.name in targets or lin.path in targets]


# ------------------------------------------------------------------------------------- config lookup

def _read_config(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def find_config(name_or_path: str, revision: str | None = "main") -> tuple[dict[str, Any], str]:
    """config.json of a model source (embedded alias, folder, finished stage output, Hub id), without weights.

    The source is resolved as the stages resolve it (sources.py), without converting the embedded model.
    """
    from rlhf_pipeline import embedded
    from rlhf_pipeline.recipe import ModelSpec

    if not (embedded.is_embedded(name_or_path) or Path(name_or_path).expanduser().is_dir()
            or is_hub_id(name_or_path)):
        raise PipelineError(f"model.name_or_path: '{name_or_path}' does not exist yet; the estimate needs the "
                            "base model's config.json: pass --base MODEL (the model that stage starts from)")
    source = resolve_source(ModelSpec(name_or_path=name_or_path, revision=revision or "main"), progress=print,
                            convert_embedded=False)
    folder = Path(source.path)
    if folder.is_dir() or embedded.is_embedded(name_or_path):
        if not (folder / "config.json").is_file():
            hint = ("it is not converted yet: run any stage with it once (the first run converts it in ~35 s), "
                    "then estimate") if embedded.is_embedded(name_or_path) else "it has no config.json"
            raise PipelineError(f"model.name_or_path: {name_or_path} ({folder}): {hint}")
        return _read_config(folder / "config.json"), str(folder / "config.json")
    return _hub_config(source.path, source.revision or "main"), f"{source.path} (Hugging Face cache)"


def _hub_config(repo_id: str, revision: str) -> dict[str, Any]:
    """A Hub model's config.json from the local cache; downloaded (one small file) only when online."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    cache_dir = os.environ.get("HF_HUB_CACHE") or None
    cached = try_to_load_from_cache(repo_id, "config.json", revision=revision, cache_dir=cache_dir)
    if isinstance(cached, str):
        return _read_config(Path(cached))
    try:
        return _read_config(Path(hf_hub_download(repo_id, "config.json", revision=revision, cache_dir=cache_dir)))
    except Exception as err:
        raise PipelineError(f"model.name_or_path: could not fetch the config.json of '{repo_id}' ({err}); "
                            "download it first or pass --base with a local folder") from None

"""A recipe's `generation:` section: which engine samples, how policy versions reach it, where it runs.

Checked before any weights load (no torch import here): a vLLM engine in this process needs `vllm` importable
in this environment, a server started by the pipeline needs a Python that has it, a server the user started
needs a URL. Hugging Face `generate` is the default and the reference the vLLM engine is tested against.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

from rlhf_pipeline.errors import RecipeError

if TYPE_CHECKING:
    from rlhf_pipeline.recipe import Recipe

ENGINES = ("hf", "vllm")
SYNCS = ("auto", "merged", "lora")
MODES = ("colocated", "server")
ENGINE_DTYPES = ("auto", "float32", "bfloat16", "float16")
INSTALL_HINT = ("on GPUs `pip install 'rlhf-pipeline[vllm]'`; on a CPU-only machine `make vllm-env` builds "
                ".venv-vllm with vLLM's CPU build (docs/vllm.md), then run rlhf-pipeline from there, or use "
                "generation.mode: server with generation.server_python: .venv-vllm/bin/python")


@dataclass
class GenerationSpec:
    """How the stage samples. `sync`: how each policy version reaches a vLLM engine (merged weights reloaded,
    or a LoRA adapter under a new id; auto = merged on CPU, where vLLM's LoRA kernels are slow, lora on GPUs).
    `mode`: the engine in this process (colocated) or an OpenAI-compatible vLLM server (`server_url` of one the
    user started; without it the pipeline starts one with `server_python`, default this Python)."""

    engine: str = "hf"
    sync: str = "auto"
    mode: str = "colocated"
    dtype: str = "auto"  # the engine's weights: auto = the trainer's compute dtype (float32 on CPU, bf16 on GPUs)
    server_url: str | None = None
    server_python: str | None = None
    kv_cache_gib: int = 2  # CPU: the KV cache size in GiB (VLLM_CPU_KVCACHE_SPACE, a whole number)
    gpu_memory_utilization: float = 0.35  # GPU: the share of its memory the engine may take (weights + KV cache)
    enforce_eager: bool = False  # vLLM's own knob: no graph compilation (starts faster, may sample slower)
    max_model_len: int | None = None  # longest prompt + answer the engine accepts; null: the model's own limit
    startup_timeout: float = 600.0  # seconds to wait for a server to answer

    def __post_init__(self) -> None:
        for key, allowed in (("engine", ENGINES), ("sync", SYNCS), ("mode", MODES), ("dtype", ENGINE_DTYPES)):
            if getattr(self, key) not in allowed:
                raise ValueError(f"{key}: one of {', '.join(allowed)}, got {getattr(self, key)!r}")
        if self.server_url is not None:
            parsed = urlparse(self.server_url)
            if parsed.scheme not in ("http", "https") or not parsed.netloc:
                raise ValueError(f"server_url: an http(s) URL such as http://127.0.0.1:8000, got {self.server_url!r}")
        if (self.server_url or self.server_python) and self.mode != "server":
            raise ValueError("mode: server_url and server_python are for mode: server; set it, or remove them")
        if self.server_url and self.server_python:
            raise ValueError("server_python: starts a server, and server_url names one already running; give one")
        if self.kv_cache_gib <= 0 or not 0 < self.gpu_memory_utilization <= 1 or (self.max_model_len or 16) < 16:
            raise ValueError("kv_cache_gib: must be > 0 (and gpu_memory_utilization in (0, 1], max_model_len >= 16)")

    @property
    def uses_vllm(self) -> bool:
        return self.engine == "vllm"


def vllm_importable() -> bool:
    """Whether this environment has vLLM (found without importing it: importing costs seconds)."""
    return importlib.util.find_spec("vllm") is not None


def check_generation(recipe: Recipe) -> None:
    """Before any weights load: the engine the recipe asks for can run here, or say how to make it run."""
    spec: GenerationSpec = recipe.sections["generation"]
    if not spec.uses_vllm:
        return
    if spec.mode == "colocated" and not vllm_importable():
        raise RecipeError(recipe.path, "generation.engine", f"vllm is not installed in this environment "
                          f"({sys.executable}); install it ({INSTALL_HINT}), or set generation.engine: hf")
    if spec.mode == "server" and spec.server_url is None:
        python = Path(spec.server_python) if spec.server_python else None
        if python is None and not vllm_importable():
            raise RecipeError(recipe.path, "generation.server_python", "the pipeline starts the vLLM server, but "
                              f"this environment ({sys.executable}) has no vllm; name the Python of one that has it "
                              f"(e.g. .venv-vllm/bin/python), give generation.server_url, or install it "
                              f"({INSTALL_HINT})")
        if python is not None and not (python.is_file() and os.access(python, os.X_OK)):
            raise RecipeError(recipe.path, "generation.server_python", f"{python} is not an executable Python; "
                              "name the interpreter of the environment that has vllm (`make vllm-env` makes "
                              ".venv-vllm/bin/python)")

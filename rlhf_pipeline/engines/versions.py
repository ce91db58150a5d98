"""What the vLLM engines share: the settings they start with, and handing them each new policy version exactly once.

A version is identified by (shared base, role, version label): PPO labels the policy by its optimizer step,
frozen stages by their folder. A new version is exported (weights.py) and loaded: merged weights replace the
engine's weights, then its prefix cache is dropped (cached keys and values of the old weights would otherwise
be reused for the same prompt tokens); an adapter gets a LoRA id never used before, because vLLM keeps serving
the adapter it first loaded under an id when the same id comes back with a new path.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlhf_pipeline.engines.base import Completion, EngineStats, SamplingSettings
from rlhf_pipeline.engines.weights import engine_base, save_policy_adapter, write_merged
from rlhf_pipeline.errors import PipelineError

if TYPE_CHECKING:
    from collections.abc import Sequence

    from rlhf_pipeline.adapters import SharedBase
    from rlhf_pipeline.engines.spec import GenerationSpec


def cache_root() -> Path:
    """Where vLLM keeps its compiled graphs (VLLM_CACHE_ROOT; else beside the pipeline's other caches)."""
    return Path(os.environ.get("VLLM_CACHE_ROOT", Path.home() / ".cache" / "rlhf_pipeline" / "vllm"))


def engine_environment(spec: GenerationSpec) -> dict[str, str]:
    """Environment variables a vLLM engine reads when it starts (the user's own values win)."""
    wanted = {"VLLM_CACHE_ROOT": str(cache_root()), "VLLM_CPU_KVCACHE_SPACE": str(spec.kv_cache_gib),
              "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True", "VLLM_SERVER_DEV_MODE": "1",
              "VLLM_CONFIGURE_LOGGING": os.environ.get("VLLM_CONFIGURE_LOGGING", "0"),
              "TOKENIZERS_PARALLELISM": "false"}
    threads = os.environ.get("OMP_NUM_THREADS")
    if threads and threads.isdigit():  # one engine thread per OpenMP thread asked for, not every core
        wanted["VLLM_CPU_OMP_THREADS_BIND"] = f"0-{int(threads) - 1}"
    return {key: os.environ.get(key, value) for key, value in wanted.items()}


def resolve_sync(spec: GenerationSpec) -> str:
    """auto: merged weights on CPU (vLLM's CPU LoRA kernels sample ~6x slower: NOTES-CPU), LoRA on GPUs (public
    figures put LoRA decode at ~0.6x merged, and an adapter syncs without writing the whole model)."""
    import torch

    if spec.sync != "auto":
        return spec.sync
    return "lora" if torch.cuda.is_available() else "merged"


def resolve_engine_dtype(spec: GenerationSpec) -> str:
    """auto: the dtype the trainer computes in (`models.resolve_dtype`: float32 on CPU, bfloat16 on GPUs that have
    it; float16 on older GPUs, for speed), so the engine samples the policy being trained. bfloat16 on a CPU with
    AMX samples faster, but on a model this small it is another policy: the demo's SFT answers sampled in bf16
    scored VADER 0.240 against 0.126 in fp32 (docs/vllm.md); ask for it with `generation.dtype: bfloat16`."""
    import torch

    from rlhf_pipeline.models import resolve_dtype

    if spec.dtype != "auto":
        return spec.dtype
    if torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        return "float16"
    return str(resolve_dtype("auto")).removeprefix("torch.")


def sampling_fields(settings: SamplingSettings, num_samples: int) -> dict[str, Any]:
    """vLLM's sampling parameters for our settings: pure softmax(logits / T) sampling (or greedy), stopping at the
    stop ids (kept in the answer), with each sampled token's log-probability after the temperature."""
    return {"n": num_samples, "temperature": settings.temperature, "top_p": settings.top_p, "top_k": 0,
            "min_p": 0.0, "repetition_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0,
            "max_tokens": settings.max_new_tokens, "stop_token_ids": list(settings.stop_ids),
            "ignore_eos": False, "skip_special_tokens": False, "logprobs": 0}


def base_identity(shared: SharedBase) -> tuple[str, bool]:
    """Which base a shared model holds (its folder, and whether quantized): the engine serves roles of that base,
    from this model or another one loaded the same way (a resumed run's)."""
    model = shared.model.get_base_model() if hasattr(shared.model, "get_base_model") else shared.model
    return str(model.name_or_path), bool(getattr(model, "is_quantized", False))


@dataclass(frozen=True)
class LoadedVersion:
    """A policy version as the engine holds it: the adapter's LoRA name and id (None for merged weights)."""

    key: tuple[int, str, object]
    lora_name: str | None = None
    lora_id: int | None = None
    folder: Path | None = None


class VersionedEngine(ABC):
    """The bookkeeping both vLLM engines share; subclasses load weights and adapters and sample."""

    name = "vllm"

    def __init__(self, spec: GenerationSpec, sync: str, scratch: Path | None = None) -> None:
        self.spec = spec
        self.sync = sync
        self.scratch = scratch or Path(tempfile.mkdtemp(prefix="rlhf-vllm-"))
        self.owns_scratch = scratch is None
        self.base_dir: Path | None = None
        self.base_key: tuple[str, bool] | None = None
        self.loaded: LoadedVersion | None = None
        self.next_lora_id = 1
        self.stats = EngineStats(self.name)

    def prepare(self, shared: SharedBase, base_path: str | Path) -> Path:
        """The engine's own full-precision base (weights.engine_base), decided once before the engine starts."""
        self.base_dir = engine_base(shared, base_path, self.scratch)
        self.base_key = base_identity(shared)
        return self.base_dir

    def use(self, shared: SharedBase, role: str, version: object = None) -> None:
        """Make `role` at `version` the policy sampled from; exported and loaded only when it is new."""
        key = (id(shared), role, version)
        if self.loaded is not None and self.loaded.key == key:
            return
        if base_identity(shared) != self.base_key:
            raise PipelineError(f"the {role} role is on another base than the one the vLLM engine holds; sample "
                                "policies of one base per engine (or use generation.engine: hf)")
        started = time.perf_counter()
        previous = self.loaded
        folder = self.scratch / f"version-{self.stats.syncs + 1}"
        if self.sync == "merged":
            write_merged(shared, role, self.base_dir, folder)
            self.load_merged(folder)
            self.loaded = LoadedVersion(key, folder=folder)
        else:
            save_policy_adapter(shared, role, folder)
            lora_id, self.next_lora_id = self.next_lora_id, self.next_lora_id + 1
            self.loaded = LoadedVersion(key, f"policy-{lora_id}", lora_id, folder)
            self.load_lora(self.loaded, previous)
        if previous is not None and previous.folder is not None:
            shutil.rmtree(previous.folder, ignore_errors=True)
        self.stats.add_sync(time.perf_counter() - started)

    def generate(self, prompt_ids: Sequence[Sequence[int]], num_samples: int, settings: SamplingSettings,
                 progress: Any = None) -> list[list[Completion]]:
        """`num_samples` completions per prompt from the loaded version.

        Drawn from the engine's own generator (seeded once when it starts): vLLM 0.32's CPU build fails on
        per-request seeds once a prompt's prefill is split over steps, so answers repeat only for the same
        sequence of calls, and a resumed PPO run samples anew (Hugging Face's answers follow torch's seed).
        """
        if self.loaded is None:
            raise RuntimeError("no policy version loaded: call use(shared, role, version) first")
        self.stats.start()
        completions = self.sample([list(ids) for ids in prompt_ids], num_samples, settings)
        self.stats.add(sum(len(c.token_ids) for group in completions for c in group))
        if progress is not None:
            progress(len(prompt_ids) * num_samples)
        return completions

    @abstractmethod
    def load_merged(self, folder: Path) -> None:
        """Replace the engine's weights with the complete checkpoint in `folder`."""

    @abstractmethod
    def load_lora(self, version: LoadedVersion, previous: LoadedVersion | None) -> None:
        """Serve `version`'s adapter from now on (and drop `previous`'s)."""

    @abstractmethod
    def sample(self, prompt_ids: list[list[int]], num_samples: int,
               settings: SamplingSettings) -> list[list[Completion]]:
        """Completions per prompt from the engine, token ids and log-probs."""

    def close(self) -> None:
        if self.owns_scratch:
            shutil.rmtree(self.scratch, ignore_errors=True)

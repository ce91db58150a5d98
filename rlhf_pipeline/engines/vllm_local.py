"""The vLLM engine inside this process (colocated): `vllm.LLM` on the engine's own full-precision base.

Prompts go in as token ids and answers come back as token ids (the engine's tokenizer is never used), with the
log-probability of each sampled token after the temperature (`logprobs_mode: processed_logprobs`), which PPO
compares with its own. The model's generation_config is ignored (`generation_config: vllm`), so no default of
the model's (top_k, a repetition penalty) changes what is sampled. Scripts that start one need an
`if __name__ == "__main__":` guard: vLLM's worker processes re-import the main module.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlhf_pipeline.engines.base import Completion, SamplingSettings
from rlhf_pipeline.engines.versions import (
    LoadedVersion,
    VersionedEngine,
    engine_environment,
    resolve_engine_dtype,
    sampling_fields,
)

if TYPE_CHECKING:
    from rlhf_pipeline.adapters import SharedBase
    from rlhf_pipeline.engines.spec import GenerationSpec


def engine_arguments(spec: GenerationSpec, sync: str, lora_rank: int | None) -> dict[str, Any]:
    """`vllm.LLM`'s (and the server's) engine arguments, shared so both engines start alike."""
    import torch

    arguments: dict[str, Any] = {"dtype": resolve_engine_dtype(spec), "seed": 0, "enforce_eager": spec.enforce_eager,
                                 "generation_config": "vllm", "logprobs_mode": "processed_logprobs",
                                 "enable_prefix_caching": True}
    if spec.max_model_len is not None:
        arguments["max_model_len"] = spec.max_model_len
    if torch.cuda.is_available():
        arguments["gpu_memory_utilization"] = spec.gpu_memory_utilization
    if sync == "lora":
        arguments |= {"enable_lora": True, "max_lora_rank": max(8, lora_rank or 8), "max_loras": 1}
    return arguments


def completions_of(output: Any) -> list[Completion]:
    """A `RequestOutput`'s answers: token ids and the sampled tokens' log-probabilities."""
    answers = []
    for answer in output.outputs:
        ids = list(answer.token_ids)
        logprobs = [position[token].logprob for position, token in zip(answer.logprobs, ids, strict=True)] \
            if answer.logprobs is not None else None
        answers.append(Completion(ids, logprobs))
    return answers


class ColocatedVLLM(VersionedEngine):
    """A `vllm.LLM` started in this process on the engine base prepared from the shared base."""

    def __init__(self, spec: GenerationSpec, sync: str, shared: SharedBase, base_path: str | Path,
                 lora_rank: int | None = None, scratch: Path | None = None) -> None:
        super().__init__(spec, sync, scratch)
        self.lora_request: Any = None
        base_dir = self.prepare(shared, base_path)
        os.environ.update(engine_environment(spec))
        from vllm import LLM

        started = time.perf_counter()
        self.llm = LLM(model=str(base_dir), skip_tokenizer_init=True, **engine_arguments(spec, sync, lora_rank))
        self.stats.started_seconds = time.perf_counter() - started

    def load_merged(self, folder: Path) -> None:
        self.llm.collective_rpc("reload_weights", kwargs={"weights_path": str(folder)})
        self.llm.reset_prefix_cache()

    def load_lora(self, version: LoadedVersion, previous: LoadedVersion | None) -> None:
        from vllm.lora.request import LoRARequest

        self.lora_request = LoRARequest(version.lora_name, version.lora_id, str(version.folder))
        if previous is not None and previous.lora_id is not None:
            self.llm.llm_engine.remove_lora(previous.lora_id)

    def sample(self, prompt_ids: list[list[int]], num_samples: int,
               settings: SamplingSettings) -> list[list[Completion]]:
        from vllm import SamplingParams, TokensPrompt

        params = SamplingParams(**sampling_fields(settings, num_samples), detokenize=False)
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in prompt_ids], params,
                                    use_tqdm=False, lora_request=self.lora_request)
        return [completions_of(output) for output in outputs]

    def close(self) -> None:
        """Shut the engine down (its worker processes with it) and remove the exported versions."""
        llm = self.__dict__.pop("llm", None)
        if llm is not None:
            llm.llm_engine.engine_core.shutdown()
            del llm
        super().close()

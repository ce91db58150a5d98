"""Where a model comes from, resolved without loading anything (no torch): the one place that reads names.

A `name_or_path` is the embedded default (`smollm2-135m-instruct`), a local folder, a finished stage's
output folder (its base, plus its adapter when it trained one) or a Hugging Face Hub id, which offline must
already be in the local cache. `models.py` loads what this resolves; `estimate` reads its config.json.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlhf_pipeline import embedded
from rlhf_pipeline.errors import PipelineError
from rlhf_pipeline.outputs import read_manifest

if TYPE_CHECKING:
    from rlhf_pipeline.recipe import ModelSpec

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")  # `name` or `org/name`; dots allowed (Llama-3.1-8B)


@dataclass
class ModelSource:
    """Where weights come from, and the public name to record in model cards and adapter configs."""

    path: str
    revision: str | None
    origin: str
    origin_revision: str | None
    tokenizer_path: str
    adapter: str | None = None  # a finished stage's folder whose adapter (and head) sits on the base
    lineage: list[str] = field(default_factory=list)  # finished stage folders behind this model, oldest first

    def as_dict(self) -> dict[str, Any]:
        return {"path": self.path, "revision": self.revision, "origin": self.origin,
                "origin_revision": self.origin_revision}


def resolve_source(spec: ModelSpec, progress: Any = print, convert_embedded: bool = True) -> ModelSource:
    """Turn `name_or_path` into a loadable source; a finished stage's output is its base plus its adapter.

    `convert_embedded=False` names the embedded model's folder without converting it (for tools that only
    read config.json, which then must say it is not converted yet).
    """
    name = spec.name_or_path
    if embedded.is_embedded(name):
        folder = str(embedded.materialise(name, progress=progress) if convert_embedded else embedded.model_dir(name))
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
        base, folder = manifest.base_model, str(path.resolve())
        lineage = [*manifest.lineage, folder]
        if not manifest.adapter:  # a full fine-tune: the folder holds the weights themselves
            return ModelSource(folder, None, base["origin"], base.get("origin_revision"), folder, lineage=lineage)
        return ModelSource(base["path"], base.get("revision"), base["origin"], base.get("origin_revision"),
                           str(path), folder, lineage)
    looks_local = name.startswith((".", "/", "~")) or name.count("/") > 1 or ("/" not in name and path.suffix)
    if looks_local or not is_hub_id(name):  # `org/Llama-3.1-8B` is a Hub id; `model.gguf`, `./x` are paths
        raise PipelineError(f"model.name_or_path: folder '{name}' not found")
    check_hub_reachable(name, spec.revision)
    return ModelSource(name, spec.revision, name, spec.revision, name)


def hub_offline() -> bool:
    """HF_HUB_OFFLINE, read now (huggingface_hub reads it once, at its import)."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def is_hub_id(name: str) -> bool:
    """A Hub repo id (`org/name` or `name`) rather than a folder on this machine."""
    return bool(_HUB_ID.fullmatch(name)) and not Path(name).expanduser().exists()


def check_hub_reachable(repo_id: str, revision: str | None) -> None:
    """Offline, a Hub id must already be in the local cache; say so before anything loads."""
    from huggingface_hub import try_to_load_from_cache

    cache_dir = os.environ.get("HF_HUB_CACHE") or None
    if hub_offline() and not isinstance(try_to_load_from_cache(repo_id, "config.json", revision=revision,
                                                               cache_dir=cache_dir), str):
        raise PipelineError(f"model.name_or_path: '{repo_id}' is not in the local Hugging Face cache and "
                            "HF_HUB_OFFLINE=1 forbids downloading it; unset HF_HUB_OFFLINE, download it "
                            "first, or point name_or_path at a local folder")

"""The fields of a trainer's config dataclass (TRL's SFTConfig, RewardConfig...): names, annotations, defaults.

`dataclasses.fields` of the real class is the truth. Importing a TRL config costs seconds (it pulls in torch
and transformers) and `rlhf-pipeline validate` must answer in well under three, so the fields are read once
per installed version of trl and transformers and kept as JSON in the cache (`$RLHF_PIPELINE_CACHE`, else
`~/.cache/rlhf_pipeline`, under `trainer_fields/`); `stages.cache_config_fields()` fills it for every
registered stage, and `make install` runs that. Annotations become the strings `schema` checks values
against (`int | None`, `list[str]`, `IntervalStrategy | str`).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import json
import logging
import os
import typing
from importlib import metadata
from pathlib import Path
from typing import Any

from rlhf_pipeline.outputs import write_json
from rlhf_pipeline.schema import annotation_text

logger = logging.getLogger(__name__)
_LIBRARIES = ("trl", "transformers")  # their configs import torch; the cache key also names our version


@dataclasses.dataclass(frozen=True)
class ConfigField:
    """One field of a config dataclass: its annotation as a string, and its default when YAML can spell it."""

    annotation: str
    default: Any = None


def cache_dir() -> Path:
    root = os.environ.get("RLHF_PIPELINE_CACHE")
    return (Path(root).expanduser() if root else Path.home() / ".cache" / "rlhf_pipeline") / "trainer_fields"


def _versions() -> str:
    """The installed versions the fields were read from: a new version is read afresh."""
    found = []
    for name in (*_LIBRARIES, "rlhf-pipeline"):
        try:
            found.append(f"{name}-{metadata.version(name)}")
        except metadata.PackageNotFoundError:
            found.append(f"{name}-none")
    return "_".join(found)


def slow_to_import(module: str) -> bool:
    """TRL's and transformers' configs pull in torch; other config classes (ours) import in milliseconds."""
    return module.split(".")[0] in _LIBRARIES


@functools.cache
def config_fields(module: str, class_name: str) -> dict[str, ConfigField]:
    """{field name: ConfigField} of a config dataclass, from the cache or (once) from the class itself."""
    if not slow_to_import(module):
        return read_fields(module, class_name)
    path = cache_dir() / f"{module}.{class_name}-{_versions()}.json"
    try:
        cached = json.loads(path.read_text(encoding="utf-8"))
        return {name: ConfigField(**value) for name, value in cached.items()}
    except (OSError, ValueError, TypeError):
        fields = read_fields(module, class_name)
        try:
            write_json(path, {name: dataclasses.asdict(field) for name, field in fields.items()})
        except OSError as err:  # a read-only home: slower next time, never wrong
            logger.warning("could not cache %s's fields in %s (%s); they are read again next time", class_name,
                           path.parent, err)
        return fields


def read_fields(module: str, class_name: str) -> dict[str, ConfigField]:
    """Import the class and read `dataclasses.fields`: the slow, exact path behind the cache."""
    cls = getattr(importlib.import_module(module), class_name)
    hints = typing.get_type_hints(cls) if slow_to_import(module) else {}  # ours keep annotations as strings
    return {field.name: ConfigField(annotation_text(hints.get(field.name, field.type)), _default(field))
            for field in dataclasses.fields(cls) if not field.name.startswith("_")}


def _default(field: dataclasses.Field) -> Any:
    """The field's default if it is plain data (what a recipe could write), else None."""
    if field.default is not dataclasses.MISSING:
        value = field.default
    elif field.default_factory is not dataclasses.MISSING:
        value = field.default_factory()
    else:
        return None
    value = getattr(value, "value", value)  # an Enum default: its string
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return None
    return value

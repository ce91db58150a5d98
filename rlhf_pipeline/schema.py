"""The schema machinery under recipes and data cards: YAML files in, typed dataclasses out, errors naming keys.

`build_section` turns a YAML mapping into one of our dataclasses (nested sections included), checking
every key and value against the field's annotation string (`from __future__ import annotations` keeps
them as strings; TRL's config fields come as strings from `trainer_fields`), so both are checked the same
way without importing torch. `read_yaml` reads a file and names the line of a syntax error.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import math
import re
import sys
import types
import typing
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from rlhf_pipeline.errors import RecipeError

_SCALARS: dict[str, tuple[type, ...]] = {
    "int": (int,),
    "float": (float, int),
    "str": (str,),
    "bool": (bool,),
    "dict": (dict,),
    "list": (list,),
    "tuple": (list, tuple),
}


def _matches(value: Any, node: ast.expr) -> bool:
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
        return _matches(value, node.left) or _matches(value, node.right)
    if isinstance(node, ast.Constant):
        if node.value is None:
            return value is None
        return isinstance(node.value, str) and _matches(value, ast.parse(node.value, mode="eval").body)
    if isinstance(node, ast.Subscript):
        outer = node.value.id if isinstance(node.value, ast.Name) else ""
        args = node.slice.elts if isinstance(node.slice, ast.Tuple) else [node.slice]
        if outer == "Optional":
            return value is None or _matches(value, args[0])
        if outer == "Union":
            return any(_matches(value, arg) for arg in args)
        if outer == "Literal":
            return any(isinstance(a, ast.Constant) and a.value == value for a in args)
        if outer in ("list", "List", "Sequence"):
            return isinstance(value, list) and all(_matches(item, args[0]) for item in value)
        if outer in ("dict", "Dict", "Mapping"):
            return isinstance(value, dict)
        if outer in ("tuple", "Tuple"):
            return isinstance(value, (list, tuple))
        return True
    if isinstance(node, ast.Name):
        if node.id == "Any":
            return True
        allowed = _SCALARS.get(node.id)
        if allowed is None:  # an Enum or class the YAML cannot spell: TRL accepts its string form
            return isinstance(value, str) or not isinstance(value, (int, float, list, dict))
        if bool not in allowed and isinstance(value, bool):
            return False
        return isinstance(value, allowed)
    return True


def matches(value: Any, annotation: str) -> bool:
    """Whether a YAML value fits a dataclass annotation such as `int | None` or `list[str]`."""
    return _matches(value, ast.parse(annotation, mode="eval").body)


_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _union_names(node: ast.expr) -> set[str]:
    """The plain type names of an `A | B | ...` annotation: {IntervalStrategy, str} for eval_strategy's."""
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
        return _union_names(node.left) | _union_names(node.right)
    return {node.id} if isinstance(node, ast.Name) else set()


def _is_enum_choice(annotation: str) -> bool:
    """`IntervalStrategy | str`, without bool: how transformers types a choice such as eval_strategy."""
    names = _union_names(ast.parse(annotation, mode="eval").body)
    return "str" in names and "bool" not in names and bool(names - _SCALARS.keys() - {"Any"})


def coerce(value: Any, annotation: str) -> Any:
    """Undo two YAML 1.1 readings that the field's type rules out.

    YAML 1.1 reads `1e-5` (exponent, no dot) as a string: a numeric field gets the number. It reads `no`
    (and `off`, `false`) as false: an enum choice gets "no" back, so `eval_strategy: no` means what
    transformers documents; a field that takes a bool keeps false.
    """
    if value is False and _is_enum_choice(annotation):
        return "no"
    if isinstance(value, str) and _NUMBER.fullmatch(value) and not matches(value, annotation):
        number = float(value)
        if matches(number, annotation):
            return number
    return value


def describe(annotation: str) -> str:
    """Say an annotation in words a recipe author understands."""
    words = {"str": "a string", "int": "an integer", "float": "a number", "bool": "true or false",
             "None": "null", "dict": "a mapping", "list": "a list"}
    if annotation.startswith("list[") and annotation.endswith("]"):
        return f"a list, each item {describe(annotation[5:-1])}"
    parts = [p.strip() for p in annotation.replace("Optional[", "").rstrip("]").split("|")]
    return " or ".join(words.get(p, p) for p in parts)


def annotation_text(annotation: Any) -> str:
    """A type as the annotation string `schema` reads: `int | None`, `list[str]`, `Literal['a', 'b']`."""
    if isinstance(annotation, str):
        return annotation
    if annotation is type(None) or annotation is None:
        return "None"
    if annotation is Any:
        return "Any"
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(annotation_text(arg) for arg in args)
    if origin is typing.Literal:
        return f"Literal[{', '.join(repr(arg) for arg in args)}]"
    if origin is not None:
        name = getattr(origin, "__name__", str(origin))
        return f"{name}[{', '.join(annotation_text(arg) for arg in args)}]" if args else name
    return getattr(annotation, "__name__", str(annotation))


def suggest(key: str, candidates: Iterable[str]) -> str:
    """A '; did you mean X?' tail for a misspelt key, or nothing when no key is close."""
    close = difflib.get_close_matches(key, list(candidates), n=1, cutoff=0.6)
    return f"; did you mean {close[0]}?" if close else ""


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, except that a key said twice in one mapping is an error.

    PyYAML keeps the last of two equal keys without a word, so `policies: {ppo: a, ppo: b}` would compare one
    policy and a repeated `learning_rate` would silently win; YAML itself requires keys to be unique.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        lines: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *defaults` may be overridden key by key
                continue
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, typing.Hashable):
                continue  # the safe loader names an unhashable key itself
            if key in lines:
                raise yaml.constructor.ConstructorError(
                    "while reading a mapping", node.start_mark,
                    f"found the key {key!r} twice (first on line {lines[key] + 1})", key_node.start_mark)
            lines[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: Path, what: str = "recipe") -> dict[str, Any]:
    """Read a YAML mapping, turning a missing file, a syntax error or a repeated key into a message with the line."""
    if not path.is_file():
        raise RecipeError(path, None, f"{what} file not found (looked for {path.resolve()})")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)  # a SafeLoader
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise RecipeError(path, None, f"{line}not valid YAML ({getattr(err, 'problem', err)})") from None
    except UnicodeDecodeError:
        raise RecipeError(path, None, "not UTF-8 text; save the file as UTF-8") from None
    if not isinstance(data, dict):
        raise RecipeError(path, None, f"a {what} must be a mapping of keys to values")
    return data


def shown_key(key: object) -> str:
    """A key as an error names it: as written, or quoted when it is empty or not a string (`''`, `3`)."""
    return key if isinstance(key, str) and key.strip() else repr(key)


def dotted_key(prefix: str, key: object) -> str:
    return f"{prefix}.{shown_key(key)}" if prefix else shown_key(key)


def finite(value: Any) -> bool:
    """YAML spells infinity and not-a-number (.inf, .nan); no setting means either."""
    return not isinstance(value, float) or math.isfinite(value)


def build_section(cls: type, data: Any, path: Path, prefix: str) -> Any:
    """Build one of our section dataclasses from YAML, naming the exact key that is wrong."""
    if not isinstance(data, dict):
        raise RecipeError(path, prefix or None, f"must be a mapping of keys (got {type(data).__name__})")
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key not in fields:
            raise RecipeError(path, dotted_key(prefix, key), f"unknown key{suggest(str(key), fields)}")
        annotation = annotation_text(fields[key].type)
        value = coerce(value, annotation)
        nested = _section_class(cls, annotation)
        if (mapped := _mapping_of_sections(cls, annotation)) and isinstance(value, dict):
            kwargs[key] = {name: build_section(mapped, item, path, f"{dotted_key(prefix, key)}.{shown_key(name)}")
                           for name, item in value.items()}
        elif nested and isinstance(value, dict):
            kwargs[key] = build_section(nested, value, path, dotted_key(prefix, key))
        elif nested and not (value is None and "None" in (p.strip() for p in annotation.split("|"))):
            raise RecipeError(path, dotted_key(prefix, key), f"must be a mapping of keys (got {value!r})")
        elif matches(value, annotation):
            if not finite(value):
                raise RecipeError(path, dotted_key(prefix, key), f"must be a finite number, got {value}")
            kwargs[key] = value
        else:
            raise RecipeError(path, dotted_key(prefix, key), f"expected {describe(annotation)}, got {value!r}")
    missing = [n for n, f in fields.items() if n not in kwargs and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise RecipeError(path, dotted_key(prefix, missing[0]), "required key is missing")
    try:
        return cls(**kwargs)
    except ValueError as err:
        message = str(err)
        key = next((name for name in sorted(fields, key=len, reverse=True)
                    if message.startswith((f"{name}:", f"{name} ", f"{name}["))), "")
        if key and message.startswith(f"{key}[") and ": " in message:  # an item of a list: `train[1].weight: ...`
            key, message = message.split(": ", 1)
        problem = message.removeprefix(f"{key}:").strip() if key else message
        raise RecipeError(path, dotted_key(prefix, key) if key else prefix or None, problem) from None


def _mapping_of_sections(owner: type, annotation: str) -> type | None:
    """The dataclass of a `dict[str, Section]` field (named entries, each a section of its own), else None."""
    node = ast.parse(annotation, mode="eval").body
    if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name) and node.value.id == "dict":
        args = node.slice.elts if isinstance(node.slice, ast.Tuple) else [node.slice]
        return _section_class(owner, ast.unparse(args[-1]))
    return None


def _section_class(owner: type, annotation: str) -> type | None:
    """The dataclass an annotation such as `LoraSpec | None` names, looked up in the owner's module."""
    namespace = vars(sys.modules[owner.__module__])
    for name in annotation.split("|"):
        candidate = namespace.get(name.strip())
        if dataclasses.is_dataclass(candidate):
            return candidate
    return None

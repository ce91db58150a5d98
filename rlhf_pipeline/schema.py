"""Type checks and key suggestions for recipe values, driven by annotation strings.

Annotations come either from our own dataclasses (`from __future__ import annotations` keeps them as
strings) or from TRL's config source read by `trainer_fields`; both are checked the same way, without
importing torch.
"""

from __future__ import annotations

import ast
import difflib
import re
from collections.abc import Iterable
from typing import Any

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
    parts = [p.strip() for p in annotation.replace("Optional[", "").rstrip("]").split("|")]
    return " or ".join(words.get(p, p) for p in parts)


def suggest(key: str, candidates: Iterable[str]) -> str:
    """A '; did you mean X?' tail for a misspelt key, or nothing when no key is close."""
    close = difflib.get_close_matches(key, list(candidates), n=1, cutoff=0.6)
    return f"; did you mean {close[0]}?" if close else ""

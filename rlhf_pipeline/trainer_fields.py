"""Field names and types of TRL/transformers config dataclasses, read from their source without importing them.

`rlhf-pipeline validate` must answer in well under three seconds, and importing TRL pulls in torch and
transformers (~10 s). The dataclass fields are plain annotated assignments, so parsing the installed
source files with `ast` gives the exact field list of the installed version at a fraction of the cost.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
from pathlib import Path

# Where a base class that a config module imports from a package root actually lives.
_PACKAGE_ROOT_CLASSES = {("transformers", "TrainingArguments"): "transformers.training_args"}


def _module_file(module: str) -> Path:
    """Locate a module's source file without executing the module or its parent package."""
    top, _, rest = module.partition(".")
    spec = importlib.util.find_spec(top)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"package '{top}' is not installed")
    path = Path(next(iter(spec.submodule_search_locations)), *rest.split(".")) if rest else None
    if path is None:
        return Path(next(iter(spec.submodule_search_locations))) / "__init__.py"
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def _resolve_base(module: str, tree: ast.Module, base: str) -> tuple[str, str] | None:
    """Find the module that defines `base` as imported in `tree` (relative or absolute import)."""
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and any(alias.name == base for alias in node.names):
            if node.level:
                package = module.rsplit(".", node.level)[0]
                target = f"{package}.{node.module}" if node.module else package
            else:
                target = node.module or ""
            return _PACKAGE_ROOT_CLASSES.get((target, base), target), base
    if any(isinstance(n, ast.ClassDef) and n.name == base for n in tree.body):
        return module, base
    return None


@functools.cache
def dataclass_fields(module: str, class_name: str) -> dict[str, str]:
    """Return {field name: annotation source} of a dataclass, its bases' fields included."""
    tree = ast.parse(_module_file(module).read_text(encoding="utf-8"))
    cls = next((n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == class_name), None)
    if cls is None:
        raise LookupError(f"class {class_name} not found in {module}")
    fields: dict[str, str] = {}
    for base in cls.bases:
        if isinstance(base, ast.Name) and (found := _resolve_base(module, tree, base.id)):
            fields.update(dataclass_fields(*found))
    for node in cls.body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.target.id[0] != "_":
            fields[node.target.id] = ast.unparse(node.annotation)
    return fields

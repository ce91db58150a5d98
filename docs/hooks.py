"""MkDocs hook: the site is built from the repository's own tree, so a link works the same on GitHub and on the site.

Every page keeps its repository path (README.md is the home page; docs/recipes.md, recipes/smollm2-135m/README.md,
...), so a relative link written for a checkout resolves on the site exactly as it does on GitHub, and the strict
build checks every one of them. MkDocs itself only walks `docs_dir`; `SITE_TREES` says what else the site carries.
"""

from __future__ import annotations

import os
from pathlib import Path

from mkdocs.config.defaults import MkDocsConfig
from mkdocs.structure.files import File, Files

# What the site is built from, relative to the folder of mkdocs.yml: the README (the home page), the guides, and
# the folders the guides link into (their READMEs are pages, their other files are copied as they are).
SITE_TREES = ("README.md", "docs", "recipes", "data_cards", "data/demo", "accelerate_configs", "benchmarks")
SKIPPED_FOLDERS = frozenset({"__pycache__"})


def site_sources(root: Path) -> list[str]:
    """Every file under SITE_TREES, as a '/'-separated path relative to `root` (symlinked folders followed)."""
    found: list[str] = []
    for tree in SITE_TREES:
        if (root / tree).is_file():
            found.append(tree)
            continue
        for folder, subfolders, names in os.walk(root / tree, followlinks=True):
            subfolders[:] = sorted(name for name in subfolders if name not in SKIPPED_FOLDERS)
            found += [Path(folder, name).relative_to(root).as_posix() for name in sorted(names)]
    return found


def on_files(files: Files, config: MkDocsConfig) -> Files:
    """Swap the files MkDocs found in docs_dir (named relative to it) for the repository's, named from its top."""
    docs_dir = os.path.realpath(config.docs_dir)
    for file in list(files):
        if file.src_dir is not None and os.path.realpath(file.src_dir) == docs_dir:
            files.remove(file)
    root = Path(config.config_file_path).resolve().parent
    for path in site_sources(root):
        files.append(File(path, str(root), config.site_dir, config.use_directory_urls))
    return files

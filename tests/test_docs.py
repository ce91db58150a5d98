"""The README and the guides stay true: the site builds strictly, and every command they show is checked.

Every page of the site (mkdocs.yml's nav: the README, docs/, the recipe folders' READMEs, ...) is read here.
Each command in a ```bash block is parsed the way it would run: `rlhf-pipeline ...` (also `python -m
rlhf_pipeline` and after `accelerate launch ... -m rlhf_pipeline`) by the CLI's own parser, the recipe it names
validated with its overrides (torch-free, as `rlhf-pipeline validate`), the files it names present, and an
`outputs/...` path one that a shipped recipe writes. UPPER-CASE words (RECIPE, SCRIPT.py), `<...>` and
`$VARIABLES` are placeholders. A command of a kind this module does not know fails, so it gets a check.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import importlib.util
import io
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest
import yaml

from rlhf_pipeline.cli import make_parser
from rlhf_pipeline.data.cards import load_card
from rlhf_pipeline.pipeline import read_pipeline, validate_pipeline
from rlhf_pipeline.stages import STAGE_NAMES, load_recipe

REPO = Path(__file__).resolve().parents[1]
README_MAX_LINES = 300
SHELL = {"bash", "sh", "shell", "console"}
# the shell's and other tools' commands
NOT_CHECKED = {"export", "set", "wait", "pip", "cd", "git", "hf", "nvidia-smi"}
SEPARATORS = {"&&", "||", ";", "|", "&"}
VARIABLE = "0"  # what a $VARIABLE is parsed as: accelerate reads some of its options as numbers
COMMAND = r"(?:rlhf-pipeline|make|accelerate launch|python) "
INPUT_PATHS = ("recipe", "output_dir", "run_dir", "items", "accelerate_config")  # CLI arguments naming inputs
REPO_PATH = re.compile(r"(?:recipes|rlhf_pipeline|tests|benchmarks|data_cards|data|docs|accelerate_configs)/[\w./-]*")


def _nav_pages(nav: list) -> list[str]:
    pages: list[str] = []
    for entry in nav:
        for value in entry.values() if isinstance(entry, dict) else [entry]:
            pages += _nav_pages(value) if isinstance(value, list) else [value]
    return pages


PAGES = _nav_pages(yaml.safe_load((REPO / "mkdocs.yml").read_text(encoding="utf-8"))["nav"])


@dataclass
class Block:
    page: str
    line: int
    lang: str
    text: str

    def __str__(self) -> str:
        return f"{self.page}:{self.line}"


def code_blocks(page: str) -> list[Block]:
    blocks, lang, start, body = [], None, 0, []
    for number, line in enumerate((REPO / page).read_text(encoding="utf-8").splitlines(), 1):
        if line.startswith("```"):
            if lang is None:
                lang, start, body = line[3:].strip(), number, []
            else:
                blocks.append(Block(page, start, lang, "\n".join(body)))
                lang = None
        elif lang is not None:
            body.append(line)
    return blocks


BLOCKS = [block for page in PAGES for block in code_blocks(page)]


def commands(text: str) -> list[list[str]]:
    """A shell block's commands as argument lists: continuations and multi-line quotes joined, comments dropped."""
    text = re.sub(r"\$\(\(.*?\)\)", "$N", text)  # $((arithmetic)) and $(command substitution): one word each
    text = re.sub(r"\$\([^()]*\)", "$S", text)
    found, pending = [], ""
    for line in text.splitlines():
        pending += line[:-1] if line.endswith("\\") else line + "\n"
        if line.endswith("\\"):
            continue
        try:
            words = shlex.split(pending, comments=True)
        except ValueError:  # a quote still open: the command goes on
            continue
        pending = ""
        command: list[str] = []
        for word in [*words, ";"]:
            if word not in SEPARATORS:
                command += [] if not command and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", word) else [word]  # VAR=1 cmd
            elif command:
                found += [] if command[0] in NOT_CHECKED else [command]
                command = []
    assert not pending.strip(), f"unfinished command: {pending!r}"
    return found


def is_placeholder(word: str) -> bool:
    """$VARIABLE, <model>, or a word in capitals that names nothing here (RECIPE, SCRIPT.py)."""
    upper = "/" not in word and Path(word).stem.isupper() and not (REPO / word).exists()
    return "$" in word or "<" in word or upper


@cache
def shipped_outputs() -> frozenset[Path]:
    """Every folder a shipped recipe writes (a pipeline's rounds included)."""
    outputs = set()
    for path in sorted((REPO / "recipes").rglob("*.yaml")):
        if {"stages", "rounds"} & yaml.safe_load(path.read_text(encoding="utf-8")).keys():
            outputs |= {recipe.output_dir for recipe in validate_pipeline(path)}
        else:
            outputs.add(load_recipe(path, pending_outputs=[Path("/")]).output_dir)
    return frozenset(outputs)


def check_path(word: str, where: object) -> None:
    """A file or folder a command reads: in the checkout, or under outputs/ where a shipped recipe writes."""
    path = Path(word.rstrip("/"))
    if is_placeholder(word) or path.is_absolute():
        return
    if path.parts[0] == "outputs":
        assert any(path == out or out in path.parents or path in out.parents for out in shipped_outputs()), (
            f"{where}: {word} is written by no shipped recipe")
    else:
        assert (REPO / path).exists(), f"{where}: {word} does not exist"


@cache
def parser():
    return make_parser()


def parse(command_parser: argparse.ArgumentParser, argv: list[str], where: object) -> argparse.Namespace:
    """argv as the command parses it; its usage error (argparse exits) as the test's failure."""
    errors = io.StringIO()
    with contextlib.redirect_stderr(errors), contextlib.redirect_stdout(io.StringIO()):
        try:
            return command_parser.parse_args(argv)
        except SystemExit:
            pytest.fail(f"{where}: {command_parser.prog} {shlex.join(argv)}: {errors.getvalue().splitlines()[-1]}")


def check_cli(argv: list[str], where: object) -> None:
    """The command line as rlhf-pipeline parses it, its recipe validated with the overrides, its inputs present."""
    args = parse(parser(), argv, where)
    for dest in INPUT_PATHS:
        if getattr(args, dest, None):
            check_path(str(getattr(args, dest)), where)
    if args.command == "launch" and args.config:
        from rlhf_pipeline.launch import resolve_config

        resolve_config(args.config)
    recipe = getattr(args, "recipe", None)
    if recipe is None or is_placeholder(recipe):
        return
    if {"stages", "rounds"} & yaml.safe_load((REPO / recipe).read_text(encoding="utf-8")).keys():
        validate_pipeline(REPO / recipe)
        keys = [step.key for step in read_pipeline(REPO / recipe)[1]]
        assert getattr(args, "start", None) in [None, *keys], f"{where}: --from {args.start}: not a stage of {recipe}"
        return
    stage = args.command if args.command in STAGE_NAMES else getattr(args, "stage", None)
    load_recipe(REPO / recipe, getattr(args, "overrides", []), stage=stage if stage in STAGE_NAMES else None,
                pending_outputs=sorted(shipped_outputs()))


@cache
def accelerate_parser():
    from accelerate.commands.launch import launch_command_parser  # imports torch: once, for every launch line

    return launch_command_parser()


def script_options(script: Path) -> set[str]:
    """The options a benchmark script's argparse takes, read from its source."""
    calls = [node for node in ast.walk(ast.parse(script.read_text(encoding="utf-8")))
             if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_argument"]
    return {arg.value for call in calls for arg in call.args if isinstance(arg, ast.Constant)}


def check_command(words: list[str], where: object) -> None:
    name, rest = words[0], words[1:]
    if name == "rlhf-pipeline":
        check_cli(rest, where)
    elif name == "make":
        targets = set(re.findall(r"^([\w-]+):", (REPO / "Makefile").read_text(encoding="utf-8"), re.M))
        for word in rest:
            assert "=" in word or word in targets, f"{where}: make {word}: no such target in the Makefile"
    elif name in ("python", "python3") and rest[:2] == ["-m", "rlhf_pipeline"]:
        check_cli(rest[2:], where)
    elif name in ("python", "python3") and rest[:1] == ["-m"]:
        assert importlib.util.find_spec(rest[1]), f"{where}: python -m {rest[1]}: no such module"
    elif name in ("python", "python3") and rest[:1] == ["-c"]:
        compile(rest[1], str(where), "exec")
    elif name in ("python", "python3"):
        check_path(rest[0], where)
        options = script_options(REPO / rest[0])
        for word in rest[1:]:
            if word.startswith("--"):
                assert word in options, f"{where}: {rest[0]} takes no option {word}"
            elif "/" in word:
                check_path(word, where)
    elif name == "accelerate" and rest[:1] == ["launch"]:
        words = rest[1:]  # a $VARIABLE may stand where accelerate wants a number (--num_machines $SLURM_NNODES)
        args = parse(accelerate_parser(), [VARIABLE if "$" in word else word for word in words], where)
        script_args = words[len(words) - len(args.training_script_args):]
        if args.config_file not in (None, VARIABLE):
            check_path(args.config_file, where)
        if args.module:
            assert args.training_script == "rlhf_pipeline", f"{where}: -m {args.training_script}"
            check_cli(script_args, where)
        else:
            check_path(args.training_script, where)
    elif name == "srun":
        check_shell(rest[rest.index("-c") + 1], where)
    else:
        pytest.fail(f"{where}: {shlex.join(words)}: no check for the command {name!r}; add one to tests/test_docs.py")


def check_shell(text: str, where: object) -> None:
    for words in commands(text):
        check_command(words, where)


@pytest.fixture(autouse=True)
def _in_the_checkout(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)  # recipes name outputs/... relative to the working directory, as users run them


def test_the_readme_is_an_entry() -> None:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) <= README_MAX_LINES
    assert "make demo" in text and "make test" in text


def test_pages_have_blocks_to_check() -> None:
    """The parser finds the commands (a broken fence would silently hide them)."""
    shell = [block for block in BLOCKS if block.lang in SHELL]
    assert len(shell) >= 20 and all(any(b.page == page for b in shell) for page in ("README.md", "docs/recipes.md"))
    assert sum(len(commands(block.text)) for block in shell) >= 60


@pytest.mark.parametrize("block", [b for b in BLOCKS if b.lang in SHELL], ids=str)
def test_shell_commands_parse_and_name_what_exists(block: Block) -> None:
    check_shell(block.text, block)


@pytest.mark.parametrize("block", [b for b in BLOCKS if b.lang == "yaml"], ids=str)
def test_yaml_blocks_are_valid_recipes_pipelines_or_cards(block: Block, tmp_path: Path) -> None:
    """A whole recipe, pipeline or card in a guide is checked as one, beside the demo's recipes and cards."""
    data = yaml.safe_load(block.text)
    folder = tmp_path / "recipes" / "smollm2-135m"
    shutil.copytree(REPO / "recipes" / "smollm2-135m", folder)
    for name in ("data_cards", "data"):
        (tmp_path / name).symlink_to(REPO / name)
    path = folder / "from_the_docs.yaml"
    path.write_text(block.text, encoding="utf-8")
    if "format" in data:
        load_card(path)
    elif "stage" in data:
        load_recipe(path, pending_outputs=sorted(shipped_outputs()))
    elif "stages" in data:
        validate_pipeline(path)


@pytest.mark.parametrize("block", [b for b in BLOCKS if b.lang == "python"], ids=str)
def test_python_blocks_compile_and_import_what_is_installed(block: Block) -> None:
    for node in ast.walk(ast.parse(block.text)):
        if isinstance(node, ast.ImportFrom | ast.Import):
            names = [node.module] if isinstance(node, ast.ImportFrom) else [alias.name for alias in node.names]
            assert all(importlib.util.find_spec(name.split(".")[0]) for name in names), f"{block}: {names}"
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("outputs/"):
            check_path(node.value, block)


@pytest.mark.parametrize("page", PAGES)
def test_no_command_hides_outside_a_shell_block(page: str) -> None:
    other = "\n".join(block.text for block in code_blocks(page) if block.lang not in SHELL | {"yaml", "python"})
    prose = re.sub(r"```.*?```", "", (REPO / page).read_text(encoding="utf-8"), flags=re.S)
    assert not re.search(r"^\s*" + COMMAND, other, re.M), f"{page}: a command in a block not marked bash"
    assert not re.search(r"^(?: {4}|\t)\s*" + COMMAND, prose, re.M), f"{page}: an indented command: fence it as bash"


@pytest.mark.parametrize("page", PAGES)
def test_repository_paths_in_backquotes_exist(page: str) -> None:
    for span in re.findall(r"`([^`\n]+)`", (REPO / page).read_text(encoding="utf-8")):
        if REPO_PATH.fullmatch(span) and "..." not in span:  # module paths may be the package's (data/formats.py)
            assert (REPO / span).exists() or (REPO / "rlhf_pipeline" / span).exists(), f"{page}: `{span}` is missing"


def test_the_architecture_table_has_a_row_for_every_module() -> None:
    """docs/ARCHITECTURE.md says each module's layer and concern: a new module needs its row (a folder's row,
    `report/`, or a pattern, `stages/<name>.py`, covers several)."""
    text = (REPO / "docs" / "ARCHITECTURE.md").read_text(encoding="utf-8")
    rows = [line.split("|")[2] for line in text.splitlines() if re.match(r"\| \d \|", line)]
    named = [span for row in rows for span in re.findall(r"`([^`]+)`", row)]
    patterns = []
    for span in named:
        pattern = re.escape(span).replace(re.escape("<name>"), r"\w+")
        patterns.append(re.compile(pattern if span.endswith(".py") else pattern + ".*"))
    package = REPO / "rlhf_pipeline"
    modules = [path.relative_to(package).as_posix() for path in package.rglob("*.py")
               if path.name not in ("__init__.py", "__main__.py") or path.parent.name == "stages"]
    assert [module for module in modules if not any(p.fullmatch(module) for p in patterns)] == []


RECIPE_FOLDERS = sorted({path.parent for path in (REPO / "recipes").glob("*/*.yaml")})


@pytest.mark.parametrize("folder", RECIPE_FOLDERS, ids=lambda folder: folder.name)
def test_each_recipe_folder_readme_covers_its_recipes(folder: Path) -> None:
    """Every recipe of a folder is in its README, and every recipe its README names is there (or a profile)."""
    text = (folder / "README.md").read_text(encoding="utf-8")
    named = set(re.findall(r"`([\w.-]+\.yaml)`", text))
    assert {path.name for path in folder.glob("*.yaml")} <= named
    assert {name for name in named if not (folder / name).exists()} <= {
        path.name for path in (REPO / "accelerate_configs").glob("*.yaml")}


# The site -----------------------------------------------------------------------------------------------------


def build_site(root: Path, site: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
                          cwd=root, capture_output=True, text=True, timeout=120)


def test_the_site_builds_strictly(tmp_path: Path) -> None:
    pytest.importorskip("mkdocs")
    done = build_site(REPO, tmp_path / "site")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "site" / "index.html").is_file()
    assert (tmp_path / "site" / "docs" / "stages" / "index.html").is_file()
    assert (tmp_path / "site" / "recipes" / "smollm2-135m" / "index.html").is_file()


def _copy_of_the_site_sources(root: Path) -> Path:
    """What the site is built from (docs/hooks.py's SITE_TREES, and mkdocs.yml), copied to `root`."""
    spec = importlib.util.spec_from_file_location("site_hooks", REPO / "docs" / "hooks.py")
    assert spec is not None and spec.loader is not None
    hooks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hooks)
    root.mkdir()
    shutil.copy(REPO / "mkdocs.yml", root / "mkdocs.yml")
    for tree in hooks.SITE_TREES:
        (root / tree).parent.mkdir(parents=True, exist_ok=True)
        copy = shutil.copy if (REPO / tree).is_file() else shutil.copytree
        copy(REPO / tree, root / tree)
    return root


def _rename(root: Path, old: str, new: str) -> None:
    (root / old).rename(root / new)


def _add_orphan(root: Path, old: str, new: str) -> None:
    (root / old).write_text("# A page no one linked\n", encoding="utf-8")


def _retitle(root: Path, old: str, new: str) -> None:
    page = root / "docs" / "stages.md"
    page.write_text(page.read_text(encoding="utf-8").replace(f"## {old}\n", f"## {new}\n"), encoding="utf-8")


@pytest.mark.parametrize(("change", "old", "new", "named"), [
    (_rename, "docs/stages.md", "docs/training-stages.md", "'docs/stages.md'"),          # a guide in nav, linked
    (_rename, "docs/bakeoff_tradeoff.png", "docs/tradeoff.png", "'bakeoff_tradeoff.png'"),  # an image a guide shows
    (_rename, "recipes/smollm2-135m/README.md", "recipes/smollm2-135m/RECIPES.md", "recipes/smollm2-135m/README.md"),
    (_add_orphan, "docs/orphan.md", "", "docs/orphan.md"),                                  # a page left out of nav
    (_retitle, "Rule reward models (Sparrow)", "Rule classifiers", "#rule-reward-models-sparrow"),  # a heading
])
def test_the_strict_build_fails_naming_what_a_change_broke(tmp_path: Path, change, old: str, new: str,
                                                           named: str) -> None:
    pytest.importorskip("mkdocs")
    root = _copy_of_the_site_sources(tmp_path / "repo")
    change(root, old, new)
    done = build_site(root, tmp_path / "site")
    output = done.stdout + done.stderr
    assert done.returncode != 0 and "Aborted" in output and named in output, output

"""The one error type users see: it names the file, the key or row, and how to fix it."""

from __future__ import annotations

from pathlib import Path


class PipelineError(Exception):
    """A problem the user can fix; the CLI prints it without a traceback and exits with status 2."""


class RecipeError(PipelineError):
    """A recipe or data card that cannot run, reported as `file: key: problem`."""

    def __init__(self, file: Path | str | None, key: str | None, problem: str) -> None:
        self.file, self.key, self.problem = file, key, problem
        where = ": ".join(str(part) for part in (file, key) if part)
        super().__init__(f"{where}: {problem}" if where else problem)

"""The judgement log: one JSON line per human judgement, appended and synced to disk the moment it is made.

A closed tab, a killed server or a power cut loses nothing already judged; reopening reads the log and
resumes each annotator at their first unjudged item. The first line is a header naming the task and the
items it judges, so the log of another task (or a file that is not ours) is refused instead of mixed in.
A last line torn by a crash mid-write is dropped and counted, never parsed as a judgement.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from pathlib import Path
from typing import Any

from rlhf_pipeline.errors import PipelineError
from rlhf_pipeline.outputs import write_jsonl

LOG_NAME = "judgements.jsonl"
_KIND = "rlhf_pipeline.human_judgements"


def file_digest(path: Path) -> str:
    """sha256 of a file: the header ties a log to the exact items it judges."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def shown_order(seed: int, annotator: str, item: int, size: int) -> list[int]:
    """The order in which an annotator sees an item's answers: random, but the same on every reopening."""
    order = list(range(size))
    random.Random(f"{seed}:{annotator}:{item}").shuffle(order)
    return order


class JudgementLog:
    """Append-only judgements of one task (label, ab or probe) on one items file."""

    def __init__(self, path: Path, task: str, items: str, items_digest: str) -> None:
        self.path = path
        self.header = {"kind": _KIND, "task": task, "items": items, "items_sha256": items_digest}
        self.records: list[dict[str, Any]] = []
        self.torn_lines = 0
        if path.exists() and path.stat().st_size:
            self._read()
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._write_line(self.header)

    def _read(self) -> None:
        lines = self.path.read_text(encoding="utf-8").splitlines()
        try:
            header = json.loads(lines[0])
        except (json.JSONDecodeError, IndexError):
            header = None
        if not isinstance(header, dict) or header.get("kind") != _KIND:
            raise PipelineError(f"{self.path}: not a judgement log of rlhf-pipeline (its first line is not our "
                                "header); choose another --out folder, or move this file away")
        if header.get("task") != self.header["task"] or header.get("items_sha256") != self.header["items_sha256"]:
            raise PipelineError(f"{self.path}: holds '{header.get('task')}' judgements of {header.get('items')}, "
                                f"not '{self.header['task']}' judgements of {self.header['items']} as they are now; "
                                "choose another --out folder for these items")
        for number, line in enumerate(lines[1:], start=2):
            try:
                self.records.append(json.loads(line))
            except json.JSONDecodeError as err:
                if number != len(lines):
                    raise PipelineError(f"{self.path}: line {number} is not JSON ({err}); only the last line "
                                        "can be torn by a crash: fix or remove that line") from err
                self.torn_lines += 1
        if self.torn_lines:
            self._rewrite()

    def _rewrite(self) -> None:
        """Drop a torn last line (a crash mid-write), so the next judgement starts on a line of its own."""
        write_jsonl(self.path, [self.header, *self.records])

    def _write_line(self, record: dict[str, Any]) -> None:
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def append(self, record: dict[str, Any]) -> None:
        """Write one judgement to disk (synced) before anything else happens."""
        self._write_line(record)
        self.records.append(record)

    def judged_by(self, annotator: str) -> set[int]:
        return {r["item"] for r in self.records if r["annotator"] == annotator}

    def next_item(self, annotator: str, total: int) -> int | None:
        """The annotator's first unjudged item (skips count as judged), or None when all are done."""
        done = self.judged_by(annotator)
        return next((i for i in range(total) if i not in done), None)

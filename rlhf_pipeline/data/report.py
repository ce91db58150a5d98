"""What loading a recipe's data read, kept and dropped: the data report every stage prints and saves.

Counts by drop reason with the first lines of each (`hh:line 7`), the rows and prompts of each split, eval
prompts that training shares, and for a mixture (or a stream) what each card gave.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rlhf_pipeline.data.cards import DataCard


@dataclass
class DataReport:
    """Rows read, kept and dropped (by reason, with the first few row numbers) for every card, the prompts and
    rows each split got, and for a mixture what each card gave."""

    read: int = 0
    kept: int = 0
    dropped: collections.Counter[str] = field(default_factory=collections.Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)
    splits: dict[str, dict[str, int]] = field(default_factory=dict)  # split -> {"rows", "prompts"}
    eval_prompts_in_train: int | None = None  # given eval cards only: their prompts that training also has
    sources: list[dict[str, Any]] = field(default_factory=list)  # per card: read, kept, taken, rows per split
    mixture: bool = False  # several train cards, or one with a weight, max_rows or fraction: sources are reported
    streamed: list[str] = field(default_factory=list)  # train cards read as training reads them (data.streaming)
    refresh: Callable[[], None] | None = None  # brings a stream's counts in before the report is read

    def add(self, card: DataCard, read: int, kept: int, dropped: collections.Counter[str],
            where: dict[str, list[Any]]) -> None:
        self.read += read
        self.kept += kept
        self.dropped.update(dropped)
        for reason, rows in where.items():
            self.examples.setdefault(reason, []).extend(f"{card.name}:{row}" for row in rows[:5])

    def count_split(self, name: str, keys: list[str]) -> None:
        """Rows and distinct prompts of a split, from its rows' prompt keys."""
        self.splits[name] = {"rows": len(keys), "prompts": len(set(keys))}

    def summary(self) -> str:
        if self.refresh is not None:
            self.refresh()
        reasons = ", ".join(f"{reason} {count} (e.g. {', '.join(self.examples.get(reason, [])[:3])})"
                            for reason, count in self.dropped.most_common())
        # a ranking row gives several pairs, and a pair split for KTO two answers: more examples than rows
        kept = f"{self.kept} of {self.read} rows kept" if self.kept <= self.read else \
            f"{self.kept} examples from {self.read} rows"
        sides = "; ".join(f"{name} {part['rows']} rows of {part['prompts']} prompts"
                          for name, part in self.splits.items())
        overlap = (f"; {self.eval_prompts_in_train} eval prompts also in train"
                   if self.eval_prompts_in_train else "")
        streamed = f"streaming {', '.join(self.streamed)} (counted as training reads them): " if self.streamed else ""
        mixture = f"; sources: {self.sources_summary()}" if self.mixture else ""
        return streamed + kept + (f"; dropped: {reasons}" if reasons else "") + (f"; {sides}" if sides else "") + \
            overlap + mixture

    def sources_summary(self) -> str:
        def one(source: dict[str, Any]) -> str:
            options = ", ".join(f"{key} {source[key]}" for key in ("weight", "max_rows", "fraction") if key in source)
            used = " + ".join(f"{source[f'{split}_rows']} {split}" for split in ("train", "eval")
                              if source.get(f"{split}_rows"))
            return f"{source['card']} ({source['split']}{', ' + options if options else ''}): " \
                   f"{source['rows_taken']} of {source['rows_kept']} kept rows taken ({used or 'none used'})"
        return "; ".join(one(source) for source in self.sources)

    def as_dict(self) -> dict[str, Any]:
        if self.refresh is not None:
            self.refresh()
        return {"rows_read": self.read, "rows_kept": self.kept, "rows_dropped": dict(self.dropped),
                "first_dropped": {reason: rows[:_FIRST_BAD] for reason, rows in self.examples.items()},
                "splits": self.splits, "eval_prompts_in_train": self.eval_prompts_in_train} | (
                    {"sources": self.sources} if self.mixture else {})


_FIRST_BAD = 5  # row numbers kept per reason: enough to find the pattern, never the whole file

"""What every sampling engine takes and returns, without torch: settings, completions, throughput.

An engine proposes token ids; the stages decode and score them, and PPO recomputes every log-probability
itself, so an engine is only ever trusted for the samples.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass(frozen=True)
class SamplingSettings:
    """One sampling call's settings (greedy when temperature is 0); `stop_ids` end an answer and are kept in it."""

    max_new_tokens: int
    temperature: float
    top_p: float
    seed: int
    stop_ids: tuple[int, ...]


@dataclass
class Completion:
    """One sampled answer as the engine returned it: token ids and, when the engine gives them, the log-probability
    of each under the sampling temperature."""

    token_ids: list[int]
    logprobs: list[float] | None = None


@dataclass
class EngineStats:
    """Tokens an engine produced and the wall time it spent producing and syncing them, for `resources`."""

    engine: str
    tokens: int = 0
    seconds: float = 0.0
    syncs: int = 0
    sync_seconds: float = 0.0
    started_seconds: float = 0.0
    _clock: float = field(default=0.0, repr=False)

    def start(self) -> None:
        self._clock = time.perf_counter()

    def add(self, tokens: int) -> None:
        self.tokens += tokens
        self.seconds += time.perf_counter() - self._clock

    def add_sync(self, seconds: float) -> None:
        self.syncs += 1
        self.sync_seconds += seconds

    def as_dict(self) -> dict[str, float | int | str]:
        """What a stage's `resources` records: the engine, its tokens/s while sampling, and what syncing cost."""
        return {"engine": self.engine, "sampled_tokens": self.tokens, "sampling_seconds": round(self.seconds, 3),
                "tokens_per_second": round(self.tokens / self.seconds, 1) if self.seconds else None,
                "syncs": self.syncs, "sync_seconds": round(self.sync_seconds, 3),
                "startup_seconds": round(self.started_seconds, 3)}

"""What a stage run costs: its wall time and the peak memory of the process while it ran.

`pipeline.run_stage` measures every stage (`measure_stage`) and `stages/common.finished_manifest` records
`stage_resources()` as the manifest's `metrics.resources`: `{wall_seconds, peak_rss_gib, peak_cuda_gib}`.

`run` executes several stages in one process, so the process's lifetime peak (`ru_maxrss`) is not a stage's.
On Linux the kernel's high-water mark of resident memory (`VmHWM`) is reset when the stage starts (writing 5
to `/proc/self/clear_refs`) and read when it finishes: exact, free, and a spike of any length counts. Where
that reset is refused, a daemon thread samples the resident size every 0.2 s instead (a spike shorter than
that can be missed). The peak is the whole process's, so memory an earlier stage still holds counts too.
On CUDA the peak that torch allocated on this process's device is added (`peak_cuda_gib`, else null). A stage
that samples adds `sampling`: which engine sampled, its tokens/s and what syncing policy versions cost
(`record_sampling`, called by generation.py and PPO's rollouts).

The numbers are taken when the stage builds its manifest, before its final files are written. Under
several processes each rank measures itself and rank 0's numbers are the ones recorded. A resumed stage
records the wall time of the run that finished it, not of the runs before.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path

GIB = 2**30
_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def status_bytes(key: str) -> int | None:
    """A memory line of /proc/self/status (`VmRSS`, `VmHWM`) in bytes; None where there is no such file."""
    try:
        text = _STATUS.read_text(encoding="ascii")
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1]) * 1024  # the kernel writes kB
    return None


def reset_kernel_peak() -> bool:
    """Reset this process's VmHWM to its current resident size; False where the kernel refuses (not Linux...)."""
    try:
        _CLEAR_REFS.write_text("5", encoding="ascii")
    except OSError:
        return False
    return True


def resident_bytes() -> int:
    """The process's resident size now (psutil, which accelerate installs, where /proc is missing)."""
    found = status_bytes("VmRSS")
    if found is not None:
        return found
    import psutil

    return int(psutil.Process().memory_info().rss)


class _Sampler(threading.Thread):
    """Keeps the largest resident size seen every `interval` seconds until stopped."""

    def __init__(self, interval: float) -> None:
        super().__init__(name="stage-memory-sampler", daemon=True)
        self.interval = interval
        self.peak = resident_bytes()
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(self.interval):
            self.peak = max(self.peak, resident_bytes())

    def stop(self) -> None:
        self._stop_event.set()
        self.join()


class StageMeter:
    """Wall clock and peak memory since a stage started; `snapshot()` may be read while it runs."""

    def __init__(self, sample_every: float = 0.2, kernel_peak: bool = True) -> None:
        self.started = time.monotonic()
        torch = sys.modules.get("torch")  # not imported yet: nothing is on a GPU, so there is no peak to reset
        if torch is not None and torch.cuda.is_initialized():
            torch.cuda.reset_peak_memory_stats()
        self.sampling: dict[str, object] | None = None  # the sampling engine's record (record_sampling)
        self.sampler = None if kernel_peak and reset_kernel_peak() else _Sampler(sample_every)
        if self.sampler is not None:
            self.sampler.start()

    def peak_rss_bytes(self) -> int:
        if self.sampler is None:
            return status_bytes("VmHWM") or resident_bytes()
        return max(self.sampler.peak, resident_bytes())

    def snapshot(self) -> dict[str, object]:
        """`{wall_seconds, peak_rss_gib, peak_cuda_gib}` so far (peak_cuda_gib is None without CUDA), and
        `sampling` when the stage sampled."""
        torch = sys.modules.get("torch")
        cuda = (torch.cuda.max_memory_allocated() / GIB
                if torch is not None and torch.cuda.is_initialized() else None)
        return {"wall_seconds": round(time.monotonic() - self.started, 3),
                "peak_rss_gib": round(self.peak_rss_bytes() / GIB, 4),
                "peak_cuda_gib": None if cuda is None else round(cuda, 4)} | (
                    {"sampling": self.sampling} if self.sampling is not None else {})

    def stop(self) -> None:
        if self.sampler is not None:
            self.sampler.stop()


_ACTIVE: ContextVar[StageMeter | None] = ContextVar("stage_meter", default=None)


@contextmanager
def measure_stage(sample_every: float = 0.2, kernel_peak: bool = True) -> Iterator[StageMeter]:
    """Measure the stage that runs inside the block; `stage_resources()` reads it meanwhile.

    `kernel_peak=False` samples even where the kernel's high-water mark could be reset (for tests).
    """
    meter = StageMeter(sample_every, kernel_peak)
    token = _ACTIVE.set(meter)
    try:
        yield meter
    finally:
        _ACTIVE.reset(token)
        meter.stop()


def record_sampling(record: dict[str, object]) -> None:
    """Keep the sampling engine's record (engine, tokens, tokens/s, syncs) as the running stage's `sampling`."""
    meter = _ACTIVE.get()
    if meter is not None:
        meter.sampling = dict(record)


def stage_resources() -> dict[str, object] | None:
    """The running stage's resources so far; None outside `measure_stage` (a stage's `run` called directly)."""
    meter = _ACTIVE.get()
    return None if meter is None else meter.snapshot()

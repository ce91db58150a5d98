"""Stopping on SIGTERM or SIGINT without losing work: finish the optimizer step, save a checkpoint, exit.

Slurm and spot instances send SIGTERM and allow a grace period before SIGKILL. While a stage trains, the
first signal only asks for a stop: the trainer finishes its current optimizer step, every rank agrees on
stopping at that step, a checkpoint is saved, and the stage exits with 128 + the signal's number and no
`stage.json`, so the same command resumes there. Outside training (loading, writing the final outputs) a
signal stops at once, as Ctrl-C always did: there is no step to finish.

A second signal exits at once; a repeat within `_SAME_REQUEST_SECONDS` is the same request, because a
launcher forwards the signal it got to workers that the scheduler may also have signalled directly. With a
grace period, a step plus its save that cannot finish in time exits when the period ends rather than being
killed mid-write (checkpoints are written whole or not at all, so the previous one stays the newest).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from rlhf_pipeline.distributed import launched_as_rank_zero, max_over_processes

_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_SAME_REQUEST_SECONDS = 2.0


class Stopped(KeyboardInterrupt):
    """A stop asked for by a signal; `exit_status` is the shell's convention for it (143 for SIGTERM)."""

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(message)
        self.signum = signum
        self.message = message

    @property
    def exit_status(self) -> int:
        return 128 + self.signum


@dataclass
class _Request:
    signum: int | None = None
    at: float = 0.0
    training: bool = False
    grace_period: float | None = None


_request = _Request()


def _name(signum: int) -> str:
    return signal.Signals(signum).name


def _exit_now(signum: int, why: str) -> None:
    print(f"{_name(signum)}: {why}; exiting now. The newest complete checkpoint is where a re-run resumes.",
          file=sys.stderr, flush=True)
    os._exit(128 + signum)


def _on_signal(signum: int, frame: FrameType | None) -> None:
    now = time.monotonic()
    if _request.signum is not None:
        if now - _request.at < _SAME_REQUEST_SECONDS:
            return
        _exit_now(signum, "second stop request")
    _request.signum, _request.at = signum, now
    if not _request.training:
        raise Stopped(signum, f"stopped by {_name(signum)}; re-run the same command to resume from the last "
                              "checkpoint")
    if launched_as_rank_zero():  # a launcher signals every rank: one notice is enough
        print(f"{_name(signum)}: finishing this optimizer step and saving a checkpoint (send it again to exit at "
              "once)", file=sys.stderr, flush=True)
    if _request.grace_period is not None:
        timer = threading.Timer(_request.grace_period, _exit_now,
                                (signum, f"no checkpoint within the grace period of {_request.grace_period:g} s"))
        timer.daemon = True
        timer.start()


@contextmanager
def stop_signals_handled(grace_period: float | None = None) -> Iterator[None]:
    """Route SIGTERM and SIGINT to the stop request for the block (the CLI wraps every command in it)."""
    if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
        yield
        return
    global _request
    _request = _Request(grace_period=grace_period)
    previous = {signum: signal.signal(signum, _on_signal) for signum in _STOP_SIGNALS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        _request = _Request()


def requested_signal() -> int | None:
    """The signal that asked any process to stop, or None. A collective: every rank calls it at the same step,
    so all stop at the same step even when only one was signalled."""
    return int(max_over_processes(_request.signum or 0)) or None


@contextmanager
def stopping_after_step() -> Iterator[None]:
    """Within the block a signal asks the trainer to stop after its step (it polls `requested_signal`)."""
    _request.training = True
    try:
        yield
    finally:
        _request.training = False


def raise_if_stopped(steps: int, checkpoint: Path | None) -> None:
    """After a trainer returned: a stop request ends the stage here, before anything marks it finished."""
    signum = requested_signal()
    if signum is None:
        return
    saved = f"checkpoint saved in {checkpoint}" if checkpoint else "no checkpoint saved"
    raise Stopped(signum, f"stopped by {_name(signum)} after step {steps}; {saved}; re-run the same command to "
                          "resume from it")

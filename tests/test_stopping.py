"""Signals: outside training they stop at once; in training the first asks for a stop after the step, a second
one (or the end of the grace period) exits at once. Real signals, sent to this process or to a child."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from rlhf_pipeline.stopping import (
    Stopped,
    raise_if_stopped,
    requested_signal,
    stop_signals_handled,
    stopping_after_step,
)


def test_outside_training_a_signal_stops_at_once_and_handlers_are_restored() -> None:
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Stopped) as stopped, stop_signals_handled():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
        pytest.fail("the signal did not stop the block")
    assert stopped.value.exit_status == 143
    assert stopped.value.message == "stopped by SIGTERM; re-run the same command to resume from the last checkpoint"
    assert signal.getsignal(signal.SIGTERM) is before


def test_in_training_a_signal_is_a_request_for_the_trainer() -> None:
    with stop_signals_handled(), stopping_after_step():
        assert requested_signal() is None
        raise_if_stopped(3, None)  # nothing asked: no stop
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)  # a launcher forwarding the same request: not a second one
        assert requested_signal() == signal.SIGINT
        with pytest.raises(Stopped, match=r"^stopped by SIGINT after step 3; no checkpoint saved; re-run") as stop:
            raise_if_stopped(3, None)
    assert stop.value.exit_status == 130
    assert requested_signal() is None  # the next command starts with no request


_CHILD = """
import os, signal, sys, time
from rlhf_pipeline import stopping
stopping._SAME_REQUEST_SECONDS = 0.2
grace = float(sys.argv[1]) if len(sys.argv) > 1 else None
with stopping.stop_signals_handled(grace), stopping.stopping_after_step():
    print("training", flush=True)
    time.sleep(30)
"""


def _child(*args: str) -> subprocess.Popen[str]:
    process = subprocess.Popen([sys.executable, "-c", _CHILD, *args], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    assert process.stdout is not None and process.stdout.readline() == "training\n"
    return process


def test_a_second_signal_exits_at_once() -> None:
    process = _child()
    process.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    assert process.poll() is None  # the first one waits for the step
    sent = time.monotonic()
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=10)
    assert time.monotonic() - sent < 2
    assert process.returncode == 143
    assert "SIGTERM: finishing this optimizer step and saving a checkpoint" in err
    assert "SIGTERM: second stop request; exiting now." in err


def test_a_step_that_outlasts_the_grace_period_exits_when_it_ends() -> None:
    process = _child("1.5")
    sent = time.monotonic()
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=20)
    assert 1.5 <= time.monotonic() - sent < 5
    assert process.returncode == 130
    assert "SIGINT: no checkpoint within the grace period of 1.5 s; exiting now." in err

"""One writer per output folder: refusal with the holder's details, takeover of a dead holder's lock, --force-unlock.

The holders here are other processes (a lock held by this process would prove nothing about flock):
`_hold` starts one that takes the lock and waits.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from rlhf_pipeline.errors import PipelineError
from rlhf_pipeline.locks import LOCK_FILE, output_lock

_HOLDER = """
import signal, sys, time
from pathlib import Path
from rlhf_pipeline.locks import output_lock
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # leave through output_lock's release
with output_lock(Path(sys.argv[1]), "sft stage of elsewhere.yaml"):
    print("locked", flush=True)
    time.sleep(120)
"""


@pytest.fixture
def hold(tmp_path: Path) -> Iterator[subprocess.Popen[str]]:
    """Another process holding `tmp_path/out`'s lock until the test ends (or kills it)."""
    process = subprocess.Popen([sys.executable, "-c", _HOLDER, str(tmp_path / "out")], stdout=subprocess.PIPE,
                               text=True)
    assert process.stdout is not None and process.stdout.readline().strip() == "locked"
    yield process
    process.kill()
    process.wait()


def test_second_writer_is_refused_with_the_holders_details(tmp_path: Path, hold: subprocess.Popen[str]) -> None:
    started = time.monotonic()
    with pytest.raises(PipelineError) as refused, output_lock(tmp_path / "out", "sft stage of mine.yaml"):
        pytest.fail("a second writer got the lock")
    assert time.monotonic() - started < 2
    message = str(refused.value)
    assert message.startswith(f"{tmp_path / 'out'}: in use by PID {hold.pid} on host {socket.gethostname()} since ")
    assert "(sft stage of elsewhere.yaml)" in message
    assert "wait for it to finish or stop it" in message and "--force-unlock" in message
    assert json.loads((tmp_path / "out" / LOCK_FILE).read_text())["pid"] == hold.pid  # the holder's lock is intact


def test_lock_of_a_killed_process_is_taken_over(tmp_path: Path, hold: subprocess.Popen[str],
                                                caplog: pytest.LogCaptureFixture) -> None:
    os.kill(hold.pid, signal.SIGKILL)
    hold.wait()
    assert json.loads((tmp_path / "out" / LOCK_FILE).read_text())["pid"] == hold.pid  # left behind by the kill
    with caplog.at_level(logging.WARNING, logger="rlhf_pipeline.locks"), output_lock(tmp_path / "out", "mine"):
        record = json.loads((tmp_path / "out" / LOCK_FILE).read_text())
        assert record["pid"] == os.getpid() and record["task"] == "mine"
    assert f"took over the lock left by PID {hold.pid}" in caplog.text
    assert not (tmp_path / "out" / LOCK_FILE).exists()  # released at exit


def test_force_unlock_takes_a_held_lock_and_the_old_holder_leaves_it_alone(tmp_path: Path,
                                                                            hold: subprocess.Popen[str],
                                                                            caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="rlhf_pipeline.locks"), \
            output_lock(tmp_path / "out", "mine", force_unlock=True):
        assert f"--force-unlock removed the lock of PID {hold.pid}" in caplog.text
        hold.send_signal(signal.SIGTERM)
        assert hold.wait() == 0  # it released its lock, on the file it had locked
        assert json.loads((tmp_path / "out" / LOCK_FILE).read_text())["pid"] == os.getpid()
        with pytest.raises(PipelineError, match=f"in use by PID {os.getpid()}"), output_lock(tmp_path / "out", "x"):
            pass


def test_a_released_lock_is_free_again_and_other_ranks_do_not_lock(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    with output_lock(tmp_path / "out", "first"):
        assert (tmp_path / "out" / LOCK_FILE).exists()
    with output_lock(tmp_path / "out", "second"):
        pass
    monkeypatch.setenv("RANK", "1")
    with output_lock(tmp_path / "other", "rank 1"):
        assert not (tmp_path / "other").exists()

"""One writer per output folder: a `.lock` file held with `flock` for as long as a stage runs there.

Two runs of a stage on one folder would move each other's checkpoints away mid-write, so the second is
refused at once with the holder's host, PID and start time. The kernel drops an `flock` when its holder
dies, however it dies, so a lock left by a killed run is simply taken over (and said so); a PID file alone
could not tell a dead holder from a reused PID. Under several processes only rank 0 locks.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rlhf_pipeline.distributed import launched_as_rank_zero
from rlhf_pipeline.errors import PipelineError

logger = logging.getLogger(__name__)

LOCK_FILE = ".lock"
# Errors from file systems that do not support flock (some network mounts): run unlocked, with a warning.
_NO_LOCKING = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS}


def _holder(path: Path) -> dict[str, Any]:
    """What the holder wrote into the lock file; it may still be writing it, so retry briefly."""
    for _ in range(10):
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            time.sleep(0.05)
    return {}


def _describe(holder: dict[str, Any]) -> str:
    if not holder:
        return "another process"
    return (f"PID {holder.get('pid', '?')} on host {holder.get('host', '?')} since {holder.get('started', '?')} "
            f"({holder.get('task', 'a stage')})")


def _pid_alive(pid: Any) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ProcessLookupError, ValueError, TypeError):
        return False
    except PermissionError:
        return True
    return True


def _refusal(folder: Path, holder: dict[str, Any]) -> PipelineError:
    how = "wait for it to finish or stop it"
    if holder.get("host") == socket.gethostname() and not _pid_alive(holder.get("pid")):
        how = ("its PID is gone but a process it started still holds the lock (e.g. a data loader worker); "
               "wait a few seconds and retry")
    return PipelineError(f"{folder}: in use by {_describe(holder)}; {how}. If that run is gone for good "
                         "(e.g. on another host that was shut down), re-run with --force-unlock")


def _open_locked(path: Path) -> int | None:
    """An fd holding the lock on the file now at `path`, or None when another process holds it."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        except BaseException:
            os.close(fd)
            raise
        try:  # a holder that released meanwhile unlinked the file we opened: lock the new one instead
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


def _release(path: Path, fd: int) -> None:
    """Remove the lock file before closing it, so no one locks a file that is on its way out; a file that
    --force-unlock put in its place belongs to the new holder and stays."""
    try:
        if os.stat(path).st_ino == os.fstat(fd).st_ino:
            path.unlink()
    except FileNotFoundError:
        pass
    os.close(fd)


@contextmanager
def output_lock(folder: Path, task: str, force_unlock: bool = False) -> Iterator[None]:
    """Hold `folder`'s lock for the block, or raise a PipelineError naming who holds it.

    `task` says what this run is (e.g. "sft stage of recipes/sft.yaml"); the lock records it with this
    host, PID and start time for whoever is refused. `force_unlock` removes a lock still held (by a
    process this host cannot see) and takes a fresh one.
    """
    if not launched_as_rank_zero():
        yield
        return
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_FILE
    if force_unlock and path.exists():
        logger.warning("%s: --force-unlock removed the lock of %s", folder, _describe(_holder(path)))
        path.unlink(missing_ok=True)
    try:
        fd = _open_locked(path)
    except OSError as err:
        if err.errno not in _NO_LOCKING:
            raise
        logger.warning("%s: this file system does not support locks (%s); running unlocked, so make sure no "
                       "other run writes to this folder", folder, err.strerror)
        yield
        return
    if fd is None:
        raise _refusal(folder, _holder(path))
    previous = _holder(path)
    if previous and previous.get("pid") != os.getpid():
        logger.warning("%s: took over the lock left by %s, which is no longer running", folder, _describe(previous))
    record = {"host": socket.gethostname(), "pid": os.getpid(), "task": task,
              "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        os.fsync(fd)
        yield
    finally:
        _release(path, fd)

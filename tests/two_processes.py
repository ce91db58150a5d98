"""Run a script as two real processes with `torch.distributed.run` on a free port (gloo on the CPU)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path


def launch_two_processes(script: Path, *args: str, timeout: float = 600) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
               str(script), *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true"})
    assert done.returncode == 0, done.stderr[-3000:]

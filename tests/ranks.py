"""Real multi-process runs for the tests: torchrun's environment set by hand, gloo on loopback."""

from __future__ import annotations

import os
import socket
import subprocess
import sys


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_ranks(args: list[str], world_size: int = 2) -> list[subprocess.Popen]:
    """Start ``python *args`` once per rank (one thread each), output captured."""
    procs = []
    for rank in range(world_size):
        env = os.environ | {"WORLD_SIZE": str(world_size), "RANK": str(rank), "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1",
                            "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    return procs


def rank_outputs(procs: list[subprocess.Popen], timeout: float) -> list[str]:
    """Wait for every rank and return their outputs; kill any left running."""
    try:
        return [proc.communicate(timeout=timeout)[0] for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()


def wait_ranks(procs: list[subprocess.Popen], timeout: float) -> None:
    """Wait for every rank; kill any left running; fail with the output of a rank that failed."""
    for proc, out in zip(procs, rank_outputs(procs, timeout)):
        assert proc.returncode == 0, out[-3000:]

"""One writer per run folder, and ranks that do not outlive their launcher.

`unmask train` holds an exclusive OS lock on ``RUN/train.lock`` (its PID written inside) while it
runs: a second writer is refused naming that PID, a lock left by a killed process is free again,
and under torchrun rank 0 holds it while the other ranks learn the outcome instead of waiting.
Ranks started by torchrun end when torchrun itself is killed.
"""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from ranks import free_port, launch_ranks, rank_outputs
from runs import finetune_source

UNMASK = str(Path(sys.executable).with_name("unmask"))  # the installed console script
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))
ENV = os.environ | {"OMP_NUM_THREADS": "1"}
LONG = ["--preset", "tiny", "--context-len", "16", "--batch-size", "2", "--steps", "100000", "--checkpoint-every", "100000",
        "--eval-every", "100000", "--log-every", "1", "--precision", "fp32"]


def start(args: list[str], log: Path) -> subprocess.Popen:
    """Start a long command, its output to ``log`` (a pipe left unread would fill and stall it)."""
    with open(log, "w") as f:
        proc = subprocess.Popen(args, env=ENV, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    proc.log = log
    return proc


def wait_for(condition, proc: subprocess.Popen, what: str, limit: float = 240) -> None:
    """Poll ``condition`` until it holds; fail with the process's output if it ends first."""
    deadline = time.monotonic() + limit
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"{what}: the process ended first: {proc.log.read_text()[-2000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not after {limit} s")
        time.sleep(0.05)


def lock_holder(run_dir: Path) -> str:
    lock = run_dir / "train.lock"
    return lock.read_text().strip() if lock.is_file() else ""


def last_line(text: str) -> str:
    return text.strip().splitlines()[-1]


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait()


def test_a_second_writer_is_refused_naming_the_pid(tmp_path, small_data):
    run_dir = tmp_path / "run"
    first = start([UNMASK, "train", "--run-dir", str(run_dir), "--data", str(small_data), *LONG], tmp_path / "first.log")
    try:
        wait_for(lambda: lock_holder(run_dir) == str(first.pid), first, "the first run takes the lock")
        second = subprocess.run([UNMASK, "train", "--run-dir", str(run_dir), "--data", str(small_data), *LONG],
                                env=ENV, capture_output=True, text=True, timeout=300)
        assert second.returncode == 2, second.stderr[-2000:]
        assert last_line(second.stderr).startswith("error: --run-dir") and f"PID {first.pid}" in second.stderr, second.stderr
        assert "Traceback" not in second.stderr
        resumed = subprocess.run([UNMASK, "train", "--run-dir", str(run_dir), "--resume"], env=ENV, capture_output=True, text=True,
                                 timeout=300)
        assert resumed.returncode == 2 and f"PID {first.pid}" in resumed.stderr, resumed.stderr
        assert first.poll() is None  # the first run was not disturbed
    finally:
        stop(first)


def test_a_lock_left_by_a_killed_process_does_not_block(tmp_path, small_data):
    run_dir = tmp_path / "run"
    killed = start([UNMASK, "train", "--run-dir", str(run_dir), "--data", str(small_data), *LONG], tmp_path / "killed.log")
    try:
        wait_for(lambda: lock_holder(run_dir) == str(killed.pid), killed, "the run takes the lock")
        os.kill(killed.pid, signal.SIGKILL)
        killed.wait()
    finally:
        stop(killed)
    assert lock_holder(run_dir) == str(killed.pid)  # the file stays; the OS released the lock with the process
    short = [a if a != "100000" else "2" for a in LONG]
    again = subprocess.run([UNMASK, "train", "--run-dir", str(run_dir), "--data", str(small_data), *short],
                           env=ENV, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert (run_dir / "checkpoints" / "LATEST").read_text().strip() == "step_000002"


def test_a_run_dir_that_is_a_file_is_one_line(tmp_path, small_data):
    run_dir = tmp_path / "run"
    run_dir.write_text("not a folder")
    out = subprocess.run([UNMASK, "train", "--run-dir", str(run_dir), "--data", str(small_data), "--steps", "1"],
                         env=ENV, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and last_line(out.stderr).startswith(f"error: --run-dir {run_dir}"), out.stderr
    assert "is a file" in out.stderr and "Traceback" not in out.stderr
    assert run_dir.read_text() == "not a folder"


RANK_WORKER = textwrap.dedent(
    """
    import json, os, sys
    from unmask.config import ModelConfig, TrainConfig
    from unmask.errors import UnmaskError
    from unmask.train import train

    os.environ["MASTER_PORT"] = sys.argv[3]
    try:
        train(sys.argv[1], ModelConfig(vocab_size=512, context_len=16, n_layer=1, n_head=2, n_embd=32),
              TrainConfig(steps=2, batch_size=2, precision="fp32", eval_every=100), sys.argv[2], device="cpu", progress=False)
    except UnmaskError as exc:
        print(json.dumps({"refused": str(exc)}))
        sys.exit(2)
    """
)


def test_every_rank_is_refused_when_the_run_is_locked(tmp_path, small_data):
    """Rank 0 cannot take the lock: every rank ends with the same error instead of waiting for rank 0."""
    from unmask.checkpoint import run_lock

    run_dir = tmp_path / "run"
    with run_lock(run_dir):
        procs = launch_ranks(["-c", RANK_WORKER, str(run_dir), str(small_data), str(free_port())])
        outputs = rank_outputs(procs, timeout=240)
    for proc, out in zip(procs, outputs):
        assert proc.returncode == 2, out[-2000:]
        assert f"PID {os.getpid()}" in json.loads(out.strip().splitlines()[-1])["refused"]
    assert not (run_dir / "checkpoints").exists()


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def _running(pid: int) -> bool:
    """Alive and not a zombie (an orphan's zombie may wait for a reaper that never comes)."""
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_ranks_stop_when_torchrun_is_killed(tmp_path, small_data):
    run_dir = tmp_path / "run"
    launcher = start([TORCHRUN, "--nnodes", "1", "--nproc-per-node", "2", "--rdzv-backend", "c10d",
                      "--rdzv-endpoint", f"127.0.0.1:{free_port()}", "-m", "unmask", "train", "--run-dir", str(run_dir),
                      "--data", str(small_data), *LONG], tmp_path / "torchrun.log")
    ranks: list[int] = []
    try:
        metrics = run_dir / "metrics.jsonl"
        wait_for(lambda: metrics.is_file() and metrics.stat().st_size > 0, launcher, "both ranks train")
        ranks = _children(launcher.pid)
        assert len(ranks) == 2, ranks
        os.kill(launcher.pid, signal.SIGKILL)
        launcher.wait()
        deadline = time.monotonic() + 60
        while any(map(_running, ranks)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(map(_running, ranks)), "ranks kept training after their launcher died"
    finally:
        for pid in ranks:
            if _running(pid):
                os.kill(pid, signal.SIGKILL)
        stop(launcher)


def test_finetune_is_refused_while_the_run_is_locked(tmp_path, small_data):
    """`unmask finetune` takes the lock before it writes RUN/pairs."""
    from unmask.checkpoint import run_lock

    source, pairs = finetune_source(tmp_path, small_data)
    run_dir = tmp_path / "sft"
    with run_lock(run_dir):
        out = subprocess.run([UNMASK, "finetune", "--run-dir", str(run_dir), "--init-from", str(source), "--pairs", str(pairs),
                              "--steps", "1"], env=ENV, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and last_line(out.stderr).startswith(f"error: --run-dir {run_dir}"), out.stderr
    assert f"PID {os.getpid()}" in out.stderr
    assert not (run_dir / "pairs").exists()
    missing = subprocess.run([UNMASK, "finetune", "--run-dir", str(tmp_path / "typo"), "--resume"], env=ENV, capture_output=True,
                             text=True, timeout=300)
    assert missing.returncode == 2 and "--run-dir" in missing.stderr and "does not exist" in missing.stderr, missing.stderr
    assert not (tmp_path / "typo").exists()

"""`unmask train --resume` through the command line continues the run exactly as it was configured.

A run started with non-default flags is killed with SIGKILL after its first checkpoint and resumed
with ``--run-dir R --resume`` only: its per-step losses must equal an uninterrupted run's. A flag
that differs from the saved run is refused by name; ``--steps`` extends the run with a notice and
a learning rate that continues smoothly from where the run was.
"""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from runs import finetune_source

from unmask.checkpoint import load_model

STEPS = 24
FLAGS = ["--preset", "tiny", "--context-len", "32", "--batch-size", "4", "--steps", str(STEPS), "--checkpoint-every", "4",
         "--precision", "fp32", "--eval-every", "1000", "--log-every", "1", "--lr", "1e-3", "--loss", "k-dce",
         "--warmup-steps", "3", "--seed", "3"]
WARMUP = 3  # before the first checkpoint (step 4), so the resume step lies on the cosine
ENV = os.environ | {"OMP_NUM_THREADS": "1"}  # one thread: no spinning workers on a shared CPU


def unmask(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "unmask", "train", *args], env=ENV, capture_output=True, text=True, timeout=300)


def records(run_dir, kind="train") -> list[dict]:
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


def start_and_kill(run_dir, data) -> int:
    """Start the run, SIGKILL it as soon as its first checkpoint exists; the step it can resume from."""
    proc = subprocess.Popen([sys.executable, "-m", "unmask", "train", "--run-dir", str(run_dir), "--data", str(data), *FLAGS],
                            env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest = run_dir / "checkpoints" / "LATEST"
    try:
        deadline = time.monotonic() + 240
        while not latest.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    step = int(latest.read_text().strip().removeprefix("step_"))
    assert 0 < step < STEPS, "the run was not killed mid-run"
    return step


@pytest.fixture(scope="module")
def runs(tmp_path_factory, small_data):
    root = tmp_path_factory.mktemp("resume")
    full = unmask("--run-dir", str(root / "full"), "--data", str(small_data), *FLAGS)
    assert full.returncode == 0, full.stderr[-2000:]
    killed_at = start_and_kill(root / "split", small_data)
    shutil.copytree(root / "split", root / "extended")
    return root, killed_at


def test_resume_with_only_run_dir_continues_exactly(runs):
    root, killed_at = runs
    resumed = unmask("--run-dir", str(root / "split"), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    full, split = records(root / "full"), records(root / "split")
    assert [r["step"] for r in split] == list(range(1, STEPS + 1))
    assert [r["loss"] for r in split] == [r["loss"] for r in full]
    assert [r["lr"] for r in split] == [r["lr"] for r in full]
    assert full[0]["lr"] == pytest.approx(1e-3 / WARMUP)  # the run really used --lr 1e-3 and --warmup-steps
    config = json.loads((root / "split" / "config.json").read_text())["train"]
    assert (config["loss"], config["lr"], config["seed"]) == ("k-dce", 1e-3, 3)


def test_resume_refuses_a_differing_flag(runs):
    root, _ = runs
    out = unmask("--run-dir", str(root / "extended"), "--resume", "--lr", "3e-3")
    assert out.returncode == 2
    assert "--lr" in out.stderr and "0.001" in out.stderr and "0.003" in out.stderr, out.stderr
    out = unmask("--run-dir", str(root / "extended"), "--resume", "--loss", "t-dce")
    assert out.returncode == 2 and "--loss" in out.stderr and "k-dce" in out.stderr, out.stderr


def test_resume_with_more_steps_keeps_the_learning_rate_continuous(runs):
    root, killed_at = runs
    new_steps = STEPS + 8
    out = unmask("--run-dir", str(root / "extended"), "--resume", "--steps", str(new_steps))
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"--steps changed from {STEPS} to {new_steps} at step {killed_at}" in out.stderr
    full, extended = records(root / "full"), records(root / "extended")
    assert [r["step"] for r in extended] == list(range(1, new_steps + 1))
    # up to the resume step: the old run; the first update after it uses the old schedule's LR there
    assert [r["lr"] for r in extended[: killed_at + 1]] == [r["lr"] for r in full[: killed_at + 1]]
    # from there (or the end of warmup) a cosine from that LR down to the floor (lr * min_lr_ratio) at the new end
    anchor = max(killed_at, WARMUP)
    start, floor = full[anchor]["lr"], 1e-3 * 0.1
    for r in extended[anchor:]:
        progress = (r["step"] - 1 - anchor) / (new_steps - anchor)
        assert r["lr"] == pytest.approx(floor + (start - floor) * 0.5 * (1 + math.cos(math.pi * progress)), rel=1e-12)
    saved = json.loads((root / "extended" / "config.json").read_text())["train"]
    assert saved["steps"] == new_steps and saved["steps_changes"] == [[killed_at, STEPS]]


UNMASK = str(Path(sys.executable).with_name("unmask"))  # the installed console script
SHORT = ["--preset", "tiny", "--context-len", "16", "--batch-size", "2", "--precision", "fp32", "--eval-every", "1000", "--log-every", "1"]


def cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([UNMASK, *args], env=env or ENV, capture_output=True, text=True, timeout=300)


def test_resume_refuses_data_prepared_again(tmp_path):
    """A data folder prepared again (other documents, same tokenizer) is refused on --resume: the run
    recorded the content fingerprint of the shards it trained on."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(8):
        (corpus / f"{i}.txt").write_text(f"Document {i}. " + "Some words of text, and more words. " * 40)
    data = tmp_path / "data"
    assert cli("data", "prepare", str(corpus), "--out", str(data), "--workers", "0").returncode == 0
    run = cli("train", "--run-dir", str(tmp_path / "run"), "--data", str(data), "--steps", "2", *SHORT)
    assert run.returncode == 0, run.stderr[-2000:]
    recorded = json.loads((tmp_path / "run" / "config.json").read_text())["data_fingerprint"]
    assert recorded == json.loads((data / "meta.json").read_text())["fingerprint"]
    (corpus / "0.txt").write_text("Another document altogether. " * 40)
    assert cli("data", "prepare", str(corpus), "--out", str(data), "--workers", "0", "--overwrite").returncode == 0
    resumed = cli("train", "--run-dir", str(tmp_path / "run"), "--resume", "--steps", "3")
    assert resumed.returncode == 2, resumed.stderr[-2000:]
    assert resumed.stderr.strip().splitlines()[-1].startswith(f"error: --resume: the data in {data.resolve()} changed"), resumed.stderr
    assert recorded in resumed.stderr


def test_resume_rebuilds_the_embedded_corpus_and_its_fingerprint(tmp_path):
    """The embedded corpus is rebuilt where the run had it when its cache was removed, with the same
    content fingerprint, so the run resumes on it."""
    env = ENV | {"UNMASK_CACHE": str(tmp_path / "cache")}
    run = cli("train", "--run-dir", str(tmp_path / "run"), "--steps", "2", *SHORT, env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["data_fingerprint"] and Path(saved["data_dir"]).parent == tmp_path / "cache"
    shutil.rmtree(tmp_path / "cache")
    resumed = cli("train", "--run-dir", str(tmp_path / "run"), "--resume", "--steps", "3", env=env)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert json.loads((Path(saved["data_dir"]) / "meta.json").read_text())["fingerprint"] == saved["data_fingerprint"]
    assert [r["step"] for r in records(tmp_path / "run")] == [1, 2, 3]


def test_a_damaged_checkpoint_names_resume_from_which_continues_exactly(tmp_path, small_data):
    """A truncated latest checkpoint: --resume names --resume-from with the checkpoint kept before it,
    and resuming from there recomputes the same losses."""
    run_dir = tmp_path / "run"
    full = cli("train", "--run-dir", str(run_dir), "--data", str(small_data), *SHORT, "--steps", "6", "--checkpoint-every", "2")
    assert full.returncode == 0, full.stderr[-2000:]
    before = records(run_dir)
    model = run_dir / "checkpoints" / "step_000006" / "model.safetensors"
    model.write_bytes(model.read_bytes()[: model.stat().st_size // 2])
    read = cli("sample", "--checkpoint", str(run_dir), "--length", "4")
    assert read.returncode == 2 and read.stderr.strip().splitlines()[-1].endswith(
        f"the checkpoint {model.parent} is damaged (the checkpoints kept before it: step_000004)"), read.stderr
    refused = cli("train", "--run-dir", str(run_dir), "--resume")
    assert refused.returncode == 2, refused.stderr[-2000:]
    line = refused.stderr.strip().splitlines()[-1]
    assert line.startswith(f"error: cannot read {model}") and line.endswith("resume from an earlier checkpoint with --resume-from 4"), line
    missing = cli("train", "--run-dir", str(run_dir), "--resume-from", "3")
    assert missing.returncode == 2 and "--resume-from 3" in missing.stderr and "steps 4, 6" in missing.stderr, missing.stderr
    resumed = cli("train", "--run-dir", str(run_dir), "--resume-from", "4")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert records(run_dir) == [r | {"tokens_per_s": r2["tokens_per_s"], "elapsed_s": r2["elapsed_s"]}
                                for r, r2 in zip(before, records(run_dir))]
    assert (run_dir / "checkpoints" / "LATEST").read_text().strip() == "step_000006"
    load_model(run_dir)  # the new step 6 is complete


def test_more_steps_inside_the_warmup_say_the_lr_keeps_rising(tmp_path, small_data):
    run_dir = tmp_path / "run"
    first = cli("train", "--run-dir", str(run_dir), "--data", str(small_data), *SHORT, "--steps", "2", "--warmup-steps", "10",
                "--lr", "1e-3")
    assert first.returncode == 0, first.stderr[-2000:]
    more = cli("train", "--run-dir", str(run_dir), "--resume", "--steps", "5")
    assert more.returncode == 0, more.stderr[-2000:]
    assert "cosine" not in more.stderr
    assert ("--steps changed from 2 to 5 at step 2: the learning rate keeps rising along its warmup, from 0.0003 now to 0.0005 "
            "at step 5 (the warmup is 10 steps)") in more.stderr, more.stderr
    assert [r["lr"] for r in records(run_dir)] == pytest.approx([1e-4, 2e-4, 3e-4, 4e-4, 5e-4])
    past = cli("train", "--run-dir", str(run_dir), "--resume", "--steps", "20")
    assert past.returncode == 0, past.stderr[-2000:]
    assert ("--steps changed from 5 to 20 at step 5: the learning rate continues its warmup from 0.0006 to 0.001 at step 10, then "
            "follows a cosine to 0.0001 at step 20") in past.stderr, past.stderr


def test_resuming_a_finished_run_says_so(tmp_path, small_data):
    run_dir = tmp_path / "run"
    assert cli("train", "--run-dir", str(run_dir), "--data", str(small_data), *SHORT, "--steps", "2").returncode == 0
    again = cli("train", "--run-dir", str(run_dir), "--resume")
    assert again.returncode == 0, again.stderr[-2000:]
    last = again.stderr.strip().splitlines()[-1]
    assert last == f"already finished at step 2 -> {run_dir}; give --steps N (more than 2) with --resume to train it further", last
    assert "nan" not in again.stderr


def test_finetune_resumes_from_an_earlier_checkpoint(tmp_path, small_data):
    source, pairs = finetune_source(tmp_path, small_data)
    run_dir = tmp_path / "sft"
    first = cli("finetune", "--run-dir", str(run_dir), "--init-from", str(source), "--pairs", str(pairs), "--steps", "2",
                "--checkpoint-every", "1", "--log-every", "1", "--precision", "fp32")
    assert first.returncode == 0, first.stderr[-2000:]
    before = records(run_dir)
    again = cli("finetune", "--run-dir", str(run_dir), "--resume-from", "1")
    assert again.returncode == 0, again.stderr[-2000:]
    assert again.stderr.strip().splitlines()[-1].startswith("done: 2 steps"), again.stderr
    assert [r["loss"] for r in records(run_dir)] == [r["loss"] for r in before]
    finished = cli("finetune", "--run-dir", str(run_dir), "--resume")
    assert finished.stderr.strip().splitlines()[-1].startswith("already finished at step 2"), finished.stderr


FAILING_WRITER = '''
import os, resource, signal

import safetensors.torch

_real_save, _target = safetensors.torch.save_file, os.environ["FAIL_SAVE_IN"]


def save_file(tensors, filename, metadata=None):
    """The real writer, past 1000 bytes failing with the I/O error of a full disk for files under _target."""
    if _target not in str(filename):
        return _real_save(tensors, filename, metadata=metadata)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1000, hard))
    try:
        return _real_save(tensors, filename, metadata=metadata)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


safetensors.torch.save_file = save_file
'''


def test_a_failed_save_is_one_line_and_the_run_resumes(tmp_path, small_data):
    """The checkpoint writer fails for real (a file size limit set for the step-4 checkpoint only, loaded
    through sitecustomize): `unmask train` prints one error line, and --resume continues the run."""
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(FAILING_WRITER)
    env = ENV | {"PYTHONPATH": os.pathsep.join([str(tmp_path / "site"), *filter(None, [os.environ.get("PYTHONPATH")])]),
                 "FAIL_SAVE_IN": "step_000004"}
    run_dir = tmp_path / "run"
    failed = cli("train", "--run-dir", str(run_dir), "--data", str(small_data), *SHORT, "--steps", "6", "--checkpoint-every", "2", env=env)
    assert failed.returncode == 2 and "Traceback" not in failed.stderr, failed.stderr[-3000:]
    assert failed.stderr.strip().splitlines()[-1] == (
        f"error: cannot write {run_dir / 'checkpoints' / 'step_000004'} (Error while serializing: I/O error: File too large (os error 27)); "
        "nothing of the run was lost (its last checkpoint step_000002 is intact): free space and continue it with --resume")
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["LATEST", "step_000002"]
    resumed = cli("train", "--run-dir", str(run_dir), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert [r["step"] for r in records(run_dir)] == list(range(1, 7))

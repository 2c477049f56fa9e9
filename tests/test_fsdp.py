"""FSDP2 from outside the model, sharded checkpoints, resume on another number of processes, EMA.

Two real processes (gloo, CPU) run ``unmask.train.train`` under the environment torchrun sets.
References are one plain process (no wrapper) with the same global batch: the same global batch
rows and masking noise are drawn by every layout, so only the fp32 summation order differs (the
gradient of a step is summed over micro-batches and all-reduced in another order). In fp32, losses
agree to 1e-5 and weights to 5e-5 (see tests/test_distributed.py for why Adam amplifies rounding);
with bf16 autocast, the default where the CPU multiplies bf16 fast, the other order is rounded to
bf16 and the losses agree to 1e-3 (measured: about 1e-4 per step, 8e-4 at most over 40 steps).
"""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from ranks import free_port, launch_ranks, wait_ranks
from safetensors.torch import load_file

from unmask.checkpoint import load_model, load_weights
from unmask.checkpoint_sharded import consolidate
from unmask.config import ModelConfig, TrainConfig
from unmask.likelihood import mc_elbo
from unmask.model import Transformer
from unmask.sampling import SamplerSpec
from unmask.train import autocast_dtype, train

L = 16
# per-step loss tolerance between process layouts, by the autocast dtype (see the module docstring)
LOSS_TOLERANCE = {None: 1e-5, torch.bfloat16: 1e-3}

WORKER = textwrap.dedent(
    """
    import json, os, sys, torch
    from unmask.config import ModelConfig, TrainConfig
    from unmask.train import train

    root, data, jobs = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    for job in jobs:
        os.environ["MASTER_PORT"] = str(job["port"])
        if job.get("live"):  # the sharded checkpoint loaded into a live 2-process FSDP model
            from unmask.checkpoint_sharded import load_sharded
            from unmask.checkpoint import latest_checkpoint
            from unmask.distributed import init_world, parallelize, shutdown
            from unmask.model import Transformer
            from unmask.train import make_optimizer
            sys.path.insert(0, job["tests"])
            from test_fsdp import live_outputs
            world, dev = init_world("cpu", "fsdp")
            cfg = TrainConfig(**job["cfg"])
            model = Transformer(ModelConfig(**job["model"]))
            parallelize(model, world, dev, "fsdp")
            load_sharded(latest_checkpoint(os.path.join(root, job["name"])), model, make_optimizer(model, cfg), None)
            out = live_outputs(model, data)
            if world.is_main:
                with open(os.path.join(root, job["name"] + "-live.json"), "w") as f:
                    json.dump(out, f)
            shutdown(world)
            continue
        train(os.path.join(root, job["name"]), ModelConfig(**job["model"]), TrainConfig(**job["cfg"]), data, device="cpu",
              progress=False, stop_after=job.get("stop_after"), resume=job.get("resume", False))
    """
)


def configs(objective: str, **kw) -> tuple[ModelConfig, TrainConfig]:
    model = ModelConfig(vocab_size=512, context_len=L, n_layer=2, n_head=2, n_embd=32, causal=objective == "ar")
    cfg = dict(objective=objective, loss="t-dce", steps=6, batch_size=2, global_batch_tokens=8 * L, lr=3e-3, warmup_steps=1,
               precision="fp32", seed=5, log_every=1, eval_every=1000, eval_windows=2, eval_draws=2, checkpoint_every=1000)
    cfg.update(kw)
    return model, TrainConfig(**cfg)


def job(name: str, model: ModelConfig, cfg: TrainConfig, **kw) -> dict:
    return {"name": name, "model": dataclasses.asdict(model), "cfg": dataclasses.asdict(cfg), "port": free_port(), **kw}


def launch(root, data, jobs: list[dict]) -> list[subprocess.Popen]:
    return launch_ranks(["-c", WORKER, str(root), str(data), json.dumps(jobs)])


def run_two_ranks(root, data, jobs: list[dict]) -> None:
    wait_ranks(launch(root, data, jobs), timeout=300)


def losses(run_dir) -> list[float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r["loss"] for r in map(json.loads, lines) if r["kind"] == "train"]


def live_outputs(model, data) -> dict:
    """A validation bound and a seeded sample of ``model`` (any wrapper): what a checkpoint must reproduce."""
    from unmask.data import TokenDataset

    windows = torch.from_numpy(TokenDataset(data, "val").eval_windows(L, 4))
    with torch.no_grad():
        bound = mc_elbo(model, windows, draws=4, estimator="t-dce", batch_size=4, seed=3)
        canvas = torch.full((2, L), model.config.mask_id)
        sample = SamplerSpec("first-hitting").run(model, canvas, torch.Generator().manual_seed(7))
    return {"nats": bound.nats_per_token, "tokens": sample.tokens.tolist()}


def assert_weights_close(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=5e-5, rtol=0, msg=f"{what}: {key}")


def test_fsdp_two_ranks_equal_one_process_and_resume_across_world_sizes(tmp_path, small_data):
    """2-rank FSDP = 1 plain process (MDM with activation checkpointing and EMA; AR); a run saved by
    2 ranks resumes on 1 and one saved by 1 resumes on 2, continuing the loss curve; the sharded
    checkpoint consolidates to a single file whose model reproduces the live sharded model."""
    mdm_model, mdm_cfg = configs("mdm", ema=0.9)
    ar_model, ar_cfg = configs("ar")
    fsdp_mdm = dataclasses.replace(mdm_cfg, parallel="fsdp", activation_checkpointing=True)
    fsdp_ar = dataclasses.replace(ar_cfg, parallel="fsdp")
    ref = tmp_path / "single"
    ref_mdm = train(ref / "mdm", mdm_model, mdm_cfg, small_data, device="cpu", progress=False)
    default_mdm = dataclasses.replace(mdm_cfg, precision="auto")  # the CLI's default precision
    ref_default = train(ref / "mdm-default", mdm_model, default_mdm, small_data, device="cpu", progress=False)
    ref_ar = train(ref / "ar", ar_model, ar_cfg, small_data, device="cpu", progress=False)
    # one process (FSDP over a one-member group) saves a sharded checkpoint at step 3
    train(tmp_path / "two" / "from1", ar_model, fsdp_ar, small_data, device="cpu", progress=False, stop_after=3)

    run_two_ranks(tmp_path / "two", small_data, [
        job("mdm", mdm_model, fsdp_mdm), job("ar", ar_model, fsdp_ar),
        job("from2", mdm_model, fsdp_mdm, stop_after=3), job("from1", ar_model, fsdp_ar, resume=True),
        job("from2-default", mdm_model, dataclasses.replace(fsdp_mdm, precision="auto"), stop_after=3),
        job("mdm", mdm_model, fsdp_mdm, live=True, tests=os.path.dirname(__file__)),
    ])
    two = tmp_path / "two"
    assert losses(two / "mdm") == pytest.approx(ref_mdm.losses, abs=1e-5)
    assert losses(two / "ar") == pytest.approx(ref_ar.losses, abs=1e-5)
    for name in ("mdm", "ar"):  # consolidated automatically at the end of the run
        assert_weights_close(load_weights(two / name)[0], load_weights(ref / name)[0], name)
    ckpt = load_weights(two / "mdm")[2]
    ema_fsdp, ema_ref = load_file(ckpt / "ema.safetensors"), load_file(load_weights(ref / "mdm")[2] / "ema.safetensors")
    assert_weights_close(ema_fsdp, ema_ref, "ema")

    # 1 -> 2: the run saved by one process continued on two
    assert losses(two / "from1") == pytest.approx(ref_ar.losses, abs=1e-5)
    # 2 -> 1: the run saved by two processes continues on one
    resumed = train(two / "from2", mdm_model, fsdp_mdm, small_data, device="cpu", progress=False, resume=True)
    assert len(resumed.losses) == 3
    assert losses(two / "from2") == pytest.approx(ref_mdm.losses, abs=1e-5)
    assert_weights_close(load_weights(two / "from2")[0], load_weights(ref / "mdm")[0], "2 -> 1")
    # 2 -> 1 at the default precision: bf16 autocast where this CPU has it, to its own tolerance
    train(two / "from2-default", mdm_model, dataclasses.replace(fsdp_mdm, precision="auto"), small_data, device="cpu", progress=False,
          resume=True)
    tolerance = LOSS_TOLERANCE[autocast_dtype("auto", torch.device("cpu"))]
    assert losses(two / "from2-default") == pytest.approx(ref_default.losses, abs=tolerance)

    # the single file of the sharded checkpoint reproduces the live sharded model exactly
    live = json.loads((two / "mdm-live.json").read_text())
    loaded, _ = load_model(two / "mdm", weights="raw")
    out = live_outputs(loaded, small_data)
    assert out["nats"] == pytest.approx(live["nats"], abs=1e-6)
    assert out["tokens"] == live["tokens"]


def test_consolidate_mid_run_and_refusals(tmp_path, small_data):
    """A mid-run sharded checkpoint is refused by sample/eval until consolidated; consolidation
    gives the weights the sharded checkpoint holds; a changed world size needs a global batch."""
    from unmask.errors import UnmaskError

    model, cfg = configs("mdm", steps=4)
    fsdp = dataclasses.replace(cfg, parallel="fsdp")
    train(tmp_path / "run", model, fsdp, small_data, device="cpu", progress=False, stop_after=2)
    with pytest.raises(UnmaskError, match="consolidate"):
        load_model(tmp_path / "run")
    consolidate(tmp_path / "run")
    a, _ = load_model(tmp_path / "run")
    plain = train(tmp_path / "plain", model, cfg, small_data, device="cpu", progress=False, stop_after=2)
    assert plain.steps == 2
    assert_weights_close(a.state_dict(), load_weights(tmp_path / "plain")[0], "consolidated")
    with pytest.raises(UnmaskError, match="multiple of 2 processes|batch-size"):
        from unmask.train import batch_layout

        batch_layout(dataclasses.replace(cfg, batch_size=3), L, 2)


def test_ema_equals_closed_form_and_survives_resume(tmp_path, small_data):
    """ema_k = d^k w_0 + sum_i (1 - d) d^(k-i) w_i over the recorded weights w_i; resume is exact;
    load_model uses the EMA by default and the raw weights on request."""
    d, steps = 0.8, 5
    model_cfg, cfg = configs("mdm", steps=steps, ema=d, checkpoint_every=1, keep_checkpoints=100, global_batch_tokens=0, batch_size=4)
    train(tmp_path / "run", model_cfg, cfg, small_data, device="cpu", progress=False)
    torch.manual_seed(cfg.seed)
    recorded = [{k: v.double() for k, v in Transformer(model_cfg).state_dict().items()}]
    for step in range(1, steps + 1):
        recorded.append({k: v.double() for k, v in load_file(tmp_path / "run" / "checkpoints" / f"step_{step:06d}" / "model.safetensors").items()})
    ema = load_file(tmp_path / "run" / "checkpoints" / f"step_{steps:06d}" / "ema.safetensors")
    for key, value in ema.items():
        exact = d**steps * recorded[0][key] + sum((1 - d) * d ** (steps - i) * recorded[i][key] for i in range(1, steps + 1))
        torch.testing.assert_close(value.double(), exact, atol=1e-6, rtol=0, msg=key)
    assert max((ema[k] - recorded[-1][k].float()).abs().max().item() for k in ema) > 1e-4  # not the raw weights

    train(tmp_path / "split", model_cfg, cfg, small_data, device="cpu", progress=False, stop_after=2)
    train(tmp_path / "split", model_cfg, cfg, small_data, device="cpu", progress=False, resume=True)
    split = load_file(tmp_path / "split" / "checkpoints" / f"step_{steps:06d}" / "ema.safetensors")
    assert all(torch.equal(split[k], ema[k]) for k in ema)

    by_default, _ = load_model(tmp_path / "run")
    raw, _ = load_model(tmp_path / "run", weights="raw")
    assert all(torch.equal(by_default.state_dict()[k], ema[k]) for k in ema)
    assert all(torch.equal(raw.state_dict()[k], recorded[-1][k].float()) for k in ema)


def test_sigkill_of_one_rank_keeps_the_last_checkpoint_and_the_run_resumes(tmp_path, small_data):
    """SIGKILL one of two FSDP ranks mid-run: LATEST names an intact checkpoint, and the run resumes
    from it (on one process) with the losses of an uninterrupted run."""
    model, cfg = configs("mdm", steps=400)
    fsdp = dataclasses.replace(cfg, parallel="fsdp", checkpoint_every=2)
    procs = launch(tmp_path, small_data, [job("run", model, fsdp)])
    latest = tmp_path / "run" / "checkpoints" / "LATEST"
    try:
        deadline = time.time() + 240
        while time.time() < deadline and not (latest.is_file() and int(latest.read_text().strip()[5:]) >= 4):
            assert all(p.poll() is None for p in procs), procs[0].communicate()[0][-3000:]
            time.sleep(0.05)
        os.kill(procs[1].pid, signal.SIGKILL)
        try:
            procs[0].wait(timeout=20)  # gloo notices the lost peer; torchrun would end it anyway
        except subprocess.TimeoutExpired:
            procs[0].kill()
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.communicate()
    step = int(latest.read_text().strip()[5:])
    assert 4 <= step < 400
    stop = step + 2
    resumed = train(tmp_path / "run", model, fsdp, small_data, device="cpu", progress=False,
                    resume=True, stop_after=2)
    reference = train(tmp_path / "ref", model, cfg, small_data, device="cpu", progress=False, stop_after=stop)
    assert resumed.losses == pytest.approx(reference.losses[step:stop], abs=1e-5)


def test_cli_fsdp_run_consolidate_and_weights_flag(tmp_path, small_data, capsys):
    """Through the command line: an FSDP run with EMA, a refused bad global batch, `unmask checkpoint
    consolidate` of a mid-run checkpoint, and sampling from the EMA (default) and the raw weights."""
    from unmask.cli import main

    run_dir = tmp_path / "run"
    common = ["train", "--run-dir", str(run_dir), "--data", str(small_data), "--context-len", "16", "--batch-size", "2",
              "--parallel", "fsdp", "--ema", "0.9", "--steps", "4", "--checkpoint-every", "2", "--eval-every", "100"]
    assert main(common[:-8] + ["--global-batch-tokens", "40", "--steps", "4"]) == 2
    assert "--global-batch-tokens=40" in capsys.readouterr().err
    assert main(common + ["--global-batch-tokens", "64"]) == 0
    mid = run_dir / "checkpoints" / "step_000002"
    assert main(["sample", "--checkpoint", str(mid), "--length", "8", "--json"]) == 2
    assert "unmask checkpoint consolidate" in capsys.readouterr().err
    assert main(["checkpoint", "consolidate", str(mid)]) == 0
    capsys.readouterr()
    outputs = {}
    for weights in ("auto", "raw"):
        assert main(["sample", "--checkpoint", str(run_dir), "--length", "8", "--seed", "3", "--weights", weights, "--json"]) == 0
        outputs[weights] = json.loads(capsys.readouterr().out)["samples"][0]["tokens"]
    ema_model, _ = load_model(run_dir)
    raw_model, _ = load_model(run_dir, weights="raw")
    assert any(not torch.equal(a, b) for a, b in zip(ema_model.state_dict().values(), raw_model.state_dict().values()))
    assert len(outputs["auto"]) == len(outputs["raw"]) == 8


def test_cli_truncated_shard_is_one_line_and_the_run_resumes_from_an_earlier_checkpoint(tmp_path, small_data):
    """A truncated shard file: `unmask checkpoint consolidate` and `unmask train --resume` each print one
    error line naming the file (resume: and the --resume-from to give); --resume-from continues exactly."""
    unmask = str(Path(sys.executable).with_name("unmask"))
    env = os.environ | {"OMP_NUM_THREADS": "1"}

    def cli(*args):
        return subprocess.run([unmask, *args], env=env, capture_output=True, text=True, timeout=300)

    run_dir = tmp_path / "run"
    first = cli("train", "--run-dir", str(run_dir), "--data", str(small_data), "--context-len", "16", "--batch-size", "2",
                "--parallel", "fsdp", "--steps", "4", "--checkpoint-every", "2", "--eval-every", "100", "--log-every", "1",
                "--precision", "fp32")
    assert first.returncode == 0, first.stderr[-2000:]
    before = losses(run_dir)
    ckpt = run_dir / "checkpoints" / "step_000004"
    (shard,) = (ckpt / "sharded").glob("*.safetensors")
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])

    for args, ending in ((["checkpoint", "consolidate", str(ckpt)], "(the checkpoints kept before it: step_000002)"),
                         (["train", "--run-dir", str(run_dir), "--resume"], "resume from an earlier checkpoint with --resume-from 2")):
        out = cli(*args)
        assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-3000:]
        line = out.stderr.strip().splitlines()[-1]
        assert line.startswith(f"error: cannot read {shard}: truncated") and line.endswith(ending), line
    resumed = cli("train", "--run-dir", str(run_dir), "--resume-from", "2")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert losses(run_dir) == before


def test_a_failed_sharded_save_is_one_error_and_loses_nothing(tmp_path, small_data, monkeypatch):
    """DCP's writer fails for real (a file size limit): one UnmaskError naming the checkpoint; the last
    one stays and the run resumes from it."""
    import unmask.checkpoint_sharded as cs
    from limits import file_size_limit

    from unmask.errors import UnmaskError

    model, cfg = configs("mdm", steps=4, parallel="fsdp", checkpoint_every=2)
    train(tmp_path / "run", model, cfg, small_data, device="cpu", progress=False, stop_after=2)
    real_save = cs.dcp.save

    def failing_save(*args, **kwargs):
        with file_size_limit(1000):
            return real_save(*args, **kwargs)

    monkeypatch.setattr(cs.dcp, "save", failing_save)
    with pytest.raises(UnmaskError, match=r"cannot write .*step_000004 \(.*File too large.*\); nothing of the run was lost \(its last "
                                          r"checkpoint step_000002 is intact\)"):
        train(tmp_path / "run", model, cfg, small_data, device="cpu", progress=False, resume=True)
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["LATEST", "step_000002"]
    monkeypatch.setattr(cs.dcp, "save", real_save)
    assert train(tmp_path / "run", model, cfg, small_data, device="cpu", progress=False, resume=True).steps == 4

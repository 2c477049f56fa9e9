"""Training speed at scale: tokens/s and model FLOPs utilisation (MFU), MDM next to AR, on one machine.

Every row runs the real training loop (``unmask.train.train``) in its own process (or under
torchrun for several processes) on the embedded corpus, for ``--steps`` steps, and reports the
median tokens/s of the logged intervals after the first (warm-up and compilation), peak memory
(CUDA: ``max_memory_allocated`` of rank 0; CPU: peak RSS of rank 0) and

    MFU = tokens/s x FLOPs per token / peak matmul FLOP/s of this machine at the precision used.

FLOPs per training token (PaLM, appendix B; forward + backward = 3 x forward):
    6 x (N + V d) + 12 x n_layer x L x d     bidirectional attention (MDM)
    6 x (N + V d) +  6 x n_layer x L x d     causal attention (AR)
N = non-embedding parameters (``ModelConfig.non_embedding_params``), V d = the output head (the
input embedding is a lookup, no FLOPs), L = context length, d = width. The attention term counts
the L x L score and value products a query actually makes: all L keys for the MDM, on average
L / 2 for the AR model, whose causal kernel skips the masked half (counting the full square for
both would credit the AR model with work it never does). Activation recomputation is not counted
(model FLOPs, not hardware FLOPs). The peak is measured in the same run: the best
of repeated square matmuls (CPU 2048, CUDA 8192) in bf16 where the trainer computes in bf16, else
fp32, with all the cores (CPU) of the machine.

    python benchmarks/train_scale.py --device cpu --out runs/scale-cpu                       # ~5 min on 2 cores
    python benchmarks/train_scale.py --device cuda --out $OUT/scale    # one GPU: small, 85m, 350m; 13 rows, ~8 min

Writes ``results.json`` and ``results.md`` (table + machine + formula) to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r"""
import json, os, resource, sys, torch
from unmask.config import ModelConfig, TrainConfig
from unmask.data import TokenDataset
from unmask.train import train
a = json.loads(sys.argv[1])
vocab = TokenDataset(a["data"], "train").tokenizer.vocab_size
over = {"context_len": a["context"]} if a["context"] else {}
model = ModelConfig.from_name(a["preset"], vocab_size=vocab, causal=a["objective"] == "ar", **over)
cfg = TrainConfig(objective=a["objective"], steps=a["steps"], batch_size=a["batch_size"], precision=a["precision"],
                  log_every=a["log_every"], eval_every=10**9, checkpoint_every=10**9, warmup_steps=5, eval_windows=2,
                  parallel=a["parallel"], compile=a["compile"], activation_checkpointing=a["act_ckpt"],
                  global_batch_tokens=a["global_batch_tokens"])
if torch.cuda.is_available() and a["device"] == "cuda":
    torch.cuda.reset_peak_memory_stats()
train(a["run_dir"], model, cfg, a["data"], device=a["device"], progress=False)
if int(os.environ.get("RANK", "0")) == 0:
    rates = [r["tokens_per_s"] for r in map(json.loads, open(a["run_dir"] + "/metrics.jsonl")) if r["kind"] == "train"]
    gpu = torch.cuda.max_memory_allocated() / 2**20 if a["device"] == "cuda" else None
    print("RESULT " + json.dumps({"rates": rates[1:], "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                                  "peak_gpu_mib": gpu, "context": model.context_len, "n_layer": model.n_layer,
                                  "n_embd": model.n_embd, "vocab": model.vocab_size, "non_embedding": model.non_embedding_params()}))
"""


def flops_per_token(r: dict) -> float:
    """6 (N + V d) + 12 n_layer L d (bidirectional) or + 6 n_layer L d (causal, ``r["objective"] == "ar"``):
    training FLOPs per token (see the module docstring)."""
    attention = (6 if r["objective"] == "ar" else 12) * r["n_layer"] * r["context"] * r["n_embd"]
    return 6 * (r["non_embedding"] + r["vocab"] * r["n_embd"]) + attention


def cpu_isa() -> dict:
    flags = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else platform.processor()
    return {"model": model, "cores": os.cpu_count(), "avx2": "avx2" in flags, "avx512f": "avx512f" in flags,
            "avx512_bf16": "avx512_bf16" in flags, "amx_bf16": "amx_bf16" in flags}


def peak_matmul(device: str, dtype_name: str, size: int | None = None, reps: int | None = None, threads: int | None = None) -> float:
    """Best FLOP/s of repeated square matmuls on this device in this dtype (default size: CUDA 8192, CPU 2048;
    CPU: with ``threads`` threads, default all the cores)."""
    import torch

    dtype = getattr(torch, dtype_name)
    n = size or (8192 if device == "cuda" else 2048)
    reps = reps or (20 if device == "cuda" else 4)
    if device == "cpu":
        torch.set_num_threads(threads or os.cpu_count() or 1)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    best = float("inf")
    for _ in range(3):
        torch.matmul(a, b)
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(reps):
            torch.matmul(a, b)
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - t) / reps)
    return 2 * n**3 / best


def rows_for(args) -> list[dict]:
    """The configurations to measure: name, preset, objective, processes, parallel, compile, act_ckpt."""
    rows = []
    if args.device == "cpu":
        p = args.presets[0]
        for objective in ("mdm", "ar"):
            rows.append(dict(preset=p, objective=objective, procs=1, parallel="ddp", compile=False, act_ckpt=False))
        rows += [
            dict(preset=p, objective="mdm", procs=2, parallel="ddp", compile=False, act_ckpt=False),
            dict(preset=p, objective="mdm", procs=2, parallel="fsdp", compile=False, act_ckpt=False),
            dict(preset=p, objective="mdm", procs=1, parallel="ddp", compile=True, act_ckpt=False),
            dict(preset=p, objective="ar", procs=1, parallel="ddp", compile=True, act_ckpt=False),
            dict(preset=p, objective="mdm", procs=1, parallel="ddp", compile=False, act_ckpt=True),
        ]
    else:
        for p in args.presets:
            rows += [
                dict(preset=p, objective="mdm", procs=1, parallel="ddp", compile=False, act_ckpt=False),
                dict(preset=p, objective="mdm", procs=1, parallel="ddp", compile=True, act_ckpt=False),
                dict(preset=p, objective="ar", procs=1, parallel="ddp", compile=True, act_ckpt=False),
                dict(preset=p, objective="mdm", procs=1, parallel="fsdp", compile=True, act_ckpt=False),
            ]
        rows.append(dict(preset=args.presets[-1], objective="mdm", procs=1, parallel="fsdp", compile=True, act_ckpt=True))
    return rows


def run_row(row: dict, args, data: str, root: Path, index: int) -> dict:
    batch = args.batch_size or (16 if args.device == "cpu" else {"small": 256, "85m": 64}.get(row["preset"], 32))
    spec = {
        "preset": row["preset"], "objective": row["objective"], "steps": args.steps, "batch_size": batch, "precision": args.precision,
        "log_every": args.log_every, "parallel": row["parallel"], "compile": row["compile"], "act_ckpt": row["act_ckpt"],
        "context": args.context, "device": args.device, "data": data, "run_dir": str(root / f"row{index}"),
        "global_batch_tokens": 0,
    }
    env = dict(os.environ)
    cores = os.cpu_count() or 1
    if row["procs"] > 1:
        env["OMP_NUM_THREADS"] = str(max(1, cores // row["procs"]))
        child = root / "child.py"  # torchrun runs a script file
        child.write_text(CHILD)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={row['procs']}", str(child), json.dumps(spec)]
    else:
        cmd = [sys.executable, "-c", CHILD, json.dumps(spec)]
    t = time.perf_counter()
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.row_timeout)
    except subprocess.TimeoutExpired:
        return {**row, "batch": batch, "error": f"timed out after {args.row_timeout} s", "wall_s": time.perf_counter() - t}
    wall = time.perf_counter() - t
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if out.returncode != 0 or not lines:
        return {**row, "batch": batch, "error": (out.stderr or out.stdout)[-1500:], "wall_s": wall}
    res = json.loads(lines[-1][len("RESULT "):])
    return {**row, **res, "batch": batch, "wall_s": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--presets", default=None, help="Comma-separated presets (CPU: the first only; default CPU small, CUDA small,85m,350m).")
    parser.add_argument("--steps", type=int, default=None, help="Steps per row (default CPU 12, CUDA 40).")
    parser.add_argument("--batch-size", type=int, default=None, help="Sequences per process per step (default CPU 16; CUDA small 256, 85m 64, else 32).")
    parser.add_argument("--context", type=int, default=None, help="Override the presets' context length.")
    parser.add_argument("--log-every", type=int, default=None, help="Steps per timed interval (default CPU 2, CUDA 5).")
    parser.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    parser.add_argument("--row-timeout", type=int, default=600, help="Seconds before a row is given up (reported as failed).")
    parser.add_argument("--out", required=True, help="Folder for results.json and results.md.")
    args = parser.parse_args()
    args.presets = (args.presets or ("small" if args.device == "cpu" else "small,85m,350m")).split(",")
    args.steps = args.steps or (12 if args.device == "cpu" else 40)
    args.log_every = args.log_every or (2 if args.device == "cpu" else 5)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)

    import torch

    from unmask.data import default_dataset
    from unmask.train import autocast_dtype

    amp = autocast_dtype(args.precision, torch.device(args.device))
    dtype = "bfloat16" if amp is not None else "float32"
    machine = {"device": args.device, "torch": torch.__version__, "compute_dtype": dtype, "cpu": cpu_isa()}
    if args.device == "cuda":
        machine["gpu"] = torch.cuda.get_device_name(0)
    peak = peak_matmul(args.device, dtype)
    machine["peak_matmul_tflops"] = peak / 1e12
    print(f"machine: {json.dumps(machine)}", flush=True)
    data = str(default_dataset())
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, row in enumerate(rows_for(args)):
            res = run_row(row, args, data, Path(tmp), i)
            if "error" not in res:
                res["tokens_per_s"] = statistics.median(res["rates"])
                res["flops_per_token"] = flops_per_token(res)
                res["mfu"] = res["tokens_per_s"] * res["flops_per_token"] / peak
            results.append(res)
            print(json.dumps({k: v for k, v in res.items() if k != "rates"}), flush=True)
    (out_dir / "results.json").write_text(json.dumps({"machine": machine, "rows": results}, indent=2) + "\n")
    md = [f"# Training speed ({args.device})", "",
          f"Machine: {machine.get('gpu') or machine['cpu']['model']}; {machine['cpu']['cores']} CPU cores; torch {machine['torch']}; "
          f"CPU ISA: AVX2 {machine['cpu']['avx2']}, AVX-512 {machine['cpu']['avx512f']}, AVX512-BF16 {machine['cpu']['avx512_bf16']}, "
          f"AMX-BF16 {machine['cpu']['amx_bf16']}.",
          f"Compute dtype: {dtype}; measured peak matmul: {peak / 1e12:.3f} TFLOP/s ({'8192' if args.device == 'cuda' else '2048'}^2 {dtype}).",
          "FLOPs per token: 6 (N + V d) + 12 n_layer L d for the MDM, + 6 n_layer L d for the AR model (PaLM; causal attention "
          "makes half the score and value products; recomputation not counted).",
          f"Steps per row: {args.steps}; tokens/s: median of {args.log_every}-step intervals after the first.", "",
          "| preset | objective | processes | parallel | compile | act. ckpt | batch x L | tokens/s | MFU | peak GPU MiB | peak RSS MiB |",
          "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            md.append(f"| {r['preset']} | {r['objective']} | {r['procs']} | {r['parallel']} | {r['compile']} | {r['act_ckpt']} | {r['batch']} | failed | | | |")
            continue
        gpu = f"{r['peak_gpu_mib']:,.0f}" if r.get("peak_gpu_mib") else "-"
        md.append(f"| {r['preset']} | {r['objective']} | {r['procs']} | {r['parallel']} | {r['compile']} | {r['act_ckpt']} | "
                  f"{r['batch']} x {r['context']} | {r['tokens_per_s']:,.0f} | {100 * r['mfu']:.1f}% | {gpu} | {r['peak_rss_mib']:,.0f} |")
    ok = [r for r in results if "error" not in r]
    for preset in args.presets:
        for compiled in (False, True):
            base = {r["objective"]: r["tokens_per_s"] for r in ok if r["preset"] == preset and r["procs"] == 1 and r["parallel"] == "ddp"
                    and r["compile"] == compiled and not r["act_ckpt"]}
            if "mdm" in base and "ar" in base:
                md.append(f"\n{preset}: MDM / AR tokens/s = {base['mdm'] / base['ar']:.3f} ({'compiled' if compiled else 'eager'}, one process; goal >= 0.95)")
    text = "\n".join(md) + "\n"
    (out_dir / "results.md").write_text(text)
    print(text)
    failed = [r for r in results if "error" in r]
    for r in failed:
        print(f"row failed: {r['preset']} {r['objective']} {r['parallel']} compile={r['compile']}: {r['error']}", file=sys.stderr)


if __name__ == "__main__":
    main()

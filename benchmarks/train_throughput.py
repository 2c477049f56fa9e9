"""Training throughput of MDM vs AR on the same preset, measured side by side in one run.

Each repeat trains both models for the same number of steps with the real training loop
(`unmask.train.train`), each in its own subprocess so that peak resident memory is per run.
The order alternates between repeats so that drift of a noisy machine hits both alike.
Reports the median tokens/s (per-interval rates from metrics.jsonl, first interval dropped as
warm-up) of each objective, their ratio, and the peak RSS of each run.

    python benchmarks/train_throughput.py                      # tiny preset, bf16 autocast where supported
    python benchmarks/train_throughput.py --preset small --precision fp32 --steps 40
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, resource, sys
from unmask.config import ModelConfig, TrainConfig
from unmask.data import TokenDataset, default_dataset
from unmask.train import train
args = json.loads(sys.argv[1])
data = default_dataset()
vocab = TokenDataset(data, "train").tokenizer.vocab_size
model = ModelConfig.from_name(args["preset"], vocab_size=vocab, causal=args["objective"] == "ar")
cfg = TrainConfig(objective=args["objective"], steps=args["steps"], batch_size=args["batch_size"], precision=args["precision"],
                  log_every=args["log_every"], eval_every=10**9, checkpoint_every=10**9, warmup_steps=5, eval_windows=4)
train(args["run_dir"], model, cfg, data, progress=False)
rates = [r["tokens_per_s"] for r in map(json.loads, open(args["run_dir"] + "/metrics.jsonl")) if r["kind"] == "train"]
print(json.dumps({"rates": rates[1:], "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def run_once(objective: str, args: argparse.Namespace, root: Path, repeat: int) -> dict:
    spec = {
        "objective": objective, "preset": args.preset, "steps": args.steps, "batch_size": args.batch_size,
        "precision": args.precision, "log_every": args.log_every, "run_dir": str(root / f"{objective}-{repeat}"),
    }
    out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(spec)], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    results: dict[str, dict[str, list[float]]] = {"mdm": {"rates": [], "rss": []}, "ar": {"rates": [], "rss": []}}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            order = ("mdm", "ar") if repeat % 2 == 0 else ("ar", "mdm")
            for objective in order:
                res = run_once(objective, args, Path(tmp), repeat)
                results[objective]["rates"] += res["rates"]
                results[objective]["rss"].append(res["peak_rss_mib"])
                print(f"repeat {repeat} {objective}: median {statistics.median(res['rates']):,.0f} tokens/s, peak RSS {res['peak_rss_mib']:,.0f} MiB", flush=True)

    mdm, ar = (statistics.median(results[o]["rates"]) for o in ("mdm", "ar"))
    print(f"\npreset={args.preset} batch={args.batch_size} steps={args.steps} precision={args.precision} repeats={args.repeats}")
    print(f"{'objective':10} {'tokens/s (median)':>18} {'intervals':>10} {'peak RSS MiB':>13}")
    for name, value in (("mdm", mdm), ("ar", ar)):
        print(f"{name:10} {value:>18,.0f} {len(results[name]['rates']):>10} {max(results[name]['rss']):>13,.0f}")
    print(f"MDM / AR tokens/s ratio: {mdm / ar:.3f}   (goal >= 0.95)")
    print(f"benchmark parent peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:,.0f} MiB")


if __name__ == "__main__":
    main()

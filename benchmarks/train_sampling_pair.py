"""Train the checkpoints that benchmarks/sampling.py compares: an AR model at budget C and MDMs at
C and at a multiple of C, same preset, data, recipe and seed.

An MDM needs more training compute than an AR model to reach the same loss (SMDM: about 16x), so
comparing decoding speed "at equal quality" needs an MDM trained for longer. Each run is the
repository's own `unmask train` command; a finished run is skipped and an interrupted one resumes.

    python benchmarks/train_sampling_pair.py                        # small preset, C = 300 steps of 8 x 256 tokens, MDM at 1x and 4x
    python benchmarks/train_sampling_pair.py --preset 85m --steps 500 --batch-size 16 --multiples 1,4 --device cuda   # GPU
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path


def finished(run: Path, steps: int) -> bool:
    latest = run / "checkpoints" / "LATEST"  # names the newest complete checkpoint, step_XXXXXX
    return latest.exists() and int(latest.read_text().strip().split("_")[-1]) >= steps


def train(run: Path, objective: str, steps: int, args: argparse.Namespace) -> None:
    if finished(run, steps):
        print(f"{run}: finished, skipped", flush=True)
        return
    cmd = [sys.executable, "-m", "unmask", "train", "--run-dir", str(run), "--preset", args.preset, "--objective", objective,
           "--steps", str(steps), "--batch-size", str(args.batch_size), "--seed", str(args.seed),
           "--eval-every", str(max(steps // 4, 1)), "--checkpoint-every", str(max(steps // 4, 1)), "--device", args.device]
    if args.context_len:
        cmd += ["--context-len", str(args.context_len)]
    if (run / "config.json").exists():
        cmd = [sys.executable, "-m", "unmask", "train", "--run-dir", str(run), "--resume", "--steps", str(steps), "--device", args.device]
    print(" ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/bench")
    parser.add_argument("--preset", default="small")
    parser.add_argument("--steps", type=int, default=300, help="budget C in optimizer steps (AR model)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--multiples", default="1,4", help="MDM budgets as multiples of C")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--context-len", type=int, default=0, help="override the preset's context (0: keep it)")
    args = parser.parse_args()
    out = Path(args.out)
    train(out / f"ar-{args.preset}", "ar", args.steps, args)
    for m in (int(v) for v in args.multiples.split(",")):
        train(out / f"mdm-{args.preset}-{m}x", "mdm", m * args.steps, args)


if __name__ == "__main__":
    main()

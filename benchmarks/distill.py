"""Few-step sampling after distillation: the generative perplexity (judged by an AR model of the same
data) and the unigram entropy of samples from a teacher and its distilled student, at the same numbers
of sampling steps: an MDM and its SDTT student, a Duo model and its DCD student
(docs/algorithms.md, 'Distillation for few-step sampling').

Every run is the repository's own command (`unmask train`, `unmask distill`, `unmask eval genppl`); a
finished run is reused, so the script can be run again to add samples or methods. Low entropy flags
degenerate text (a few tokens repeated), which a low gen-PPL alone would hide.

    python benchmarks/distill.py                                   # CPU miniature (tiny preset, context 32)
    python benchmarks/distill.py --preset small --context-len 0 --steps 5000 --round-steps 1000 --rounds 3 \\
        --teacher-steps 256 --samples 256 --device cuda --results benchmarks/results/distill_gpu
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path


def unmask(*args: str) -> str:
    """Run ``python -m unmask ARGS`` and return its standard output (its progress goes to stderr)."""
    cmd = [sys.executable, "-m", "unmask", *args]
    print(" ".join(cmd), file=sys.stderr, flush=True)
    return subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout


def finished(run: Path, steps: int) -> bool:
    latest = run / "checkpoints" / "LATEST"  # names the newest complete checkpoint, step_XXXXXX
    return latest.exists() and int(latest.read_text().strip().split("_")[-1]) >= steps


def train(run: Path, objective: str, args: argparse.Namespace) -> None:
    if finished(run, args.steps):
        return
    extra = ["--context-len", str(args.context_len)] if args.context_len else []
    if objective == "duo":
        extra += ["--curriculum-steps", str(args.steps // 2)]
    resume = ["--resume"] if (run / "config.json").exists() else ["--objective", objective, "--preset", args.preset, *extra]
    unmask("train", "--run-dir", str(run), *resume, "--steps", str(args.steps), "--batch-size", str(args.batch_size),
           "--eval-every", str(args.steps), "--checkpoint-every", str(args.steps), "--device", args.device)


def distill(teacher: Path, method: str, out: Path, args: argparse.Namespace) -> None:
    total = args.rounds * args.round_steps
    if finished(out, total):
        return
    if (out / "config.json").exists():
        unmask("distill", "--out", str(out), "--resume", "--device", args.device)
        return
    unmask("distill", str(teacher), "--method", method, "--rounds", str(args.rounds), "--steps-per-round", str(args.round_steps),
           "--teacher-steps", str(args.teacher_steps), "--batch-size", str(args.batch_size), "--eval-every", str(total),
           "--checkpoint-every", str(args.round_steps), "--out", str(out), "--device", args.device)


def quality(run: Path, judge: Path, steps: int, args: argparse.Namespace) -> dict:
    length = args.context_len - 1 if args.context_len else 0  # the EOS before the sample takes a position
    out = unmask("eval", "genppl", "--checkpoint", str(run), "--judge", str(judge), "--num-samples", str(args.samples),
                 *(["--length", str(length)] if length else []), "--steps", str(steps), "--seed", "0", "--device", args.device, "--json")
    record = json.loads(out)
    return {"gen_ppl": record["gen_ppl"], "unigram_entropy": record["unigram_entropy"]}


def table(rows: list[dict]) -> str:
    lines = ["| method | model | sampling steps | gen-PPL | unigram entropy |", "|---|---|---|---|---|"]
    lines += [f"| {r['method']} | {r['model']} | {r['steps']} | {r['gen_ppl']:.1f} | {r['unigram_entropy']:.2f} |" for r in rows]
    return "\n".join(lines)


def caption(args: argparse.Namespace) -> str:
    return (f"Teachers and AR judge: preset {args.preset}, context {args.context_len or 'of the preset'}, {args.steps} steps of "
            f"{args.batch_size} windows; distillation: {args.rounds} rounds of {args.round_steps} steps from {args.teacher_steps} "
            f"teacher steps; {args.samples} samples per row, seed 0, device {args.device}.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/bench-distill")
    parser.add_argument("--results", default="benchmarks/results/distill_cpu")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--context-len", type=int, default=32, help="override the preset's context (0: keep it); also the sample length")
    parser.add_argument("--steps", type=int, default=400, help="training steps of the teachers and the AR judge")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--round-steps", type=int, default=100)
    parser.add_argument("--teacher-steps", type=int, default=32, help="the teacher's sampling steps in the first round")
    parser.add_argument("--methods", default="sdtt,dcd")
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    out, rows = Path(args.out), []
    judge = out / "ar"
    train(judge, "ar", args)
    counts = [args.teacher_steps // 2**r for r in range(args.rounds + 1)]
    for method in args.methods.split(","):
        source = {"sdtt": "mdm", "dcd": "duo"}[method]
        teacher, student = out / source, out / f"{source}-{method}"
        train(teacher, source, args)
        distill(teacher, method, student, args)
        for name, run in (("teacher", teacher), ("student", student)):
            for steps in counts:
                rows.append({"method": method, "model": name, "steps": steps, **quality(run, judge, steps, args)})
                print(table(rows[-1:]).splitlines()[-1], flush=True)
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    (results / "distill.json").write_text(json.dumps({"settings": vars(args), "rows": rows}, indent=2) + "\n")
    (results / "distill.md").write_text(caption(args) + "\n\n" + table(rows) + "\n")
    print(table(rows))


if __name__ == "__main__":
    main()

"""An MDM initialised from our trained AR run vs an MDM from scratch, at the same additional compute.

1. Train the AR baseline (tiny preset, ``--ar-steps``) on the embedded corpus, or reuse it.
2. Train MDMs for ``--steps`` steps each (same batch, data order and masking noise, same learning
   rate schedule, so the same additional FLOPs):
   * ``scratch``: random initialisation (the library's default MDM);
   * ``ar+shift+anneal``: from the AR run, logit shift kept (Dream) and the attention mask annealed
     from causal to bidirectional over ``--anneal`` steps (DiffuLLaMA);
   * ``ar plain`` (with ``--plain``): from the AR run, bidirectional at once, no shift.
3. Validation bound curves (the in-training validation: ``--eval-windows`` windows x 4 draws every
   ``--eval-every`` steps) in one plot; the final bound of each on 256 held-out windows spread over the validation
   split, 8 draws, k-DCE, one seed shared by all (so their Monte Carlo noise is shared).
4. Compute saved: the first validation step at which an adapted MDM's bound is at or below the
   scratch MDM's final bound, as a fraction of the scratch run's steps (linear interpolation
   between validation points).

Writes adaptation.json, adaptation.md and adaptation.png to --out.

    nice -n 10 python benchmarks/adaptation.py --out benchmarks/results --plain    # tiny, 600 AR + 3 x 400 MDM steps
    python benchmarks/adaptation.py --out /tmp/adapt-q --quick                      # smoke test, ~1 min
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from unmask.adaptation import adapted_config, source_config
from unmask.checkpoint import load_model
from unmask.config import ModelConfig, TrainConfig
from unmask.data import TokenDataset, default_dataset
from unmask.evaluation.infill import spread_windows
from unmask.likelihood import ar_nll, mc_elbo
from unmask.train import train


def curve(run_dir: Path) -> list[tuple[int, float, float]]:
    """(step, val nats/token, flops) of a run's validation lines."""
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return [(r["step"], r["val_nats_per_token"], r["flops"]) for r in lines if r["kind"] == "val"]


def first_reach(points: list[tuple[int, float, float]], target: float) -> float | None:
    """The (interpolated) step at which a curve first reaches ``target`` nats/token, or None."""
    prev = None
    for step, value, _ in points:
        if value <= target:
            if prev is None or prev[1] == value:
                return float(step)
            s0, v0 = prev
            return s0 + (v0 - target) / (v0 - value) * (step - s0)
        prev = (step, value)
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--work", type=Path, default=None, help="Run folders (default: OUT/adaptation-runs).")
    ap.add_argument("--ar-steps", type=int, default=600)
    ap.add_argument("--steps", type=int, default=400, help="Training steps of each MDM.")
    ap.add_argument("--anneal", type=int, default=100)
    ap.add_argument("--eval-every", type=int, default=25)
    ap.add_argument("--windows", type=int, default=256)
    ap.add_argument("--draws", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--eval-windows", type=int, default=32, help="Validation windows during training.")
    ap.add_argument("--plain", action="store_true", help="Also adapt without shift and annealing.")
    ap.add_argument("--quick", action="store_true", help="Smoke test: a few steps of each.")
    args = ap.parse_args()
    if args.quick:
        args.ar_steps, args.steps, args.anneal, args.eval_every, args.windows, args.draws = 20, 20, 10, 10, 16, 2
    work = args.work or args.out / "adaptation-runs"
    args.out.mkdir(parents=True, exist_ok=True)
    data = default_dataset()
    vocab = TokenDataset(data, "train").tokenizer.vocab_size
    common = dict(batch_size=args.batch, eval_windows=args.eval_windows, eval_every=args.eval_every, checkpoint_every=10_000, log_every=10, seed=args.seed)
    started = time.perf_counter()

    ar_dir = work / "ar"
    if not (ar_dir / "checkpoints").exists():
        ar_cfg = ModelConfig.from_name("tiny", vocab_size=vocab, causal=True)
        train(ar_dir, ar_cfg, TrainConfig(objective="ar", steps=args.ar_steps, **common), data)
    source = source_config(ar_dir)

    variants = {
        "scratch": (ModelConfig.from_name("tiny", vocab_size=vocab), {}),
        "ar+shift+anneal": (adapted_config(source, keep_shift=True), {"init_from": str(ar_dir), "anneal_steps": args.anneal}),
    }
    if args.plain:
        variants["ar plain"] = (adapted_config(source, keep_shift=False), {"init_from": str(ar_dir)})
    timings = {}
    for name, (cfg, extra) in variants.items():
        run_dir = work / name.replace(" ", "_").replace("+", "_")
        if not (run_dir / "checkpoints").exists():
            t0 = time.perf_counter()
            train(run_dir, cfg, TrainConfig(objective="mdm", steps=args.steps, **common, **extra), data)
            timings[name] = time.perf_counter() - t0

    windows, prev = spread_windows(data, "val", ModelConfig.from_name("tiny").context_len, args.windows)
    ar_model, _ = load_model(ar_dir)
    with torch.no_grad():
        ar_final = ar_nll(ar_model, windows, prev, batch_size=32).nats_per_token
    records = {}
    for name in variants:
        run_dir = work / name.replace(" ", "_").replace("+", "_")
        model, _ = load_model(run_dir)
        with torch.no_grad():
            res = mc_elbo(model, windows, draws=args.draws, estimator="k-dce", batch_size=32, seed=args.seed)
        records[name] = {"final_nats": res.nats_per_token, "final_se": res.stderr, "curve": curve(run_dir), "train_s": timings.get(name)}
    target = records["scratch"]["curve"][-1][1]
    for name, rec in records.items():
        reach = first_reach(rec["curve"], target)
        rec["steps_to_scratch_final"] = reach
        rec["reached_by_first_validation"] = reach is not None and reach == rec["curve"][0][0]  # an upper bound then
        rec["compute_saved"] = None if reach is None else 1 - reach / args.steps
    ar_flops = curve(ar_dir)[-1][2]
    result = {
        "setup": {"preset": "tiny", "batch": args.batch, "eval_windows_in_training": args.eval_windows, "context": 128, "mdm_steps": args.steps, "ar_steps": args.ar_steps,
                  "anneal_steps": args.anneal, "eval_windows": args.windows, "draws": args.draws, "seed": args.seed,
                  "mdm_flops": records["scratch"]["curve"][-1][2], "ar_pretraining_flops": ar_flops},
        "ar_final_nats": ar_final,
        "scratch_final_val": target,
        "runs": records,
        "elapsed_s": time.perf_counter() - started,
    }  # fmt: skip
    (args.out / "adaptation.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "adaptation.md").write_text(markdown(result))
    plot(result, args.out / "adaptation.png")
    print(markdown(result))


def markdown(result: dict) -> str:
    s = result["setup"]
    lines = [
        f"MDMs on the embedded corpus, tiny preset, {s['mdm_steps']} steps x {s['batch']} x {s['context']} tokens each "
        f"({s['mdm_flops']:.3g} FLOPs, 6ND); the AR source trained {s['ar_steps']} steps ({s['ar_pretraining_flops']:.3g} FLOPs).",
        f"Final bound: {s['eval_windows']} held-out windows, {s['draws']} draws, k-DCE, shared seed. "
        f"AR source (exact): {result['ar_final_nats']:.4f} nats/token.",
        "",
        "| MDM | final bound (nats/token) | steps to reach scratch's final val bound | compute saved |",
        "|---|---|---|---|",
    ]
    for name, r in result["runs"].items():
        first = r.get("reached_by_first_validation") and name != "scratch"
        reach = "not reached" if r["steps_to_scratch_final"] is None else ("<= " if first else "") + f"{r['steps_to_scratch_final']:.0f}"
        saved = "-" if r["compute_saved"] is None else (">= " if first else "") + f"{100 * r['compute_saved']:.0f}%"
        lines.append(f"| {name} | {r['final_nats']:.4f} +- {r['final_se']:.4f} | {reach} | {saved} |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, r in result["runs"].items():
        steps, vals, _ = zip(*r["curve"])
        ax.plot(steps, vals, marker=".", label=f"MDM {name}")
    ax.axhline(result["ar_final_nats"], color="gray", ls="--", lw=1, label="AR source (exact NLL)")
    ax.axhline(result["scratch_final_val"], color="C0", ls=":", lw=1)
    ax.set_xlabel("MDM training steps (same additional compute for every curve)")
    ax.set_ylabel("validation bound, nats/token")
    ax.set_title("AR -> MDM adaptation vs MDM from scratch (tiny, embedded corpus)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


if __name__ == "__main__":
    main()

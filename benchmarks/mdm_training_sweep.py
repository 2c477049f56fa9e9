"""Optimisation sweep for the MDM (and the AR baseline) at a fixed token budget.

Every run sees the same number of training tokens (steps x batch x context; the batch-32 run takes
half the steps) and is scored on the SAME held-out windows, taken at an even stride over the whole
validation split (not just its first work):

* MDM: Monte Carlo ELBO bound, always with the k-DCE estimator (whatever the training loss; both
  estimate the same bound) and the same seed, so the runs share their Monte Carlo noise and their
  differences are sharper than each SE suggests. Reported: nats/token +- SE.
* AR: exact NLL on the same tokens.

The sweep is two stages. Stage 1 varies the learning rate of each objective. Stage 2 changes one
factor at a time around the MDM's best stage-1 learning rate: warmup (50 -> 150 steps, at most half the run), k-DCE instead of t-DCE,
low-discrepancy t off, and batch 32 at half the steps. A row's train-loss columns are the mean of
the last 10% of steps ("final") and the largest single-step loss after warmup ("max"), the spikes.
Runs go to worker processes (``--workers``, ``--threads`` torch threads each; on a shared CPU
single-threaded workers waste less time waiting for each other). Outputs in --out: one JSON per run in runs/ (finished runs are skipped when the sweep is
re-run, an interrupted one resumes from its checkpoint), sweep.json, sweep.md and sweep.png
(if matplotlib is installed).

    python benchmarks/mdm_training_sweep.py --out /tmp/sweep                 # tiny preset, 600 steps x 16 x 128
    python benchmarks/mdm_training_sweep.py --out /tmp/sweep --steps 300     # half the tokens
    python benchmarks/mdm_training_sweep.py --out /tmp/sweep-q --quick       # smoke test, a minute
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from unmask.checkpoint import load_model
from unmask.config import ModelConfig, TrainConfig
from unmask.data import TokenDataset, default_dataset
from unmask.evaluation.infill import spread_windows
from unmask.likelihood import ar_nll, mc_elbo
from unmask.train import train

MDM_LRS = (5e-4, 1e-3, 2e-3, 3e-3)
AR_LRS = (1e-3, 3e-3, 5e-3)


@dataclass(frozen=True)
class Run:
    name: str
    objective: str
    lr: float
    warmup: int = 50
    loss: str = "t-dce"
    low_discrepancy: bool = True
    batch_size: int = 16
    changes: dict = field(default_factory=dict, hash=False)  # what this run changes vs its stage's base

    def train_config(self, steps: int, seed: int) -> TrainConfig:
        # equal tokens: a larger batch runs proportionally fewer steps (and a proportionally shorter warmup)
        scale = self.batch_size / 16
        run_steps, warmup = int(steps / scale), int(self.warmup / scale)
        return TrainConfig(
            objective=self.objective, loss=self.loss, low_discrepancy=self.low_discrepancy, lr=self.lr, warmup_steps=warmup,
            steps=run_steps, batch_size=self.batch_size, seed=seed, eval_every=run_steps, eval_windows=4, eval_draws=2,
            checkpoint_every=run_steps, keep_checkpoints=1,
        )


def stage_one(mdm: list[float], ar: list[float], quick: bool) -> list[Run]:
    mdm, ar = (mdm[1::2], ar[:1]) if quick else (mdm, ar)
    return [Run(f"mdm lr={lr:g}", "mdm", lr) for lr in mdm] + [Run(f"ar lr={lr:g}", "ar", lr) for lr in ar]


def stage_two(best_lr: float, steps: int, quick: bool) -> list[Run]:
    base = Run("", "mdm", best_lr)
    long_warmup = min(150, steps // 2)
    runs = [
        replace(base, name=f"mdm lr={best_lr:g} warmup={long_warmup}", warmup=long_warmup),
        replace(base, name=f"mdm lr={best_lr:g} k-dce", loss="k-dce"),
        replace(base, name=f"mdm lr={best_lr:g} low-discrepancy off", low_discrepancy=False),
        replace(base, name=f"mdm lr={best_lr:g} batch=32 (half steps)", batch_size=32),
    ]
    return runs[1:3] if quick else runs


def unigram_nats(data: Path, windows: torch.Tensor) -> float:
    """Cross-entropy of the windows under the training split's add-one unigram: the floor a model must beat."""
    ds = TokenDataset(data, "train")
    counts = np.ones(ds.tokenizer.vocab_size, dtype=np.float64)
    for shard in ds.shards:
        counts += np.bincount(np.asarray(shard), minlength=ds.tokenizer.vocab_size)[: ds.tokenizer.vocab_size]
    logp = np.log(counts / counts.sum())
    return float(-logp[windows.numpy()].mean())


def execute(run: Run, args: argparse.Namespace, data: Path, windows: torch.Tensor, prev: torch.Tensor) -> dict:
    out = args.out / "runs" / f"{slug(run.name)}.json"
    if out.exists():
        return json.loads(out.read_text())
    run_dir = args.out / "runs" / slug(run.name)
    vocab = TokenDataset(data, "train").tokenizer.vocab_size
    model_cfg = ModelConfig.from_name(args.preset, vocab_size=vocab, causal=run.objective == "ar")
    cfg = run.train_config(args.steps, args.seed)
    resume = (run_dir / "checkpoints" / "LATEST").exists()
    start = time.perf_counter()
    result = train(run_dir, model_cfg, cfg, data, resume=resume, progress=False)
    train_s = time.perf_counter() - start
    losses = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    # per-step losses of this call; after a resume the logged ones (every 10 steps) are all we have
    steps_loss = result.losses if not resume else [r["loss"] for r in losses if r["kind"] == "train"]
    skip = min(cfg.warmup_steps, len(steps_loss) - 1) if not resume else 0
    after_warmup = steps_loss[skip:]
    tail = steps_loss[-max(len(steps_loss) // 10, 1):]
    model, _ = load_model(run_dir)
    start = time.perf_counter()
    if run.objective == "ar":
        val = ar_nll(model, windows, prev, batch_size=32)
    else:
        val = mc_elbo(model, windows, draws=args.draws, estimator="k-dce", batch_size=32, seed=args.seed)
    record = {
        "name": run.name, "objective": run.objective, "lr": run.lr, "warmup_steps": cfg.warmup_steps, "loss": run.loss,
        "low_discrepancy": run.low_discrepancy, "batch_size": run.batch_size, "steps": cfg.steps, "tokens": result.tokens,
        "val_nats_per_token": val.nats_per_token, "val_stderr": val.stderr, "val_estimator": val.estimator, "val_draws": val.draws,
        "val_tokens": val.num_tokens, "final_train_loss": float(np.mean(tail)), "max_train_loss": float(max(after_warmup)),
        "max_train_loss_step": int(np.argmax(after_warmup)) + skip + 1,
        "train_s": train_s, "eval_s": time.perf_counter() - start, "resumed": resume,
    }
    out.write_text(json.dumps(record, indent=2) + "\n")
    return record


def run_all(runs: list[Run], args: argparse.Namespace, data: Path, windows: torch.Tensor, prev: torch.Tensor) -> list[dict]:
    """Each run in a worker process with ``args.threads`` torch threads (``args.workers`` at a time); results in order."""
    with ProcessPoolExecutor(args.workers, mp_context=mp.get_context("spawn"), initializer=torch.set_num_threads, initargs=(args.threads,)) as pool:
        futures = [pool.submit(execute, run, args, data, windows, prev) for run in runs]
        records = []
        for future in futures:
            r = future.result()
            print(f"{r['name']:40} {r['val_nats_per_token']:.4f} +- {r['val_stderr']:.4f}  max loss {r['max_train_loss']:.2f}  {r['train_s']:.0f} s", flush=True)
            records.append(r)
    return records


def slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in ".-" else "_" for c in name)


def table(records: list[dict], unigram: float, args: argparse.Namespace) -> str:
    lines = [
        f"preset={args.preset}, {args.steps} steps x batch 16 x context (batch-32 rows: half the steps), seed {args.seed}; "
        f"validation: {records[0]['val_tokens']:,} tokens ({args.windows} windows evenly spread over the split), "
        f"MDM k-DCE bound with {args.draws} draws; unigram cross-entropy {unigram:.3f} nats/token",
        "",
        "| run | val nats/token | +- SE | final train loss | max train loss (step) | wall s (train + eval) |",
        "|---|---|---|---|---|---|",
    ]
    for r in records:
        lines.append(
            f"| {r['name']} | {r['val_nats_per_token']:.4f} | {r['val_stderr']:.4f} | {r['final_train_loss']:.3f} | "
            f"{r['max_train_loss']:.2f} ({r['max_train_loss_step']}) | {r['train_s']:.0f} + {r['eval_s']:.0f} |"
        )
    lines.append("")
    for objective in ("mdm", "ar"):
        mine = [r for r in records if r["objective"] == objective]
        if mine:
            best = min(mine, key=lambda r: r["val_nats_per_token"])
            lines.append(f"best {objective.upper()}: {best['name']} ({best['val_nats_per_token']:.4f} +- {best['val_stderr']:.4f} nats/token)")
    return "\n".join(lines)


def plot(records: list[dict], unigram: float, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(records) + 1.5))
    names = [r["name"] for r in records]
    ax.errorbar([r["val_nats_per_token"] for r in records], range(len(records)), xerr=[2 * r["val_stderr"] for r in records], fmt="o")
    ax.axvline(unigram, color="grey", linestyle="--", label="unigram")
    ax.set_yticks(range(len(records)), names)
    ax.invert_yaxis()
    ax.set_xlabel("validation nats/token (MDM: bound, +- 2 SE; AR: exact)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def lrs(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/mdm_training_sweep"))
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--steps", type=int, default=600, help="Steps at batch 16 (the token budget of every run).")
    parser.add_argument("--windows", type=int, default=256, help="Validation windows, evenly spread over the split.")
    parser.add_argument("--draws", type=int, default=16, help="Monte Carlo draws of the MDM bound.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mdm-lrs", type=lrs, default=list(MDM_LRS), help="Stage-1 MDM learning rates, comma-separated.")
    parser.add_argument("--ar-lrs", type=lrs, default=list(AR_LRS), help="Stage-1 AR learning rates, comma-separated.")
    parser.add_argument("--workers", type=int, default=1, help="Runs trained at the same time, each in its own process.")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads per worker (1 on a busy machine).")
    parser.add_argument("--quick", action="store_true", help="Smoke test: 60 steps, a few runs, 16 windows, 4 draws.")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.windows, args.draws = 60, 16, 4
    (args.out / "runs").mkdir(parents=True, exist_ok=True)

    data = default_dataset()
    length = ModelConfig.from_name(args.preset).context_len
    windows, prev = spread_windows(data, "val", length, args.windows)
    unigram = unigram_nats(data, windows)
    records = run_all(stage_one(args.mdm_lrs, args.ar_lrs, args.quick), args, data, windows, prev)
    best_lr = min((r for r in records if r["objective"] == "mdm"), key=lambda r: r["val_nats_per_token"])["lr"]
    records += run_all(stage_two(best_lr, args.steps, args.quick), args, data, windows, prev)

    text = table(records, unigram, args)
    print("\n" + text)
    (args.out / "sweep.md").write_text(text + "\n")
    (args.out / "sweep.json").write_text(json.dumps({"preset": args.preset, "steps": args.steps, "windows": args.windows, "draws": args.draws,
                                                     "seed": args.seed, "unigram_nats_per_token": unigram, "runs": records}, indent=2) + "\n")
    if plot(records, unigram, args.out / "sweep.png"):
        print(f"wrote {args.out / 'sweep.png'}")


if __name__ == "__main__":
    main()

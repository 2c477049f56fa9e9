"""``unmask demo``: a tiny MDM and AR model on the embedded corpus, compared where each is strong."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import typer

from unmask.cli.app import app
from unmask.config import ModelConfig, TrainConfig

# Per-objective optimiser settings at demo compute (tiny preset, 600 steps of 16 x 128 tokens),
# each objective at its own best on validation (benchmarks/mdm_training_sweep.py).
DEMO_TRAIN = {
    "mdm": dict(lr=1e-3, warmup_steps=50, loss="t-dce", low_discrepancy=True, batch_size=16),
    "ar": dict(lr=3e-3, warmup_steps=50, batch_size=16),
}
SPAN_WINDOW, SPAN_LEN = 48, 4  # a 4-token span in the middle of 48-token held-out windows


def demo_train_config(objective: str, steps: int, seed: int) -> TrainConfig:
    every = max(steps // 4, 1)
    return dataclasses.replace(TrainConfig(), objective=objective, steps=steps, seed=seed, eval_every=every, checkpoint_every=every,
                               **DEMO_TRAIN[objective])


def print_infilling(mdm_dir: Path, ar_dir: Path, data_dir: Path, spans: int, examples: int) -> None:
    """Span scores of both models on the same held-out spans, and a few greedy fills."""
    from unmask.checkpoint import checkpoint_tokenizer, load_model
    from unmask.evaluation.infill import infill_examples, span_line, span_scores, spread_windows

    mdm, cfg = load_model(mdm_dir)
    ar, _ = load_model(ar_dir)
    tok = checkpoint_tokenizer(mdm_dir)
    width = min(SPAN_WINDOW, cfg.model.context_len)
    start, stop = width // 2, width // 2 + SPAN_LEN
    windows, prev = spread_windows(data_dir, "val", width, spans)
    typer.echo(f"\n== infilling: {SPAN_LEN} masked tokens inside {windows.shape[0]} held-out windows "
               f"({start} tokens of text before the span, {width - stop} after)")
    typer.echo("The MDM reads both sides of the span; the AR model can only read the left side.")
    for s in span_scores(mdm, ar, windows, prev, start, stop):
        typer.echo(f"{s.setting:16} {s.nats_per_token:.3f} nats/token of the span   all {SPAN_LEN} tokens top-1: {100 * s.greedy_exact:4.1f}%")
    if examples <= 0:
        return
    pick = slice(0, windows.shape[0], max(windows.shape[0] // examples, 1))
    fills = infill_examples(mdm, ar, windows[pick][:examples], prev[pick][:examples], start, stop)
    typer.echo("\nGreedy fills of the [span] (MDM: from both sides; AR: from the left, the right side pasted after it):")
    for i, row in enumerate(windows[pick][:examples].tolist()):
        for who in ("true", "mdm", "ar"):
            typer.echo(f"{who.upper():>4}: {span_line(tok, row, start, stop, fills[who][i].tolist())}")
        typer.echo("")


@app.command()
def demo(
    run_root: Path = typer.Option(Path("runs/demo"), help="Where the two runs are written (re-running resumes them)."),
    preset: str = typer.Option("tiny"),
    steps: int = typer.Option(600, help="Training steps for each model."),
    draws: int = typer.Option(16, help="MC draws for the MDM bound."),
    spans: int = typer.Option(256, help="Held-out spans for the infilling comparison."),
    examples: int = typer.Option(3, help="Infilled lines to print."),
    seed: int = typer.Option(0),
) -> None:
    """Train a tiny MDM and AR model on the embedded corpus; compare likelihoods, infilling and samples."""
    from unmask.data import TokenDataset, default_dataset
    from unmask.evaluation import evaluate_checkpoint, format_likelihood
    from unmask.sampling.generate import generate
    from unmask.train import train as run_training

    data_dir = default_dataset()
    vocab = TokenDataset(data_dir, "train").tokenizer.vocab_size
    results = {}
    for objective in ("mdm", "ar"):
        run_dir = run_root / objective
        model_cfg = ModelConfig.from_name(preset, vocab_size=vocab, causal=objective == "ar")
        typer.echo(f"== training {objective.upper()} ({preset}: {model_cfg.non_embedding_params() / 1e6:.2f}M non-embedding params) -> {run_dir}", err=True)
        resume = (run_dir / "checkpoints" / "LATEST").exists()
        run_training(run_dir, model_cfg, demo_train_config(objective, steps, seed), data_dir, resume=resume)
        results[objective] = evaluate_checkpoint(run_dir, data_dir, draws=draws, batch_size=32, seed=seed)
    typer.echo("\n== validation likelihood (held-out works, the same tokens for both models)")
    for objective in ("mdm", "ar"):
        typer.echo(format_likelihood(results[objective]))
    print_infilling(run_root / "mdm", run_root / "ar", data_dir, spans, examples)
    for objective in ("mdm", "ar"):
        res = generate(run_root / objective, num_samples=2, length=64, steps=64, seed=seed)
        typer.echo(f"\n== {objective.upper()} samples ({res['nfe']} network calls for 2 x 64 tokens, {res['seconds']:.1f} s)")
        for i, s in enumerate(res["samples"]):
            typer.echo(f"--- sample {i} ---\n{s['text'].strip()}")

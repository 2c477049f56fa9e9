"""``unmask demo``: a tiny MDM and AR model on the embedded corpus, compared where each is strong."""

from __future__ import annotations

from pathlib import Path

import typer

from unmask.cli.app import app
from unmask.config import ModelConfig, TrainConfig

SPAN_WINDOW, SPAN_LEN = 48, 4  # gaps of 1 and 4 tokens in the middle of 48-token held-out windows


def demo_train_config(objective: str, steps: int, seed: int) -> TrainConfig:
    every = max(steps // 4, 1)
    return TrainConfig(objective=objective, steps=steps, seed=seed, eval_every=every, checkpoint_every=every)


def print_infilling(mdm_dir: Path, ar_dir: Path, data_dir: Path, spans: int, examples: int) -> None:
    """Blank and span scores of both models on the same held-out windows, and a few greedy fills."""
    import torch

    from unmask.checkpoint import checkpoint_tokenizer, load_model
    from unmask.evaluation.infill import infill_examples, span_line, span_scores, spread_windows

    mdm, cfg = load_model(mdm_dir)
    ar, _ = load_model(ar_dir)
    tok = checkpoint_tokenizer(mdm_dir)
    width = min(SPAN_WINDOW, cfg.model.context_len)
    start = width // 2
    windows, prev = spread_windows(data_dir, "val", width, spans)
    prev = torch.full_like(prev, tok.eos_id)  # the AR model reads exactly the text left of the gap, as the MDM does
    typer.echo(f"\n== infilling: gaps in the middle of {windows.shape[0]} held-out windows of {width} tokens ({start} tokens before the gap)")
    typer.echo("The MDM reads the text on both sides of a gap; the AR model can only read the text before it.")
    blank = span_scores(mdm, ar, windows, prev, start, start + 1)
    span = span_scores(mdm, ar, windows, prev, start, start + SPAN_LEN)
    typer.echo(f"{'':17}{'1-token gap':>24}{f'{SPAN_LEN}-token gap':>16}")
    typer.echo(f"{'':17}{'nats/token':>12}{'top-1':>12}{'nats/token':>16}")
    for b, s in zip(blank, span):
        typer.echo(f"{b.setting:17}{b.nats_per_token:>12.3f}{100 * b.greedy_exact:>11.1f}%{s.nats_per_token:>16.3f}")
    if examples <= 0:
        return
    stop = start + SPAN_LEN
    # readable examples: gaps inside a line of verse or prose (chosen from the true text only), evenly spread
    rows = windows.tolist()
    lines = [i for i, r in enumerate(rows) if "\n" not in tok.decode(r[start - 1 : stop + 1]) and len(span_line(tok, r, start, stop, r[start:stop])) > 40]
    pick = lines[:: max(len(lines) // examples, 1)][:examples]
    if not pick:
        return
    fills = infill_examples(mdm, ar, windows[pick], prev[pick], start, stop)
    typer.echo(f"\nGreedy fills of a {SPAN_LEN}-token [gap] (MDM: from both sides; AR: from the left, the text after it pasted unchanged):")
    for i, row in enumerate(pick):
        for who in ("true", "mdm", "ar"):
            typer.echo(f"{who.upper():>4}: {span_line(tok, rows[row], start, stop, fills[who][i].tolist())}")
        typer.echo("")


@app.command()
def demo(
    run_root: Path = typer.Option(Path("runs/demo"), help="Where the two runs are written (re-running resumes them)."),
    preset: str = typer.Option("tiny"),
    steps: int = typer.Option(600, min=1, help="Training steps for each model."),
    draws: int = typer.Option(16, min=2, help="MC draws for the MDM bound."),
    spans: int = typer.Option(256, min=1, help="Held-out windows for the infilling comparison."),
    examples: int = typer.Option(3, min=0, help="Infilled lines to print."),
    seed: int = typer.Option(0, min=0),
) -> None:
    """Train a tiny MDM and AR model on the embedded corpus; compare likelihoods, infilling and samples."""
    from unmask.data import TokenDataset, default_dataset
    from unmask.evaluation import evaluate_checkpoint, format_likelihood
    from unmask.generation import generate
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

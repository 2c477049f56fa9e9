"""The ``unmask`` command line. Each subcommand is a typed function; errors print one line.

    unmask demo                     train tiny MDM + AR on the embedded corpus, evaluate, sample
    unmask data prepare FILES...    tokenise your corpus into packed shards
    unmask train --run-dir RUN ...  train an MDM (default) or the AR baseline
    unmask eval --checkpoint RUN    perplexity (MDM: ELBO bound +- SE; AR: exact)
    unmask sample --checkpoint RUN  generate text
    unmask presets                  list model presets with parameter counts
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Optional

import torch
import typer

from unmask.config import PRESETS, ModelConfig, TrainConfig
from unmask.errors import UnmaskError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, help="Masked diffusion language models: train, evaluate, sample.")
data_app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, help="Corpus preparation.")
app.add_typer(data_app, name="data")

_T = TrainConfig()


def _echo_json(obj: dict) -> None:
    typer.echo(json.dumps(obj, indent=2))


@app.command()
def presets() -> None:
    """List the model presets with their parameter counts (at the default 4096-token vocabulary)."""
    typer.echo(f"{'preset':8} {'layers':>6} {'heads':>5} {'width':>6} {'context':>7} {'non-emb params':>15} {'total params':>13}")
    for name, cfg in PRESETS.items():
        typer.echo(
            f"{name:8} {cfg.n_layer:>6} {cfg.n_head:>5} {cfg.n_embd:>6} {cfg.context_len:>7} "
            f"{cfg.non_embedding_params() / 1e6:>14.2f}M {cfg.total_params() / 1e6:>12.2f}M"
        )


@data_app.command("prepare")
def data_prepare(
    inputs: list[Path] = typer.Argument(None, help="Text files, folders (*.txt, *.jsonl inside) or .jsonl files."),
    out: Path = typer.Option(..., "--out", help="Folder to write the packed token shards to."),
    tokenizer: str = typer.Option("default", help="'default' (shipped BPE), 'train' (new BPE on your corpus), or a tokenizer.json / folder."),
    vocab_size: int = typer.Option(4096, help="Vocabulary size when --tokenizer train."),
    val_input: Optional[list[Path]] = typer.Option(None, help="Validation documents; default: a --val-fraction of the inputs, by document."),
    val_fraction: float = typer.Option(0.05, help="Fraction of documents held out when no --val-input is given."),
    text_field: str = typer.Option("text", help="Field holding the text in .jsonl files / HF datasets."),
    hf_dataset: Optional[str] = typer.Option(None, help="Name of an HF dataset (needs network and `pip install 'unmask[hf]'`)."),
    hf_config: Optional[str] = typer.Option(None, help="HF dataset configuration."),
    hf_split: str = typer.Option("train", help="HF dataset split."),
) -> None:
    """Tokenise a corpus into packed shards for `unmask train --data`."""
    from unmask.data import hf_documents, load_tokenizer, prepare_dataset, read_documents, train_bpe

    if not inputs and not hf_dataset:
        raise UnmaskError("data prepare: give input files/folders or --hf-dataset NAME")
    if not 0 < val_fraction < 1:
        raise UnmaskError(f"--val-fraction={val_fraction} must be between 0 and 1")
    docs = list(hf_documents(hf_dataset, hf_config, hf_split, text_field) if hf_dataset else read_documents(inputs, text_field))
    val_docs = list(read_documents(val_input, text_field)) if val_input else None
    tok = train_bpe(docs, vocab_size) if tokenizer == "train" else load_tokenizer(tokenizer)
    path = prepare_dataset(out, tok, docs, val_docs, val_fraction=val_fraction)
    typer.echo(f"wrote {path}")


def _data_dir(data: Optional[Path]) -> Path:
    from unmask.data import default_dataset

    return Path(data) if data is not None else default_dataset()


@app.command()
def train(
    run_dir: Path = typer.Option(..., help="Folder for config, metrics.jsonl and checkpoints."),
    preset: str = typer.Option("tiny", help=f"Model size: {', '.join(PRESETS)}."),
    objective: str = typer.Option(_T.objective, help="mdm (masked diffusion) or ar (autoregressive baseline)."),
    data: Optional[Path] = typer.Option(None, help="Folder from `unmask data prepare`; default: the embedded Shakespeare corpus."),
    steps: int = typer.Option(_T.steps),
    batch_size: int = typer.Option(_T.batch_size, help="Sequences per micro-batch (per process)."),
    grad_accum: int = typer.Option(_T.grad_accum, help="Micro-batches per optimizer step."),
    lr: float = typer.Option(_T.lr),
    warmup_steps: int = typer.Option(_T.warmup_steps),
    weight_decay: float = typer.Option(_T.weight_decay),
    loss: str = typer.Option(_T.loss, help="MDM objective: t-dce or k-dce."),
    schedule: str = typer.Option(_T.schedule, help="MDM masking schedule: linear or cosine."),
    precision: str = typer.Option(_T.precision, help="auto (bf16 autocast where supported), bf16 or fp32."),
    context_len: Optional[int] = typer.Option(None, help="Override the preset's context length."),
    time_conditioning: bool = typer.Option(False, help="Give the MDM network the time t (default: time-agnostic)."),
    seed: int = typer.Option(_T.seed),
    eval_every: int = typer.Option(_T.eval_every),
    checkpoint_every: int = typer.Option(_T.checkpoint_every),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
    resume: bool = typer.Option(False, help="Continue RUN exactly from its latest checkpoint."),
) -> None:
    """Train an MDM or the AR baseline; works alone or under torchrun."""
    from unmask.data import TokenDataset
    from unmask.train import train as run_training

    data_dir = _data_dir(data)
    vocab = TokenDataset(data_dir, "train").tokenizer.vocab_size
    overrides = {"vocab_size": vocab, "causal": objective == "ar", "time_conditioning": time_conditioning}
    if context_len is not None:
        overrides["context_len"] = context_len
    model_cfg = ModelConfig.from_name(preset, **overrides)
    train_cfg = TrainConfig(
        objective=objective, loss=loss, schedule=schedule, steps=steps, batch_size=batch_size, grad_accum=grad_accum, lr=lr,
        warmup_steps=warmup_steps, weight_decay=weight_decay, precision=precision, seed=seed, eval_every=eval_every,
        checkpoint_every=checkpoint_every,
    )
    typer.echo(f"{objective.upper()} {preset}: {model_cfg.non_embedding_params() / 1e6:.2f}M non-embedding params, {model_cfg.total_params() / 1e6:.2f}M total", err=True)
    result = run_training(run_dir, model_cfg, train_cfg, data_dir, resume=resume, device=device)
    typer.echo(f"done: {result.steps} steps, {result.tokens:,} tokens, last loss {result.final_loss:.4f}, {result.tokens_per_s:,.0f} tokens/s -> {run_dir}", err=True)


def evaluate_checkpoint(
    checkpoint: Path, data: Optional[Path], split: str, windows: Optional[int], draws: int, estimator: Optional[str],
    batch_size: int, seed: int, device: str, progress: bool = True,
) -> dict:
    """Perplexity of a checkpoint on a split's consecutive context-length windows (see README for the keys)."""
    from unmask.checkpoint import load_model
    from unmask.data import TokenDataset
    from unmask.likelihood import ar_nll, mc_elbo, previous_tokens
    from unmask.schedule import Schedule

    if split not in ("val", "train"):
        raise UnmaskError(f"--split {split!r} is not one of: val, train")
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device))
    model, cfg = load_model(checkpoint, dev)
    data_dir = Path(data) if data is not None else Path(cfg.data_dir) if cfg.data_dir and Path(cfg.data_dir).exists() else _data_dir(None)
    dataset = TokenDataset(data_dir, split)
    if dataset.tokenizer.fingerprint != cfg.tokenizer_fingerprint:
        raise UnmaskError(f"--data {data_dir} was tokenised with a different tokenizer than {checkpoint}; prepare it with the checkpoint's tokenizer.json")
    w = torch.from_numpy(dataset.eval_windows(cfg.model.context_len, windows))
    if cfg.model.causal:
        result = ar_nll(model, w, previous_tokens(w, dataset.tokenizer.eos_id), batch_size=batch_size, progress=progress)
    else:
        result = mc_elbo(model, w, draws=draws, estimator=estimator or cfg.train.loss, schedule=Schedule(cfg.train.schedule), batch_size=batch_size, seed=seed, progress=progress)
    return {"checkpoint": str(checkpoint), "objective": cfg.train.objective, "split": split, **result.to_dict()}


@app.command("eval")
def eval_cmd(
    checkpoint: Path = typer.Option(..., help="Run folder or checkpoints/step_* folder."),
    data: Optional[Path] = typer.Option(None, help="Prepared data folder; default: the one the run was trained on."),
    split: str = typer.Option("val", help="val or train."),
    windows: Optional[int] = typer.Option(None, help="Use only the first N context-length windows (default: all)."),
    draws: int = typer.Option(32, help="MDM: Monte Carlo draws of t per window (stratified)."),
    estimator: Optional[str] = typer.Option(None, help="MDM: t-dce or k-dce (default: the training loss)."),
    batch_size: int = typer.Option(16),
    seed: int = typer.Option(0),
    device: str = typer.Option("auto"),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON object instead of text."),
) -> None:
    """Validation perplexity: MDM ELBO bound with its Monte Carlo standard error, AR exact."""
    res = evaluate_checkpoint(checkpoint, data, split, windows, draws, estimator, batch_size, seed, device, progress=not as_json)
    if as_json:
        _echo_json(res)
    else:
        typer.echo(format_likelihood(res))


def format_likelihood(res: dict) -> str:
    if res["kind"] == "elbo":
        return (
            f"MDM  {res['nats_per_token']:.4f} +- {res['stderr']:.4f} nats/token  perplexity <= {res['perplexity']:.2f} +- {res['perplexity_stderr']:.2f}"
            f"  ({res['num_tokens']:,} tokens, {res['draws']} draws, {res['estimator']})"
        )
    return f"AR   {res['nats_per_token']:.4f} nats/token  perplexity = {res['perplexity']:.2f}  ({res['num_tokens']:,} tokens, exact)"


def generate(
    checkpoint: Path, prompt: str, num_samples: int, length: int, steps: int, temperature: float, precision: str, seed: int, device: str
) -> dict:
    """Samples from a checkpoint: MDM by the ancestral sampler, AR token by token."""
    from unmask.checkpoint import load_model
    from unmask.data import Tokenizer
    from unmask.checkpoint import resolve_checkpoint
    from unmask.sampling import ARConfig, AncestralConfig, ancestral, ar_sample

    if num_samples < 1:
        raise UnmaskError(f"--num-samples={num_samples} must be a positive integer")
    if length < 1:
        raise UnmaskError(f"--length={length} must be a positive integer")
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device))
    model, cfg = load_model(checkpoint, dev)
    tok = Tokenizer.from_file(resolve_checkpoint(checkpoint) / "tokenizer.json")
    ids = tok.encode(prompt) if prompt else []
    ctx = cfg.model.context_len
    if len(ids) + length > ctx:
        raise UnmaskError(f"--prompt of {len(ids)} tokens + --length {length} exceeds the model's context of {ctx} tokens; shorten one of them")
    gen = torch.Generator(device=dev).manual_seed(seed)
    start = time.perf_counter()
    if cfg.model.causal:
        x = torch.tensor([[tok.eos_id] + ids] * num_samples, device=dev)
        out = ar_sample(model, x, gen, ARConfig(max_new_tokens=length, temperature=temperature, precision=precision))
        generated = out.tokens[:, 1 + len(ids) :]
    else:
        x = torch.tensor([ids + [cfg.model.mask_id] * length] * num_samples, device=dev)
        out = ancestral(model, x, gen, AncestralConfig(steps=steps, temperature=temperature, precision=precision, schedule=cfg.train.schedule))
        generated = out.tokens[:, len(ids) :]
    seconds = time.perf_counter() - start
    samples = [{"tokens": row.tolist(), "text": prompt + tok.decode(row.tolist())} for row in generated.cpu()]
    return {"checkpoint": str(checkpoint), "objective": cfg.train.objective, "nfe": out.nfe, "steps": out.steps, "seconds": seconds, "samples": samples}


@app.command()
def sample(
    checkpoint: Path = typer.Option(..., help="Run folder or checkpoints/step_* folder."),
    prompt: str = typer.Option("", help="Text the samples start with."),
    num_samples: int = typer.Option(2),
    length: int = typer.Option(64, help="Tokens to generate after the prompt."),
    steps: int = typer.Option(64, help="MDM: sampling steps (network calls)."),
    temperature: float = typer.Option(1.0),
    precision: str = typer.Option("float64", help="Categorical sampling precision: float64 (exact) or float32 (ablation only; biased)."),
    seed: int = typer.Option(0),
    device: str = typer.Option("auto"),
    as_json: bool = typer.Option(False, "--json", help="Print tokens, text and NFE as JSON."),
) -> None:
    """Generate text from a trained MDM or AR checkpoint."""
    res = generate(checkpoint, prompt, num_samples, length, steps, temperature, precision, seed, device)
    if as_json:
        _echo_json(res)
        return
    for i, s in enumerate(res["samples"]):
        typer.echo(f"--- sample {i} ---\n{s['text']}")
    typer.echo(f"({res['nfe']} network calls, {res['seconds']:.2f} s)", err=True)


@app.command()
def demo(
    run_root: Path = typer.Option(Path("runs/demo"), help="Where the two runs are written (re-running resumes them)."),
    preset: str = typer.Option("tiny"),
    steps: int = typer.Option(600, help="Training steps for each model."),
    draws: int = typer.Option(16, help="MC draws for the MDM bound."),
    seed: int = typer.Option(0),
) -> None:
    """Train a tiny MDM and AR model on the embedded corpus, report both perplexities, print samples."""
    from unmask.data import TokenDataset
    from unmask.train import train as run_training

    data_dir = _data_dir(None)
    vocab = TokenDataset(data_dir, "train").tokenizer.vocab_size
    results = {}
    for objective in ("mdm", "ar"):
        run_dir = run_root / objective
        model_cfg = ModelConfig.from_name(preset, vocab_size=vocab, causal=objective == "ar")
        train_cfg = dataclasses.replace(_T, objective=objective, steps=steps, seed=seed, eval_every=max(steps // 4, 1), checkpoint_every=max(steps // 4, 1))
        typer.echo(f"== training {objective.upper()} ({preset}: {model_cfg.non_embedding_params() / 1e6:.2f}M non-embedding params) -> {run_dir}", err=True)
        resume = (run_dir / "checkpoints" / "LATEST").exists()
        run_training(run_dir, model_cfg, train_cfg, data_dir, resume=resume)
        results[objective] = evaluate_checkpoint(run_dir, data_dir, "val", None, draws, None, 32, seed, "auto")
    typer.echo("\n== validation likelihood (held-out works, same tokens for both)")
    for objective in ("mdm", "ar"):
        typer.echo(format_likelihood(results[objective]))
    for objective in ("mdm", "ar"):
        res = generate(run_root / objective, "", 2, 64, 64, 1.0, "float64", seed, "auto")
        typer.echo(f"\n== {objective.upper()} samples ({res['nfe']} network calls for 2 x 64 tokens)")
        for i, s in enumerate(res["samples"]):
            typer.echo(f"--- sample {i} ---\n{s['text'].strip()}")


def main(argv: list[str] | None = None) -> int:
    """Console entry point: ``UnmaskError`` becomes one ``error: ...`` line and exit status 2."""
    try:
        app(args=argv, prog_name="unmask", standalone_mode=False)
    except UnmaskError as exc:
        typer.echo(f"error: {exc}", err=True)
        return 2
    except (typer.Abort, KeyboardInterrupt):
        typer.echo("aborted", err=True)
        return 130
    except Exception as exc:  # click usage errors carry their own exit code and message
        import click

        if isinstance(exc, click.ClickException):
            exc.show()
            return exc.exit_code
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``unmask eval ppl|harness|genppl`` and ``unmask report``."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer

from unmask.cli.app import app, command_group, echo_json
from unmask.cli.sampler_options import COMPILE_HELP, with_sampler_options

eval_app = command_group("Likelihood, lm-eval tasks, generation quality.")
app.add_typer(eval_app, name="eval")

CHECKPOINT = typer.Option(..., help="Run folder or checkpoints/step_* folder.")
SAVE = typer.Option(False, "--save", help="Also append the result to RUN/results/<kind>.jsonl (read by `unmask report`).")
JSON = typer.Option(False, "--json", help="Print a JSON object instead of text.")


def _save(checkpoint: Path, kind: str, record: dict) -> None:
    from unmask.checkpoint import resolve_checkpoint
    from unmask.evaluation.report import append_result

    ckpt = resolve_checkpoint(checkpoint)
    run_dir = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt
    append_result(run_dir, kind, record)


@eval_app.command("ppl")
def ppl(
    checkpoint: Path = CHECKPOINT,
    data: Optional[Path] = typer.Option(None, help="Prepared data folder; default: the one the run was trained on."),
    split: str = typer.Option("val", help="val or train (of --data)."),
    text: Optional[list[Path]] = typer.Option(None, help="Score local .txt/.jsonl files instead (tokenised with the checkpoint's tokenizer)."),
    dataset: Optional[str] = typer.Option(None, help="Score a named zero-shot set instead (online): wikitext103, wikitext2, ptb, lambada, lm1b, openwebtext."),
    detokenizer: str = typer.Option("none", help="For --text: none, wikitext, ptb, lm1b, lambada."),
    packed: Optional[bool] = typer.Option(None, "--packed/--unpacked", help="Concatenate documents (default for --text) or score each alone."),
    windows: Optional[int] = typer.Option(None, min=1, help="Use only N windows, spread evenly over the source (packed)."),
    limit_documents: Optional[int] = typer.Option(None, min=1, help="Use only the first N documents of --text/--dataset."),
    draws: int = typer.Option(32, min=2, help="MDM: Monte Carlo draws per window (stratified)."),
    estimator: Optional[str] = typer.Option(None, help="MDM: t-dce, k-dce, any-order (bounds) or chain-rule (exact, L calls; block models: L' calls); default: the training loss."),
    batch_size: int = typer.Option(16, min=1),
    seed: int = typer.Option(0),
    device: str = typer.Option("auto"),
    weights: str = typer.Option("auto", help="auto (the EMA of the weights when the run kept one, else the weights), ema or raw."),
    save: bool = SAVE,
    as_json: bool = JSON,
) -> None:
    """Perplexity: MDM ELBO bound with its Monte Carlo standard error (or exact chain rule), AR exact."""
    from unmask.evaluation import evaluate_checkpoint, format_likelihood

    res = evaluate_checkpoint(
        checkpoint, data, split, windows, draws, estimator, batch_size, seed, device, progress=not as_json,
        text=text, dataset=dataset, detokenize=detokenizer, packed=packed, limit_documents=limit_documents, weights=weights,
    )
    if save:
        _save(checkpoint, "ppl", res)
    echo_json(res) if as_json else typer.echo(format_likelihood(res))


@eval_app.command("harness")
@with_sampler_options
def harness(
    checkpoint: Path = CHECKPOINT,
    tasks: str = typer.Option("shakespeare_word_order,shakespeare_next_line", help="Comma-separated lm-eval task names (the shipped offline ones work without network)."),
    method: str = typer.Option("chain-rule", help="MDM loglikelihood: chain-rule (exact, deterministic) or mc (Monte Carlo bound)."),
    draws: int = typer.Option(32, min=2, help="MDM, --method mc: draws per request."),
    limit: Optional[int] = typer.Option(None, min=1, help="Only the first N documents of each task."),
    num_fewshot: Optional[int] = typer.Option(None, min=0),
    include_path: Optional[str] = typer.Option(None, help="Folder with more task YAMLs."),
    batch_size: int = typer.Option(16, min=1),
    seed: int = typer.Option(0),
    device: str = typer.Option("auto"),
    save: bool = SAVE,
    as_json: bool = JSON,
    compile: bool = typer.Option(False, "--compile", help=COMPILE_HELP),
    sampling: dict = None,
) -> None:
    """lm-eval-harness tasks in-process through the unmask model adapter.

    --cfg guides scoring and generation; the other sampler options apply to generate_until
    (default: the ancestral sampler, greedy, one step per generated token)."""
    from unmask.evaluation.harness import UnmaskLM, run_harness

    lm = UnmaskLM(checkpoint, method=method, draws=draws, batch_size=batch_size, seed=seed, device=device, compile=compile, **sampling)
    res = run_harness(lm, [t.strip() for t in tasks.split(",") if t.strip()], limit=limit, num_fewshot=num_fewshot, include_path=include_path, seed=seed)
    record = {"checkpoint": str(checkpoint), "tasks": res["tasks"], "settings": f"method={method} limit={limit} " + " ".join(f"{k}={v}" for k, v in sampling.items())}
    if save:
        _save(checkpoint, "harness", record)
    if as_json:
        echo_json(record)
        return
    for task, metrics in res["tasks"].items():
        typer.echo(f"{task}: " + "  ".join(f"{k}={v:.4f}" for k, v in metrics.items() if k != "sample_len") + f"  (n={metrics.get('sample_len')})")


@eval_app.command("genppl")
@with_sampler_options
def genppl(
    checkpoint: Path = CHECKPOINT,
    judge: Optional[Path] = typer.Option(None, help="AR run/checkpoint trained with the same tokenizer (the usual judge)."),
    judge_hf: Optional[Path] = typer.Option(None, help="Or a local HF causal-LM folder (e.g. GPT-2); needs transformers."),
    num_samples: int = typer.Option(16, min=1),
    length: int = typer.Option(128, min=1, help="Generated tokens per sample."),
    label: str = typer.Option("", help="Name of this configuration in reports."),
    seed: int = typer.Option(0),
    device: str = typer.Option("auto"),
    save: bool = SAVE,
    as_json: bool = JSON,
    compile: bool = typer.Option(False, "--compile", help=COMPILE_HELP),
    sampling: dict = None,
) -> None:
    """Generate samples (any sampler, cache and guidance) and report generative perplexity with unigram entropy and distinct-n."""
    import torch

    from unmask.checkpoint import checkpoint_tokenizer, load_model
    from unmask.device import pick_device
    from unmask.errors import UnmaskError
    from unmask.evaluation.genppl import HFJudge, judge_nll, quality_report
    from unmask.generation import generate

    if (judge is None) == (judge_hf is None):
        raise UnmaskError("genppl: give exactly one of --judge RUN or --judge-hf FOLDER")
    start = time.perf_counter()
    out = generate(checkpoint, "", num_samples, length, seed=seed, device=device, compile=compile, **sampling)
    tokens = [s["tokens"] for s in out["samples"]]
    if judge is not None:
        model, cfg = load_model(judge, pick_device(device))
        if not cfg.model.causal:
            raise UnmaskError(f"--judge {judge} is an MDM; the judge must be an AR model")
        judge_tok = checkpoint_tokenizer(judge)
        sample_tok = checkpoint_tokenizer(checkpoint)
        if judge_tok.fingerprint != sample_tok.fingerprint:
            raise UnmaskError(f"--judge {judge} uses a different tokenizer than {checkpoint}; use --judge-hf or a judge trained on the same data")
        nll = judge_nll(model, torch.tensor(tokens), judge_tok.eos_id)
    else:
        nll = HFJudge(judge_hf, str(pick_device(device))).nll([s["text"] for s in out["samples"]])
    record = {
        "checkpoint": str(checkpoint), "label": label or " ".join([out["sampler"], *(f"{k}={v}" for k, v in sampling.items() if k != "sampler")]),
        "sampling": sampling, "generated_tokens": num_samples * length,
        "tokens_per_s": num_samples * length / out["seconds"], "nfe": out["nfe"], "seconds": out["seconds"],
        **quality_report(tokens, nll), "judge": str(judge or judge_hf), **({"compiled": out["compiled"]} if compile else {}),
    }
    if save:
        _save(checkpoint, "genppl", record)
    if as_json:
        echo_json(record)
    else:
        typer.echo(
            f"gen-PPL {record['gen_ppl']:.2f}  entropy {record['unigram_entropy']:.3f}  distinct-2 {record['distinct_2']:.3f}  "
            f"{record['tokens_per_s']:.1f} tokens/s  ({num_samples} x {length} tokens, {out['nfe']} network calls, {time.perf_counter() - start:.1f} s)"
        )


@app.command()
def report(
    runs: list[Path] = typer.Argument(..., help="Run folders (e.g. an MDM and an AR run)."),
    out: Path = typer.Option(Path("report"), help="Folder for report.md, report.json and the PNG plots."),
) -> None:
    """Markdown + JSON + PNG report: curves vs tokens and FLOPs, likelihood table, Pareto plot."""
    from unmask.evaluation.report import make_report

    res = make_report(runs, out)
    typer.echo(f"wrote {out / 'report.md'}, {out / 'report.json'} and {', '.join(res['plots'])}")

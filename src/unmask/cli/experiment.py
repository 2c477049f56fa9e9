"""``unmask experiment scaling | reverse-curse | reverse-curse-ablation | reversal | conditional | shift``: SMDM's experiments and the
controlled reversal task, each writing a results folder (results.json, results.md, a PNG) and resuming
where it stopped when run again."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from unmask.cli.app import app, command_group
from unmask.cli.train import log_to_option
from unmask.errors import UnmaskError
from unmask.experiments.conditional import Settings as ConditionalSettings
from unmask.tracking import tracker_names

experiment_app = command_group("SMDM's experiments: scaling laws, reverse curse, reversal on random token pairs, conditional generation, distribution shift.")
app.add_typer(experiment_app, name="experiment")


def _floats(text: str, flag: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise UnmaskError(f"{flag} {text!r}: give comma-separated numbers, e.g. 0,0.5,1,2,3") from None


def _ints(text: str, flag: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise UnmaskError(f"{flag} {text!r}: give comma-separated integers, e.g. 0,1,2") from None


@experiment_app.command("scaling")
def scaling(
    out: Path = typer.Option(Path("runs/experiments/scaling"), help="Results folder (runs/, results.json, results.md, scaling.png)."),
    grid: str = typer.Option("cpu", help="cpu (about an hour on a 2-core CPU), gpu (one GPU, hours, not run here), or a JSON file of grid fields."),
    data: Optional[Path] = typer.Option(None, help="Folder from `unmask data prepare`; default: the embedded Shakespeare corpus."),
    bootstrap: int = typer.Option(1000, help="Bootstrap resamples for the confidence intervals."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
    log_to: Optional[List[str]] = log_to_option(),
) -> None:
    """IsoFLOP grid of MDM and AR runs, frontiers L*(C) and N*(C), compute multiplier and size ratio."""
    from unmask.experiments import scaling as experiment

    if bootstrap < 10:
        raise UnmaskError(f"--bootstrap={bootstrap}: use at least 10 resamples")
    experiment.run(out, grid, data, device=device, bootstrap_samples=bootstrap, log_to=tracker_names(log_to))
    typer.echo(f"wrote {out}/results.md, results.json and scaling.png", err=True)


@experiment_app.command("reverse-curse")
def reverse_curse(
    out: Path = typer.Option(Path("runs/experiments/reverse-curse"), help="Results folder."),
    facts_file: Optional[Path] = typer.Option(None, help="JSONL of {\"name\", \"description\"} facts; default: synthetic fictional facts."),
    facts: int = typer.Option(20, min=1, help="Synthetic facts per direction."),
    repeats: int = typer.Option(20, min=1, help="Copies of each paraphrase in the training text."),
    text_chars: int = typer.Option(200_000, min=0, help="Characters of Shakespeare mixed in as ordinary text (0: the facts alone)."),
    layout: str = typer.Option("packed", help="Training data layout: packed (documents packed into windows) or rows (one document per row)."),
    steps: int = typer.Option(1000, min=1, help="Training steps of each model."),
    extra_mdm_steps: str = typer.Option("", help="Comma-separated step counts of further MDM runs (more compute than the AR model), e.g. 4000."),
    seeds: str = typer.Option("0,1", help="Comma-separated training seeds; the table reports mean and spread over them."),
    cfg_scales: str = typer.Option("0,0.5,1,2,3", help="MDM guidance scales w to evaluate at."),
    distractors: int = typer.Option(7, min=1, help="Wrong answers each correct one is ranked against."),
    context_len: int = typer.Option(64, min=1, help="Model context in tokens."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
    log_to: Optional[List[str]] = log_to_option(),
) -> None:
    """Train MDM and AR on facts seen in one direction; exact match and ranking in both directions."""
    from unmask.experiments import reverse_curse as experiment

    settings = experiment.Settings(facts_per_direction=facts, repeats=repeats, steps=steps, seeds=_ints(seeds, "--seeds"),
                                   cfg_scales=_floats(cfg_scales, "--cfg-scales"), distractors=distractors, context_len=context_len,
                                   extra_mdm_steps=_ints(extra_mdm_steps, "--extra-mdm-steps"), text_chars=text_chars, layout=layout)
    experiment.run(out, settings, facts_file, device=device, log_to=tracker_names(log_to))
    typer.echo(f"wrote {out}/results.md, results.json and reverse_curse.png", err=True)


@experiment_app.command("reverse-curse-ablation")
def reverse_curse_ablation(
    out: Path = typer.Option(Path("runs/experiments/reverse-curse-ablation"), help="Results folder (runs/, corpora/, results.json, results.md, ablation.png)."),
    points: str = typer.Option("", help="Comma-separated points of the grid to run (default all): base, mixed, mixed-12k, depth1, depth4, width64, width256, "
                                        "repeats5, paraphrases1, lr1e-3, lr4e-3, constant-lr, t-dce, context64."),
    ar_points: str = typer.Option("base,mixed", help="Comma-separated points that also train an AR model (the control)."),
    seeds: str = typer.Option("0", help="Comma-separated training seeds of every run."),
    more_seeds: str = typer.Option("", help="Comma-separated POINT:SEED further MDM runs beyond --seeds, e.g. base:1."),
    steps: int = typer.Option(4000, min=1, help="Training steps of every run (the base configuration's)."),
    n_layer: int = typer.Option(2, min=1, help="The base configuration's layers."),
    n_embd: int = typer.Option(128, min=1, help="The base configuration's width."),
    n_head: int = typer.Option(4, min=1, help="The base configuration's attention heads."),
    context_len: int = typer.Option(32, min=1, help="The base configuration's context in tokens."),
    batch_size: int = typer.Option(16, min=1, help="The base configuration's sequences per step."),
    slack: int = typer.Option(4, help="MASK positions after the answer when its length is not told."),
    elbo_draws: int = typer.Option(16, help="Monte Carlo draws of the MDM's any-order bound per answer."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
    log_to: Optional[List[str]] = log_to_option(),
) -> None:
    """One factor at a time around a base where the MDM learns the facts: text, depth, width, repeats, paraphrases, lr, schedule,
    k-DCE vs t-DCE; every run asked with the answer's length told or not, on three canvases, ranked in three orders."""
    from dataclasses import replace

    from unmask.experiments import reverse_curse_ablation as experiment

    names = tuple(v.strip() for v in points.split(",") if v.strip()) or experiment.Settings().points
    extra = []
    for item in (v.strip() for v in more_seeds.split(",") if v.strip()):
        point, _, seed = item.partition(":")
        if not seed.isdigit():
            raise UnmaskError(f"--more-seeds {item!r}: give POINT:SEED, e.g. base:1")
        extra.append((point, int(seed)))
    base = replace(experiment.BASE, steps=steps, n_layer=n_layer, n_embd=n_embd, n_head=n_head, context_len=context_len, batch_size=batch_size)
    grid = experiment.Settings(base=base, points=names, ar_points=tuple(v.strip() for v in ar_points.split(",") if v.strip()),
                               seeds=_ints(seeds, "--seeds"), more_seeds=tuple(extra), slack=slack, elbo_draws=elbo_draws)
    experiment.run(out, grid, device=device, log_to=tracker_names(log_to))
    typer.echo(f"wrote {out}/results.md, results.json and ablation.png", err=True)


_C = ConditionalSettings()


@experiment_app.command("conditional")
def conditional(
    out: Path = typer.Option(Path("runs/experiments/conditional"), help="Results folder."),
    facts_file: Optional[Path] = typer.Option(None, help="JSONL of {\"name\", \"description\"} facts; default: synthetic fictional facts."),
    facts: int = typer.Option(_C.facts_per_direction, min=1, help="Synthetic facts per direction (half the facts are fine-tuned on, half held out)."),
    steps: int = typer.Option(_C.steps, min=1, help="AR pretraining steps."),
    mdm_steps: int = typer.Option(_C.mdm_steps, min=1, help="MDM pretraining steps."),
    sft_steps: int = typer.Option(_C.sft_steps, min=1, help="Fine-tuning steps of each model."),
    sft_lr: float = typer.Option(_C.sft_lr, help="Fine-tuning peak learning rate."),
    cfg_dropout: float = typer.Option(_C.cfg_dropout, help="CFG dropout of the standard-CFG fine-tuned MDM (one with 0 is always trained)."),
    cfg_scales: str = typer.Option(",".join(f"{w:g}" for w in _C.cfg_scales), help="MDM guidance scales w to evaluate at."),
    seeds: str = typer.Option(",".join(map(str, _C.seeds)), help="Comma-separated training seeds; the table reports mean and spread over them."),
    distractors: int = typer.Option(_C.distractors, min=1, help="Wrong answers each correct one is ranked against."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
    log_to: Optional[List[str]] = log_to_option(),
) -> None:
    """Pretrain MDM and AR, fine-tune both on question/answer pairs; accuracy and likelihood against the guidance scale."""
    from unmask.experiments import conditional as experiment

    settings = experiment.Settings(facts_per_direction=facts, steps=steps, mdm_steps=mdm_steps, sft_steps=sft_steps, sft_lr=sft_lr, cfg_dropout=cfg_dropout,
                                   cfg_scales=_floats(cfg_scales, "--cfg-scales"), seeds=_ints(seeds, "--seeds"), distractors=distractors)
    experiment.run(out, settings, facts_file, device=device, log_to=tracker_names(log_to))
    typer.echo(f"wrote {out}/results.md, results.json and conditional.png", err=True)


@experiment_app.command("shift")
def shift(
    out: Path = typer.Option(Path("runs/experiments/shift"), help="Results folder."),
    shifted: Optional[List[Path]] = typer.Option(None, help="Local text (.txt, .jsonl or a folder) to score as shifted data; repeatable."),
    milton: bool = typer.Option(True, help="Also score the shipped Milton texts."),
    steps: int = typer.Option(800, min=1, help="Training steps of the MDM and the full-length AR run."),
    ar_fractions: str = typer.Option("0.25,0.5", help="Lengths of the extra AR runs, as fractions of --steps (equal-loss comparison)."),
    vocab_size: int = typer.Option(1024, min=0, help="BPE size trained on the corpus; 0: the shipped 4096-token tokenizer."),
    draws: int = typer.Option(16, min=2, help="Monte Carlo draws of the MDM bound."),
    windows: int = typer.Option(64, min=1, help="Windows scored per corpus."),
    chain_rule: bool = typer.Option(True, help="Also score the MDM with the exact left-to-right chain rule."),
    seed: int = typer.Option(0, min=0, help="Training seed."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
    log_to: Optional[List[str]] = log_to_option(),
) -> None:
    """Train MDM and AR on Shakespeare; relative NLL increase on shifted text at equal compute and equal loss."""
    from unmask.experiments import shift as experiment

    settings = experiment.Settings(vocab_size=vocab_size, steps=steps, ar_fractions=_floats(ar_fractions, "--ar-fractions"), eval_draws=draws,
                                   eval_windows=windows, chain_rule=chain_rule, seed=seed)
    experiment.run(out, settings, shifted or [], milton, device=device, log_to=tracker_names(log_to))
    typer.echo(f"wrote {out}/results.md, results.json and shift.png", err=True)


@experiment_app.command("reversal")
def reversal(
    out: Path = typer.Option(Path("runs/experiments/reversal"), help="Results folder."),
    pairs: int = typer.Option(32, help="Random token pairs (A, B), trained only as 'A r B'; chance is 1/pairs."),
    inverse_pairs: int = typer.Option(0, help="Other pairs trained only as \"D r' C\" (0: the second relation r' is never seen)."),
    layouts: str = typer.Option("isolated", help="Comma-separated: isolated (one fact per row), packed (facts back to back in windows)."),
    layers: str = typer.Option("1,2", help="Comma-separated numbers of layers."),
    positions: str = typer.Option("rope,absolute", help="Comma-separated: rope (rotary), absolute (learned embeddings)."),
    seeds: str = typer.Option("0,1,2", help="Comma-separated seeds; each draws its own pairs and initialisation."),
    steps: int = typer.Option(2000, help="Training steps of each model."),
    lr: float = typer.Option(1e-2, help="Peak learning rate of both models."),
    batch_size: int = typer.Option(32, help="Rows (isolated) or windows (packed) per step."),
    n_embd: int = typer.Option(64, help="Model width."),
    n_head: int = typer.Option(4, help="Attention heads."),
    context_len: int = typer.Option(16, help="Window length of the packed layout (isolated rows are 5 tokens)."),
    repeats: int = typer.Option(50, help="Copies of each fact in the packed stream."),
    eval_points: int = typer.Option(10, help="Checkpoints scored along training (plus step 0)."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
    log_to: Optional[List[str]] = log_to_option(),
) -> None:
    """Random token pairs learned as 'A r B', asked as 'B r [M]': MDM vs AR, layers, rotary vs absolute positions."""
    from unmask.experiments import reversal as experiment

    settings = experiment.Settings(pairs=pairs, inverse_pairs=inverse_pairs, repeats=repeats, layouts=tuple(v.strip() for v in layouts.split(",") if v.strip()),
                                   layers=_ints(layers, "--layers"), positions=tuple(v.strip() for v in positions.split(",") if v.strip()),
                                   seeds=_ints(seeds, "--seeds"), n_embd=n_embd, n_head=n_head, context_len=context_len, steps=steps,
                                   batch_size=batch_size, lr=lr, eval_points=eval_points)
    experiment.run(out, settings, device=device, log_to=tracker_names(log_to))
    typer.echo(f"wrote {out}/results.md, results.json and reversal.png", err=True)

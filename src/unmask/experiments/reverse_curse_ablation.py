"""An ablation grid of the reverse-curse fact experiment (:mod:`unmask.experiments.reverse_curse`).

Every point of the grid changes ONE factor of a base configuration in which the MDM learns the
facts in the direction it saw (packed, the facts alone, 2 layers): the text (the facts alone or
mixed with Shakespeare), depth, width, repeats, paraphrases, learning rate, its schedule, and the
MDM's estimator (k-DCE or t-DCE). The AR model trains only at the control points (``ar_points``).
Each trained model is then asked its questions under several evaluations
(:mod:`unmask.experiments.answer_variants`), which cost no training: the answer's length told or
not, the reverse prompt's canvas, and the order of the chain rule that ranks the answers.

The runs share one resumable grid (:func:`unmask.experiments.runner.run_grid`), one corpus per
distinct data setting under ``OUT/corpora``; results.json, results.md and ablation.png hold
one row per run: the steps, the seen direction's exact match (convergence), the reverse
direction's scores under every evaluation, and the one-sided binomial p-value of its top-1
count against chance.
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from unmask.errors import OptionError, not_one_of
from unmask.experiments import reverse_curse as rc
from unmask.experiments.runner import RunSpec, md_table, pyplot, run_grid, save_figure, write_outputs

BASE = rc.Settings(n_layer=2, context_len=32, steps=4000, text_chars=0, seeds=(0,), cfg_scales=(0.0,))

# (name, factor, the settings it changes from the base)
POINTS: tuple[tuple[str, str, dict[str, Any]], ...] = (
    ("base", "base", {}),
    ("mixed", "text", {"text_chars": 200_000}),
    ("mixed-12k", "text", {"text_chars": 200_000, "steps": 12_000}),
    ("depth1", "depth", {"n_layer": 1}),
    ("depth4", "depth", {"n_layer": 4}),
    ("width64", "width", {"n_embd": 64}),
    ("width256", "width", {"n_embd": 256}),
    ("repeats5", "repeats", {"repeats": 5}),
    ("paraphrases1", "paraphrases", {"paraphrases": 1}),
    ("lr1e-3", "learning rate", {"lr": 1e-3}),
    ("lr4e-3", "learning rate", {"lr": 4e-3}),
    ("constant-lr", "schedule", {"min_lr_ratio": 1.0}),
    ("t-dce", "objective", {"loss": "t-dce"}),
    ("context64", "context", {"context_len": 64}),
)
_DATA_FIELDS = ("text_chars", "repeats", "paraphrases", "facts_per_direction", "data_seed", "vocab_size")


@dataclass(frozen=True)
class Settings:
    """The grid: the base configuration, the points run (names of :data:`POINTS`), the points with an
    AR control, their seeds, and the evaluation's knobs."""

    base: rc.Settings = BASE
    points: tuple[str, ...] = tuple(p[0] for p in POINTS)
    ar_points: tuple[str, ...] = ("base", "mixed")
    seeds: tuple[int, ...] = (0,)
    slack: int = 4  # MASK positions after the answer when its length is not told
    elbo_draws: int = 16  # Monte Carlo draws of the any-order bound per answer
    overrides: tuple[tuple[str, str, Any], ...] = ()  # (point, field, value): e.g. more steps for one point
    more_seeds: tuple[tuple[str, int], ...] = ()  # (point, seed): further MDM runs of a point with another seed

    def __post_init__(self) -> None:
        known = [p[0] for p in POINTS]
        for name in (*self.points, *self.ar_points, *(o[0] for o in self.overrides), *(m[0] for m in self.more_seeds)):
            if name not in known:
                raise not_one_of("points", name, known)
        if not self.points:
            raise OptionError("points", "{points} must name at least one point of the grid")
        if not self.seeds:
            raise OptionError("seeds", "{seeds} must name at least one seed")
        if self.slack < 1:
            raise OptionError("slack", "{slack}={_v} must be at least 1 (MASK positions after the answer)", _v=self.slack)
        if self.elbo_draws < 2:
            raise OptionError("elbo_draws", "{elbo_draws}={_v} must be at least 2 (for a standard error)", _v=self.elbo_draws)
        for point in known:
            self.settings(point)  # every point's settings are valid

    def settings(self, point: str) -> rc.Settings:
        """The reverse-curse settings of ``point``: the base with its factor (and any override) changed."""
        changes = dict(next(p[2] for p in POINTS if p[0] == point))
        changes.update({f: v for name, f, v in self.overrides if name == point})
        return replace(self.base, **changes, seeds=self.seeds)


def factor_of(point: str) -> str:
    return next(p[1] for p in POINTS if p[0] == point)


def data_key(settings: rc.Settings) -> str:
    """The name of the corpus a point trains on: its data settings (points that share them share it)."""
    return "-".join(f"{f}{getattr(settings, f)}" for f in _DATA_FIELDS)


def specs_for(grid: Settings, corpora: dict[str, tuple[Path, int]]) -> list[RunSpec]:
    """The MDM run of every point and seed (``more_seeds`` included), and the AR run of every ``ar_points`` point and seed; ``corpora``:
    data key -> (data folder, vocabulary size)."""
    specs = []
    for point in grid.points:
        s = grid.settings(point)
        data, vocab = corpora[data_key(s)]
        more = [seed for name, seed in grid.more_seeds if name == point and seed not in grid.seeds]
        for seed in (*grid.seeds, *more):
            for kind in ("mdm", "ar") if point in grid.ar_points and seed not in more else ("mdm",):
                specs.append(RunSpec(f"{point}-{kind}-seed{seed}", s.model_config("reverse-curse", vocab, kind),
                                     s.train_config(kind, s.steps, seed, **s.training(kind)), str(data),
                                     {"point": point, "factor": factor_of(point), "kind": kind, "seed": seed, "slack": grid.slack,
                                      "elbo_draws": grid.elbo_draws, "distractors": s.distractors, "data_seed": s.data_seed}))
    return specs


# (metric name, order, canvas) of the rankings; an AR model has only its own order
RANKINGS = (("top1", "left-to-right", "eos"), ("top1_r2l", "right-to-left", "eos"), ("top1_any", "any-order", "eos"),
            ("top1_no_eos", "left-to-right", "no-eos"), ("top1_closed", "left-to-right", "closed"))


def _ranked_first(scores: list[float], answers: list[list[list[int]]]) -> list[float]:
    """Per question, 1.0 where no distractor scores above the correct answer (the first candidate): rank 1,
    as :func:`unmask.experiments.reverse_curse.evaluate_run` counts it."""
    out, k = [], 0
    for cands in answers:
        block = scores[k : k + len(cands)]
        k += len(cands)
        out.append(float(not any(s > block[0] for s in block[1:])))
    return out


def evaluate(run_dir: Path, facts, settings: rc.Settings, grid: Settings, device: str = "auto") -> dict[str, Any]:
    """Per direction: exact match with the answer's length told and not told, top-1 under every ranking of
    :data:`RANKINGS`, the left-to-right mean log p per answer token, and the number of questions."""
    from unmask.checkpoint import checkpoint_tokenizer, load_model
    from unmask.device import pick_device
    from unmask.experiments.answer_variants import complete_untold, score_answers
    from unmask.experiments.answers import complete

    model, cfg = load_model(run_dir, pick_device(device))
    tok = checkpoint_tokenizer(run_dir)
    qs, prompts, answers = rc.question_ids(facts, settings, tok)
    pairs = [(p, a) for p, cands in zip(prompts, answers) for a in cands]
    closing = [*tok.encode("."), tok.eos_id]
    per_question: dict[str, list[float]] = {}
    for metric, order, canvas in RANKINGS:
        if cfg.model.causal and order != "left-to-right":
            continue
        scores = score_answers(model, pairs, tok.eos_id, order, canvas, closing, draws=grid.elbo_draws, seed=settings.data_seed)
        per_question[metric] = _ranked_first(scores, answers)
        if metric == "top1":
            starts = [0, *itertools.accumulate(len(c) for c in answers)][:-1]  # each question's correct answer
            per_question["logp_per_token"] = [scores[k] / len(c[0]) for k, c in zip(starts, answers)]
    lengths = [len(cands[0]) for cands in answers]
    per_question["em"] = [float(f == c[0]) for f, c in zip(complete(model, prompts, lengths, tok.eos_id), answers)]
    untold = complete_untold(model, prompts, lengths, tok.eos_id, tok.decode, grid.slack)
    per_question["em_untold"] = [float(text == q.answer) for text, q in zip(untold, qs)]
    result: dict[str, Any] = {}
    for direction in ("same", "reverse"):
        idx = [i for i, q in enumerate(qs) if q.direction == direction]
        result[direction] = {m: sum(v[i] for i in idx) / len(idx) for m, v in per_question.items()}
        result[direction]["questions"] = len(idx)
    return result


def p_above_chance(hits: int, n: int, chance: float) -> float:
    """One-sided binomial p-value P(X >= hits) of ``hits`` top-1 answers among ``n`` questions at ``chance``."""
    from fractions import Fraction

    from unmask.experiments.reversal import binomial_tail

    return binomial_tail(hits, n, Fraction(chance).limit_denominator(1000))


def _changed(grid: Settings, point: str) -> str:
    """The point's settings that differ from the base, in words ("n_layer=1"), or "-"."""
    s, base = grid.settings(point), replace(grid.base, seeds=grid.seeds)
    return ", ".join(f"{f}={getattr(s, f)}" for f in s.__dataclass_fields__ if getattr(s, f) != getattr(base, f)) or "-"


def summarise(records: list[dict], grid: Settings) -> list[dict]:
    """One row per run: the point, what it changes, the model, seed, steps, every metric of both directions,
    and the p-value of the reverse left-to-right top-1 count against chance."""
    rows = []
    for r in records:
        meta, result = r["spec"]["meta"], r["result"]
        s = grid.settings(meta["point"])
        n = result["reverse"]["questions"]
        row = {"point": meta["point"], "factor": meta["factor"], "changed": _changed(grid, meta["point"]), "model": meta["kind"].upper(),
               "seed": meta["seed"], "steps": r["spec"]["train"]["steps"], "questions": n,
               **{f"{d}_{m}": v for d in ("same", "reverse") for m, v in result[d].items() if m != "questions"}}
        row["reverse_top1_p"] = p_above_chance(round(row["reverse_top1"] * n), n, s.chance)
        rows.append(row)
    return rows


def pooled(rows: list[dict], chance: float) -> dict[str, tuple[int, int, float]]:
    """The MDM runs' reverse top-1 under every ranking, pooled: (hits, questions, one-sided p against chance)."""
    mdm = [r for r in rows if r["model"] == "MDM"]
    out = {}
    for metric, _, _ in RANKINGS:
        hits, n = sum(round(r[f"reverse_{metric}"] * r["questions"]) for r in mdm), sum(r["questions"] for r in mdm)
        out[metric] = (hits, n, p_above_chance(hits, n, chance))
    return out


def _f(v: Any) -> str:
    return "-" if v is None else f"{v:.3f}"


def markdown(grid: Settings, rows: list[dict], source: str) -> str:
    chance = grid.base.chance
    lines = ["# Reverse curse: ablation grid", "",
             f"Facts: {source}. Base: {grid.base.described()}, packed, the facts alone ({grid.base.paraphrases} paraphrases x "
             f"{grid.base.repeats}), {grid.base.loss}, lr floor x{grid.base.min_lr_ratio:g}; each point changes one factor. "
             f"Seeds {list(grid.seeds)}" + "".join(f"; {point} also seed {seed}" for point, seed in grid.more_seeds) + f". Chance top-1 = {chance:.3f} ({grid.base.distractors} distractors).", "",
             "EM: greedy exact match, the answer's length told (the canvas holds its tokens) / not told "
             f"({grid.slack} more positions; the text before the first EOS or full stop). Top-1 of the reverse direction: "
             "l2r = exact left-to-right chain rule on [EOS ; prompt ; answer]; r2l = right to left; any = the MDM's any-order bound "
             f"({grid.elbo_draws} draws); no-eos = l2r without the leading EOS; closed = l2r with '.' and EOS given after the answer. "
             "p: one-sided binomial p-value of the reverse l2r top-1 count against chance.", ""]
    header = ["point", "changed", "model", "seed", "steps", "same EM told / untold", "same top-1", "reverse EM told / untold",
              "reverse top-1 l2r", "r2l", "any", "no-eos", "closed", "p"]
    table = [[r["point"], r["changed"], r["model"], r["seed"], r["steps"], f"{r['same_em']:.3f} / {r['same_em_untold']:.3f}", _f(r["same_top1"]),
              f"{r['reverse_em']:.3f} / {r['reverse_em_untold']:.3f}", _f(r["reverse_top1"]), _f(r.get("reverse_top1_r2l")),
              _f(r.get("reverse_top1_any")), _f(r["reverse_top1_no_eos"]), _f(r["reverse_top1_closed"]), f"{r['reverse_top1_p']:.3g}"]
             for r in rows]
    lines += [md_table(header, table), "", "Every MDM run pooled, reverse top-1 per ranking (hits / questions, p against chance):", ""]
    lines.append(md_table(["ranking", "hits", "questions", "top-1", "p"],
                          [[m, h, n, f"{h / n:.3f}", f"{p:.3g}"] for m, (h, n, p) in pooled(rows, chance).items()]))
    lines += ["", "![reverse top-1 by run and ranking](ablation.png)"]
    return "\n".join(lines)


def _plot(rows: list[dict], chance: float, path: Path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(2, 1, figsize=(12, 7.5), sharex=True)
    labels = [f"{r['point']} {r['model']} s{r['seed']}" for r in rows]
    x = range(len(rows))
    for offset, (key, label) in zip((-0.2, 0.2), (("same_em", "told"), ("same_em_untold", "not told"))):
        axes[0].bar([i + offset for i in x], [r[key] for r in rows], 0.4, label=f"length {label}")
    axes[0].set(ylim=(0, 1.05), title="seen direction: exact match")
    width = 0.8 / len(RANKINGS)
    for j, (metric, order, canvas) in enumerate(RANKINGS):
        values = [r.get(f"reverse_{metric}") or 0.0 for r in rows]
        axes[1].bar([i - 0.4 + (j + 0.5) * width for i in x], values, width, label=f"{order}, {canvas}")
    axes[1].axhline(chance, color="grey", ls=":", label="chance")
    axes[1].set(ylim=(0, 1.05), title="reverse direction: top-1 among distractors")
    axes[1].set_xticks(list(x), labels, rotation=40, fontsize=8, ha="right")
    for ax in axes:
        ax.legend(fontsize=7, ncol=3)
    save_figure(fig, path)


def run(out_dir: str | Path, grid: Settings = Settings(), device: str = "auto", progress: bool = True, log_to: tuple[str, ...] = ()) -> dict:
    """Prepare the corpora (once each), train the grid (resumably), evaluate every run and write results.json,
    results.md and ablation.png."""
    out = Path(out_dir)
    corpora, facts, source = {}, None, ""
    for point in grid.points:
        s = grid.settings(point)
        if data_key(s) not in corpora:
            facts, source, data, tok = rc.facts_corpus(out / "corpora" / data_key(s), s, None)
            corpora[data_key(s)] = (data.resolve(), tok.vocab_size)
            rc.check_questions_fit(facts, s, tok)
    rc.facts_mod.write_facts(out / "facts.jsonl", facts)
    records = run_grid(out, specs_for(grid, corpora), lambda spec, run_dir: evaluate(run_dir, facts, grid.settings(spec.meta["point"]), grid, device),
                       device=device, progress=progress, chunk=grid.base.chunk, desc="reverse-curse ablation", log_to=log_to)
    rows = summarise(records, grid)
    _plot(rows, grid.base.chance, out / "ablation.png")
    result = {"experiment": "reverse-curse-ablation", "settings": asdict(grid), "facts": source, "runs": records, "summary": rows,
              "pooled": pooled(rows, grid.base.chance)}
    write_outputs(out, result, markdown(grid, rows, source))
    return result

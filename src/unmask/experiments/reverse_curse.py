"""The reverse curse (SMDM; Berglund et al.): facts seen in one direction, asked in the other.

Data: the facts of :mod:`unmask.experiments.facts` (synthetic, or the user's JSONL), each in
its paraphrases repeated ``repeats`` times, mixed with passages of the embedded Shakespeare
corpus as ordinary text, tokenised with a BPE of ``vocab_size`` tokens trained on that mixture.
Models: an MDM and an AR model trained FROM SCRATCH on it with the same recipe, for each seed.

Layout of the training data (``layout``):

* ``packed`` (the default): the documents packed back to back into windows of ``context_len``
  tokens and trained as text (``unmask.objectives.mdm`` / ``ar``), as pretraining does; a fact's
  last words then also stand just before the next document's first ones;
* ``rows``: one document per training row, ``[EOS ; document ; EOS pads]``, a pairs folder
  (``unmask.data.pairs``) with an empty prompt trained by fine-tuning's loop (``sft``), as
  ``unmask experiment reversal`` trains its ``isolated`` layout: each paraphrase of each fact (and
  each piece of the Shakespeare text, cut at words to fit a row) is its own row, so nothing
  unrelated stands beside a fact. The MDM's answer likelihoods are then scored on rows of the
  training length (the positions after the answer MASK, marginalised).

Evaluation, per question ("<A> is" -> "<B>"), in the direction seen in training and the reverse:

* exact match of the greedy completion of the answer's length (AR: argmax left to right; MDM:
  confidence decoding at temperature 0, one token per call, at guidance scales w);
* rank of log p(answer | prompt) among the correct answer and ``distractors`` answers of other
  facts of the same kind (names or descriptions): top-1 accuracy (chance 1 / (1 + distractors))
  and mean rank. AR: exact; MDM: exact left-to-right chain rule, at each w;
* the mean log p(correct answer | prompt) per answer token.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from unmask.errors import OptionError, check_number, not_one_of
from unmask.experiments import facts as facts_mod
from unmask.experiments.answers import answer_logprobs, complete
from unmask.experiments.recipe import SmallModel
from unmask.experiments.runner import RunSpec, md_table, pyplot, run_grid, save_figure, seed_rows, write_outputs


@dataclass(frozen=True)
class FactSettings(SmallModel):
    """What the facts experiments (this one and :mod:`unmask.experiments.conditional`) share besides the
    model: the corpus of :func:`prepare`, the training seeds and the evaluation."""

    facts_per_direction: int = 20
    repeats: int = 20  # copies of each paraphrase in the training text
    text_chars: int = 200_000  # characters of Shakespeare mixed in as ordinary text
    seeds: tuple[int, ...] = (0, 1)
    distractors: int = 7
    cfg_scales: tuple[float, ...] = (0.0, 0.5, 1.0, 2.0, 3.0)
    data_seed: int = 0
    paraphrases: int = len(facts_mod.TEMPLATES["n2d"])  # how many of the paraphrase templates the training text uses (the first is the plain one)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_number("paraphrases", self.paraphrases, f"[1, {len(facts_mod.TEMPLATES['n2d'])}]")
        if not self.seeds:
            raise OptionError("seeds", "{seeds} must name at least one seed")
        if not self.cfg_scales:
            raise OptionError("cfg_scales", "{cfg_scales} must name at least one guidance scale")
        for w in self.cfg_scales:
            check_number("cfg_scales", w, ">= 0")
        check_number("distractors", self.distractors, ">= 1")

    @property
    def chance(self) -> float:
        """The top-1 accuracy of a guess among the correct answer and its distractors."""
        return 1 / (1 + self.distractors)


LAYOUTS = ("packed", "rows")
LOSSES = ("k-dce", "t-dce")


@dataclass(frozen=True)
class Settings(FactSettings):
    """The experiment's settings: the shared ones, further MDM runs and the layout of the training data."""

    extra_mdm_steps: tuple[int, ...] = ()  # further MDM runs trained this many steps (more compute than the AR model)
    layout: str = "packed"  # packed: documents packed into windows; rows: one document per training row
    loss: str = "k-dce"  # the MDM's estimator of its bound (docs/algorithms.md, 'MDM loss: t-DCE and k-DCE')
    min_lr_ratio: float = 0.1  # the cosine decays the learning rate to lr x this (1: constant after warmup)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_number("text_chars", self.text_chars, ">= 0")
        check_number("min_lr_ratio", self.min_lr_ratio, "[0, 1]")
        if self.layout not in LAYOUTS:
            raise not_one_of("layout", self.layout, LAYOUTS)
        if self.loss not in LOSSES:
            raise not_one_of("loss", self.loss, LOSSES)
        if any(n <= 0 for n in self.extra_mdm_steps):
            raise OptionError("extra_mdm_steps", "{extra_mdm_steps} {_steps} must be positive step counts", _steps=list(self.extra_mdm_steps))

    def training(self, kind: str) -> dict[str, Any]:
        """The :class:`~unmask.config.TrainConfig` settings of a run of ``kind`` (mdm, ar) beyond the recipe's: the
        learning-rate floor, and the MDM's estimator where it is not the objective's default (k-DCE)."""
        extra: dict[str, Any] = {"min_lr_ratio": self.min_lr_ratio}
        if kind == "mdm" and self.loss != "k-dce":
            extra["loss"] = self.loss
        return extra


def _text_documents(chars: int) -> list[str]:
    """Paragraphs of the embedded corpus's training works, up to ``chars`` characters."""
    from unmask.data import shakespeare_works

    docs, total = [], 0
    for _, text in shakespeare_works("train"):
        for para in text.split("\n\n"):
            if total >= chars:
                return docs
            if para.strip():
                docs.append(para.strip())
                total += len(para)
    return docs


def prepare(out: Path, settings: FactSettings, facts: list[facts_mod.Fact]) -> Path:
    """OUT/data: facts x paraphrases x repeats + ordinary text, shuffled (train); a few passages (val)."""
    from unmask.data import prepare_dataset, shakespeare_works, train_bpe

    data = out / "data"
    if (data / "meta.json").is_file():
        return data
    rng = random.Random(settings.data_seed)
    docs = facts_mod.fact_documents(facts, settings.paraphrases) * settings.repeats + _text_documents(settings.text_chars)
    rng.shuffle(docs)
    val = [p.strip() for p in shakespeare_works("validation")[0][1].split("\n\n") if p.strip()][:200]
    tok = train_bpe(docs + val, vocab_size=settings.vocab_size)
    return prepare_dataset(data, tok, docs, val, progress=False)


def _row_pieces(tok, texts: list[str], limit: int) -> list[str]:
    """The ``texts`` cut at spaces into pieces of at most ``limit`` tokens each (a single longer word is left out)."""
    pieces = []
    for text in texts:
        words: list[str] = []
        for word in text.split():
            if words and len(tok.encode(" ".join([*words, word]))) > limit:
                pieces.append(" ".join(words))
                words = []
            words.append(word)
        if words:
            pieces.append(" ".join(words))
    return [p for p in pieces if len(tok.encode(p)) <= limit]


def prepare_rows(out: Path, settings: FactSettings, facts: list[facts_mod.Fact]) -> Path:
    """OUT/data-rows (made once): the documents of :func:`prepare` (same BPE recipe), one per row of a pairs folder
    with an empty prompt, rows of at most ``context_len`` tokens (text cut at words to fit)."""
    from unmask.data import shakespeare_works, train_bpe
    from unmask.data.pairs import Pair, prepare_pairs

    data = out / "data-rows"
    if (data / "pairs.json").is_file():
        return data
    rng = random.Random(settings.data_seed)
    fact_docs = facts_mod.fact_documents(facts, settings.paraphrases) * settings.repeats
    text_docs = _text_documents(settings.text_chars)
    docs = fact_docs + text_docs
    rng.shuffle(docs)
    val = [p.strip() for p in shakespeare_works("validation")[0][1].split("\n\n") if p.strip()][:200]
    tok = train_bpe(docs + val, vocab_size=settings.vocab_size)
    limit = settings.context_len - 2  # the row's EOS before and one EOS pad after
    longest = max(len(tok.encode(d)) for d in fact_docs)
    if longest > limit:
        raise OptionError("context_len", "{context_len}={_len}: the longest fact takes {_longest} tokens, a row {_row}; use {context_len} "
                          "{_row} or more", _len=settings.context_len, _longest=longest, _row=longest + 2)
    train = fact_docs + _row_pieces(tok, text_docs, limit)
    rng.shuffle(train)
    held_out = _row_pieces(tok, val, limit)[:200]
    return prepare_pairs(data, tok, [Pair("", d) for d in train], [Pair("", d) for d in held_out], max_length=settings.context_len)


def facts_corpus(out: Path, settings: FactSettings, facts_file: str | Path | None):
    """(facts, their source, OUT/data, its tokenizer): the facts (written to OUT/facts.jsonl) and the
    corpus of :func:`prepare`, made once (with ``layout`` "rows": OUT/data-rows of :func:`prepare_rows`)."""
    from unmask.data import TokenDataset
    from unmask.data.pairs import PairDataset

    out.mkdir(parents=True, exist_ok=True)
    facts, source = facts_mod.load_facts(facts_file, settings.facts_per_direction, settings.data_seed)
    facts_mod.write_facts(out / "facts.jsonl", facts)
    if getattr(settings, "layout", "packed") == "rows":
        data = prepare_rows(out, settings, facts)
        return facts, source, data, PairDataset(data, "train").tokenizer
    data = prepare(out, settings, facts)
    return facts, source, data, TokenDataset(data, "train").tokenizer


def specs_for(settings: Settings, data: Path, vocab: int) -> list[RunSpec]:
    """An MDM and an AR run per seed; ``meta`` records the evaluation settings, so a finished run is
    reused only when they are the same. Layout "rows": the runs fine-tune on the pairs folder, named ``rows-...``."""
    evaluation = {"distractors": settings.distractors, "cfg_scales": list(settings.cfg_scales), "data_seed": settings.data_seed}
    rows = settings.layout == "rows"
    if rows:
        evaluation["layout"] = "rows"
    specs = []
    runs = [("mdm", settings.steps, ""), ("ar", settings.steps, ""), *(("mdm", n, f"-{n}steps") for n in settings.extra_mdm_steps)]
    for seed in settings.seeds:
        for kind, steps, suffix in runs:
            train = settings.train_config(kind, steps, seed, **settings.training(kind), **({"sft": True} if rows else {}))
            specs.append(RunSpec(f"{'rows-' if rows else ''}{kind}-seed{seed}{suffix}", settings.model_config("reverse-curse", vocab, kind),
                                 train, str(data), {"kind": kind, "seed": seed, **evaluation}))
    return specs


def question_ids(facts: list[facts_mod.Fact], settings: FactSettings, tok) -> tuple[list[facts_mod.Question], list[list[int]], list[list[list[int]]]]:
    """(questions, their prompts' ids, per question the ids of [correct answer, distractors...]): the
    distractors are answers of other facts of the same kind, drawn from the ``data_seed``."""
    qs = facts_mod.questions(facts)
    rng = random.Random(settings.data_seed + 1)
    candidates = []  # per question: [correct answer, distractors...]
    for q in qs:
        others = [getattr(f, q.asks) for j, f in enumerate(facts) if j != q.fact]
        candidates.append([q.answer, *rng.sample(others, min(settings.distractors, len(others)))])
    return qs, [tok.encode(q.prompt) for q in qs], [[tok.encode(" " + a) for a in cands] for cands in candidates]


def evaluate_run(run_dir: Path, facts: list[facts_mod.Fact], settings: Settings, device: str = "auto", row_length: int | None = None) -> dict[str, Any]:
    """Exact match, ranking and log-likelihood per direction (and per guidance scale for an MDM); ``row_length``: an
    MDM trained on rows of this length scores its answers on rows of it (``answer_logprobs``'s ``pad_to``)."""
    from unmask.checkpoint import checkpoint_tokenizer, load_model
    from unmask.device import pick_device

    model, cfg = load_model(run_dir, pick_device(device))
    tok = checkpoint_tokenizer(run_dir)
    qs, prompts, answers = question_ids(facts, settings, tok)
    scales = (0.0,) if cfg.model.causal else settings.cfg_scales
    result: dict[str, Any] = {}
    for w in scales:
        pairs = [(p, a) for p, cands in zip(prompts, answers) for a in cands]
        logp = answer_logprobs(model, pairs, tok.eos_id, cfg_scale=w, pad_to=row_length)
        fills = complete(model, prompts, [len(cands[0]) for cands in answers], tok.eos_id, cfg_scale=w)
        per_dir: dict[str, dict[str, list[float]]] = {"same": {}, "reverse": {}}
        k = 0
        for q, cands, fill in zip(qs, answers, fills):
            scores = logp[k : k + len(cands)]
            k += len(cands)
            rank = 1 + sum(s > scores[0] for s in scores[1:])
            bucket = per_dir[q.direction]
            bucket.setdefault("exact_match", []).append(float(fill == cands[0]))
            bucket.setdefault("rank_top1", []).append(float(rank == 1))
            bucket.setdefault("mean_rank", []).append(float(rank))
            bucket.setdefault("answer_logprob_per_token", []).append(scores[0] / len(cands[0]))
        result[f"w={w:g}"] = {d: {m: sum(v) / len(v) for m, v in metrics.items()} for d, metrics in per_dir.items()}
    return result


def summarise(records: list[dict], settings: Settings) -> list[dict]:
    """One row per (model, w): mean and standard deviation over seeds of every metric."""
    rows = []
    groups = sorted({(r["spec"]["meta"]["kind"], r["spec"]["train"]["steps"]) for r in records}, key=lambda g: (g[0] != "ar", g[1]))
    for kind, steps in groups:
        runs = [r for r in records if r["spec"]["meta"]["kind"] == kind and r["spec"]["train"]["steps"] == steps]
        label = kind.upper() if steps == settings.steps else f"{kind.upper()} {steps} steps"
        rows += seed_rows(label, runs, lambda result: {f"{d}_{m}": v for d in ("same", "reverse") for m, v in result[d].items()}, steps=steps)
    return rows


def markdown(settings: Settings, rows: list[dict], source: str, num_facts: int) -> str:
    lines = ["# Reverse curse: MDM vs AR", "",
             f"Facts: {source}; {num_facts // 2} per direction, {settings.paraphrases} paraphrases each, "
             f"x{settings.repeats}, mixed with {settings.text_chars:,} characters of Shakespeare"
             + ("; one document per training row (layout rows)" if settings.layout == "rows" else "")
             + ". Models trained from scratch "
             f"({settings.described()}"
             + (f"; further MDM runs of {', '.join(map(str, settings.extra_mdm_steps))} steps" if settings.extra_mdm_steps else "")
             + f"), seeds {list(settings.seeds)}. Values: mean +- sd over seeds.", "",
             "Exact match: greedy completion of the answer's length (AR argmax; MDM confidence decoding at temperature 0, one token per call, "
             f"guidance scale w). Rank: correct answer among {settings.distractors} distractors by log p(answer | prompt) (MDM: exact left-to-right "
             f"chain rule); top-1 chance = {settings.chance:.3f}, mean-rank chance = {(settings.distractors + 2) / 2:.1f}.", ""]

    def fmt(v):
        return f"{v[0]:.3f} +- {v[1]:.3f}"

    table = [[r["model"], r["cfg"], fmt(r["same_exact_match"]), fmt(r["reverse_exact_match"]), fmt(r["same_rank_top1"]),
              fmt(r["reverse_rank_top1"]), fmt(r["reverse_mean_rank"]), fmt(r["same_answer_logprob_per_token"]),
              fmt(r["reverse_answer_logprob_per_token"])] for r in rows]
    lines.append(md_table(["model", "guidance", "same EM", "reverse EM", "same top-1", "reverse top-1", "reverse mean rank",
                           "same log p/token", "reverse log p/token"], table))
    lines += ["", "![accuracy by direction](reverse_curse.png)"]
    return "\n".join(lines)


def _plot(rows: list[dict], settings: Settings, path: Path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    labels = [f"{r['model']} {r['cfg']}" if r["model"].startswith("MDM") else r["model"] for r in rows]
    x = range(len(rows))
    for ax, metric, title in ((axes[0], "exact_match", "exact match"), (axes[1], "rank_top1", "top-1 among distractors")):
        for offset, direction in ((-0.2, "same"), (0.2, "reverse")):
            means = [r[f"{direction}_{metric}"][0] for r in rows]
            sds = [r[f"{direction}_{metric}"][1] for r in rows]
            ax.bar([i + offset for i in x], means, 0.4, yerr=sds, label=f"{direction} direction")
        if metric == "rank_top1":
            ax.axhline(settings.chance, color="grey", ls=":", label="chance")
        ax.set_xticks(list(x), labels, rotation=30, fontsize=8)
        ax.set(ylim=(0, 1.05), title=title)
        ax.legend(fontsize=8)
    save_figure(fig, path)


def check_questions_fit(facts: list[facts_mod.Fact], settings: FactSettings, tok) -> None:
    """Refuse a ``context_len`` shorter than the longest [EOS ; question ; answer] row (any candidate answer)."""
    longest = max(1 + len(tok.encode(q.prompt)) + len(tok.encode(" " + getattr(f, q.asks))) for q in facts_mod.questions(facts) for f in facts)
    if longest > settings.context_len:
        raise OptionError("context_len", "{context_len}={_len}: the longest question with its answer takes {_longest} tokens; "
                          "use {context_len} {_longest} or more (or shorter facts)", _len=settings.context_len, _longest=longest)


def run(out_dir: str | Path, settings: Settings = Settings(), facts_file: str | Path | None = None, device: str = "auto",
        progress: bool = True, log_to: tuple[str, ...] = ()) -> dict:
    """Prepare (once), train (resumably), evaluate and write results.json, results.md, reverse_curse.png; ``log_to``:
    the trackers of every run (:mod:`unmask.tracking`)."""
    out = Path(out_dir)
    facts, source, data, tok = facts_corpus(out, settings, facts_file)
    check_questions_fit(facts, settings, tok)
    specs = specs_for(settings, data.resolve(), tok.vocab_size)
    row_length = None
    if settings.layout == "rows":
        from unmask.data.pairs import PairDataset

        row_length = PairDataset(data, "train").length
    records = run_grid(out, specs, lambda spec, run_dir: evaluate_run(run_dir, facts, settings, device, row_length), device=device,
                       progress=progress, chunk=settings.chunk, desc="reverse-curse", log_to=log_to)
    rows = summarise(records, settings)
    _plot(rows, settings, out / "reverse_curse.png")
    result = {"experiment": "reverse-curse", "settings": asdict(settings), "facts": source, "num_facts": len(facts),
              "runs": records, "summary": rows}
    write_outputs(out, result, markdown(settings, rows, source, len(facts)))
    return result

"""Conditional generation (SMDM): fine-tuning on pairs and guided sampling, MDM vs AR.

Data: the fictional facts of :mod:`unmask.experiments.facts` (or the user's), each seen in one
direction in its paraphrases, mixed with Shakespeare (the reverse-curse corpus). Pretrained: an
MDM and an AR model trained from scratch on it. The task: questions in the direction seen in
pretraining, "Question: who is <A>? Answer:" -> "<B>". The facts are split in two halves (both
directions in each); fine-tuning (``unmask finetune``'s loop: prompt never masked, the response
EOS-padded to the row's end, loss per response token) sees the questions of one half, and every
model is evaluated on the other half, whose questions no model saw. Fine-tuned: the MDM with CFG
dropout 0 (guidance is then SMDM's unsupervised CFG) and with ``cfg_dropout`` (standard CFG),
and the AR model on the same pairs.

Evaluation per held-out question, at every guidance scale w for an MDM (AR: no guidance):

* accuracy: the greedy answer equals the reference. Fine-tuned models decode their whole response
  region and the answer is what precedes the first EOS. Pretrained models are asked in the form
  they were trained on, "<A> is", and decode exactly the answer's number of tokens (they never
  learned where an answer stops). AR: argmax. MDM: confidence decoding at temperature 0, one
  token per call, in two orders: the most confident position first ("any order"), and the
  leftmost first ("left to right", blocks of one token).
* conditional likelihood: log p(answer, EOS | prompt) per token (AR exact; MDM exact
  left-to-right chain rule with guidance w; a fine-tuned MDM's remaining pad positions are
  marginalised), and the rank of the correct answer among ``distractors`` answers of other
  held-out facts of the same kind.
"""

from __future__ import annotations

import itertools
import random
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from unmask.data.pairs import Pair, encode_pair, prepare_pairs
from unmask.errors import check_number
from unmask.experiments import facts as facts_mod
from unmask.experiments import reverse_curse
from unmask.experiments.answers import answer_logprobs, complete
from unmask.experiments.runner import RunSpec, md_table, pyplot, run_grid, save_figure, seed_rows, write_outputs


@dataclass(frozen=True)
class Settings(reverse_curse.FactSettings):
    """The corpus, model, seeds and evaluation of the reverse curse (``steps``: the AR model's pretraining),
    the MDM's pretraining and the fine-tuning."""

    steps: int = 600  # AR pretraining steps
    mdm_steps: int = 2400  # MDM pretraining steps (SMDM: an MDM needs several times the AR compute)
    sft_steps: int = 100
    sft_lr: float = 1e-4
    cfg_dropout: float = 0.1  # the standard-CFG fine-tuned MDM; a second one uses 0 (unsupervised CFG)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_number("mdm_steps", self.mdm_steps, ">= 1")
        check_number("sft_steps", self.sft_steps, ">= 1")
        check_number("sft_lr", self.sft_lr, "> 0")
        check_number("cfg_dropout", self.cfg_dropout, "(0, 1)", " (the dropout-0 model is always trained)")


QUESTION = "Question: who is {subject}? Answer:"
METRICS = ("accuracy_any_order", "accuracy_left_to_right", "rank_top1", "answer_logprob_per_token")


@dataclass(frozen=True)
class Task:
    """Held-out and fine-tuning questions in the direction seen in pretraining."""

    sft: list[facts_mod.Question]
    held_out: list[facts_mod.Question]


def split_task(facts: list[facts_mod.Fact]) -> Task:
    """Facts alternate n2d/d2n; pairs of consecutive facts go alternately to fine-tuning and held out,
    so both halves hold both directions."""
    seen = [q for q in facts_mod.questions(facts) if q.direction == "same"]
    return Task([q for q in seen if (q.fact // 2) % 2 == 0], [q for q in seen if (q.fact // 2) % 2 == 1])


def subject(q: facts_mod.Question) -> str:
    """"<A>" of the plain question "<A> is"."""
    return q.prompt[: -len(" is")]


def sft_pair(q: facts_mod.Question) -> Pair:
    return Pair(QUESTION.format(subject=subject(q)), q.answer)


def candidates(task: Task, distractors: int, seed: int) -> list[list[str]]:
    """Per held-out question: [its answer, then answers of other held-out facts of the same kind]."""
    rng = random.Random(seed)
    out = []
    for q in task.held_out:
        others = [o.answer for o in task.held_out if o.asks == q.asks and o.fact != q.fact]
        out.append([q.answer, *rng.sample(others, min(distractors, len(others)))])
    return out


def specs_for(settings: Settings, data: Path, pairs: Path, vocab: int, out: Path) -> list[RunSpec]:
    """Per seed: the pretrained MDM and AR, then their fine-tuned versions (MDM with CFG dropout 0
    and ``cfg_dropout``), which start from the pretrained run folders."""
    evaluation = {"cfg_scales": list(settings.cfg_scales), "distractors": settings.distractors, "data_seed": settings.data_seed}
    specs = []
    for seed in settings.seeds:
        for kind, steps in (("mdm", settings.mdm_steps), ("ar", settings.steps)):
            model = settings.model_config("conditional", vocab, kind)
            base = f"{kind}-seed{seed}"
            specs.append(RunSpec(base, model, settings.train_config(kind, steps, seed), str(data),
                                 {"kind": kind, "sft": False, "cfg_dropout": None, "seed": seed, **evaluation}))
            for dropout in ((0.0, settings.cfg_dropout) if kind == "mdm" else (0.0,)):
                sft = settings.train_config(kind, settings.sft_steps, seed, lr=settings.sft_lr, eval_windows=64, sft=True, cfg_dropout=dropout,
                                            init_from=str((out / "runs" / base).resolve()))
                name = f"{base}-sft" + (f"-drop{dropout:g}" if kind == "mdm" else "")
                specs.append(RunSpec(name, model, sft, str(pairs), {"kind": kind, "sft": True, "cfg_dropout": dropout, "seed": seed, **evaluation}))
    return specs


def evaluate_run(spec: RunSpec, run_dir: Path, task: Task, choices: list[list[str]], row_length: int, settings: Settings,
                 device: str = "auto") -> dict[str, Any]:
    """Accuracy, ranking and log p(answer, EOS | prompt) per token, at each guidance scale (MDM)."""
    from unmask.checkpoint import checkpoint_tokenizer, load_model
    from unmask.device import pick_device

    model, cfg = load_model(run_dir, pick_device(device))
    tok = checkpoint_tokenizer(run_dir)
    eos = tok.eos_id
    sft = spec.train.sft
    if sft:
        encoded = [[encode_pair(tok, Pair(sft_pair(q).prompt, answer)) for answer in answers] for q, answers in zip(task.held_out, choices)]
    else:
        encoded = [[(tok.encode(q.prompt), tok.encode(" " + answer)) for answer in answers] for q, answers in zip(task.held_out, choices)]
    prompts = [cands[0][0] for cands in encoded]
    references = [cands[0][1] for cands in encoded]
    lengths = [row_length - 1 - len(p) for p in prompts] if sft else [len(a) for a in references]
    result: dict[str, Any] = {}
    for w in ((0.0,) if cfg.model.causal else settings.cfg_scales):
        flat = [(p, a + [eos]) for cands in encoded for p, a in cands]
        logp = answer_logprobs(model, flat, eos, cfg_scale=w, pad_to=row_length if sft else None)
        fills = {order: complete(model, prompts, lengths, eos, cfg_scale=w, left_to_right=order == "left_to_right")
                 for order in ("any_order", "left_to_right")}
        scores = [logp[k : k + len(cands)] for k, cands in zip(itertools.accumulate((len(c) for c in encoded), initial=0), encoded)]
        result[f"w={w:g}"] = {
            **{f"accuracy_{order}": statistics.fmean(float(cut(fill, eos, sft) == ref) for fill, ref in zip(done, references))
               for order, done in fills.items()},
            "rank_top1": statistics.fmean(float(not any(s > mine[0] for s in mine[1:])) for mine in scores),  # as the reverse curse ranks
            "answer_logprob_per_token": statistics.fmean(mine[0] / (len(ref) + 1) for mine, ref in zip(scores, references)),
        }
    return result


def cut(fill: list[int], eos: int, sft: bool) -> list[int]:
    """A fine-tuned model's answer: its response up to the first EOS (the pads)."""
    return fill[: fill.index(eos)] if sft and eos in fill else fill


def label(meta: dict) -> str:
    kind = meta["kind"].upper()
    if not meta["sft"]:
        return f"{kind} pretrained"
    return f"{kind} fine-tuned" + (f", CFG dropout {meta['cfg_dropout']:g}" if meta["kind"] == "mdm" else "")


def summarise(records: list[dict]) -> list[dict]:
    """One row per (model, w): mean and standard deviation over seeds."""
    groups: dict[str, list[dict]] = {}
    for r in records:
        groups.setdefault(label(r["spec"]["meta"]), []).append(r)
    return [row for name, runs in groups.items() for row in seed_rows(name, runs)]


def markdown(settings: Settings, rows: list[dict], source: str, task: Task) -> str:
    lines = ["# Conditional generation: fine-tuning and guidance, MDM vs AR", "",
             f"Facts: {source}. Pretraining from scratch on the facts (each in its own direction, {settings.repeats} copies of each "
             f"paraphrase) mixed with {settings.text_chars:,} characters of Shakespeare "
             f"({settings.described(f'{settings.mdm_steps} (MDM) and {settings.steps} (AR)')}). "
             f"Fine-tuning: {len(task.sft)} questions \"{QUESTION}\" -> answer, {settings.sft_steps} steps at lr "
             f"{settings.sft_lr:g}; evaluation on the {len(task.held_out)} questions of the other facts. Seeds {list(settings.seeds)}; "
             "mean +- sd over seeds.", "",
             "Accuracy: greedy answer equals the reference (fine-tuned: the response region decoded, cut at the first EOS; pretrained: "
             "prompt \"<A> is\", the answer's length given); MDM decoding at temperature 0, one token per call, the most confident "
             "position first (any order) or the leftmost (left to right). Top-1: the correct answer ranked first by log p(answer, EOS | prompt) among "
             f"{settings.distractors} distractors (chance {settings.chance:.3f}). log p/token: of the correct answer and its EOS (MDM: exact "
             "left-to-right chain rule, guided with w).", ""]

    def fmt(v):
        return f"{v[0]:.3f} +- {v[1]:.3f}"

    lines.append(md_table(["model", "guidance", "accuracy (any order)", "accuracy (left to right)", "top-1", "log p/token"],
                          [[r["model"], r["cfg"], *(fmt(r[m]) for m in METRICS)] for r in rows]))
    lines += ["", "![accuracy and likelihood against the guidance scale](conditional.png)"]
    return "\n".join(lines)


def _plot(rows: list[dict], settings: Settings, path: Path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 4, figsize=(19, 4.2))
    models = list(dict.fromkeys(r["model"] for r in rows))
    titles = ("accuracy, any order", "accuracy, left to right", "top-1 among distractors", "log p(answer, EOS | prompt) per token")
    for ax, metric, title in zip(axes, METRICS, titles):
        for name in models:
            mine = [r for r in rows if r["model"] == name]
            ws = [float(r["cfg"][2:]) for r in mine]
            means = [r[metric][0] for r in mine]
            if len(mine) == 1:  # AR: no guidance, a level line
                ax.axhline(means[0], ls="--", color="grey" if "pretrained" in name else "black", label=name)
            else:
                ax.errorbar(ws, means, yerr=[r[metric][1] for r in mine], marker="o", capsize=3, label=name)
        if metric == "rank_top1":
            ax.axhline(settings.chance, color="grey", ls=":", label="chance")
        ax.set(xlabel="guidance scale w", title=title)
        ax.legend(fontsize=7)
    save_figure(fig, path)


def run(out_dir: str | Path, settings: Settings = Settings(), facts_file: str | Path | None = None, device: str = "auto",
        progress: bool = True, log_to: tuple[str, ...] = ()) -> dict:
    """Prepare (once), pretrain and fine-tune (resumably), evaluate, write results.json, results.md, conditional.png;
    ``log_to``: the trackers of every run (:mod:`unmask.tracking`)."""
    out = Path(out_dir)
    facts, source, data, tok = reverse_curse.facts_corpus(out, settings, facts_file)
    task = split_task(facts)
    choices = candidates(task, settings.distractors, settings.data_seed + 1)
    # rows long enough for every held-out question with any of its candidate answers
    asked = [Pair(sft_pair(q).prompt, answer) for q, answers in zip(task.held_out, choices) for answer in answers]
    longest = max(2 + sum(map(len, encode_pair(tok, pair))) for pair in asked + [sft_pair(q) for q in task.sft])
    pairs = out / "pairs"
    if not (pairs / "pairs.json").is_file():
        prepare_pairs(pairs, tok, [sft_pair(q) for q in task.sft], [sft_pair(q) for q in task.held_out], length=longest,
                      max_length=settings.context_len)
    specs = specs_for(settings, data.resolve(), pairs.resolve(), tok.vocab_size, out)
    records = run_grid(out, specs, lambda spec, run_dir: evaluate_run(spec, run_dir, task, choices, longest, settings, device),
                       device=device, progress=progress, chunk=settings.chunk, desc="conditional", log_to=log_to)
    rows = summarise(records)
    _plot(rows, settings, out / "conditional.png")
    result = {"experiment": "conditional", "settings": asdict(settings), "facts": source, "num_facts": len(facts),
              "held_out_questions": len(task.held_out), "sft_questions": len(task.sft), "runs": records, "summary": rows}
    write_outputs(out, result, markdown(settings, rows, source, task))
    return result

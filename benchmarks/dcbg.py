"""Classifier guidance (D-CBG): does it steer, and what does it cost? Label accuracy of guided samples
under a HELD-OUT classifier as gamma grows, with their generative perplexity.

Task: does a chunk of Shakespeare speak of love? Every training play of the embedded corpus is cut
into chunks of --chunk tokens, labelled "love" when a word of the love family occurs in it (love,
loves, loved, lover, lovers, loving, lovely, beloved) and "other" otherwise (--per-class of each).
A label a tiny network learns in minutes on a CPU, and one whose truth can also be read off a sample
(the rule itself, a third judge). The even-numbered chunks train the classifier that guides, the
odd-numbered ones a second classifier that judges, so the judge has seen none of the guide's texts
and shares none of its weights:

* guide: --guide-layers x --guide-width (2 x 128), seed 0, trained on canvases masked by the MDM's
  forward process (``unmask.objectives.classifier``); with --guide-from-mdm the MDM's own network
  and weights with a label head (``init_from``) instead, which at this budget learns slower;
* judge: --judge-layers x --judge-width (2 x 64), seed 1, the same objective.

Both are scored on clean chunks of the validation plays. Then, for each gamma in --gammas and each
label of --toward (default: love, the minority label), --samples samples of --length tokens from
the MDM with the ancestral sampler (steps = length) guided toward the label (dcbg auto: first-order, as a 4096-token vocabulary exceeds the
exact budget at every step), each scored by the judge (accuracy: its argmax is the label; mean
p_judge(label | sample)), by the rule (share of samples with a love word), by the AR judge of the
same tokenizer (gen-PPL) and by unigram entropy; tokens/s of the decoding. Last, one step of both
forms on the same canvas at V = 4096: their time and how well the first-order tilt ranks the tokens
as the exact one does (Pearson and Spearman correlations over V, top-10 overlap).

Writes dcbg.json, dcbg.md and dcbg.png to --out. The MDM and the AR judge: --mdm/--ar, else
`make demo`'s runs/demo/{mdm,ar} when finished, else the pair benchmarks/structured.py trains in
runs/bench-structured (trained here with its recipe when missing).

    nice -n 10 python benchmarks/dcbg.py                   # under 10 minutes on 2 CPU cores
    python benchmarks/dcbg.py --from-json benchmarks/results/dcbg/dcbg.json   # rewrite the report only
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import sys
import time
from pathlib import Path

import torch

from unmask.checkpoint import checkpoint_tokenizer, load_model
from unmask.classifier import Classifier, load_classifier
from unmask.classifier_guidance import exact_terms, first_order_terms
from unmask.config import ModelConfig, TrainConfig
from unmask.data import shakespeare_works
from unmask.data.labels import Labelled, prepare_labels
from unmask.evaluation.genppl import judge_nll, unigram_entropy
from unmask.generation import generate
from unmask.train import train

LOVE = re.compile(r"\b(lov(e|es|ed|er|ers|ing|ely)|beloved)\b", re.IGNORECASE)
LABELS = ("love", "other")
LOVE_LABEL = LABELS[0]


def chunks(tok, text: str, size: int) -> list[str]:
    """The text cut into pieces of ``size`` tokens (decoded back to text; the last, shorter one dropped)."""
    ids = tok.encode(text)
    return [tok.decode(ids[i : i + size]) for i in range(0, len(ids) - size + 1, size)]


def label_of(text: str) -> str:
    """The rule that labels the texts: "love" when a word of the love family occurs in ``text``."""
    return LOVE_LABEL if LOVE.search(text) else "other"


def balanced(pieces: list[Labelled], per_class: int) -> list[Labelled]:
    """``per_class`` texts of each label, spread evenly over ``pieces`` (all of a label that has fewer)."""
    out = []
    for label in LABELS:
        mine = [p for p in pieces if p.label == label]
        out += mine[:: max(1, len(mine) // per_class)][:per_class]
    return out


def labelled(tok, size: int, per_class: int) -> tuple[list[Labelled], list[Labelled], list[Labelled]]:
    """(guide's texts, judge's texts, validation texts): the even and odd chunks of the training plays
    and the chunks of the validation plays, ``per_class`` of each label each (a quarter for validation)."""
    sides: tuple[list[Labelled], list[Labelled]] = ([], [])
    for play, text in shakespeare_works("train"):
        for i, piece in enumerate(chunks(tok, text, size)):
            sides[i % 2].append(Labelled(piece, label_of(piece), f"{play} chunk {i}"))
    val = [Labelled(piece, label_of(piece), f"{play} chunk {i}") for play, text in shakespeare_works("validation")
           for i, piece in enumerate(chunks(tok, text, size))]
    return balanced(sides[0], per_class), balanced(sides[1], per_class), balanced(val, per_class // 4)


def train_classifier(run: Path, rows: list[Labelled], tok, model: ModelConfig, cfg: TrainConfig, device: str) -> Path:
    """A classifier run trained on ``rows`` (5% held out), reused when finished."""
    if not (run / "checkpoints" / "LATEST").exists():
        folder = prepare_labels(run.parent / f"{run.name}-labels", tok, rows, max_length=model.context_len, val_fraction=0.05, seed=cfg.seed)
        start = time.perf_counter()
        train(run, model, cfg, folder, device=device, progress=False)
        (run / "train_seconds.txt").write_text(f"{time.perf_counter() - start:.1f}\n")
    return run


@torch.no_grad()
def clean_accuracy(classifier: Classifier, tok, rows: list[Labelled]) -> float:
    """Accuracy of the classifier on the clean texts ``rows`` (each as [EOS ; text ; PAD ...], padding hidden)."""
    ids = [[tok.eos_id] + tok.encode(row.text) for row in rows]
    width = max(map(len, ids))
    tokens = torch.tensor([row + [tok.pad_id] * (width - len(row)) for row in ids])
    real = torch.tensor([[True] * len(row) + [False] * (width - len(row)) for row in ids])
    predicted = classifier.log_probs(tokens.to(classifier.model.embed.weight.device), real.to(classifier.model.embed.weight.device)).argmax(1)
    return sum(classifier.labels[int(k)] == row.label for k, row in zip(predicted, rows)) / len(rows)


def runs(args) -> tuple[Path, Path]:
    """The MDM and the AR judge: --mdm/--ar, runs/demo when finished, else benchmarks/structured.py's pair."""
    if args.mdm and args.ar:
        return Path(args.mdm), Path(args.ar)
    demo = Path("runs/demo")
    if all((demo / k / "checkpoints" / "LATEST").exists() for k in ("mdm", "ar")):
        return demo / "mdm", demo / "ar"
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from structured import train_pair

    pair = argparse.Namespace(runs="runs/bench-structured", preset="tiny", context=64, train_steps=200, train_batch=8, seed=0, device=args.device)
    return train_pair(pair)


def classifiers(args, mdm: Path, tok) -> tuple[Path, Path, list[Labelled]]:
    """The guide (--guide-layers x --guide-width from scratch, seed 0, or with --guide-from-mdm the MDM's
    network and weights) on the even chunks, the judge (--judge-layers x --judge-width, seed 1) on the odd ones."""
    guide_rows, judge_rows, val = labelled(tok, args.chunk, args.per_class)
    source = load_model(mdm, "cpu")[1].model
    common = {"objective": "classifier", "batch_size": args.batch, "eval_windows": 64, "eval_draws": 2, "log_every": 25, "keep_checkpoints": 1}
    small = lambda name, layers, width: ModelConfig(name=name, vocab_size=source.vocab_size, context_len=source.context_len,  # noqa: E731
                                                    n_layer=layers, n_head=2, n_embd=width, labels=LABELS)
    if args.guide_from_mdm:
        guide_model = ModelConfig(**{**source.to_dict(), "labels": LABELS, "shift_logits": False, "block_causal": 0})
        start = {"init_from": str(mdm.resolve()), "lr": 1e-3}
    else:
        guide_model, start = small("guide", args.guide_layers, args.guide_width), {"lr": 2e-3}
    guide = train_classifier(Path(args.runs) / "guide", guide_rows, tok, guide_model, TrainConfig(
        **common, **start, steps=args.guide_steps, warmup_steps=20, seed=0, eval_every=args.guide_steps, checkpoint_every=args.guide_steps),
        args.device)
    judge = train_classifier(Path(args.runs) / "judge", judge_rows, tok, small("judge", args.judge_layers, args.judge_width), TrainConfig(
        **common, steps=args.judge_steps, lr=2e-3, warmup_steps=20, seed=1, eval_every=args.judge_steps, checkpoint_every=args.judge_steps),
        args.device)
    return guide, judge, val


def guided_grid(args, mdm: Path, guide: Classifier, judge: Classifier, ar, tok) -> list[dict]:
    """One row per (gamma, label): the judge's accuracy and mean p(label), gen-PPL, entropy, tokens/s, the form used."""
    rows = []
    for gamma in args.gammas:
        for label in args.toward:
            index = LABELS.index(label)
            start = time.perf_counter()
            res = generate(mdm, "", args.samples, args.length, seed=args.seed + index, device=args.device, classifier=guide, label=label,
                           gamma=gamma, dcbg="auto", sampler="ancestral", steps=args.length)
            seconds = time.perf_counter() - start
            tokens = torch.tensor([s["tokens"] for s in res["samples"]])
            canvas = torch.cat([torch.full((tokens.shape[0], 1), tok.eos_id), tokens], dim=1)
            with torch.no_grad():
                p = judge.log_probs(canvas.to(judge.model.embed.weight.device)).exp().cpu()
            nll = judge_nll(ar, tokens, tok.eos_id)
            rule = sum(label_of(sample["text"]) == LOVE_LABEL for sample in res["samples"]) / len(res["samples"])
            rows.append({"gamma": gamma, "label": label, "accuracy": (p.argmax(dim=1) == index).float().mean().item(),
                         "p_label": p[:, index].mean().item(), "love_words": rule, "gen_ppl": math.exp(nll), "entropy": unigram_entropy(tokens.tolist()),
                         "tokens_per_s": tokens.numel() / seconds, "used": res["dcbg"]["used"], "nfe": res["nfe"],
                         "example": res["samples"][0]["text"]})
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "example"}), flush=True)
    return rows


@torch.no_grad()
def exact_vs_first_order(args, mdm: Path, guide: Classifier, tok) -> dict:
    """One step of each form on --compare-rows canvases of --length MASKs after EOS, one position wanted per row."""
    model = load_model(mdm, args.device)[0]
    score = guide.score(LOVE_LABEL)
    rows, length, m = args.compare_rows, args.length, model.config.mask_id
    x = torch.full((rows, length + 1), m, device=model.embed.weight.device)
    x[:, 0] = tok.eos_id
    gen = torch.Generator().manual_seed(args.seed)
    filled = torch.rand(rows, length, generator=gen) < 0.5  # half the canvas decoded, by the MDM's own argmax
    logits = model(x)
    x[:, 1:] = torch.where(filled.to(x.device), logits[:, 1:].argmax(dim=-1), x[:, 1:])
    want = torch.zeros_like(x, dtype=torch.bool)
    open_cols = [(~filled[b]).nonzero().squeeze(1) for b in range(rows)]
    for b in range(rows):
        want[b, 1 + open_cols[b][torch.randint(len(open_cols[b]), (1,), generator=gen)]] = True
    vocab = model.config.vocab_size
    start = time.perf_counter()
    exact = exact_terms(score, x, want, vocab)
    exact_s = time.perf_counter() - start
    start = time.perf_counter()
    first = first_order_terms(score, x, want, vocab)
    first_s = time.perf_counter() - start
    centred = lambda v: v - v.mean(dim=1, keepdim=True)  # noqa: E731
    pearson = (centred(exact) * centred(first)).sum(1) / (centred(exact).norm(dim=1) * centred(first).norm(dim=1))
    ranks = lambda v: v.argsort(dim=1).argsort(dim=1).float()  # noqa: E731
    spearman = (centred(ranks(exact)) * centred(ranks(first))).sum(1) / (centred(ranks(exact)).norm(dim=1) * centred(ranks(first)).norm(dim=1))
    top = exact.topk(10, dim=1).indices
    overlap = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(top, first.topk(10, dim=1).indices)) / (10 * rows)
    return {"rows": rows, "vocab": vocab, "canvases": rows * vocab, "exact_s": exact_s, "first_order_s": first_s,
            "pearson": pearson.mean().item(), "spearman": spearman.mean().item(), "top10_overlap": overlap,
            "exact_spread": (exact.amax(1) - exact.amin(1)).mean().item()}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mdm", default="", help="MDM run to guide (with --ar)")
    parser.add_argument("--ar", default="", help="AR run of the same tokenizer: the gen-PPL judge")
    parser.add_argument("--runs", default="runs/bench-dcbg", help="where the two classifiers are trained (finished runs are reused)")
    parser.add_argument("--chunk", type=int, default=32, help="tokens per labelled text")
    parser.add_argument("--per-class", type=int, default=800, help="texts per label for each classifier")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--guide-steps", type=int, default=200)
    parser.add_argument("--guide-layers", type=int, default=2)
    parser.add_argument("--guide-width", type=int, default=128)
    parser.add_argument("--guide-from-mdm", action="store_true", help="start the guide from the MDM's network and weights (init_from)")
    parser.add_argument("--judge-steps", type=int, default=200)
    parser.add_argument("--judge-layers", type=int, default=2)
    parser.add_argument("--judge-width", type=int, default=64)
    parser.add_argument("--gammas", type=lambda s: [float(v) for v in s.split(",")], default=[0.0, 2.0, 4.0, 8.0, 16.0])
    parser.add_argument("--toward", type=lambda s: s.split(","), default=["love"], help="labels to guide toward (love, other)")
    parser.add_argument("--samples", type=int, default=32, help="samples per gamma and label")
    parser.add_argument("--length", type=int, default=16)
    parser.add_argument("--compare-rows", type=int, default=1, help="canvases of the exact vs first-order step")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results/dcbg")
    parser.add_argument("--from-json", default="", help="only rewrite the Markdown and the plot from a dcbg.json")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.from_json:
        report(json.loads(Path(args.from_json).read_text()), Path(args.out))
        return
    start = time.perf_counter()
    mdm, ar_dir = runs(args)
    trained_here = not all((Path(args.runs) / name / "checkpoints" / "LATEST").exists() for name in ("guide", "judge"))
    tok = checkpoint_tokenizer(mdm)
    guide_dir, judge_dir, val = classifiers(args, mdm, tok)
    torch.set_grad_enabled(False)
    guide, judge = load_classifier(guide_dir, args.device), load_classifier(judge_dir, args.device)
    ar = load_model(ar_dir, args.device)[0]
    accuracy = {"guide": clean_accuracy(guide, tok, val), "judge": clean_accuracy(judge, tok, val), "validation_texts": len(val),
                "guide_train_s": float((guide_dir / "train_seconds.txt").read_text()),
                "judge_train_s": float((judge_dir / "train_seconds.txt").read_text())}
    print(json.dumps(accuracy), flush=True)
    rows = guided_grid(args, mdm, guide, judge, ar, tok)
    compare = exact_vs_first_order(args, mdm, guide, tok)
    print(json.dumps(compare), flush=True)
    machine = {"device": platform.processor() or platform.machine(), "threads": torch.get_num_threads(), "load_average": os.getloadavg()[0],
               "torch": torch.__version__, "mdm": str(mdm), "ar": str(ar_dir), "mdm_train_steps": load_model(mdm, "cpu")[1].train.steps,
               "seconds": time.perf_counter() - start, "trained_here": trained_here}
    settings = {k: v for k, v in vars(args).items() if k != "from_json"}
    report({"machine": machine, "settings": settings, "classifiers": accuracy, "rows": rows, "compare": compare}, Path(args.out))


def table(rows: list[dict]) -> list[str]:
    out = ["| gamma | toward | held-out judge accuracy | p_judge(label) | samples with a love word | gen-PPL | unigram entropy | tokens/s | form |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['gamma']:g} | {r['label']} | {100 * r['accuracy']:.0f}% | {r['p_label']:.2f} | {100 * r['love_words']:.0f}% | "
                   f"{r['gen_ppl']:.0f} | {r['entropy']:.2f} | {r['tokens_per_s']:.0f} | {r['used']} |")
    return out


def report(saved: dict, out_dir: Path) -> None:
    m, s, c, cmp = saved["machine"], saved["settings"], saved["classifiers"], saved["compare"]
    rows = saved["rows"]
    guide_net = "the MDM's network" if s.get("guide_from_mdm") else f"{s.get('guide_layers', 2)} x {s.get('guide_width', 128)}"
    parts = [
        "# Classifier guidance (D-CBG): steering toward a label",
        f"{m['device']}, {m['threads']} threads (load average {m['load_average']:.1f} at the start), torch {m['torch']}; MDM {m['mdm']} "
        f"({m['mdm_train_steps']} steps), gen-PPL judge {m['ar']}; love vs other chunks of {s['chunk']} tokens, {s['per_class']} per "
        f"label for each classifier; {s['samples']} samples of {s['length']} tokens per gamma and label (ancestral, {s['length']} steps); "
        f"{m['seconds']:.0f} s in all{'' if m.get('trained_here', True) else ' (the classifiers reused from an earlier call: add their training times below)'}.",
        f"Clean accuracy on {c['validation_texts']} chunks of the validation plays: guide {100 * c['guide']:.0f}% "
        f"({s['guide_steps']} steps, {guide_net}, {c['guide_train_s']:.0f} s), held-out judge {100 * c['judge']:.0f}% "
        f"({s['judge_steps']} steps, {s['judge_layers']} x {s['judge_width']}, {c['judge_train_s']:.0f} s).",
        "## Label accuracy under the held-out judge vs gamma",
        "Judge accuracy: the share of samples the held-out classifier labels as the label guided toward; p_judge: its mean "
        "probability of that label; love words: the share of samples the labelling rule itself calls love. Gen-PPL: under the AR "
        "judge, given the EOS separator.",
        "\n".join(table(rows)),
        f"## Exact vs first-order on one step (V = {cmp['vocab']})",
        f"{cmp['rows']} canvas{'es' if cmp['rows'] > 1 else ''} half decoded, one wanted position each: the exact form scores {cmp['canvases']} canvases in {cmp['exact_s']:.2f} s, "
        f"the first-order form one gradient in {cmp['first_order_s']:.3f} s ({cmp['exact_s'] / cmp['first_order_s']:.0f}x). Agreement of "
        f"the two tilts over the vocabulary: Pearson {cmp['pearson']:.2f}, Spearman {cmp['spearman']:.2f}, top-10 overlap "
        f"{100 * cmp['top10_overlap']:.0f}% (exact tilt spread max - min: {cmp['exact_spread']:.2f} nats).",
        "## Examples (first sample of each setting)",
        "```text\n" + "\n".join(f"gamma {r['gamma']:g} {r['label']}: {r['example'][:140].replace(chr(10), ' ')}" for r in rows) + "\n```",
        "![judge accuracy and gen-PPL vs gamma](dcbg.png)",
    ]
    text = "\n\n".join(parts) + "\n"
    print(text)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "dcbg.json").write_text(json.dumps(saved, indent=2) + "\n")
    (out_dir / "dcbg.md").write_text(text)
    plot(rows, out_dir / "dcbg.png")


def plot(rows: list[dict], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    for label, colour in zip(LABELS, ("tab:red", "tab:gray")):
        rs = [r for r in rows if r["label"] == label]
        if not rs:
            continue
        left.plot([r["gamma"] for r in rs], [100 * r["accuracy"] for r in rs], "o-", color=colour, label=f"toward {label}: judge says {label}")
        left.plot([r["gamma"] for r in rs], [100 * r["love_words"] for r in rs], "s--", color=colour, alpha=0.6,
                  label=f"toward {label}: has a love word")
        right.plot([r["gamma"] for r in rs], [r["gen_ppl"] for r in rs], "o-", color=colour, label=f"toward {label}")
    left.set(xlabel="gamma", ylabel="% of samples", ylim=(0, 100))
    right.set(xlabel="gamma", ylabel="gen-PPL (AR judge)")
    left.legend(fontsize=8)
    fig.suptitle("D-CBG: label accuracy and generative perplexity of guided samples", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()

"""The reversal curse in a controlled task: does an MDM answer ``B r [M]`` after learning only ``A r B``?

Shin et al. (2026, "A Theoretical Analysis of Why Masked Diffusion Models Mitigate the Reversal
Curse") argue that an MDM trained on ``A r B`` learns the conditional ``[M] r B -> A``, that the
shared weights store this "B goes with A" evidence on the value side, and that relative (rotary)
positions route attention by offset only, so the same evidence is read by the reversed query
``B r [M]`` (note: the SAME relation token; their "A is B" / "B is [M]"). An AR model never
conditions on what follows, so it stays at chance. This experiment measures that on the task of
:mod:`unmask.experiments.reversal_task` (random token pairs, no other text), for MDM and AR, one
and more layers, rotary and learned absolute positions (``ModelConfig.positions``), several seeds
(each seed draws its own pairs and its own initialisation).

Training is the project's loop and objectives, in one of two layouts of the same facts:

* ``isolated``: one fact per row, ``[EOS A r B EOS]``, a pairs folder (``unmask.data.pairs``)
  with an empty prompt, so the whole fact is the learned region: the MDM's k-DCE masks among
  ``A r B EOS`` (``unmask.objectives.sft`` with its default CFG dropout 0), the AR model learns
  the same tokens left to right. The setting of a one-layer analysis: nothing but the fact.
* ``packed``: the facts as documents packed back to back (``EOS A r B EOS A' r B' ...``), windows
  of ``context_len`` tokens (``unmask.objectives.mdm`` / ``ar``), as text is pretrained (and as
  ``unmask experiment reverse-curse`` trains). Here an entity B also stands two positions before
  the unrelated A' of the next fact (``B EOS A'``), which teaches the network not to read a B at
  that offset.

Runs train in fp32 (bf16 autocast gains nothing at this size and costs precision); on a shared CPU,
``OMP_NUM_THREADS=1`` keeps a model this small from losing most of its time to thread contention.
Every ``checkpoint_every`` steps a checkpoint is kept and, when the run is done, each is scored
(plus the initialisation, step 0): per direction (forward ``A r [M]``, infill ``[M] r B``,
reverse ``B r [M]``, reverse with the second relation ``B r' [M]``) the top-1 accuracy among the
candidates (chance 1 / pairs), mean rank and log-likelihood of the answer. The summary reports
mean +- sd over seeds at the last step and a one-sided exact binomial test, pooled over seeds, of
"top-1 above chance" (k correct of pairs x seeds, p0 = 1 / pairs; it treats the questions as
independent). Outputs: results.json, results.md, reversal.png (curves against steps).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import torch

from unmask.config import ModelConfig, TrainConfig
from unmask.errors import OptionError, UnmaskError, check_number
from unmask.experiments import reversal_task as task_mod
from unmask.experiments.runner import RunSpec, md_table, mean_sd, pyplot, run_grid, write_outputs

LAYOUTS = ("isolated", "packed")
KINDS = ("mdm", "ar")


@dataclass(frozen=True)
class Settings:
    pairs: int = 32
    inverse_pairs: int = 0  # pairs trained only as "D r' C" (0: r' is never seen in training)
    repeats: int = 50  # copies of each fact in the packed stream
    layouts: tuple[str, ...] = ("isolated",)
    layers: tuple[int, ...] = (1, 2)
    positions: tuple[str, ...] = ("rope", "absolute")
    seeds: tuple[int, ...] = (0, 1, 2)
    n_embd: int = 64
    n_head: int = 4
    context_len: int = 16  # packed windows (isolated rows are 5 tokens)
    steps: int = 2000
    batch_size: int = 32
    lr: float = 1e-2  # the same for both models
    eval_points: int = 10  # checkpoints scored along training (plus step 0)

    def __post_init__(self) -> None:
        for name in ("repeats", "n_embd", "n_head", "steps", "batch_size", "eval_points"):
            check_number(name, getattr(self, name), ">= 1")
        check_number("pairs", self.pairs, ">= 2")
        check_number("inverse_pairs", self.inverse_pairs, ">= 0")
        check_number("context_len", self.context_len, ">= 5")
        check_number("lr", self.lr, "> 0")
        for name, values, known in (("layouts", self.layouts, LAYOUTS), ("positions", self.positions, ("rope", "absolute"))):
            if not values or any(v not in known for v in values):
                raise OptionError(name, "{%s} {_values} must name one or more of: {_known}" % name, _values=list(values), _known=", ".join(known))
        for name in ("seeds", "layers"):
            values = getattr(self, name)
            if not values or min(values) < (1 if name == "layers" else 0):
                raise OptionError(name, "{%s} {_values} must name at least one, each >= {_least}" % name, _values=list(values),
                                  _least=1 if name == "layers" else 0)
        if self.steps < self.eval_points:
            raise OptionError("steps", "{steps}={_steps} must be at least {eval_points}={_points}", _steps=self.steps, _points=self.eval_points)

    @property
    def every(self) -> int:
        """Steps between scored checkpoints."""
        return self.steps // self.eval_points


def prepare(out: Path, settings: Settings, layout: str, seed: int) -> Path:
    """OUT/data/<layout>-seed<seed> (made once): the facts of ``seed`` as a pairs folder (isolated) or a token folder (packed)."""
    from unmask.data.pairs import Pair, prepare_pairs

    folder = out / "data" / f"{layout}-seed{seed}"
    task = task_mod.make_task(settings.pairs, settings.inverse_pairs, seed)
    if layout == "packed":
        return task_mod.prepare(folder, task, settings.repeats, settings.context_len, seed)
    if not (folder / "pairs.json").is_file():
        facts = [Pair("", doc) for doc in task_mod.documents(task)]
        prepare_pairs(folder, task_mod.tokenizer(task), facts, facts, length=5)
    return folder


def spec_for(settings: Settings, data: Path, kind: str, layout: str, layers: int, positions: str, seed: int) -> RunSpec:
    """One run: ``kind`` (mdm/ar) trained on ``layout`` with a checkpoint kept every ``settings.every`` steps."""
    task = task_mod.make_task(settings.pairs, settings.inverse_pairs, seed)
    model = ModelConfig(name="reversal", vocab_size=task.entities + 4, context_len=5 if layout == "isolated" else settings.context_len,
                        n_layer=layers, n_head=settings.n_head, n_embd=settings.n_embd, causal=kind == "ar", positions=positions)
    train = TrainConfig(objective=kind, steps=settings.steps, batch_size=settings.batch_size, lr=settings.lr,
                        warmup_steps=max(1, settings.steps // 20), seed=seed, eval_every=settings.steps, eval_windows=4,
                        checkpoint_every=settings.every, keep_checkpoints=settings.eval_points + 1,
                        log_every=max(1, settings.steps // 50), sft=layout == "isolated", precision="fp32")
    meta = {"kind": kind, "layout": layout, "layers": layers, "positions": positions, "seed": seed, "pairs": settings.pairs,
            "inverse_pairs": settings.inverse_pairs, "repeats": settings.repeats}
    return RunSpec(f"{layout}-{kind}-{layers}l-{positions}-seed{seed}", model, train, str(data), meta)


def specs_for(out: Path, settings: Settings) -> list[RunSpec]:
    specs = []
    for layout in settings.layouts:
        for seed in settings.seeds:
            data = prepare(out, settings, layout, seed).resolve()
            for layers in settings.layers:
                for positions in settings.positions:
                    specs += [spec_for(settings, data, kind, layout, layers, positions, seed) for kind in KINDS]
    return specs


def evaluate_model(model, task: task_mod.Task, tok) -> dict[str, dict[str, float]]:
    """Every direction's metrics (:func:`unmask.experiments.reversal_task.score`); an AR model is not asked to infill."""
    out = {}
    for direction, q in task_mod.questions(task, tok).items():
        if direction == "infill" and model.config.causal:
            continue
        out[direction] = task_mod.score(task_mod.slot_logprobs(model, q), q)
    return out


def evaluate_run(spec: RunSpec, run_dir: Path, device: str = "auto") -> dict[str, Any]:
    """Scores at step 0 (the loop's initialisation: ``torch.manual_seed(seed)`` then the network) and at every kept
    checkpoint, and the training loss logged by the loop."""
    from unmask.checkpoint import checkpoint_tokenizer, kept_steps, load_model
    from unmask.device import pick_device
    from unmask.model import Transformer

    dev = pick_device(device)
    seed = spec.meta["seed"]
    task = task_mod.make_task(spec.meta["pairs"], spec.meta["inverse_pairs"], seed)
    tok = checkpoint_tokenizer(run_dir)
    torch.manual_seed(spec.train.seed)
    curve = [{"step": 0, **evaluate_model(Transformer(spec.model).to(dev).eval(), task, tok)}]
    for step in kept_steps(run_dir):
        model, _ = load_model(run_dir / "checkpoints" / f"step_{step:06d}", dev)
        curve.append({"step": step, **evaluate_model(model, task, tok)})
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines() if line.strip()]
    loss = [[m["step"], m["loss"]] for m in lines if m.get("kind") == "train"]
    return {"curve": curve, "final": curve[-1], "train_loss": loss}


def binomial_tail(k: int, n: int, p: Fraction) -> float:
    """P(X >= k) for X ~ Binomial(n, p), exactly (rational arithmetic): the one-sided p-value of k successes."""
    if not 0 <= k <= n:
        raise UnmaskError(f"binomial test: k={k} successes must lie in 0..n={n}")
    p = Fraction(p)
    return float(sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k, n + 1)))


def _groups(records: list[dict]) -> dict[tuple, list[dict]]:
    """Records by (layout, layers, positions, kind), in the order of the grid."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        m = r["spec"]["meta"]
        groups.setdefault((m["layout"], m["layers"], m["positions"], m["kind"]), []).append(r)
    return groups


def summarise(records: list[dict], settings: Settings) -> list[dict]:
    """One row per (layout, layers, positions, kind): mean and sd over seeds of every final metric, and per direction
    the pooled count of top-1 answers and its binomial p-value against chance 1 / pairs."""
    rows = []
    for (layout, layers, positions, kind), runs in _groups(records).items():
        row: dict[str, Any] = {"layout": layout, "layers": layers, "positions": positions, "model": kind.upper(),
                               "seeds": [r["spec"]["meta"]["seed"] for r in runs]}
        for direction in task_mod.DIRECTIONS:
            finals = [r["result"]["final"].get(direction) for r in runs]
            if None in finals:
                continue
            for metric in ("top1", "mean_rank", "logp", "logp_candidates"):
                row[f"{direction}_{metric}"] = mean_sd([f[metric] for f in finals])
            correct, asked = sum(f["correct"] for f in finals), settings.pairs * len(finals)
            row[f"{direction}_correct"] = [correct, asked]
            row[f"{direction}_p"] = binomial_tail(correct, asked, Fraction(1, settings.pairs))
        rows.append(row)
    return rows


def curves(runs: list[dict]) -> dict[str, Any]:
    """Mean and sd over the seeds of ``runs`` of top-1 and candidate log-likelihood per direction against the
    step, and of the logged training loss: ``{"steps", "<direction>_<metric>": [(mean, sd), ...], "loss_steps", "loss"}``."""
    steps = [point["step"] for point in runs[0]["result"]["curve"]]
    out: dict[str, Any] = {"steps": steps}
    for direction in task_mod.DIRECTIONS:
        if direction not in runs[0]["result"]["curve"][0]:
            continue
        for metric in ("top1", "logp_candidates"):
            out[f"{direction}_{metric}"] = [mean_sd([r["result"]["curve"][i][direction][metric] for r in runs]) for i in range(len(steps))]
    losses = [r["result"]["train_loss"] for r in runs]
    out["loss_steps"] = [s for s, _ in losses[0]]
    out["loss"] = [mean_sd([run[i][1] for run in losses]) for i in range(len(out["loss_steps"]))]
    return out


_STYLE = {"forward": ("tab:blue", "forward A r [M] -> B"), "infill": ("tab:green", "infill [M] r B -> A"),
          "reverse": ("tab:red", "reverse B r [M] -> A"), "reverse_r2": ("tab:orange", "reverse B r' [M] -> A")}


def _plot(records: list[dict], settings: Settings, path: Path) -> None:
    """One column per (layout, layers, positions): top-1, candidate log-likelihood and training loss against the step;
    MDM solid, AR dashed, mean over seeds with a band of one sd."""
    plt = pyplot()
    groups = _groups(records)
    configs = list(dict.fromkeys(key[:3] for key in groups))
    fig, axes = plt.subplots(3, len(configs), figsize=(4.2 * len(configs), 9), squeeze=False)
    for col, config in enumerate(configs):
        for kind, dash in (("mdm", "-"), ("ar", "--")):
            c = curves(groups[(*config, kind)])
            for row, metric in ((0, "top1"), (1, "logp_candidates")):
                for direction, (color, label) in _STYLE.items():
                    if f"{direction}_{metric}" not in c:
                        continue
                    mean, sd = torch.tensor(c[f"{direction}_{metric}"]).T
                    axes[row][col].plot(c["steps"], mean, dash, color=color, label=f"{kind.upper()} {label}")
                    axes[row][col].fill_between(c["steps"], mean - sd, mean + sd, color=color, alpha=0.12)
            mean, sd = torch.tensor(c["loss"]).T
            axes[2][col].plot(c["loss_steps"], mean, dash, color="black", label=f"{kind.upper()} training loss")
            axes[2][col].fill_between(c["loss_steps"], mean - sd, mean + sd, color="black", alpha=0.12)
        axes[0][col].axhline(1 / settings.pairs, color="grey", ls=":", label="chance")
        axes[1][col].axhline(-math.log(settings.pairs), color="grey", ls=":", label="chance")
        axes[0][col].set(title=f"{config[0]}, {config[1]} layer(s), {config[2]}", ylim=(-0.02, 1.02), ylabel="top-1 among candidates")
        axes[1][col].set(ylabel="log p(answer), over candidates")
        axes[2][col].set(xlabel="training step", ylabel="training loss (nats/token)")
    axes[0][0].legend(fontsize=6)
    axes[2][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _fmt(v: Any) -> str:
    return "n/a" if v is None else f"{v[0]:.3f} ± {v[1]:.3f}"


def _p(row: dict, direction: str) -> str:
    if f"{direction}_p" not in row:
        return "n/a"
    k, n = row[f"{direction}_correct"]
    return f"{k}/{n}, p={row[f'{direction}_p']:.2g}"


def markdown(settings: Settings, rows: list[dict]) -> str:
    chance = 1 / settings.pairs
    relation = ("r' never seen in training" if not settings.inverse_pairs else
                f"r' trained on {settings.inverse_pairs} other pairs as 'D r' C'")
    lines = ["# Reversal curse on random token pairs: MDM vs AR", "",
             f"{settings.pairs} pairs (A, B) of distinct random entities per seed, trained only as 'A r B' ({relation}); "
             f"layouts {', '.join(settings.layouts)}. Models from scratch: width {settings.n_embd}, {settings.n_head} heads, "
             f"{settings.steps} steps of {settings.batch_size} rows, lr {settings.lr:g} for both; seeds {list(settings.seeds)} "
             "(each its own pairs and initialisation). Values at the last step: mean ± sd over seeds.", "",
             f"Top-1: the answer above every other candidate of its kind (chance {chance:.3f}); log p: of the answer, "
             f"normalised over the candidates (chance {-math.log(settings.pairs):.2f}). Binomial: top-1 answers pooled over seeds, "
             f"one-sided exact test against {chance:.3f} (questions taken as independent).", ""]
    table = [[r["layout"], r["layers"], r["positions"], r["model"], _fmt(r.get("forward_top1")), _fmt(r.get("infill_top1")),
              _fmt(r.get("reverse_top1")), _p(r, "reverse"), _fmt(r.get("reverse_logp_candidates")),
              _fmt(r.get("reverse_r2_top1")), _p(r, "reverse_r2")] for r in rows]
    lines.append(md_table(["layout", "layers", "positions", "model", "forward top-1", "infill top-1", "reverse top-1",
                           "reverse: correct, binomial p", "reverse log p", "reverse (r') top-1", "reverse (r'): correct, p"], table))
    lines += ["", "![curves against training steps](reversal.png)"]
    return "\n".join(lines)


def run(out_dir: str | Path, settings: Settings = Settings(), device: str = "auto", progress: bool = True,
        log_to: tuple[str, ...] = ()) -> dict:
    """Prepare (once per layout and seed), train (resumably), score every kept checkpoint, write results.json,
    results.md and reversal.png; ``log_to``: the trackers of every run (:mod:`unmask.tracking`)."""
    out = Path(out_dir)
    specs = specs_for(out, settings)
    records = run_grid(out, specs, lambda spec, run_dir: evaluate_run(spec, run_dir, device), device=device, progress=progress,
                       chunk=settings.every, desc="reversal", log_to=log_to)
    rows = summarise(records, settings)
    _plot(records, settings, out / "reversal.png")
    result = {"experiment": "reversal", "settings": asdict(settings), "runs": records, "summary": rows,
              "curves": {"/".join(map(str, key)): curves(runs) for key, runs in _groups(records).items()}}
    write_outputs(out, result, markdown(settings, rows))
    return result

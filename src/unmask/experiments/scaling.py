"""IsoFLOP scaling laws of MDM and AR, and the compute gap between them (SMDM; docs/algorithms.md, 'Scaling-law fit').

For every compute budget C of a grid and every model size of the grid's depth dial (width =
``aspect`` x depth, heads of ``head_dim``), one MDM and one AR run train on D = C / (6 N) tokens,
N the non-embedding parameters, with the same recipe (AdamW, betas 0.9/0.95, weight decay 0.1,
clip 1.0, 1% warmup, cosine decay to 10%; learning rate ``lr * sqrt(ref_width / width)`` for
both). Each run's final validation loss is measured on the same held-out windows: the MDM's
Monte Carlo bound with ``eval_draws`` draws (and its standard error), the AR model's exact NLL.
:mod:`unmask.experiments.fits` turns the runs into frontiers and the compute multiplier.

FLOPs: the budget uses C = 6 N D. Next to it every run reports the count with the output head
and attention, C_full = D (6 N + 6 V d + 12 n_layer L d) (training = 3 x forward; attention
scores and values 4 L d per token and layer in the forward, counted dense for both models).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from unmask.config import ModelConfig
from unmask.errors import OptionError, UnmaskError
from unmask.experiments import fits
from unmask.experiments.recipe import train_recipe
from unmask.experiments.runner import RunSpec, embedded_data, md_table, pyplot, run_grid, save_figure, write_outputs

KINDS = ("mdm", "ar")


@dataclass(frozen=True)
class Grid:
    """An IsoFLOP grid: budgets (6ND FLOPs) x depths, and the shared recipe."""

    budgets: tuple[float, ...]
    depths: tuple[int, ...]
    aspect: int = 32  # width per layer of depth
    head_dim: int = 32
    context_len: int = 128
    batch_size: int = 16
    lr: float = 2e-3  # at ref_width; lr(width) = lr * sqrt(ref_width / width), the same rule for MDM and AR
    ref_width: int = 128
    min_steps: int = 20
    eval_windows: int = 64
    eval_draws: int = 32
    seed: int = 0
    vocab_size: int = 0  # without a data folder: > 0 trains a BPE of this size on the embedded corpus; 0: the shipped tokenizer

    def __post_init__(self) -> None:
        if len(set(self.depths)) < 3:
            raise UnmaskError(f"grid depths {list(self.depths)}: an IsoFLOP parabola needs at least 3 distinct sizes")
        if len(set(self.budgets)) < 2:
            raise UnmaskError(f"grid budgets {list(self.budgets)}: the frontier fit needs at least 2 distinct budgets")
        if any(b <= 0 for b in self.budgets) or any(d <= 0 for d in self.depths):
            raise UnmaskError("grid budgets and depths must be positive")
        if self.aspect % self.head_dim:
            raise UnmaskError(f"grid aspect={self.aspect} must be a multiple of head_dim={self.head_dim}")
        if self.eval_draws < 2:
            raise UnmaskError(f"grid eval_draws={self.eval_draws} must be >= 2 (a standard error needs two draws)")

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str) -> "Grid":
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise OptionError("grid_name", "{grid_name} {_source}: unknown keys {_unknown}; known: {_known}", _source=source,
                              _unknown=sorted(unknown), _known=sorted(known))
        if "budgets" not in data or "depths" not in data:
            raise OptionError("grid_name", "{grid_name} {_source}: needs 'budgets' (FLOPs, 6ND) and 'depths' (layers) lists", _source=source)
        data = dict(data, budgets=tuple(float(b) for b in data["budgets"]), depths=tuple(int(d) for d in data["depths"]))
        return cls(**data)


GRIDS: dict[str, Grid] = {
    # about an hour on 2 CPU cores (docs/experiments.md): 3 budgets x 5 sizes (width 32 to 96, 33k to 660k
    # non-embedding parameters, around ~20 tokens per parameter at these budgets) x 2 models,
    # 1024-token BPE, 16 x 64 tokens per step
    "cpu": Grid(budgets=(3e11, 1e12, 3e12), depths=(2, 3, 4, 5, 6), aspect=16, head_dim=16, context_len=64, vocab_size=1024),
    # for one GPU: 4 budgets x 5 sizes x 2 models at context 512, widths 256 to 768
    "gpu": Grid(
        budgets=(1e15, 3e15, 1e16, 3e16), depths=(4, 6, 8, 10, 12), aspect=64, head_dim=64, context_len=512,
        batch_size=64, ref_width=512, lr=1e-3, min_steps=100, eval_windows=256, eval_draws=64,
    ),
}


def load_grid(name: str) -> Grid:
    """A named grid (cpu, gpu) or a JSON file of :class:`Grid` fields."""
    if name in GRIDS:
        return GRIDS[name]
    path = Path(name)
    if not path.is_file():
        raise OptionError("grid_name", "{grid_name} {_name!r} is neither a named grid ({_grids}) nor a JSON file", _name=name,
                          _grids=", ".join(GRIDS))
    try:
        return Grid.from_dict(json.loads(path.read_text(encoding="utf-8")), name)
    except json.JSONDecodeError as exc:
        raise OptionError("grid_name", "{grid_name} {_name}: not valid JSON ({_exc})", _name=name, _exc=exc) from None
    except TypeError as exc:
        raise OptionError("grid_name", "{grid_name} {_name}: {_exc}", _name=name, _exc=exc) from None


def model_at(grid: Grid, depth: int, vocab: int, kind: str) -> ModelConfig:
    width = grid.aspect * depth
    return ModelConfig(name=f"d{depth}", vocab_size=vocab, context_len=grid.context_len, n_layer=depth,
                       n_head=width // grid.head_dim, n_embd=width, causal=kind == "ar")


def flops(cfg: ModelConfig, tokens: int) -> dict[str, float]:
    """Training FLOPs of ``tokens`` tokens: "6ND" and "full" (with the head and dense attention)."""
    n, d = cfg.non_embedding_params(), cfg.n_embd
    return {"6ND": 6.0 * n * tokens, "full": float(tokens) * (6 * n + 6 * cfg.vocab_size * d + 12 * cfg.n_layer * cfg.context_len * d)}


def specs_for(grid: Grid, data_dir: str | Path, vocab: int) -> list[RunSpec]:
    """One MDM and one AR run per (budget, depth), in order of increasing budget."""
    specs = []
    tokens_per_step = grid.batch_size * grid.context_len
    for budget in sorted(grid.budgets):
        for depth in sorted(grid.depths):
            for kind in KINDS:
                model = model_at(grid, depth, vocab, kind)
                steps = max(grid.min_steps, round(budget / (6 * model.non_embedding_params()) / tokens_per_step))
                lr = grid.lr * math.sqrt(grid.ref_width / model.n_embd)
                train = train_recipe(kind, steps, grid.batch_size, lr, grid.seed, eval_windows=min(8, grid.eval_windows), eval_draws=2)
                meta = {"kind": kind, "budget": budget, "depth": depth, "n": model.non_embedding_params(),
                        **{f"flops_{k}": v for k, v in flops(model, steps * tokens_per_step).items()}, "tokens": steps * tokens_per_step,
                        "eval_windows": grid.eval_windows, "eval_draws": grid.eval_draws}
                specs.append(RunSpec(f"{kind}-C{budget:.0e}-d{depth}".replace("+", ""), model, train, str(data_dir), meta))
    return specs


def final_loss(spec: RunSpec, run_dir: Path, windows: int, draws: int, device: str = "auto") -> dict:
    """The run's validation loss in nats/token: MDM bound (k-DCE, ``draws`` draws) +- SE, AR exact."""
    import torch

    from unmask.checkpoint import load_model
    from unmask.data import TokenDataset
    from unmask.device import pick_device
    from unmask.likelihood import ar_nll, mc_elbo

    model, cfg = load_model(run_dir, pick_device(device))
    val = TokenDataset(spec.data_dir, "val")
    win = torch.from_numpy(val.eval_windows(cfg.model.context_len, windows))
    if cfg.model.causal:
        res = ar_nll(model, win, torch.from_numpy(val.eval_previous(cfg.model.context_len, windows)))
    else:
        res = mc_elbo(model, win, draws=draws, estimator="k-dce", seed=1234)
    return {"loss": res.nats_per_token, "stderr": res.stderr, "kind": res.kind, "tokens_scored": res.num_tokens}


def analyse(records: list[dict], bootstrap_samples: int = 1000, extrapolate: tuple[float, ...] = (1e18, 6e18, 1e20)) -> dict:
    """Frontiers per model type with bootstrap intervals, the compute multiplier and size ratio."""
    out: dict[str, Any] = {"fits": {}, "bootstrap_samples": bootstrap_samples}
    laws, boots = {}, {}
    budgets_all = sorted({r["spec"]["meta"]["budget"] for r in records})
    for kind in KINDS:
        rows = [r for r in records if r["spec"]["meta"]["kind"] == kind]
        c = np.array([r["spec"]["meta"]["budget"] for r in rows])
        n = np.array([r["spec"]["meta"]["n"] for r in rows], dtype=float)
        loss = np.array([r["result"]["loss"] for r in rows])
        vertices, loss_law, size_law = fits.frontier(c, n, loss)
        laws[kind] = (loss_law, size_law)

        def stat(cb, nb, lb):
            _, ll, sl = fits.frontier(cb, nb, lb)
            return [ll.coef, ll.exponent, sl.coef, sl.exponent]

        boots[kind] = fits.bootstrap(c, n, loss, stat, samples=bootstrap_samples, seed=0 if kind == "mdm" else 1)
        ci = {key: fits.interval(boots[kind][:, i]) if len(boots[kind]) else (float("nan"),) * 2
              for i, key in enumerate(("A", "minus_a", "B", "b"))}
        out["fits"][kind] = {
            "vertices": [asdict(v) for v in vertices],
            "loss": {"A": loss_law.coef, "a": -loss_law.exponent, "A_ci": ci["A"], "a_ci": tuple(-x for x in ci["minus_a"][::-1])},
            "size": {"B": size_law.coef, "b": size_law.exponent, "B_ci": ci["B"], "b_ci": ci["b"]},
            "bootstrap_kept": len(boots[kind]),
        }
    mdm_loss, ar_loss = laws["mdm"][0], laws["ar"][0]
    k = min(len(boots["mdm"]), len(boots["ar"]))
    comparison = []
    for budget in [*budgets_all, *extrapolate]:
        mult = float(fits.compute_multiplier(mdm_loss, ar_loss, budget))
        ratio = float(laws["mdm"][1](budget) / laws["ar"][1](budget))
        samples_m, samples_r = [], []
        for i in range(k):
            m = fits.PowerLaw(boots["mdm"][i, 0], boots["mdm"][i, 1])
            a = fits.PowerLaw(boots["ar"][i, 0], boots["ar"][i, 1])
            samples_m.append(float(fits.compute_multiplier(m, a, budget)))
            samples_r.append(float(fits.PowerLaw(boots["mdm"][i, 2], boots["mdm"][i, 3])(budget) / fits.PowerLaw(boots["ar"][i, 2], boots["ar"][i, 3])(budget)))
        comparison.append({
            "budget": budget, "extrapolated": budget not in budgets_all, "ar_loss": float(ar_loss(budget)), "mdm_loss": float(mdm_loss(budget)),
            "compute_multiplier": mult, "compute_multiplier_ci": fits.interval(np.array(samples_m)),
            "size_ratio": ratio, "size_ratio_ci": fits.interval(np.array(samples_r)),
        })
    out["comparison"] = comparison
    edge = [f"{kind.upper()} at C={v['budget']:.0e}" for kind in KINDS for v in out["fits"][kind]["vertices"] if not v["interior"]]
    out["edge_vertices"] = edge  # budgets whose best size lies at the edge of the grid: no IsoFLOP minimum there
    return out


def _plot(records: list[dict], analysis: dict, path: Path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    budgets = sorted({r["spec"]["meta"]["budget"] for r in records})
    colours = plt.cm.viridis(np.linspace(0, 0.85, len(budgets)))
    style = {"mdm": "-", "ar": "--"}
    for kind in KINDS:
        fit = analysis["fits"][kind]
        for colour, budget in zip(colours, budgets):
            rows = sorted((r for r in records if r["spec"]["meta"]["kind"] == kind and r["spec"]["meta"]["budget"] == budget),
                          key=lambda r: r["spec"]["meta"]["n"])
            n = np.array([r["spec"]["meta"]["n"] for r in rows], dtype=float)
            loss = np.array([r["result"]["loss"] for r in rows])
            err = np.array([r["result"]["stderr"] for r in rows])
            axes[0].errorbar(n, loss, yerr=err, fmt="o", color=colour, ms=4, mfc="none" if kind == "ar" else colour)
            coef = np.polyfit(np.log(n), loss, 2)
            xs = np.linspace(np.log(n).min(), np.log(n).max(), 50)
            axes[0].plot(np.exp(xs), np.polyval(coef, xs), style[kind], color=colour, label=f"{kind.upper()} C={budget:.0e}")
        cs = np.array([v["budget"] for v in fit["vertices"]])
        grid_c = np.geomspace(cs.min() / 2, cs.max() * 4, 50)
        for ax, key, law_key in ((axes[1], "loss_opt", "loss"), (axes[2], "n_opt", "size")):
            law = fit[law_key]
            coef, expo = (law["A"], -law["a"]) if law_key == "loss" else (law["B"], law["b"])
            ax.plot(cs, [v[key] for v in fit["vertices"]], "o", color="C0" if kind == "mdm" else "C1")
            ax.plot(grid_c, coef * grid_c ** expo, style[kind], color="C0" if kind == "mdm" else "C1",
                    label=f"{kind.upper()}: {coef:.3g} C^{expo:+.3f}")
        boot = analysis.get("_bands", {}).get(kind)
        if boot is not None:
            for ax, lo, hi in ((axes[1], boot["loss_lo"], boot["loss_hi"]), (axes[2], boot["size_lo"], boot["size_hi"])):
                ax.fill_between(boot["c"], lo, hi, color="C0" if kind == "mdm" else "C1", alpha=0.2)
    axes[0].set(xscale="log", xlabel="non-embedding parameters N", ylabel="final validation loss (nats/token)", title="IsoFLOP curves (MDM solid, AR dashed)")
    axes[1].set(xscale="log", yscale="log", xlabel="compute C = 6ND (FLOPs)", ylabel="L*(C)", title="loss frontier (95% bootstrap band)")
    axes[2].set(xscale="log", yscale="log", xlabel="compute C = 6ND (FLOPs)", ylabel="N*(C)", title="compute-optimal size")
    for ax in axes:
        ax.legend(fontsize=7)
    save_figure(fig, path)


def _bands(records: list[dict], samples: int) -> dict:
    """Pointwise 95% bootstrap bands of both frontiers, for the plot."""
    bands = {}
    for kind in KINDS:
        rows = [r for r in records if r["spec"]["meta"]["kind"] == kind]
        c = np.array([r["spec"]["meta"]["budget"] for r in rows])
        n = np.array([r["spec"]["meta"]["n"] for r in rows], dtype=float)
        loss = np.array([r["result"]["loss"] for r in rows])
        grid_c = np.geomspace(c.min() / 2, c.max() * 4, 50)

        def stat(cb, nb, lb):
            _, ll, sl = fits.frontier(cb, nb, lb)
            return np.concatenate([ll(grid_c), sl(grid_c)])

        values = fits.bootstrap(c, n, loss, stat, samples=samples, seed=2)
        if len(values) == 0:
            continue
        lo, hi = np.percentile(values, [2.5, 97.5], axis=0)
        bands[kind] = {"c": grid_c, "loss_lo": lo[:50], "loss_hi": hi[:50], "size_lo": lo[50:], "size_hi": hi[50:]}
    return bands


def markdown(grid_name: str, grid: Grid, records: list[dict], analysis: dict) -> str:
    lines = [f"# IsoFLOP scaling: MDM vs AR (grid `{grid_name}`)", "", "## Grid", "", "```json", json.dumps(asdict(grid)), "```", "", "## Runs", ""]
    rows = []
    for r in records:
        m, res = r["spec"]["meta"], r["result"]
        rows.append([m["kind"].upper(), f"{m['budget']:.0e}", m["depth"], m["n"], m["tokens"], f"{m['flops_6ND']:.3g}", f"{m['flops_full']:.3g}",
                     f"{res['loss']:.4f}", f"{res['stderr']:.4f}"])
    lines.append(md_table(["model", "budget C", "depth", "N (non-emb.)", "tokens D", "6ND", "FLOPs with head+attention", "val loss", "SE"], rows))
    lines += ["", "## Frontiers (95% bootstrap intervals over runs)", ""]
    rows = []
    for kind in KINDS:
        f = analysis["fits"][kind]
        rows.append([kind.upper(), f"{f['loss']['A']:.4g} [{f['loss']['A_ci'][0]:.3g}, {f['loss']['A_ci'][1]:.3g}]",
                     f"{f['loss']['a']:.4f} [{f['loss']['a_ci'][0]:.4f}, {f['loss']['a_ci'][1]:.4f}]",
                     f"{f['size']['B']:.4g} [{f['size']['B_ci'][0]:.3g}, {f['size']['B_ci'][1]:.3g}]",
                     f"{f['size']['b']:.4f} [{f['size']['b_ci'][0]:.4f}, {f['size']['b_ci'][1]:.4f}]",
                     " ".join(f"{v['n_opt']:.3g}{'' if v['interior'] else '*'}" for v in f["vertices"])])
    lines.append(md_table(["model", "A in L*=A C^-a", "a", "B in N*=B C^b", "b", "N* per budget (*: edge of grid)"], rows))
    if analysis["edge_vertices"]:
        lines += ["", f"**Not a frontier:** the best size of {', '.join(analysis['edge_vertices'])} lies at the edge of the grid (the "
                  "parabola has no minimum inside it), so N* and L* there are the best run, not an IsoFLOP minimum. The fits and the "
                  "multiplier below inherit this; widen the depth range or move the budgets before reading them as scaling laws."]
    lines += ["", "## Compute multiplier (MDM compute to reach the AR loss) and size ratio N*_MDM / N*_AR", ""]
    rows = [[f"{c['budget']:.0e}" + (" (extrapolated)" if c["extrapolated"] else ""), f"{c['ar_loss']:.4f}", f"{c['mdm_loss']:.4f}",
             f"{c['compute_multiplier']:.3g} [{c['compute_multiplier_ci'][0]:.3g}, {c['compute_multiplier_ci'][1]:.3g}]",
             f"{c['size_ratio']:.3g} [{c['size_ratio_ci'][0]:.3g}, {c['size_ratio_ci'][1]:.3g}]"] for c in analysis["comparison"]]
    lines.append(md_table(["budget C", "AR L*(C)", "MDM L*(C)", "compute multiplier", "size ratio"], rows))
    lines += ["", "SMDM reports a multiplier of about 16x and a size ratio of about 0.5x at 6e18 to 1e20 FLOPs; rows marked extrapolated",
              "lie far outside the budgets run here and carry the fitted exponents' uncertainty over many decades.", "",
              "![IsoFLOP curves and frontiers](scaling.png)"]
    return "\n".join(lines)


def run(out_dir: str | Path, grid_name: str = "cpu", data_dir: str | Path | None = None, device: str = "auto",
        progress: bool = True, bootstrap_samples: int = 1000, log_to: tuple[str, ...] = ()) -> dict:
    """Run (or resume) the grid, fit, and write results.json, results.md and scaling.png to ``out_dir``; ``log_to``:
    the trackers of every run (:mod:`unmask.tracking`)."""
    from unmask.data import TokenDataset

    grid = load_grid(grid_name)
    if data_dir is not None and grid.vocab_size:
        raise OptionError("data_dir", "{data_dir} {_dir}: the grid asks for its own {_vocab}-token BPE of the embedded corpus (vocab_size); "
                          "set vocab_size to 0 in a {grid_name} file to train on your data folder", _dir=data_dir, _vocab=grid.vocab_size)
    data = Path(data_dir) if data_dir is not None else embedded_data(out_dir, grid.vocab_size)
    vocab = TokenDataset(data, "train").tokenizer.vocab_size
    specs = specs_for(grid, data.resolve(), vocab)
    records = run_grid(out_dir, specs, lambda s, d: final_loss(s, d, grid.eval_windows, grid.eval_draws, device=device),
                       device=device, progress=progress, chunk=max(50, min(s.train.steps for s in specs)), desc="scaling", log_to=log_to)
    analysis = analyse(records, bootstrap_samples)
    bands = _bands(records, bootstrap_samples)
    _plot(records, {**analysis, "_bands": bands}, Path(out_dir) / "scaling.png")
    result = {"experiment": "scaling", "grid_name": grid_name, "grid": asdict(grid), "data_dir": str(data), "runs": records, **analysis}
    write_outputs(out_dir, result, markdown(grid_name, grid, records, analysis))
    return result

"""Robustness to distribution shift (SMDM): how much worse MDM and AR score text unlike their training text.

Both models train on the embedded Shakespeare corpus (its training works; a BPE of
``vocab_size`` tokens trained on them, or the shipped tokenizer with ``vocab_size=0``) with the
same recipe. Each is scored on the held-out Shakespeare works (in-domain) and on every shifted
corpus: by default three works of Milton shipped with the package (``assets/milton.tar.gz``,
same source and licence as the Shakespeare texts), plus any local text files. Reported: NLL in
nats/token (MDM: Monte Carlo bound +- SE, and the exact left-to-right chain-rule score; AR:
exact) and the relative increase shifted / in-domain - 1.

Two comparisons: at equal training compute (MDM and AR of the same size, steps and batch), and
at equal in-domain loss: the AR model is also trained for ``ar_fractions`` of the steps, and its
relative increase is interpolated (linearly in in-domain loss) at the MDM's in-domain loss.
"""

from __future__ import annotations

import io
import tarfile
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from unmask.errors import OptionError, check_number
from unmask.experiments.recipe import SmallModel
from unmask.experiments.runner import RunSpec, embedded_data, md_table, pyplot, run_grid, save_figure, write_outputs


@dataclass(frozen=True)
class Settings(SmallModel):
    """The model (``vocab_size`` 0: the shipped 4096-token tokenizer and the cached default dataset), the
    shorter AR runs, the scoring and the corpus."""

    steps: int = 800
    ar_fractions: tuple[float, ...] = (0.25, 0.5)  # extra, shorter AR runs for the equal-loss comparison
    eval_windows: int = 64
    eval_draws: int = 16
    chain_rule: bool = True
    seed: int = 0
    works: int = 0  # training works of the corpus used (0: all 38); fewer for quick checks

    def __post_init__(self) -> None:
        super().__post_init__()
        if any(not 0 < f < 1 for f in self.ar_fractions):
            raise OptionError("ar_fractions", "{ar_fractions} {_fractions} must lie in (0, 1) (the full-length AR run is always trained)",
                              _fractions=list(self.ar_fractions))
        check_number("eval_draws", self.eval_draws, ">= 2")


def milton_works() -> list[tuple[str, str]]:
    """(work id, text) of the shipped Milton texts, sorted; no network access."""
    data = resources.files("unmask.data").joinpath("assets", "milton.tar.gz").read_bytes()
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tf:
        return sorted((m.name[:-4], tf.extractfile(m).read().decode("utf-8")) for m in tf.getmembers() if m.name.endswith(".txt") and m.name != "NOTICE.txt")


def shifted_corpora(paths: list[str | Path], milton: bool = True) -> dict[str, list[str]]:
    from unmask.data import read_documents

    corpora = {"milton": [text for _, text in milton_works()]} if milton else {}
    for path in paths:
        corpora[Path(path).name] = list(read_documents([path]))
    if not corpora:
        raise OptionError("shifted", "no shifted corpus: keep the default Milton texts or pass {shifted} FILE")
    return corpora


def specs_for(settings: Settings, data: Path, vocab: int, corpora: list[str]) -> list[RunSpec]:
    """The MDM and the full-length AR run, then the shorter AR runs. ``meta`` records what each is
    scored on, so a finished run is reused only for the same corpora and evaluation settings."""
    evaluation = {"corpora": corpora, "eval_windows": settings.eval_windows, "eval_draws": settings.eval_draws, "chain_rule": settings.chain_rule}
    specs = []
    for kind, fraction in [("mdm", 1.0), ("ar", 1.0), *(("ar", f) for f in sorted(settings.ar_fractions, reverse=True))]:
        steps = max(1, round(settings.steps * fraction))
        specs.append(RunSpec(f"{kind}-{steps}steps", settings.model_config("shift", vocab, kind), settings.train_config(kind, steps, settings.seed),
                             str(data), {"kind": kind, "fraction": fraction, "steps": steps, **evaluation}))
    return specs


def _spread(windows: np.ndarray, prev: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
    idx = np.unique(np.linspace(0, len(windows) - 1, min(count, len(windows))).round().astype(int))
    return windows[idx], prev[idx]


def evaluate_run(run_dir: Path, corpora: dict[str, list[str]], settings: Settings, device: str = "auto") -> dict[str, Any]:
    import torch

    from unmask.checkpoint import load_model
    from unmask.data import TokenDataset
    from unmask.device import pick_device
    from unmask.evaluation.corpora import packed_windows
    from unmask.likelihood import ar_nll, chain_rule_nll, mc_elbo

    model, cfg = load_model(run_dir, pick_device(device))
    val = TokenDataset(cfg.data_dir, "val")
    length = cfg.model.context_len
    sets = {"in-domain": (val.eval_windows(length, settings.eval_windows), val.eval_previous(length, settings.eval_windows))}
    for name, docs in corpora.items():
        sets[name] = _spread(*packed_windows(docs, val.tokenizer, length), settings.eval_windows)
    out: dict[str, Any] = {}
    for name, (win, prev) in sets.items():
        w, p = torch.from_numpy(np.asarray(win, dtype=np.int64)), torch.from_numpy(np.asarray(prev, dtype=np.int64))
        if cfg.model.causal:
            out[name] = {"nll": ar_nll(model, w, p).nats_per_token, "stderr": 0.0}
        else:
            bound = mc_elbo(model, w, draws=settings.eval_draws, estimator="k-dce", seed=1234)
            out[name] = {"nll": bound.nats_per_token, "stderr": bound.stderr}
            if settings.chain_rule:
                out[name]["chain_rule"] = chain_rule_nll(model, w).nats_per_token
    return out


def interpolate_at(x: float, xs: list[float], ys: list[float]) -> tuple[float, bool]:
    """y at x, linear between the nearest points of (xs, ys); extrapolated linearly outside their range
    (the flag says so)."""
    order = np.argsort(xs)
    xs, ys = np.asarray(xs, dtype=float)[order], np.asarray(ys, dtype=float)[order]
    if len(xs) == 1:
        return float(ys[0]), True
    inside = xs[0] <= x <= xs[-1]
    i = int(np.clip(np.searchsorted(xs, x) - 1, 0, len(xs) - 2))
    t = (x - xs[i]) / (xs[i + 1] - xs[i]) if xs[i + 1] != xs[i] else 0.0
    return float(ys[i] + t * (ys[i + 1] - ys[i])), not inside


def analyse(records: list[dict], corpora: list[str]) -> dict[str, Any]:
    mdm = next(r for r in records if r["spec"]["meta"]["kind"] == "mdm")
    ars = [r for r in records if r["spec"]["meta"]["kind"] == "ar"]
    ar_full = next(r for r in ars if r["spec"]["meta"]["fraction"] == 1.0)

    def rel(res: dict, name: str, key: str = "nll") -> float:
        return res[name][key] / res["in-domain"][key] - 1

    rows = []
    for name in corpora:
        ar_in = [r["result"]["in-domain"]["nll"] for r in ars]
        ar_rel = [rel(r["result"], name) for r in ars]
        at_loss, extrapolated = interpolate_at(mdm["result"]["in-domain"]["nll"], ar_in, ar_rel)
        row = {"corpus": name, "mdm_in": mdm["result"]["in-domain"]["nll"], "mdm_shift": mdm["result"][name]["nll"],
               "mdm_rel_bound": rel(mdm["result"], name), "ar_in": ar_full["result"]["in-domain"]["nll"],
               "ar_shift": ar_full["result"][name]["nll"], "ar_rel_equal_compute": rel(ar_full["result"], name),
               "ar_rel_equal_loss": at_loss, "equal_loss_extrapolated": extrapolated}
        if "chain_rule" in mdm["result"][name]:
            row["mdm_rel_chain_rule"] = rel(mdm["result"], name, "chain_rule")
            row["mdm_in_chain_rule"] = mdm["result"]["in-domain"]["chain_rule"]
            row["mdm_shift_chain_rule"] = mdm["result"][name]["chain_rule"]
        rows.append(row)
    return {"comparison": rows}


def markdown(settings: Settings, records: list[dict], analysis: dict) -> str:
    lines = ["# Distribution shift: relative NLL increase of MDM and AR", "",
             f"Trained on the embedded Shakespeare training works ({settings.described()}, seed {settings.seed}; "
             f"BPE {settings.vocab_size or 'shipped 4096'}). Scored on {settings.eval_windows} windows per corpus "
             f"(MDM bound: {settings.eval_draws} k-DCE draws).", "", "## Runs (NLL in nats/token)", ""]
    names = [k for k in records[0]["result"]]
    rows = []
    for r in records:
        m = r["spec"]["meta"]
        res = r["result"]
        cells = [f"{res[n]['nll']:.4f}" + (f" +- {res[n]['stderr']:.4f}" if res[n]["stderr"] else "")
                 + (f" (chain rule {res[n]['chain_rule']:.4f})" if "chain_rule" in res[n] else "") for n in names]
        rows.append([m["kind"].upper(), m["steps"], *cells])
    lines.append(md_table(["model", "steps", *names], rows))
    lines += ["", "## Relative increase shifted / in-domain - 1", ""]
    rows = []
    for c in analysis["comparison"]:
        rows.append([c["corpus"], f"{c['mdm_rel_bound']:.4f}", f"{c.get('mdm_rel_chain_rule', float('nan')):.4f}",
                     f"{c['ar_rel_equal_compute']:.4f}", f"{c['ar_rel_equal_loss']:.4f}" + (" (extrapolated)" if c["equal_loss_extrapolated"] else "")])
    lines.append(md_table(["shifted corpus", "MDM (bound)", "MDM (chain rule)", "AR, equal compute", "AR, equal in-domain loss"], rows))
    lines += ["", "![relative increase against in-domain loss](shift.png)"]
    return "\n".join(lines)


def _plot(records: list[dict], corpora: list[str], path: Path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, len(corpora), figsize=(5.5 * len(corpora), 4.2), squeeze=False)
    for ax, name in zip(axes[0], corpora):
        ars = sorted((r for r in records if r["spec"]["meta"]["kind"] == "ar"), key=lambda r: r["spec"]["meta"]["steps"])
        xs = [r["result"]["in-domain"]["nll"] for r in ars]
        ax.plot(xs, [r["result"][name]["nll"] / r["result"]["in-domain"]["nll"] - 1 for r in ars], "o--", color="C1", label="AR (runs of different length)")
        mdm = next(r for r in records if r["spec"]["meta"]["kind"] == "mdm")["result"]
        ax.plot([mdm["in-domain"]["nll"]], [mdm[name]["nll"] / mdm["in-domain"]["nll"] - 1], "s", color="C0", label="MDM (bound)")
        if "chain_rule" in mdm[name]:
            ax.plot([mdm["in-domain"]["chain_rule"]], [mdm[name]["chain_rule"] / mdm["in-domain"]["chain_rule"] - 1], "^", color="C2", label="MDM (chain rule)")
        ax.set(xlabel="in-domain NLL (nats/token)", ylabel="relative NLL increase", title=f"shift to {name}")
        ax.legend(fontsize=8)
    save_figure(fig, path)


def run(out_dir: str | Path, settings: Settings = Settings(), shifted: list[str | Path] = (), milton: bool = True,
        device: str = "auto", progress: bool = True, log_to: tuple[str, ...] = ()) -> dict:
    """Prepare (once), train (resumably), score and write results.json, results.md, shift.png; ``log_to``: the
    trackers of every run (:mod:`unmask.tracking`)."""
    from unmask.data import TokenDataset

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    corpora = shifted_corpora(list(shifted), milton)
    data = embedded_data(out, settings.vocab_size, settings.works)
    vocab = TokenDataset(data, "train").tokenizer.vocab_size
    specs = specs_for(settings, Path(data).resolve(), vocab, list(corpora))
    records = run_grid(out, specs, lambda spec, run_dir: evaluate_run(run_dir, corpora, settings, device), device=device,
                       progress=progress, chunk=settings.chunk, desc="shift", log_to=log_to)
    analysis = analyse(records, list(corpora))
    _plot(records, list(corpora), out / "shift.png")
    result = {"experiment": "shift", "settings": asdict(settings), "shifted": list(corpora), "runs": records, **analysis}
    write_outputs(out, result, markdown(settings, records, analysis))
    return result

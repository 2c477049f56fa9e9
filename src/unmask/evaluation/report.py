"""``unmask report RUN...``: Markdown + JSON + PNG plots comparing runs (typically MDM vs AR).

Reads what runs already hold: ``config.json``, ``metrics.jsonl`` and the ``results/*.jsonl`` that
``unmask eval ... --save`` appends (ppl, harness, genppl). Draws training and validation curves
against tokens and against FLOPs (6 N D), a likelihood table, and, when generation results
exist, the gen-PPL vs tokens/s Pareto plot (with entropy printed next to every point).
"""

from __future__ import annotations

import json
from pathlib import Path

from unmask.errors import UnmaskError


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def append_result(run_dir: str | Path, kind: str, record: dict) -> Path:
    """Append one result line to RUN/results/<kind>.jsonl (used by `--save`)."""
    path = Path(run_dir) / "results" / f"{kind}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
    return path


def load_run(run_dir: Path) -> dict:
    config_path = run_dir / "config.json"
    if not config_path.is_file():
        raise UnmaskError(f"{run_dir} is not a run folder (no config.json); pass folders made by `unmask train`")
    config = json.loads(config_path.read_text())
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    results = {p.stem: read_jsonl(p) for p in sorted((run_dir / "results").glob("*.jsonl"))}
    return {"name": run_dir.name, "dir": str(run_dir), "config": config, "metrics": metrics, "results": results}


def _summary(run: dict) -> dict:
    model, train = run["config"]["model"], run["config"]["train"]
    vals = [m for m in run["metrics"] if m["kind"] == "val"]
    trains = [m for m in run["metrics"] if m["kind"] == "train"]
    last_val = vals[-1] if vals else {}
    ppl = run["results"].get("ppl", [])
    return {
        "run": run["name"], "objective": train["objective"], "preset": model["name"], "context_len": model["context_len"],
        "steps": trains[-1]["step"] if trains else 0, "tokens": trains[-1]["tokens"] if trains else 0,
        "flops": trains[-1]["flops"] if trains else 0,
        "val_nats_per_token": last_val.get("val_nats_per_token"), "val_stderr": last_val.get("val_stderr"),
        "val_ppl": last_val.get("val_ppl"), "eval": ppl[-1] if ppl else None,
        "harness": run["results"].get("harness", [])[-1:] or None, "genppl": run["results"].get("genppl", []),
    }


def _plot(runs: list[dict], out: Path) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UnmaskError("`unmask report` draws plots with matplotlib: pip install 'unmask[plot]'") from None
    files = []
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    for run in runs:
        label = f"{run['name']} ({run['config']['train']['objective']})"
        tr = [m for m in run["metrics"] if m["kind"] == "train"]
        va = [m for m in run["metrics"] if m["kind"] == "val"]
        for col, x in enumerate(("tokens", "flops")):
            axes[0, col].plot([m[x] for m in tr], [m["loss"] for m in tr], label=label)
            axes[1, col].errorbar([m[x] for m in va], [m["val_nats_per_token"] for m in va], yerr=[m["val_stderr"] for m in va], marker="o", label=label, capsize=2)
    for col, x in enumerate(("tokens", "FLOPs (6 N D)")):
        axes[0, col].set(xlabel=x, ylabel="train loss (nats/token)", title=f"training loss vs {x}")
        axes[1, col].set(xlabel=x, ylabel="val nats/token (MDM: bound)", title=f"validation vs {x}")
        for row in range(2):
            axes[row, col].set_xscale("log")
            axes[row, col].legend(fontsize=8)
            axes[row, col].grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=110)
    plt.close(fig)
    files.append("curves.png")

    points = [(run["name"], p) for run in runs for p in run["results"].get("genppl", [])]
    if points:
        fig, ax = plt.subplots(figsize=(7, 5))
        for name, p in points:
            ax.scatter(p["tokens_per_s"], p["gen_ppl"])
            ax.annotate(f"{name}:{p.get('label', '')} H={p['unigram_entropy']:.2f}", (p["tokens_per_s"], p["gen_ppl"]), fontsize=7)
        ax.set(xlabel="generated tokens/s", ylabel="generative perplexity (judge AR)", title="speed vs quality (entropy H next to each point)")
        ax.set_xscale("log")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / "pareto.png", dpi=110)
        plt.close(fig)
        files.append("pareto.png")
    return files


def make_report(run_dirs: list[str | Path], out_dir: str | Path) -> dict:
    """Write report.md, report.json and PNG plots into ``out_dir``; returns the JSON content."""
    if not run_dirs:
        raise UnmaskError("report: give at least one run folder")
    runs = [load_run(Path(d)) for d in run_dirs]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summaries = [_summary(r) for r in runs]
    files = _plot(runs, out)
    lines = ["# unmask report", "", "## Likelihood (validation; MDM: upper bound on the NLL)", "",
             "| run | objective | preset | steps | tokens | FLOPs | val nats/token | val ppl | eval nats/token | eval ppl | eval estimator |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in summaries:
        bound = "<= " if s["objective"] == "mdm" else ""
        val = f"{s['val_nats_per_token']:.4f} ± {s['val_stderr']:.4f}" if s["val_nats_per_token"] is not None else "-"
        vppl = f"{bound}{s['val_ppl']:.2f}" if s["val_ppl"] is not None else "-"
        ev = s["eval"]
        ev_cols = (f"{ev['nats_per_token']:.4f} ± {ev['stderr']:.4f}", f"{bound if ev['kind'] == 'elbo' else ''}{ev['perplexity']:.2f}", ev["estimator"]) if ev else ("-", "-", "-")
        lines.append(f"| {s['run']} | {s['objective']} | {s['preset']} | {s['steps']} | {s['tokens']:,} | {s['flops']:.3g} | {val} | {vppl} | {' | '.join(ev_cols)} |")
    harness = [(s["run"], h) for s in summaries for h in (s["harness"] or [])]
    if harness:
        lines += ["", "## lm-eval tasks", "", "| run | task | metric | value | settings |", "|---|---|---|---|---|"]
        for run, h in harness:
            for task, metrics in h["tasks"].items():
                for metric, value in metrics.items():
                    if metric != "sample_len":
                        lines.append(f"| {run} | {task} | {metric} | {value:.4f} | {h.get('settings', '')} |")
    gens = [(s["run"], g) for s in summaries for g in s["genppl"]]
    if gens:
        lines += ["", "## Generation quality (always with entropy)", "", "| run | label | gen-PPL | unigram entropy | distinct-2 | tokens/s |", "|---|---|---|---|---|---|"]
        for run, g in gens:
            lines.append(f"| {run} | {g.get('label', '')} | {g['gen_ppl']:.2f} | {g['unigram_entropy']:.3f} | {g['distinct_2']:.3f} | {g['tokens_per_s']:.1f} |")
    lines += ["", *[f"![{f}]({f})" for f in files], ""]
    (out / "report.md").write_text("\n".join(lines), encoding="utf-8")
    report = {"runs": summaries, "plots": files}
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
    return report

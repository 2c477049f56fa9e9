"""A grid of training runs that survives interruption, and the files every experiment writes.

Each run of an experiment has a name and a folder ``OUT/runs/<name>``. :func:`run_grid` trains
the runs in order with :func:`unmask.train.train`, in chunks of ``chunk`` steps so that one
progress bar (rate and ETA) covers the steps of the whole experiment; every chunk ends with a
checkpoint, and the next chunk continues it with ``resume=True``, which the training loop makes
exact (the losses equal an uninterrupted run's). When a run is trained, ``evaluate`` scores it and
its answer is written to ``OUT/runs/<name>/result.json`` (atomically) together with the run's
spec. On a second call:

* a run with a ``result.json`` whose spec equals the current one is skipped (its result is read);
* a run with checkpoints but no result continues from its latest checkpoint;
* a run whose saved spec differs is refused with an error naming the folder (start a new OUT).

Every finished run also appends one line to ``OUT/log.jsonl``. :func:`write_outputs` writes the
experiment's ``results.json`` and ``results.md`` atomically.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from tqdm.auto import tqdm

from unmask.checkpoint import write_text_atomic
from unmask.config import ModelConfig, TrainConfig
from unmask.errors import OptionError, UnmaskError


@dataclass(frozen=True)
class RunSpec:
    """One training run of an experiment: its name (a folder name), configs, data, and free-form
    ``meta`` the experiment uses to group runs (budget, size, seed, ...)."""

    name: str
    model: ModelConfig
    train: TrainConfig
    data_dir: str
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "model": self.model.to_dict(), "train": self.train.to_dict(), "data_dir": str(self.data_dir), "meta": self.meta}


def _canonical(data: Any) -> Any:
    """JSON round trip, so tuples and lists compare equal."""
    return json.loads(json.dumps(data))


def _same_spec(saved: Any, spec: RunSpec) -> bool:
    """Whether a result file's spec is ``spec``. Its model and training settings are compared as configs
    (a field the file does not have takes its default), so the results of runs written before a field
    existed, or with the flat training layout (before the config's sections), still count."""
    try:
        model, train = ModelConfig.from_dict(saved["model"]), TrainConfig.from_dict(saved["train"])
    except (UnmaskError, TypeError, KeyError):
        return False
    return _canonical({**saved, "model": model.to_dict(), "train": train.to_dict()}) == _canonical(spec.to_dict())


def _finished(path: Path, spec: RunSpec) -> dict | None:
    if not path.is_file():
        return None
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return None  # damaged by a crash outside the atomic write: score the run again
    if not _same_spec(saved.get("spec"), spec):
        raise OptionError("out_dir", "{_folder} holds run {_name!r} with different settings than this experiment asks for; "
                          "pass a new {out_dir} folder (or remove that run folder) to run the new settings", _folder=path.parent, _name=spec.name)
    return saved["result"]


def _trained_steps(run_dir: Path) -> int:
    """The step of the run's latest checkpoint (0 without one)."""
    from unmask.checkpoint import resolve_checkpoint, load_trainer_state

    if not (run_dir / "checkpoints").exists():
        return 0
    return load_trainer_state(resolve_checkpoint(run_dir)).step


def run_grid(
    out_dir: str | Path,
    specs: list[RunSpec],
    evaluate: Callable[[RunSpec, Path], dict],
    device: str = "auto",
    progress: bool = True,
    chunk: int = 100,
    desc: str = "experiment",
    log_to: tuple[str, ...] = (),
) -> list[dict]:
    """Train and evaluate every spec (skipping finished ones); returns one dict per spec:
    ``{"spec": spec.to_dict(), "result": evaluate(spec, run_dir)}``. ``log_to``: trackers every run
    also logs to (:mod:`unmask.tracking`; each chunk resumes the run's own)."""
    from unmask.train import train

    out = Path(out_dir)
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise UnmaskError(f"experiment has duplicate run names: {sorted(n for n in set(names) if names.count(n) > 1)}")
    if chunk <= 0:
        raise UnmaskError(f"chunk={chunk} must be a positive number of steps")
    (out / "runs").mkdir(parents=True, exist_ok=True)
    results: dict[str, dict] = {}
    done_steps = 0
    for spec in specs:
        found = _finished(out / "runs" / spec.name / "result.json", spec)
        if found is not None:
            results[spec.name] = found
            done_steps += spec.train.steps
        else:
            done_steps += min(_trained_steps(out / "runs" / spec.name), spec.train.steps)
    total = sum(s.train.steps for s in specs)
    bar = tqdm(total=total, initial=done_steps, desc=desc, unit="step", disable=not progress, dynamic_ncols=True)
    if results:
        bar.write(f"{len(results)} of {len(specs)} runs already finished in {out}: skipped")
    for spec in specs:
        if spec.name in results:
            continue
        run_dir = out / "runs" / spec.name
        bar.set_postfix_str(spec.name)
        step = _trained_steps(run_dir)
        start = time.perf_counter()
        while step < spec.train.steps:
            result = train(run_dir, spec.model, spec.train, spec.data_dir, resume=step > 0, device=device, progress=False, stop_after=chunk,
                           log_to=log_to)
            bar.update(result.steps - step)
            step = result.steps
        answer = evaluate(spec, run_dir)
        write_text_atomic(run_dir / "result.json", json.dumps({"spec": spec.to_dict(), "result": answer}, indent=2) + "\n")
        with open(out / "log.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps({"run": spec.name, "seconds": time.perf_counter() - start, **answer}) + "\n")
        results[spec.name] = answer
    bar.close()
    return [{"spec": spec.to_dict(), "result": results[spec.name]} for spec in specs]


def embedded_data(out_dir: str | Path, vocab_size: int, works: int = 0) -> Path:
    """The embedded Shakespeare corpus as a data folder: with ``vocab_size`` 0 the cached default
    dataset (shipped 4096-token tokenizer); otherwise ``OUT/data``, prepared once with a BPE of
    ``vocab_size`` tokens trained on the training works (the first ``works`` of them if > 0). A
    small vocabulary keeps the output head from dominating the compute of small CPU models."""
    from unmask.data import default_dataset, prepare_dataset, shakespeare_works, train_bpe

    if vocab_size == 0:
        return default_dataset()
    data = Path(out_dir) / "data"
    if (data / "meta.json").is_file():
        return data
    train = [text for _, text in shakespeare_works("train")][: works or None]
    val = [text for _, text in shakespeare_works("validation")][: 1 if works else None]
    return prepare_dataset(data, train_bpe(train, vocab_size), train, val, progress=False)


def write_outputs(out_dir: str | Path, data: dict, markdown: str) -> tuple[Path, Path]:
    """``OUT/results.json`` and ``OUT/results.md``, each written atomically."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "results.json", json.dumps(data, indent=2) + "\n")
    write_text_atomic(out / "results.md", markdown.rstrip() + "\n")
    return out / "results.json", out / "results.md"


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend, or a clear error naming the extra."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UnmaskError("experiments draw their plots with matplotlib: pip install 'unmask[plot]'") from None
    return plt


def save_figure(fig, path: str | Path) -> None:
    """Write a figure of :func:`pyplot` as a PNG (tight layout, 120 dpi) and free it."""
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    pyplot().close(fig)


def mean_sd(values: list[float]) -> tuple[float, float]:
    """(mean, sample standard deviation; 0 for one value): a metric's spread over seeds."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def seed_rows(label: str, runs: list[dict], flatten: Callable[[dict], dict] = lambda result: result, **fields) -> list[dict]:
    """The summary rows of runs (records of :func:`run_grid`) that differ only in their seed: one row
    per key of their results (e.g. a guidance scale), with ``fields``, the seeds, and the mean and
    standard deviation over the runs of every metric of ``flatten(result[key])``."""
    rows = []
    for key in runs[0]["result"]:
        values = [flatten(r["result"][key]) for r in runs]
        rows.append({"model": label, **fields, "cfg": key, "seeds": [r["spec"]["meta"]["seed"] for r in runs],
                     **{metric: mean_sd([v[metric] for v in values]) for metric in values[0]}})
    return rows


def md_table(header: list[str], rows: list[list[Any]]) -> str:
    """A Markdown table; floats with 4 significant digits."""
    def cell(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)

"""One save/load pair for run folders. No pickle anywhere: safetensors for tensors, JSON for the rest.

Layout of a run folder (see docs/training.md, 'The run folder'):

    RUN/config.json                        resolved RunConfig (model + train + data provenance)
    RUN/train.lock                         locked by the one process writing the run; holds its PID
    RUN/metrics.jsonl                      one JSON object per log line (train and val)
    RUN/checkpoints/LATEST                 name of the newest complete checkpoint
    RUN/checkpoints/step_000200/model.safetensors      weights; metadata: format + config
    RUN/checkpoints/step_000200/optimizer.safetensors  AdamW moments + RNG states
    RUN/checkpoints/step_000200/trainer.json           step, tokens, optimizer groups, data RNG
    RUN/checkpoints/step_000200/tokenizer.json         copy of the tokenizer: the folder stands alone
    RUN/checkpoints/step_000200/ema.safetensors        with --ema: the fp32 moving average of the weights

FSDP runs write sharded checkpoints instead (``checkpoint_sharded.py``), with the same
atomic publication (:func:`publish_checkpoint`); ``load_model`` reads their consolidated copy.

A checkpoint is written to a temporary sibling folder, flushed to disk and renamed into place;
only then does LATEST (itself replaced atomically) point to it, and only then are older
checkpoints pruned (by step number). A crash at any moment leaves the previous checkpoint intact
and LATEST naming a complete one; the next save removes the temporary folder a crash left.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from unmask.config import RunConfig
from unmask.errors import OptionError, UnmaskError, not_one_of

FORMAT = "unmask"
FORMAT_VERSION = 1
LATEST = "LATEST"
EMA_FILE = "ema.safetensors"
SHARDED_DIR = "sharded"  # torch.distributed.checkpoint folder of an FSDP checkpoint (checkpoint_sharded.py)
LOCK_FILE = "train.lock"
_locked: set[Path] = set()  # run folders whose lock this process holds


class DamagedCheckpoint(UnmaskError):
    """A checkpoint that cannot be read (a truncated or corrupt file). ``detail`` says what is wrong
    with it; the message adds the checkpoints kept before it, and resuming turns it into the
    ``resume_from`` to give (:func:`resume_hint`)."""

    def __init__(self, ckpt: Path, detail: str) -> None:
        self.ckpt, self.detail = Path(ckpt), detail
        if _step_of(self.ckpt) is None:  # not a checkpoint of a run folder
            super().__init__(detail)
            return
        earlier = _earlier_steps(self.ckpt)
        kept = f"the checkpoints kept before it: {', '.join(f'step_{s:06d}' for s in earlier)}" if earlier else "no earlier checkpoint is kept"
        super().__init__(f"{detail}; the checkpoint {self.ckpt} is damaged ({kept})")


def kept_steps(run_dir: str | Path) -> list[int]:
    """Steps of the complete checkpoints in a run folder (single-file or sharded), ascending."""
    root = Path(run_dir) / "checkpoints"
    return sorted(s for p in root.glob("step_*") if (s := _step_of(p)) is not None and _is_checkpoint(p))


def _is_checkpoint(ckpt: Path) -> bool:
    return (ckpt / "model.safetensors").is_file() or (ckpt / SHARDED_DIR).is_dir()


def _earlier_steps(ckpt: Path) -> list[int]:
    step = _step_of(ckpt)
    return [s for s in kept_steps(ckpt.parent.parent) if step is None or s < step]


def resume_hint(exc: DamagedCheckpoint) -> OptionError:
    """The error for resuming from a damaged checkpoint: resume from the last one kept before it."""
    earlier = _earlier_steps(exc.ckpt)
    if earlier:
        return OptionError("resume_from", "{_detail}; resume from an earlier checkpoint with {resume_from} {_step}", _detail=exc.detail,
                           _step=earlier[-1])
    return OptionError("run_dir", "{_detail}; no earlier checkpoint of {_run} is kept to resume from: start a new {run_dir}",
                       _detail=exc.detail, _run=exc.ckpt.parent.parent)


def write_failed(what: Path, exc: BaseException, run_dir: Path | None = None) -> UnmaskError:
    """The error for a write that failed (disk full, permissions): what could not be written and why,
    and, for a run, that its last checkpoint is intact and how to continue."""
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc).splitlines()[0]
    message = f"cannot write {what} ({reason})"
    if run_dir is None:
        return UnmaskError(message)
    latest = Path(run_dir) / "checkpoints" / LATEST
    kept = f"its last checkpoint {latest.read_text().strip()} is intact" if latest.is_file() else "it has no checkpoint yet"
    return OptionError("resume", "{_message}; nothing of the run was lost ({_kept}): free space and continue it with {resume}",
                       _message=message, _kept=kept)


@contextlib.contextmanager
def failed_writes(tmp: Path, target: Path, run_dir: Path | None = None) -> Iterator[None]:
    """A write into ``tmp`` (a folder or file that becomes ``target``) that fails (OSError, or the
    safetensors writer's error) removes ``tmp`` and raises :func:`write_failed`'s UnmaskError."""
    try:
        yield
    except (OSError, SafetensorError) as exc:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise write_failed(target, exc, run_dir) from None


def run_folder(run_dir: str | Path, create: bool = True) -> Path:
    """``run_dir`` as a folder, created if needed (and ``create``); an UnmaskError if it cannot be one."""
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise OptionError("run_dir", "{run_dir} {_dir} is a file, not a folder; give a folder for the run (new or one to {resume})",
                          _dir=run_dir)
    if not create and not run_dir.is_dir():
        raise OptionError("run_dir", "{run_dir} {_dir} does not exist; give the folder of the run to {resume}", _dir=run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OptionError("run_dir", "{run_dir} {_dir}: cannot create the folder ({_reason}); give a folder you can write to", _dir=run_dir,
                          _reason=exc.strerror) from None
    return run_dir


@contextlib.contextmanager
def run_lock(run_dir: str | Path, create: bool = True) -> Iterator[Path]:
    """Hold the exclusive lock of a run folder (``RUN/train.lock``, with this process's PID in it)
    while writing the run; a second writer gets an UnmaskError naming the holder's PID.

    An OS lock (``flock``): it ends with the process however that ends, so a killed run leaves no
    stale lock. Re-entrant within a process; readers (eval, sample) take no lock. ``create``: make
    the folder if it does not exist (False for a run to resume).
    """
    import fcntl

    run_dir = run_folder(run_dir, create)
    key = run_dir.resolve()
    if key in _locked:
        yield run_dir
        return
    with open(run_dir / LOCK_FILE, "a+", encoding="utf-8") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "unknown"
            raise OptionError("run_dir", "{run_dir} {_dir} is being written by another process (PID {_holder}); wait for it to end or "
                              "stop it, or give another {run_dir}", _dir=run_dir, _holder=holder) from None
        f.truncate(0)
        f.write(f"{os.getpid()}\n")
        f.flush()
        _locked.add(key)
        try:
            yield run_dir
        finally:
            _locked.discard(key)  # closing the file releases the lock


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some platforms cannot open directories
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text_atomic(path: Path, text: str) -> None:
    """Write a small file through a temporary file and rename, so readers never see half of it."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


@dataclass
class TrainerState:
    """Everything besides the weights needed to continue a run exactly."""

    step: int
    tokens: int
    optimizer: dict[str, Any] | None = None  # torch optimizer state_dict
    # {"data": numpy bit-generator state, "torch": ByteTensor generator state, "world_size": int}; the
    # streams are shared by all ranks, so one state describes the whole run
    rng: dict[str, Any] | None = None


def _flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors, scalars = {}, {}
    for idx, entry in state["state"].items():
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"state.{idx}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{idx}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith("state."):
            _, idx, key = name.split(".", 2)
            state.setdefault(int(idx), {})[key] = value
    for name, value in meta["scalars"].items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(
    run_dir: Path,
    model: torch.nn.Module | None,
    config: RunConfig,
    trainer: TrainerState,
    tokenizer_json: str | None = None,
    keep: int = 2,
    ema: dict[str, torch.Tensor] | None = None,
    write_weights: Callable[[Path, dict[str, str]], None] | None = None,
) -> Path:
    """Atomically write ``checkpoints/step_XXXXXX`` for an UNWRAPPED model and update LATEST.

    The tokenizer's JSON is stored beside the weights so that a checkpoint folder stands alone;
    ``ema`` (the moving average of the weights, fp32) goes to ``ema.safetensors``.
    ``write_weights(file, metadata)``, given instead of ``model``, writes ``model.safetensors``
    itself (converters stream tensors into it one at a time).
    """
    ckpt_root = Path(run_dir) / "checkpoints"
    name = f"step_{trainer.step:06d}"
    tmp = ckpt_root / f".tmp-{name}-{os.getpid()}"
    with failed_writes(tmp, ckpt_root / name, run_dir):  # e.g. a full disk: the checkpoints before this one are untouched
        ckpt_root.mkdir(parents=True, exist_ok=True)
        for stale in ckpt_root.glob(".tmp-*"):  # left by a save that crashed; one process saves a run
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
        _write_checkpoint(tmp, model, config, trainer, tokenizer_json, ema, write_weights)
        return publish_checkpoint(tmp, ckpt_root, name, trainer.step, keep)


def _write_checkpoint(tmp: Path, model: torch.nn.Module | None, config: RunConfig, trainer: TrainerState, tokenizer_json: str | None,
                      ema: dict[str, torch.Tensor] | None, write_weights: Callable[[Path, dict[str, str]], None] | None) -> None:
    """Write and flush the files of one checkpoint into the empty folder ``tmp``."""
    metadata = {"format": FORMAT, "format_version": str(FORMAT_VERSION), "config": json.dumps(config.to_dict())}
    if write_weights is not None:
        write_weights(tmp / "model.safetensors", metadata)
    else:
        weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(weights, str(tmp / "model.safetensors"), metadata=metadata)
    if ema is not None:
        save_file({k: v.detach().cpu().contiguous() for k, v in ema.items()}, str(tmp / EMA_FILE), metadata=metadata)

    extra: dict[str, Any] = {}
    opt_tensors: dict[str, torch.Tensor] = {}
    if trainer.optimizer is not None:
        opt_tensors, extra["optimizer"] = _flatten_optimizer(trainer.optimizer)
    if trainer.rng is not None:
        opt_tensors["rng.torch"] = trainer.rng["torch"]
        extra["data_rng"] = trainer.rng["data"]
        extra["world_size"] = trainer.rng["world_size"]
    save_file(opt_tensors, str(tmp / "optimizer.safetensors"), metadata={"format": FORMAT, "format_version": str(FORMAT_VERSION)})
    info = {"format": FORMAT, "format_version": FORMAT_VERSION, "step": trainer.step, "tokens": trainer.tokens, **extra}
    with open(tmp / "trainer.json", "w", encoding="utf-8") as f:
        json.dump(info, f)
    if tokenizer_json is not None:
        (tmp / "tokenizer.json").write_text(tokenizer_json, encoding="utf-8")
    for file in tmp.iterdir():
        with open(file, "rb") as f:
            os.fsync(f.fileno())
    _fsync_dir(tmp)


def fsync_tree(folder: Path) -> None:
    """Flush every file under ``folder`` and the folders themselves to disk."""
    for file in sorted(folder.rglob("*")):
        if file.is_file():
            with open(file, "rb") as f:
                os.fsync(f.fileno())
    for sub in sorted({p.parent for p in folder.rglob("*")} | {folder}):
        _fsync_dir(sub)


def publish_checkpoint(tmp: Path, ckpt_root: Path, name: str, step: int, keep: int) -> Path:
    """Rename the complete, flushed folder ``tmp`` to ``ckpt_root/name``, point LATEST to it and
    prune older checkpoints (the last ``keep`` by step number stay)."""
    final = ckpt_root / name
    if final.exists():  # a re-run of the same step after a resume: replace it
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_dir(ckpt_root)
    write_text_atomic(ckpt_root / LATEST, name + "\n")

    # Prune by step number (names stop sorting at step 10**6). Folders past this step are orphans of
    # a crash before LATEST named them: the resumed run recomputes those steps.
    done = sorted((s, p) for p in ckpt_root.glob("step_*") if p.is_dir() and (s := _step_of(p)) is not None)
    older = [p for s, p in done if s < step]
    for old in older[: max(0, len(older) - (keep - 1))] + [p for s, p in done if s > step]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _step_of(path: Path) -> int | None:
    """The step of a ``step_N`` checkpoint folder, or None for any other name."""
    digits = path.name.removeprefix("step_")
    return int(digits) if digits.isdigit() else None


def resolve_checkpoint(path: str | Path) -> Path:
    """A run folder (its LATEST checkpoint) or a checkpoint folder -> the checkpoint folder."""
    path = Path(path)
    if not path.exists():
        raise UnmaskError(f"checkpoint {str(path)!r} does not exist; pass a run folder made by `unmask train` or one of its checkpoints/step_* folders")
    if (path / "model.safetensors").is_file():
        return path
    if (path / SHARDED_DIR).is_dir():
        raise UnmaskError(_unconsolidated(path))
    latest = path / "checkpoints" / LATEST
    if latest.is_file():
        ckpt = path / "checkpoints" / latest.read_text().strip()
        if (ckpt / "model.safetensors").is_file():
            return ckpt
        if (ckpt / SHARDED_DIR).is_dir():
            raise UnmaskError(_unconsolidated(ckpt))
        raise UnmaskError(f"{latest} names {ckpt.name!r}, which has no model.safetensors; the run folder is damaged")
    raise UnmaskError(f"{str(path)!r} holds no checkpoint (no model.safetensors and no checkpoints/LATEST); was training started there?")


def _unconsolidated(ckpt: Path) -> str:
    return (f"{ckpt} is a sharded (FSDP) checkpoint without a single-file copy; write one with "
            f"`unmask checkpoint consolidate {ckpt}` (training does so at its end)")


def latest_checkpoint(run_dir: str | Path, step: int | None = None) -> Path:
    """The checkpoint folder LATEST names in a run folder, single-file or sharded (to resume);
    with ``step``, the run's checkpoint of that step (``resume_from``)."""
    latest = Path(run_dir) / "checkpoints" / LATEST
    if step is not None:
        ckpt = latest.parent / f"step_{step:06d}"
        if not _is_checkpoint(ckpt):
            kept = ", ".join(map(str, kept_steps(run_dir))) or "none"
            raise OptionError("resume_from", "{resume_from} {_step}: {_dir} has no checkpoint of step {_step}; it keeps checkpoints of steps "
                              "{_kept}", _step=step, _dir=run_dir, _kept=kept)
        return ckpt
    if not latest.is_file():
        raise OptionError("run_dir", "{run_dir} {_dir} holds no checkpoint (no checkpoints/LATEST); was training started there?", _dir=run_dir)
    ckpt = latest.parent / latest.read_text().strip()
    if not _is_checkpoint(ckpt):
        raise DamagedCheckpoint(ckpt, f"{latest} names {ckpt.name!r}, which holds no checkpoint")
    return ckpt


def _load_safetensors(file: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="pt") as f:
            metadata = f.metadata() or {}
        return load_file(str(file)), metadata
    except (SafetensorError, OSError, ValueError) as exc:
        raise DamagedCheckpoint(file.parent, f"cannot read {file}: not a valid safetensors file ({exc})") from None


def load_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], RunConfig, Path]:
    """Weights and config of a run folder or checkpoint folder. Returns (state_dict, config, checkpoint dir)."""
    ckpt = resolve_checkpoint(path)
    weights, metadata = _load_safetensors(ckpt / "model.safetensors")
    if metadata.get("format") != FORMAT:
        raise UnmaskError(f"{ckpt / 'model.safetensors'} is not an unmask checkpoint (metadata format={metadata.get('format')!r})")
    version = int(metadata.get("format_version", "0"))
    if version > FORMAT_VERSION:
        raise UnmaskError(f"{ckpt} has checkpoint format {version}, newer than this unmask ({FORMAT_VERSION}); upgrade unmask")
    config = RunConfig.from_dict(json.loads(metadata["config"]))
    return weights, config, ckpt


def load_trainer_state(ckpt: Path) -> TrainerState:
    """Optimizer, RNG and counters of a checkpoint folder (to resume)."""
    try:
        info = json.loads((ckpt / "trainer.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DamagedCheckpoint(ckpt, f"cannot read {ckpt / 'trainer.json'} ({exc})") from None
    tensors, _ = _load_safetensors(ckpt / "optimizer.safetensors")
    optimizer = _unflatten_optimizer(tensors, info["optimizer"]) if "optimizer" in info else None
    rng = None
    if isinstance(info.get("data_rng"), list):  # earlier layout: one stream per rank
        if len(info["data_rng"]) != 1:
            raise UnmaskError(f"{ckpt} has one random stream per process (written by an earlier unmask); it cannot be resumed exactly, start a new run")
        rng = {"data": info["data_rng"][0], "torch": tensors["rng.torch.0"], "world_size": 1}
    elif "data_rng" in info:
        rng = {"data": info["data_rng"], "torch": tensors["rng.torch"], "world_size": info["world_size"]}
    return TrainerState(step=info["step"], tokens=info["tokens"], optimizer=optimizer, rng=rng)


def checkpoint_tokenizer(path: str | Path):
    """The tokenizer stored beside the weights of a run/checkpoint folder."""
    from unmask.data import Tokenizer

    return Tokenizer.from_file(resolve_checkpoint(path) / "tokenizer.json")


def load_model(path: str | Path, device: str | torch.device = "cpu", weights: str = "auto"):
    """Build the model of a run/checkpoint folder with its weights, in eval mode. Returns (model, RunConfig).

    ``weights``: "auto" (the moving average ``ema.safetensors`` when the run kept one, as MDLM,
    BD3-LM and Duo evaluate and sample; else the trained weights), "ema" or "raw".
    """
    from unmask.model import Transformer

    if weights not in ("auto", "ema", "raw"):
        raise not_one_of("weights", weights, "auto, ema, raw")
    state, config, ckpt = load_weights(path)
    if weights == "ema" and not (ckpt / EMA_FILE).is_file():
        raise OptionError("weights", "{_ckpt} has no {_file} (the run was trained without {ema}); use the raw weights", _ckpt=ckpt,
                          _file=EMA_FILE)
    if weights != "raw" and (ckpt / EMA_FILE).is_file():
        state = {**state, **_load_safetensors(ckpt / EMA_FILE)[0]}  # buffers, if any, come from the model file
    model = Transformer(config.model)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise UnmaskError(f"{ckpt / 'model.safetensors'} does not match its config: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return model.to(device).eval(), config


def load_ema(ckpt: Path) -> dict[str, torch.Tensor] | None:
    """The fp32 moving average stored beside a single-file checkpoint's weights, or None."""
    return _load_safetensors(ckpt / EMA_FILE)[0] if (ckpt / EMA_FILE).is_file() else None

"""Sharded checkpoints of FSDP runs, through ``torch.distributed.checkpoint`` (DCP).

Every process writes its own shards of the weights, the AdamW moments and the EMA, with DCP's
safetensors storage (``HuggingFaceStorageWriter``): the files are safetensors whose headers say
where each shard lies in the full tensor, so nothing is pickled and nothing is unpickled on load.
DCP reshards on load, so a run saved by N processes resumes on M. Layout:

    step_000600/sharded/shard-0000R-model-00001-of-00001.safetensors   one file per process
    step_000600/config.json      the RunConfig
    step_000600/trainer.json     step, tokens, data RNG, number of processes, optimizer settings
    step_000600/rng.safetensors  the masking-noise generator state
    step_000600/tokenizer.json
    step_000600/model.safetensors, ema.safetensors   single-file copies, once consolidated

The folder is written under a temporary name, flushed and renamed, and only then named in LATEST,
as single-file checkpoints are (``checkpoint.publish_checkpoint``). :func:`consolidate` writes the
ordinary ``model.safetensors`` (and ``ema.safetensors``) that ``sample`` and ``eval`` read.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from safetensors import SafetensorError
from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from unmask.checkpoint import (
    EMA_FILE,
    FORMAT,
    FORMAT_VERSION,
    SHARDED_DIR,
    DamagedCheckpoint,
    _fsync_dir,
    _load_safetensors,
    failed_writes,
    fsync_tree,
    publish_checkpoint,
    write_failed,
)
from unmask.config import RunConfig
from unmask.distributed import World, barrier
from unmask.ema import EMA
from unmask.errors import OptionError, UnmaskError


def _flat_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, ema: EMA | None) -> tuple[dict[str, torch.Tensor], dict]:
    """One flat {name: tensor} dict of this process's shards: ``model.*``, ``optim.<param>.<moment>``,
    ``ema.*``; and the optimizer state dict it came from (for its param_groups)."""
    flat = {f"model.{k}": v for k, v in get_model_state_dict(model).items()}
    osd = get_optimizer_state_dict(model, optimizer)  # creates the AdamW moments of a fresh optimizer
    for name, entry in osd["state"].items():
        for key, value in entry.items():
            flat[f"optim.{name}.{key}"] = value
    if ema is not None:
        flat.update({f"ema.{k}": v for k, v in ema.state_dict().items()})
    return flat, osd


def is_sharded(ckpt: Path) -> bool:
    return (Path(ckpt) / SHARDED_DIR).is_dir()


def save_sharded(
    run_dir: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    ema: EMA | None,
    config: RunConfig,
    info: dict[str, Any],
    noise_state: torch.Tensor,
    tokenizer_json: str,
    world: World,
    keep: int = 2,
) -> Path:
    """Collectively write ``checkpoints/step_XXXXXX`` (every process calls this) and update LATEST.

    ``info``: step, tokens, data RNG state, world size (written to trainer.json by rank 0).
    """
    root = Path(run_dir) / "checkpoints"
    name = f"step_{info['step']:06d}"
    tmp = root / f".tmp-{name}-sharded"
    if world.is_main:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".tmp-*"):  # left by a save that crashed
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    barrier(world)
    flat, osd = _flat_state(model, optimizer, ema)
    try:
        dcp.save(flat, storage_writer=dcp.HuggingFaceStorageWriter(str(tmp / SHARDED_DIR), save_distributed=True))
    except CheckpointException as exc:  # raised on every process, holding each one's error
        cause = next((e for e, _ in exc.failures.values() if isinstance(e, (OSError, SafetensorError))), None)
        if cause is None:
            raise
        if world.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise write_failed(root / name, cause, run_dir) from None
    barrier(world)
    final = root / name
    if world.is_main:
        groups = [{k: v for k, v in g.items() if k != "params"} for g in osd["param_groups"]]
        trainer = {"format": FORMAT, "format_version": FORMAT_VERSION, "sharded": True, "ema": ema is not None,
                   "optimizer": {"param_groups": groups}, **info}
        with failed_writes(tmp, root / name, run_dir):
            (tmp / "trainer.json").write_text(json.dumps(trainer), encoding="utf-8")
            (tmp / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n", encoding="utf-8")
            (tmp / "tokenizer.json").write_text(tokenizer_json, encoding="utf-8")
            save_file({"rng.torch": noise_state}, str(tmp / "rng.safetensors"), metadata={"format": FORMAT})
            fsync_tree(tmp)
            final = publish_checkpoint(tmp, root, name, info["step"], keep)
    barrier(world)
    return final


def read_sharded_info(ckpt: Path) -> tuple[RunConfig, dict[str, Any], torch.Tensor]:
    """(config, trainer.json, masking-noise generator state) of a sharded checkpoint."""
    try:
        config = RunConfig.from_dict(json.loads((ckpt / "config.json").read_text(encoding="utf-8")))
        info = json.loads((ckpt / "trainer.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise DamagedCheckpoint(ckpt, f"cannot read the sharded checkpoint {ckpt} ({exc})") from None
    rng = _load_safetensors(ckpt / "rng.safetensors")[0]["rng.torch"]
    return config, info, rng


def check_shards(ckpt: Path) -> None:
    """Raise DamagedCheckpoint for a shard file that is shorter than its safetensors header says or
    has no readable header (a copy or save cut short), before DCP reads it: DCP's own failure
    is an assertion deep in its planner. Reads only the headers."""
    files = sorted((ckpt / SHARDED_DIR).glob("*.safetensors"))
    if not files:
        raise DamagedCheckpoint(ckpt, f"cannot read {ckpt / SHARDED_DIR}: it holds no shard files")
    for file in files:
        size = file.stat().st_size
        with open(file, "rb") as f:
            head = f.read(8)
            length = int.from_bytes(head, "little") if len(head) == 8 else -1
            try:
                header = json.loads(f.read(length)) if 0 < length <= size - 8 else None
            except (json.JSONDecodeError, UnicodeDecodeError):
                header = None
        if header is None:
            raise DamagedCheckpoint(ckpt, f"cannot read {file}: truncated or not a safetensors file ({size} bytes, no complete header)")
        needed = 8 + length + max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
        if size < needed:
            raise DamagedCheckpoint(ckpt, f"cannot read {file}: truncated ({size} of {needed} bytes)")


def load_sharded(ckpt: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, ema: EMA | None) -> None:
    """Load weights, AdamW moments and EMA of a sharded checkpoint into a sharded model of any
    number of processes (collective: every process calls it)."""
    _, info, _ = read_sharded_info(ckpt)
    if ema is not None and not info.get("ema"):
        raise OptionError("ema", "{_ckpt} was saved without an EMA of the weights; resume without {ema} or start a new run", _ckpt=ckpt)
    check_shards(ckpt)  # every process reads every header, so all of them stop alike
    flat, osd = _flat_state(model, optimizer, ema)
    dcp.load(flat, storage_reader=dcp.HuggingFaceStorageReader(str(ckpt / SHARDED_DIR)))
    set_model_state_dict(model, {k.removeprefix("model."): v for k, v in flat.items() if k.startswith("model.")})
    for name, entry in osd["state"].items():
        for key in entry:
            entry[key] = flat[f"optim.{name}.{key}"]
    set_optimizer_state_dict(model, optimizer, osd)
    if ema is not None:
        ema.load_state_dict({k.removeprefix("ema."): v for k, v in flat.items() if k.startswith("ema.")})


def consolidate(ckpt: str | Path) -> Path:
    """Write the single-file ``model.safetensors`` (and ``ema.safetensors``) of a sharded checkpoint,
    in one process, each file atomically. Returns the checkpoint folder; ``sample``/``eval`` read it."""
    from unmask.model import Transformer

    ckpt = Path(ckpt)
    if not is_sharded(ckpt):
        latest = ckpt / "checkpoints" / "LATEST"
        if latest.is_file():
            ckpt = latest.parent / latest.read_text().strip()
    if not is_sharded(ckpt):
        raise UnmaskError(f"{ckpt} is not a sharded checkpoint (no {SHARDED_DIR}/ folder); give a run folder or checkpoints/step_* folder of an FSDP run")
    config, info, _ = read_sharded_info(ckpt)
    check_shards(ckpt)
    model = Transformer(config.model)
    weights = {f"model.{k}": v for k, v in model.state_dict().items()}
    if info.get("ema"):
        weights.update({f"ema.{k}": torch.empty_like(p, dtype=torch.float32) for k, p in model.named_parameters()})
    with warnings.catch_warnings():  # DCP warns that it loads in one process, which is the point here
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(weights, storage_reader=dcp.HuggingFaceStorageReader(str(ckpt / SHARDED_DIR)), no_dist=True)
    metadata = {"format": FORMAT, "format_version": str(FORMAT_VERSION), "config": json.dumps(config.to_dict())}
    files = [(EMA_FILE, "ema.")] if info.get("ema") else []
    for file, prefix in files + [("model.safetensors", "model.")]:  # model last: its presence marks the copy complete
        part = {k.removeprefix(prefix): v.contiguous() for k, v in weights.items() if k.startswith(prefix)}
        tmp = ckpt / f".{file}.tmp-{os.getpid()}"
        with failed_writes(tmp, ckpt / file):  # the sharded checkpoint itself is untouched
            save_file(part, str(tmp), metadata=metadata)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, ckpt / file)
    _fsync_dir(ckpt)
    return ckpt

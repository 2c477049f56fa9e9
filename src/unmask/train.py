"""The one training loop: MDM or AR, one process or torchrun, CPU or GPU.

AdamW with warmup + cosine decay, gradient clipping and accumulation, bf16 autocast where the
device supports it (fp32 master weights; losses in fp32), periodic validation on fixed held-out
windows, metrics appended to ``metrics.jsonl``, atomic checkpoints and exact resume.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from tqdm.auto import tqdm

from unmask.checkpoint import (
    EMA_FILE,
    DamagedCheckpoint,
    TrainerState,
    latest_checkpoint,
    load_ema,
    load_trainer_state,
    load_weights,
    resume_hint,
    run_lock,
    save_checkpoint,
    write_text_atomic,
)
from unmask.checkpoint_sharded import consolidate, is_sharded, load_sharded, read_sharded_info, save_sharded
from unmask.block_diffusion import BlockCorruption, bd3_loss, block_elbo, check_block_size, corrupt_blocks, corrupt_blocks_k, flex_available
from unmask.config import ModelConfig, RunConfig, TrainConfig
from unmask.data import TokenDataset
from unmask.data.pairs import PairDataset
from unmask.distributed import (
    all_reduce_mean,
    barrier,
    broadcast_object,
    full_value,
    grad_sync,
    init_world,
    local_rows,
    parallelize,
    shutdown,
)
from unmask.ema import EMA
from unmask.errors import UnmaskError
from unmask.likelihood import LikelihoodResult, ar_nll, mc_elbo, response_nll
from unmask.model import Transformer
from unmask.objectives import Corruption, ar_loss, corrupt_k_dce, corrupt_response, corrupt_t_dce, dce_loss
from unmask.schedule import Schedule
from unmask.tracking import Sink, open_trackers, tracker_names


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 where the device multiplies it fast (CUDA with bf16, CPUs with AVX512-BF16/AMX); else fp32."""
    if precision == "fp32":
        return None
    if device.type == "cuda":
        supported = torch.cuda.is_bf16_supported()
    elif device.type == "cpu":
        supported = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    else:
        supported = False
    if precision == "bf16" and not supported:
        raise UnmaskError(f"--precision bf16: device {device} has no bf16 support; use --precision fp32 or auto")
    return torch.bfloat16 if supported else None


def autocast(dtype: torch.dtype | None, device: torch.device):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def learning_rate(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to cfg.lr, then cosine decay to cfg.lr * cfg.min_lr_ratio at cfg.steps.

    When ``steps`` was changed on resume at step s (``cfg.steps_changes``), steps before s follow
    the schedule of the old length, and from s the cosine runs from the LR reached at s down to
    the floor at the new end: the LR never jumps. A function of (step, cfg) only.
    """
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    start, peak = cfg.warmup_steps, cfg.lr
    if cfg.steps_changes:
        at, before = cfg.steps_changes[-1]
        earlier = dataclasses.replace(cfg, steps=before, steps_changes=cfg.steps_changes[:-1])
        if step < at:
            return learning_rate(step, earlier)
        if at > start:  # a change during warmup leaves the plain schedule of the new length
            start, peak = at, learning_rate(at, earlier)
    floor = cfg.lr * cfg.min_lr_ratio
    progress = min(1.0, (step - start) / max(1, cfg.steps - start))
    return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, fused: bool = False) -> torch.optim.AdamW:
    """AdamW with weight decay on the matrices only; ``fused`` (one kernel for all parameters) on CUDA."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=fused)


def batch_layout(cfg: TrainConfig, length: int, world_size: int) -> tuple[int, int]:
    """(sequences per micro-batch per process, micro-batches per step) for ``world_size`` processes.

    Without ``global_batch_tokens``: (batch_size, grad_accum), so a step holds world_size x
    batch_size x grad_accum sequences. With it, a step holds global_batch_tokens / length sequences
    whatever the number of processes, and grad_accum follows from it.
    """
    if not cfg.global_batch_tokens:
        return cfg.batch_size, cfg.grad_accum
    rows, rest = divmod(cfg.global_batch_tokens, length)
    if rest:
        raise UnmaskError(f"--global-batch-tokens={cfg.global_batch_tokens} must be a multiple of the context length {length}")
    accum, rest = divmod(rows, world_size * cfg.batch_size)
    if rest or not accum:
        raise UnmaskError(
            f"--global-batch-tokens={cfg.global_batch_tokens} is {rows} sequences of {length} tokens, not a multiple of "
            f"{world_size} processes x --batch-size {cfg.batch_size}; choose --batch-size dividing {rows // world_size if rows % world_size == 0 else rows} "
            "or another global batch"
        )
    return cfg.batch_size, accum


def stream_seed(seed: int, stream: int) -> int:
    """A 63-bit seed for random stream ``stream`` of a run, mixed from (seed, stream) by SeedSequence.

    Distinct streams (data order, masking noise) never share or overlap their seeds, whatever the
    run seed, unlike arithmetic such as ``seed * 1000 + stream``.
    """
    return int(np.random.SeedSequence(seed, spawn_key=(stream,)).generate_state(1, np.uint64)[0] >> 1)


DATA_STREAM, NOISE_STREAM = 0, 1


def draw_noise(x0: torch.Tensor, cfg: TrainConfig, schedule: Schedule, mask_id: int, gen: torch.Generator,
               response: torch.Tensor | None = None) -> Corruption:
    """The MDM forward-process noise of a whole (global) batch x0 (B, L), drawn on the CPU from ``gen``;
    with ``response`` (B, L) bool (fine-tuning), of the response regions only, with CFG dropout."""
    if response is not None:
        return corrupt_response(x0, response, schedule, mask_id, gen, loss=cfg.loss, prompt_dropout=cfg.sft.cfg_dropout,
                                low_discrepancy=cfg.low_discrepancy)
    if cfg.loss == "k-dce":
        return corrupt_k_dce(x0, mask_id, gen, low_discrepancy=cfg.low_discrepancy)
    return corrupt_t_dce(x0, schedule, mask_id, gen, low_discrepancy=cfg.low_discrepancy)


def draw_block_noise(x0: torch.Tensor, cfg: TrainConfig, schedule: Schedule, mask_id: int, gen: torch.Generator) -> BlockCorruption:
    """The block-diffusion noise of a whole (global) batch x0 (B, L): one clipped t (or k) per block."""
    block = cfg.block
    if cfg.loss == "k-dce":
        noise = corrupt_blocks_k(x0, block.size, mask_id, gen, (block.mask_rate_min, block.mask_rate_max), low_discrepancy=cfg.low_discrepancy)
    else:
        noise = corrupt_blocks(x0, block.size, schedule, mask_id, gen, (block.mask_rate_min, block.mask_rate_max), low_discrepancy=cfg.low_discrepancy)
    return dataclasses.replace(noise, flex=block.flex_attention)


def batch_loss(model, window: torch.Tensor, noise: Corruption | BlockCorruption | None, response: torch.Tensor | None = None) -> torch.Tensor:
    """Mean loss in nats/token of windows (B, L+1): AR without ``noise``; else the MDM (or, with
    block noise, block diffusion) on the last L tokens."""
    if response is not None:  # fine-tuning rows (B, T) [EOS ; prompt ; response]: only the response is learned
        return (ar_loss(model, window, response[:, 1:]) if noise is None else dce_loss(model, window, noise)).mean()
    if noise is None:
        return ar_loss(model, window).mean()
    if isinstance(noise, BlockCorruption):
        return bd3_loss(model, window[:, 1:], noise).mean()
    return dce_loss(model, window[:, 1:], noise).mean()


# Settings that change no number a run computes: they may differ on resume (with a notice).
OPERATIONAL = ("eval_every", "checkpoint_every", "log_every", "keep_checkpoints", "compile", "activation_checkpointing")


def changed_settings_error(refused: list[str]) -> UnmaskError:
    """The error for settings that differ from a resumed run's, each given as "--flag (saved X, given Y)"."""
    return UnmaskError(
        f"--resume: {', '.join(refused)} differ from the run's saved settings; leave them out to continue the run as it "
        "was configured, or start a new --run-dir"
    )


def resume_config(saved: RunConfig, model_cfg: ModelConfig, train_cfg: TrainConfig, step: int, data_dir: Path, fingerprint: str,
                  data_fingerprint: str = "") -> tuple[TrainConfig, list[str]]:
    """The training config a resumed run continues with, and the notices to print.

    ``saved`` is the config of the checkpoint at ``step``. The model, the data (its tokenizer's
    ``fingerprint`` and, when the run recorded one, the content fingerprint of its shards) and
    every training setting must equal the saved ones, except OPERATIONAL settings and ``steps``:
    a new length keeps the LR continuous (see :func:`learning_rate`). Anything else raises
    UnmaskError naming it.
    """
    if model_cfg != saved.model:
        diffs = [f"{f.name} (saved {getattr(saved.model, f.name)!r}, given {getattr(model_cfg, f.name)!r})"
                 for f in dataclasses.fields(ModelConfig) if getattr(saved.model, f.name) != getattr(model_cfg, f.name)]
        raise UnmaskError(f"--resume: the model differs from the saved one in {', '.join(diffs)}; resume with the saved model or start a new --run-dir")
    if fingerprint != saved.tokenizer_fingerprint:
        raise UnmaskError(
            f"--resume: the data folder {data_dir} was made with another tokenizer than the run's data {saved.data_dir} "
            f"(fingerprint {fingerprint}, saved {saved.tokenizer_fingerprint}); pass --data with the run's prepared data"
        )
    if saved.data_fingerprint and data_fingerprint != saved.data_fingerprint:
        raise UnmaskError(
            f"--resume: the data in {data_dir} changed since the run trained on it (content fingerprint {data_fingerprint or 'none'}, "
            f"the run's {saved.data_fingerprint}): it was prepared again; pass --data with the data the run was trained on, or start a new --run-dir"
        )
    notices = []
    if str(data_dir) != saved.data_dir:
        if Path(saved.data_dir).exists():
            raise UnmaskError(f"--resume: --data {data_dir} is not the run's data folder {saved.data_dir}; leave --data out to use it")
        notices.append(f"the run's data folder {saved.data_dir} is gone; continuing with {data_dir} (same tokenizer)")
    new = saved.train
    refused = []
    given_settings = train_cfg.flat_settings()
    for name, before in saved.train.flat_settings().items():  # flat: every setting by its flag's name
        given = given_settings[name]
        if name in ("steps", "steps_changes") or before == given:
            continue
        flag = "--" + name.replace("_", "-")
        if name in OPERATIONAL or (name == "batch_size" and saved.train.global_batch_tokens):
            notices.append(f"{flag} changed from {before} to {given}")
            new = dataclasses.replace(new, **{name: given})
        else:
            refused.append(f"{flag} (saved {before!r}, given {given!r})")
    if refused:
        raise changed_settings_error(refused)
    if train_cfg.steps != saved.train.steps:
        if train_cfg.steps <= step:
            raise UnmaskError(f"--steps {train_cfg.steps}: the run is already at step {step}; give more steps to continue it")
        new = dataclasses.replace(new, steps=train_cfg.steps, steps_changes=(*saved.train.steps_changes, (step, saved.train.steps)))
        notices.append(f"--steps changed from {saved.train.steps} to {train_cfg.steps} at step {step}: the learning rate {lr_course(step, new)}")
    return new, notices


def lr_course(step: int, cfg: TrainConfig) -> str:
    """How the learning rate goes on from ``step`` to the end of ``cfg.steps``, in words (see :func:`learning_rate`)."""
    now, floor, warm = learning_rate(step, cfg), cfg.lr * cfg.min_lr_ratio, cfg.warmup_steps
    if step >= warm:
        return f"continues from {now:.4g} (its value there) along a cosine to {floor:.4g} at step {cfg.steps}"
    if cfg.steps <= warm:
        return (f"keeps rising along its warmup, from {now:.4g} now to {learning_rate(cfg.steps - 1, cfg):.4g} at step {cfg.steps} "
                f"(the warmup is {warm} steps)")
    return f"continues its warmup from {now:.4g} to {cfg.lr:.4g} at step {warm}, then follows a cosine to {floor:.4g} at step {cfg.steps}"


def validate(model, windows: torch.Tensor, prev: torch.Tensor, cfg: TrainConfig, batch_size: int) -> LikelihoodResult:
    """Same held-out windows every time (and for MDM and AR); MDM draws use a fixed seed. Fine-tuning:
    ``windows`` are the held-out pair rows and ``prev`` their response masks."""
    if cfg.sft:
        return response_nll(model, windows, prev, draws=max(2, cfg.eval_draws), batch_size=batch_size, seed=1234)
    if cfg.objective == "ar":
        return ar_nll(model, windows, prev, batch_size=batch_size)
    if cfg.objective == "bd3":  # the unbiased bound: full t range, whatever the training clip
        return block_elbo(model, windows, cfg.block.size, draws=cfg.eval_draws, schedule=Schedule(cfg.schedule), batch_size=batch_size,
                          seed=1234, estimator=cfg.loss)
    return mc_elbo(model, windows, draws=cfg.eval_draws, estimator=cfg.loss, schedule=Schedule(cfg.schedule), batch_size=batch_size, seed=1234)


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    tokens: int
    final_loss: float
    tokens_per_s: float
    losses: list[float]  # per-step training loss of the steps run in this call

    def summary(self) -> str:
        """One line for the end of a command: what this call trained, or that the run had already finished."""
        if not self.losses:
            return (f"already finished at step {self.steps} -> {self.run_dir}; give --steps N (more than {self.steps}) with --resume "
                    "to train it further")
        return (f"done: {self.steps} steps, {self.tokens:,} tokens, last loss {self.final_loss:.4f}, {self.tokens_per_s:,.0f} tokens/s "
                f"-> {self.run_dir}")


def _append_metrics(path: Path, sink: Sink, record: dict) -> None:
    """One line of metrics.jsonl, also sent to the run's trackers (``--log-to``)."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
    sink.log(record)


def _truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop lines logged after the checkpoint we continue from (they will be logged again)."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line).get("step", 0) <= step]
    write_text_atomic(path, "".join(line + "\n" for line in keep))


def train(
    run_dir: str | Path,
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    data_dir: str | Path,
    resume: bool = False,
    device: str = "auto",
    progress: bool = True,
    stop_after: int | None = None,
    resume_from: int | None = None,
    log_to: tuple[str, ...] = (),
) -> TrainResult:
    """Train until ``train_cfg.steps`` (or ``stop_after`` steps in this call, for tests).

    With ``resume`` the run continues exactly from RUN's LATEST checkpoint (``resume_from``: from
    its checkpoint of that step; implies ``resume``): same weights, optimizer moments, data order
    and masking noise, so the losses equal an uninterrupted run's. The model, data and settings
    must be the saved ones; only ``steps`` and the OPERATIONAL settings may differ, with a printed
    notice (see :func:`resume_config`). RUN is locked for the whole call: one writer at a time.
    ``log_to`` names trackers (``"tensorboard"``, ``"wandb"``: :mod:`unmask.tracking`) that rank 0
    sends every metrics line to as well.
    """
    log_to = tracker_names(log_to)
    resume = resume or resume_from is not None
    world, dev = init_world(device, train_cfg.parallel)
    try:
        with _run_writer(Path(run_dir), world, resume):
            return _train(world, dev, Path(run_dir), model_cfg, train_cfg, data_dir, resume, resume_from, progress, stop_after, log_to)
    except DamagedCheckpoint as exc:
        if resume and exc.ckpt.parent == Path(run_dir) / "checkpoints":
            raise resume_hint(exc) from None
        raise
    finally:
        shutdown(world)  # also after an error, so that a later run in this process starts afresh


@contextlib.contextmanager
def _run_writer(run_dir: Path, world, resume: bool) -> Iterator[None]:
    """Rank 0 holds the run folder's lock for the whole run (:func:`unmask.checkpoint.run_lock`);
    every rank learns whether it got it, so no rank waits in a collective for one that stopped."""
    with contextlib.ExitStack() as stack:
        refused = None
        if world.is_main:
            try:
                stack.enter_context(run_lock(run_dir, create=not resume))
            except UnmaskError as exc:
                refused = str(exc)
        refused = broadcast_object(refused, world)
        if refused is not None:
            raise UnmaskError(refused)
        yield


def _content(data: TokenDataset | PairDataset) -> str:
    """The content fingerprint of a data folder ("" for pairs and folders prepared without one)."""
    return getattr(data, "fingerprint", "")


def _train(world, dev: torch.device, run_dir: Path, model_cfg: ModelConfig, train_cfg: TrainConfig, data_dir, resume: bool,
           resume_from: int | None, progress: bool, stop_after: int | None, log_to: tuple[str, ...]) -> TrainResult:
    dataset = PairDataset if train_cfg.sft else TokenDataset
    train_data, val_data = dataset(data_dir, "train"), dataset(data_dir, "val")
    tokenizer = train_data.tokenizer
    data_dir = Path(data_dir).resolve()
    state, weights, ema_weights, ckpt = None, None, None, None
    if resume:
        ckpt = latest_checkpoint(run_dir, resume_from)
        if is_sharded(ckpt):
            saved, info, noise_state = read_sharded_info(ckpt)
            state = TrainerState(info["step"], info["tokens"], None, {"data": info["data_rng"], "torch": noise_state, "world_size": info["world_size"]})
        else:
            weights, saved, _ = load_weights(ckpt)
            state = load_trainer_state(ckpt)
            ema_weights = load_ema(ckpt)
        train_cfg, notices = resume_config(saved, model_cfg, train_cfg, state.step, data_dir, tokenizer.fingerprint, _content(train_data))
        if world.is_main:
            for notice in notices:
                print(f"note: {notice}", file=sys.stderr)
    elif (run_dir / "checkpoints").exists():
        raise UnmaskError(f"--run-dir {run_dir} already holds a run; pass --resume to continue it or choose a new folder")
    if model_cfg.vocab_size != tokenizer.vocab_size:
        raise UnmaskError(
            f"model vocab_size={model_cfg.vocab_size} but the data in {data_dir} was made with a {tokenizer.vocab_size}-token tokenizer"
        )
    if train_cfg.objective in ("mdm", "bd3") and model_cfg.mask_id != tokenizer.mask_id:
        raise UnmaskError(f"model MASK id {model_cfg.mask_id} but the tokenizer of {data_dir} has MASK at {tokenizer.mask_id}")
    if model_cfg.causal != (train_cfg.objective == "ar"):
        raise UnmaskError(f"--objective {train_cfg.objective} needs causal={train_cfg.objective == 'ar'} in the model config")
    if train_cfg.objective == "bd3":
        block = train_cfg.block
        check_block_size(model_cfg.context_len, block.size)
        if block.flex_attention and (not flex_available() or dev.type != "cuda"):
            raise UnmaskError(
                f"--flex-attention needs torch.nn.attention.flex_attention on a CUDA device (here: {dev}; FlexAttention has no backward "
                "on CPU); leave the flag out to use SDPA with a boolean mask"
            )
        if model_cfg.block_causal != block.size or model_cfg.time_conditioning:
            raise UnmaskError(
                f"--objective bd3 --block-size {block.size} needs a time-agnostic model with block_causal={block.size} "
                f"(got block_causal={model_cfg.block_causal}, time_conditioning={model_cfg.time_conditioning})"
            )
    length = model_cfg.context_len
    if train_cfg.sft:
        length = train_data.length
        if length > model_cfg.context_len:
            raise UnmaskError(f"the pairs of {data_dir} are rows of {length} tokens, longer than the model's context of {model_cfg.context_len}")
    micro_bs, accum = batch_layout(train_cfg, length, world.world_size)
    config = RunConfig(model=model_cfg, train=train_cfg, data_dir=str(data_dir), tokenizer_fingerprint=tokenizer.fingerprint,
                       data_fingerprint=_content(train_data))

    torch.manual_seed(train_cfg.seed)
    model = Transformer(model_cfg)
    if state is None and train_cfg.init_from:  # AR -> MDM adaptation (unmask.adaptation)
        from unmask.adaptation import initial_weights

        model.load_state_dict(initial_weights(train_cfg.init_from, model_cfg))
    # Every rank draws the GLOBAL batch and its masking noise from the same streams and keeps its
    # own rows, so n ranks x micro-batch b compute exactly what 1 process x micro-batch n b does.
    data_rng = np.random.default_rng(stream_seed(train_cfg.seed, DATA_STREAM))
    noise_gen = torch.Generator().manual_seed(stream_seed(train_cfg.seed, NOISE_STREAM))
    step, tokens = 0, 0
    metrics_path = run_dir / "metrics.jsonl"

    if state is not None:
        if weights is not None:
            model.load_state_dict(weights)
        step, tokens = state.step, state.tokens
        if state.rng is None or (state.rng["world_size"] != world.world_size and not train_cfg.global_batch_tokens):
            saved_size = "an unknown number of" if state.rng is None else state.rng["world_size"]
            raise UnmaskError(
                f"--resume: {ckpt} was written by {saved_size} processes, this run has {world.world_size}; resume with the same "
                "number (only a run with --global-batch-tokens may change it)"
            )
        data_rng.bit_generator.state = state.rng["data"]
        noise_gen.set_state(state.rng["torch"])
        if world.is_main:
            _truncate_metrics(metrics_path, step)

    if world.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(run_dir / "config.json", json.dumps(config.to_dict(), indent=2) + "\n")
    model.to(dev)
    amp = autocast_dtype(train_cfg.precision, dev)
    net = parallelize(model, world, dev, train_cfg.parallel, param_dtype=amp if dev.type == "cuda" else None,
                      compile=train_cfg.compile, activation_checkpointing=train_cfg.activation_checkpointing)
    optimizer = make_optimizer(model, train_cfg, fused=dev.type == "cuda" and train_cfg.parallel == "ddp")
    ema = EMA(model, train_cfg.ema) if train_cfg.ema else None
    if state is not None:
        if is_sharded(ckpt):
            load_sharded(ckpt, model, optimizer, ema)
        else:
            optimizer.load_state_dict(state.optimizer)  # moments follow the parameters to their device
            if ema is not None:
                if ema_weights is None:
                    raise UnmaskError(f"--resume: {ckpt} has no {EMA_FILE}; the run was trained without --ema")
                ema.load_state_dict(ema_weights)
    schedule = Schedule(train_cfg.schedule)

    if train_cfg.sft:  # held-out pairs and their response masks
        val_windows, val_prev = map(torch.from_numpy, val_data.eval_rows(train_cfg.eval_windows))
    else:
        val_windows = torch.from_numpy(val_data.eval_windows(length, train_cfg.eval_windows))
        val_prev = torch.from_numpy(val_data.eval_previous(length, train_cfg.eval_windows))
    global_batch = micro_bs * accum * world.world_size  # rows per optimizer step, laid out (micro, rank, row)
    tokens_per_step = global_batch * length
    n_params = model_cfg.non_embedding_params()
    end = train_cfg.steps if stop_after is None else min(train_cfg.steps, step + stop_after)

    losses: list[float] = []
    bar = tqdm(total=train_cfg.steps, initial=step, desc=f"train {train_cfg.objective}", unit="step", disable=not (progress and world.is_main),
               dynamic_ncols=True)
    # closed on an error too, before its message is printed; only rank 0 writes metrics and trackers
    with bar, open_trackers(log_to if world.is_main else (), run_dir, config.to_dict(), step) as sink:
        t_start = time.perf_counter()
        t_log, tok_log = t_start, 0
        while step < end:
            lr = learning_rate(step, train_cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            net.train()
            total = torch.zeros((), device=dev)
            # the whole global batch and its noise at once: low-discrepancy t over all of it, sliced
            # per micro-batch and rank, so the estimator does not depend on the number of processes
            response = None
            if train_cfg.sft:
                windows, response = map(torch.from_numpy, train_data.sample(data_rng, global_batch))
            else:
                windows = torch.from_numpy(train_data.sample_windows(data_rng, global_batch, length + 1))
            noise_all = None
            if train_cfg.objective == "mdm":
                x0 = windows if train_cfg.sft else windows[:, 1:]
                noise_all = draw_noise(x0, train_cfg, schedule, model_cfg.mask_id, noise_gen, response)
            elif train_cfg.objective == "bd3":
                noise_all = draw_block_noise(windows[:, 1:], train_cfg, schedule, model_cfg.mask_id, noise_gen)
            step_net = net
            if train_cfg.anneal_steps and step < train_cfg.anneal_steps:  # DiffuLLaMA: causal -> bidirectional
                from unmask.adaptation import annealed_mask

                step_net = functools.partial(net, attn_mask=annealed_mask(step, train_cfg.anneal_steps, length, train_cfg.seed, dev))
            for micro in range(accum):
                rows = local_rows(world, micro_bs, micro)
                window = windows[rows].to(dev)
                noise = noise_all.rows(rows).to(dev) if noise_all is not None else None
                with grad_sync(net, micro == accum - 1), autocast(amp, dev):
                    loss = batch_loss(step_net, window, noise, None if response is None else response[rows].to(dev)) / accum
                    loss.backward()
                total += loss.detach()
            grad_norm = full_value(torch.nn.utils.clip_grad_norm_(model.parameters(), train_cfg.grad_clip))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if ema is not None:
                ema.update()
            step += 1
            tokens += tokens_per_step
            tok_log += tokens_per_step
            loss_value = all_reduce_mean(total, world).item()
            if not math.isfinite(loss_value):
                raise UnmaskError(f"training diverged at step {step} (loss {loss_value}); lower --lr or use --precision fp32")
            losses.append(loss_value)
            bar.update(1)

            if world.is_main and (step % train_cfg.log_every == 0 or step == end):
                now = time.perf_counter()
                rate = tok_log / max(now - t_log, 1e-9)
                t_log, tok_log = now, 0
                bar.set_postfix(loss=f"{loss_value:.3f}", tok_s=f"{rate:,.0f}")
                _append_metrics(metrics_path, sink, {
                    "kind": "train", "step": step, "tokens": tokens, "flops": 6 * n_params * tokens, "loss": loss_value,
                    "lr": lr, "grad_norm": float(grad_norm), "tokens_per_s": rate, "elapsed_s": now - t_start,
                })
            if step % train_cfg.eval_every == 0 or step == train_cfg.steps:
                net.eval()
                with autocast(amp, dev):
                    result = validate(model, val_windows, val_prev, train_cfg, train_cfg.batch_size)
                if world.is_main:
                    bar.write(f"step {step}: val {result.nats_per_token:.4f} nats/token (ppl {'<= ' if result.kind == 'elbo' else ''}{result.perplexity:.2f})")
                    _append_metrics(metrics_path, sink, {
                        "kind": "val", "step": step, "tokens": tokens, "flops": 6 * n_params * tokens,
                        "val_nats_per_token": result.nats_per_token, "val_stderr": result.stderr, "val_ppl": result.perplexity,
                    })
            if step % train_cfg.checkpoint_every == 0 or step == end:
                rng = {"data": data_rng.bit_generator.state, "torch": noise_gen.get_state(), "world_size": world.world_size}
                if train_cfg.parallel == "fsdp":
                    info = {"step": step, "tokens": tokens, "data_rng": rng["data"], "world_size": world.world_size}
                    saved_ckpt = save_sharded(run_dir, model, optimizer, ema, config, info, rng["torch"], tokenizer.to_json(), world,
                                              keep=train_cfg.keep_checkpoints)
                    if step == train_cfg.steps and world.is_main:  # the finished run: the single file sample/eval read
                        consolidate(saved_ckpt)
                elif world.is_main:  # the random streams are the same on every rank
                    trainer = TrainerState(step, tokens, optimizer.state_dict(), rng)
                    save_checkpoint(run_dir, model, config, trainer, tokenizer.to_json(), keep=train_cfg.keep_checkpoints,
                                    ema=ema.state_dict() if ema is not None else None)
                barrier(world)
    elapsed = time.perf_counter() - t_start
    ran = len(losses)
    return TrainResult(run_dir, step, tokens, losses[-1] if losses else float("nan"), ran * tokens_per_step / max(elapsed, 1e-9), losses)

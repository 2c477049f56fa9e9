"""The one training loop: MDM or AR, one process or torchrun, CPU or GPU.

AdamW with warmup + cosine decay, gradient clipping and accumulation, bf16 autocast where the
device supports it (fp32 master weights; losses in fp32), periodic validation on fixed held-out
windows, metrics appended to ``metrics.jsonl``, atomic checkpoints and exact resume.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from unmask.checkpoint import TrainerState, load_trainer_state, load_weights, resolve_checkpoint, save_checkpoint, write_text_atomic
from unmask.config import ModelConfig, RunConfig, TrainConfig
from unmask.data import TokenDataset
from unmask.distributed import all_gather_objects, all_reduce_mean, barrier, init_world, parallelize, shutdown
from unmask.errors import UnmaskError
from unmask.likelihood import LikelihoodResult, ar_nll, mc_elbo, previous_tokens
from unmask.model import Transformer
from unmask.objectives import ar_loss, k_dce, t_dce
from unmask.schedule import Schedule


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
    """Linear warmup to cfg.lr, then cosine decay to cfg.lr * cfg.min_lr_ratio at cfg.steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=False)


def batch_loss(model, window: torch.Tensor, cfg: TrainConfig, schedule: Schedule, gen: torch.Generator) -> torch.Tensor:
    """Mean loss in nats/token of a batch of windows (B, L+1); the MDM uses the last L tokens."""
    if cfg.objective == "ar":
        return ar_loss(model, window).mean()
    x0 = window[:, 1:]
    if cfg.loss == "k-dce":
        return k_dce(model, x0, gen, low_discrepancy=cfg.low_discrepancy).mean()
    return t_dce(model, x0, schedule, gen, low_discrepancy=cfg.low_discrepancy).mean()


def validate(model, windows: torch.Tensor, prev: torch.Tensor, cfg: TrainConfig, batch_size: int) -> LikelihoodResult:
    """Same held-out windows every time (and for MDM and AR); MDM draws use a fixed seed."""
    if cfg.objective == "ar":
        return ar_nll(model, windows, prev, batch_size=batch_size)
    return mc_elbo(model, windows, draws=cfg.eval_draws, estimator=cfg.loss, schedule=Schedule(cfg.schedule), batch_size=batch_size, seed=1234)


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    tokens: int
    final_loss: float
    tokens_per_s: float
    losses: list[float]  # per-step training loss of the steps run in this call


def _append_metrics(path: Path, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


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
) -> TrainResult:
    """Train until ``train_cfg.steps`` (or ``stop_after`` steps in this call, for tests).

    With ``resume`` the run continues exactly from RUN's LATEST checkpoint: same weights,
    optimizer moments, data order and masking noise, so the losses equal an uninterrupted run's.
    """
    run_dir = Path(run_dir)
    world, dev = init_world(device)
    train_data = TokenDataset(data_dir, "train")
    val_data = TokenDataset(data_dir, "val")
    tokenizer = train_data.tokenizer
    if model_cfg.vocab_size != tokenizer.vocab_size:
        raise UnmaskError(
            f"model vocab_size={model_cfg.vocab_size} but the data in {data_dir} was made with a {tokenizer.vocab_size}-token tokenizer"
        )
    if model_cfg.causal != (train_cfg.objective == "ar"):
        raise UnmaskError(f"--objective {train_cfg.objective} needs causal={train_cfg.objective == 'ar'} in the model config")
    length = model_cfg.context_len
    config = RunConfig(model=model_cfg, train=train_cfg, data_dir=str(Path(data_dir).resolve()), tokenizer_fingerprint=tokenizer.fingerprint)

    torch.manual_seed(train_cfg.seed)
    model = Transformer(model_cfg)
    optimizer = make_optimizer(model, train_cfg)
    data_rng = np.random.default_rng([train_cfg.seed, world.rank])
    noise_gen = torch.Generator().manual_seed(train_cfg.seed * 1000 + world.rank)
    step, tokens = 0, 0
    metrics_path = run_dir / "metrics.jsonl"

    if resume:
        ckpt = resolve_checkpoint(run_dir)
        weights, saved, _ = load_weights(ckpt)
        if saved.model != model_cfg or saved.train.objective != train_cfg.objective:
            raise UnmaskError(f"--resume: {run_dir} was trained with a different model/objective; start a new --run-dir")
        model.load_state_dict(weights)
        state = load_trainer_state(ckpt)
        step, tokens = state.step, state.tokens
        optimizer.load_state_dict(state.optimizer)
        if state.rng is None or len(state.rng["data"]) != world.world_size:
            raise UnmaskError(f"--resume: {ckpt} was written by a different number of processes; resume with the same world size")
        data_rng.bit_generator.state = state.rng["data"][world.rank]
        noise_gen.set_state(state.rng["torch"][world.rank])
        if world.is_main:
            _truncate_metrics(metrics_path, step)
    elif (run_dir / "checkpoints").exists():
        raise UnmaskError(f"--run-dir {run_dir} already holds a run; pass --resume to continue it or choose a new folder")

    if world.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(run_dir / "config.json", json.dumps(config.to_dict(), indent=2) + "\n")
    model.to(dev)
    for group_state in optimizer.state.values():  # moments follow the parameters to the device
        for key, value in group_state.items():
            if torch.is_tensor(value) and key != "step":
                group_state[key] = value.to(dev)
    net = parallelize(model, world, dev)
    amp = autocast_dtype(train_cfg.precision, dev)
    schedule = Schedule(train_cfg.schedule)

    val_windows = torch.from_numpy(val_data.eval_windows(length, train_cfg.eval_windows))
    val_prev = previous_tokens(val_windows, tokenizer.eos_id)
    tokens_per_step = train_cfg.batch_size * train_cfg.grad_accum * length * world.world_size
    n_params = model_cfg.non_embedding_params()
    end = train_cfg.steps if stop_after is None else min(train_cfg.steps, step + stop_after)

    losses: list[float] = []
    bar = tqdm(total=train_cfg.steps, initial=step, desc=f"train {train_cfg.objective}", unit="step", disable=not (progress and world.is_main), dynamic_ncols=True)
    t_start = time.perf_counter()
    t_log, tok_log = t_start, 0
    while step < end:
        lr = learning_rate(step, train_cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        net.train()
        total = torch.zeros((), device=dev)
        for micro in range(train_cfg.grad_accum):
            window = torch.from_numpy(train_data.sample_windows(data_rng, train_cfg.batch_size, length + 1)).to(dev)
            sync = micro == train_cfg.grad_accum - 1 or world.world_size == 1
            ctx = contextlib.nullcontext() if sync else net.no_sync()
            with ctx, autocast(amp, dev):
                loss = batch_loss(net, window, train_cfg, schedule, noise_gen) / train_cfg.grad_accum
                loss.backward()
            total += loss.detach()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), train_cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
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
            _append_metrics(metrics_path, {
                "kind": "train", "step": step, "tokens": tokens, "flops": 6 * n_params * tokens, "loss": loss_value,
                "lr": lr, "grad_norm": float(grad_norm), "tokens_per_s": rate, "elapsed_s": now - t_start,
            })
        if step % train_cfg.eval_every == 0 or step == train_cfg.steps:
            net.eval()
            with autocast(amp, dev):
                result = validate(model, val_windows, val_prev, train_cfg, train_cfg.batch_size)
            if world.is_main:
                bar.write(f"step {step}: val {result.nats_per_token:.4f} nats/token (ppl {'<= ' if result.kind == 'elbo' else ''}{result.perplexity:.2f})")
                _append_metrics(metrics_path, {
                    "kind": "val", "step": step, "tokens": tokens, "flops": 6 * n_params * tokens,
                    "val_nats_per_token": result.nats_per_token, "val_stderr": result.stderr, "val_ppl": result.perplexity,
                })
        if step % train_cfg.checkpoint_every == 0 or step == end:
            rng = {
                "data": all_gather_objects(data_rng.bit_generator.state, world),
                "torch": all_gather_objects(noise_gen.get_state(), world),
            }
            if world.is_main:
                trainer = TrainerState(step, tokens, optimizer.state_dict(), rng)
                save_checkpoint(run_dir, model, config, trainer, tokenizer.to_json(), keep=train_cfg.keep_checkpoints)
            barrier(world)
    bar.close()
    elapsed = time.perf_counter() - t_start
    shutdown(world)
    ran = len(losses)
    return TrainResult(run_dir, step, tokens, losses[-1] if losses else float("nan"), ran * tokens_per_step / max(elapsed, 1e-9), losses)

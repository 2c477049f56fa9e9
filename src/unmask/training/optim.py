"""The optimizer, its learning-rate schedule and the training precision."""

from __future__ import annotations

import contextlib
import dataclasses
import math

import torch

from unmask.config import TrainConfig
from unmask.errors import OptionError


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
        raise OptionError("precision", "{precision} bf16: device {_device} has no bf16 support; use {precision} fp32 or auto", _device=device)
    return torch.bfloat16 if supported else None


def autocast(dtype: torch.dtype | None, device: torch.device):
    """Autocast to ``dtype`` on ``device`` (from :func:`autocast_dtype`); nothing for None (fp32)."""
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


def lr_course(step: int, cfg: TrainConfig) -> str:
    """How the learning rate goes on from ``step`` to the end of ``cfg.steps``, in words (see :func:`learning_rate`)."""
    now, floor, warm = learning_rate(step, cfg), cfg.lr * cfg.min_lr_ratio, cfg.warmup_steps
    if step >= warm:
        return f"continues from {now:.4g} (its value there) along a cosine to {floor:.4g} at step {cfg.steps}"
    if cfg.steps <= warm:
        return (f"keeps rising along its warmup, from {now:.4g} now to {learning_rate(cfg.steps - 1, cfg):.4g} at step {cfg.steps} "
                f"(the warmup is {warm} steps)")
    return f"continues its warmup from {now:.4g} to {cfg.lr:.4g} at step {warm}, then follows a cosine to {floor:.4g} at step {cfg.steps}"

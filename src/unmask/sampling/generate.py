"""Text in, text out: load a checkpoint's tokenizer, build the canvas, run a sampler, decode."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from unmask.checkpoint import load_model, resolve_checkpoint
from unmask.data import Tokenizer
from unmask.device import pick_device
from unmask.errors import UnmaskError
from unmask.sampling.ancestral import AncestralConfig, ancestral
from unmask.sampling.ar import ARConfig, ar_sample


def generate(
    checkpoint: str | Path,
    prompt: str = "",
    num_samples: int = 2,
    length: int = 64,
    steps: int = 64,
    temperature: float = 1.0,
    precision: str = "float64",
    seed: int = 0,
    device: str = "auto",
) -> dict:
    """Samples from a checkpoint: an MDM by the ancestral sampler over [prompt ; MASK x length],
    an AR model token by token after [EOS ; prompt]. Returns {"samples": [{"tokens", "text"}], "nfe", ...}."""
    if num_samples < 1:
        raise UnmaskError(f"--num-samples={num_samples} must be a positive integer")
    if length < 1:
        raise UnmaskError(f"--length={length} must be a positive integer")
    dev = pick_device(device)
    model, cfg = load_model(checkpoint, dev)
    tok = Tokenizer.from_file(resolve_checkpoint(checkpoint) / "tokenizer.json")
    ids = tok.encode(prompt) if prompt else []
    ctx = cfg.model.context_len
    if len(ids) + length > ctx:
        raise UnmaskError(f"--prompt of {len(ids)} tokens + --length {length} exceeds the model's context of {ctx} tokens; shorten one of them")
    gen = torch.Generator(device=dev).manual_seed(seed)
    start = time.perf_counter()
    if cfg.model.causal:
        x = torch.tensor([[tok.eos_id] + ids] * num_samples, device=dev)
        out = ar_sample(model, x, gen, ARConfig(max_new_tokens=length, temperature=temperature, precision=precision))
        generated = out.tokens[:, 1 + len(ids) :]
    else:
        x = torch.tensor([ids + [cfg.model.mask_id] * length] * num_samples, device=dev)
        sampler_cfg = AncestralConfig(steps=steps, temperature=temperature, precision=precision, schedule=cfg.train.schedule)
        out = ancestral(model, x, gen, sampler_cfg)
        generated = out.tokens[:, len(ids) :]
    seconds = time.perf_counter() - start
    samples = [{"tokens": row.tolist(), "text": prompt + tok.decode(row.tolist())} for row in generated.cpu()]
    return {"checkpoint": str(checkpoint), "objective": cfg.train.objective, "nfe": out.nfe, "steps": out.steps, "seconds": seconds, "samples": samples}

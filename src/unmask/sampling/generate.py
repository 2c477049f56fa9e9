"""Text in, text out: canvases for prompts (of different lengths) and infilling templates, any
sampler by name, EOS trimming, and the decoded samples.

Token-level API: :func:`make_canvas` / :func:`infill_canvas` build (x, Conditioning) and
:meth:`SamplerSpec.run` fills the MASKs of x; :func:`generate` does it all from a checkpoint.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Sequence

import torch

from unmask.checkpoint import checkpoint_tokenizer, load_model
from unmask.data import Tokenizer
from unmask.device import pick_device
from unmask.errors import UnmaskError
from unmask.sampling.ancestral import AncestralConfig, ancestral
from unmask.sampling.ar import ARConfig, ar_sample, positions_from
from unmask.sampling.base import Conditioning, SampleOutput, StepCallback
from unmask.sampling.blocks import semi_autoregressive
from unmask.sampling.cached import cached_ancestral
from unmask.sampling.confidence import ConfidenceConfig, confidence
from unmask.sampling.first_hitting import FirstHittingConfig, first_hitting
from unmask.sampling.threshold import ThresholdConfig, threshold

SAMPLERS = {
    "ancestral": (ancestral, AncestralConfig),
    "cached": (cached_ancestral, AncestralConfig),
    "first-hitting": (first_hitting, FirstHittingConfig),
    "confidence": (confidence, ConfidenceConfig),
    "threshold": (threshold, ThresholdConfig),
}
INFILL = re.compile(r"\[MASK(?::(\d+))?\]")


@dataclass(frozen=True)
class SamplerSpec:
    """A sampler by name with all its options; ``block_len`` > 0 decodes semi-autoregressively."""

    sampler: str = "ancestral"
    steps: int = 64
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    precision: str = "float64"
    cfg_scale: float = 0.0
    schedule: str = "linear"
    k: int = 1
    score: str = "low_confidence"
    allocation: str = "even"
    tau: float = 0.9
    block_len: int = 0

    def config(self, num_blocks: int = 1):
        """The sampler's own config; steps are split evenly over the blocks."""
        if self.sampler not in SAMPLERS:
            raise UnmaskError(f"--sampler {self.sampler!r} is not one of: {', '.join(SAMPLERS)}")
        if num_blocks > 1 and self.steps % num_blocks:
            raise UnmaskError(f"--steps={self.steps} must be a multiple of the number of blocks ({num_blocks}) so each block gets the same steps")
        cls = SAMPLERS[self.sampler][1]
        wanted = {f.name for f in fields(cls)}
        values = {f.name: getattr(self, f.name) for f in fields(self) if f.name in wanted}
        if "steps" in wanted:
            values["steps"] = self.steps // num_blocks
        return cls(**values)

    def run(self, model, x: torch.Tensor, generator: torch.Generator, cond: Conditioning | None = None,
            callback: StepCallback | None = None, start: int = 0, stop_token: int | None = None) -> SampleOutput:
        """Fill the MASKs of x (B, L); with block decoding, columns [start, L) are the generation region."""
        if not self.block_len:
            cfg = self.config()  # validates the sampler name first
            return SAMPLERS[self.sampler][0](model, x, generator, cfg, cond, callback)
        gen_len = x.shape[1] - start
        if gen_len % self.block_len:
            raise UnmaskError(f"--block-len={self.block_len} must divide the generation length {gen_len}")
        cfg = self.config(gen_len // self.block_len)  # validates the sampler name first
        return semi_autoregressive(model, x, generator, SAMPLERS[self.sampler][0], cfg, self.block_len, start, cond, callback, stop_token)


def make_canvas(prompts: Sequence[Sequence[int]], length: int, mask_id: int, pad_id: int) -> tuple[torch.Tensor, Conditioning, int]:
    """[left padding ; prompt ; MASK x length] per row. Returns (x (B, P+length), cond, P)."""
    width = max((len(p) for p in prompts), default=0)
    rows, real = [], []
    for p in prompts:
        pad = width - len(p)
        rows.append([pad_id] * pad + list(p) + [mask_id] * length)
        real.append([False] * pad + [True] * (len(p) + length))
    x = torch.tensor(rows)
    key_mask = torch.tensor(real)
    cols = torch.arange(x.shape[1])
    prompt_mask = key_mask & (cols < width)[None]
    if key_mask.all():  # no padding: the plain (faster) attention path
        return x, Conditioning(prompt_mask=prompt_mask), width
    return x, Conditioning(key_mask=key_mask, positions=positions_from(key_mask), prompt_mask=prompt_mask), width


def infill_canvas(template: str, tok: Tokenizer) -> tuple[torch.Tensor, Conditioning]:
    """A template with ``[MASK]`` (one token) or ``[MASK:n]`` (n tokens) between fixed text -> (1, L)."""
    ids: list[int] = []
    pos = 0
    for m in INFILL.finditer(template):
        ids += tok.encode(template[pos : m.start()]) if m.start() > pos else []
        ids += [tok.mask_id] * int(m.group(1) or 1)
        pos = m.end()
    ids += tok.encode(template[pos:]) if pos < len(template) else []
    if tok.mask_id not in ids:
        raise UnmaskError("--infill template has no [MASK] or [MASK:n] span to fill")
    x = torch.tensor([ids])
    return x, Conditioning(prompt_mask=x != tok.mask_id)


def trim_at_eos(ids: list[int], eos: int) -> list[int]:
    return ids[: ids.index(eos)] if eos in ids else ids


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
    sampler: str = "ancestral",
    prompts: Sequence[str] | None = None,
    infill: str | None = None,
    stop_at_eos: bool = False,
    kv_cache: bool = True,
    callback: StepCallback | None = None,
    **options,
) -> dict:
    """Samples from a checkpoint. MDM: any sampler of SAMPLERS over [prompt ; MASK x length] (or an
    ``infill`` template), ``options`` = the other SamplerSpec fields (top_k, top_p, cfg_scale, k,
    score, allocation, tau, block_len, schedule). AR: token by token after [EOS ; prompt].

    ``prompts`` gives one prompt per sample (different lengths allowed); otherwise ``prompt`` is
    repeated ``num_samples`` times. Returns {"samples": [{"tokens", "text"}], "nfe", "steps", "seconds", ...}.
    """
    if num_samples < 1:
        raise UnmaskError(f"--num-samples={num_samples} must be a positive integer")
    unknown = set(options) - {f.name for f in fields(SamplerSpec)}
    if unknown:
        raise UnmaskError(f"unknown sampler option(s) {sorted(unknown)}; known: {', '.join(f.name for f in fields(SamplerSpec))}")
    if infill is not None and stop_at_eos:
        raise UnmaskError("--stop-at-eos cannot be combined with --infill: an EOS inside a span would cut off the fixed text after it")
    if length < 1:
        raise UnmaskError(f"--length={length} must be a positive integer")
    dev = pick_device(device)
    model, cfg = load_model(checkpoint, dev)
    tok = checkpoint_tokenizer(checkpoint)
    texts = list(prompts) if prompts else [prompt] * num_samples
    ctx = cfg.model.context_len
    gen = torch.Generator(device=dev).manual_seed(seed)
    spec = SamplerSpec(sampler=sampler, steps=steps, temperature=temperature, precision=precision, schedule=cfg.train.schedule, **options)
    start_time = time.perf_counter()
    if cfg.model.causal:
        if infill is not None:
            raise UnmaskError("--infill needs an MDM; an AR model only continues text")
        encoded = [[tok.eos_id] + tok.encode(t) for t in texts]
        if max(map(len, encoded)) - 1 + length > ctx:
            raise UnmaskError(f"--prompt of {max(map(len, encoded)) - 1} tokens + --length {length} exceeds the model's context of {ctx} tokens; shorten one of them")
        x, cond, width = make_canvas(encoded, 0, tok.mask_id, tok.pad_id)
        ar_cfg = ARConfig(max_new_tokens=length, temperature=temperature, precision=precision, top_k=spec.top_k, top_p=spec.top_p,
                          cfg_scale=spec.cfg_scale, kv_cache=kv_cache)
        out = ar_sample(model, x.to(dev), gen, ar_cfg, Conditioning(key_mask=cond.key_mask.to(dev)) if cond.key_mask is not None else None, callback)
        generated = out.tokens[:, width:]
    elif infill is not None:
        x, cond = infill_canvas(infill, tok)
        if x.shape[1] > ctx:
            raise UnmaskError(f"--infill template of {x.shape[1]} tokens exceeds the model's context of {ctx} tokens")
        x, cond = x.expand(num_samples, -1).to(dev), Conditioning(prompt_mask=cond.prompt_mask.expand(num_samples, -1).to(dev))
        out = spec.run(model, x, gen, cond, callback)
        generated, width = out.tokens, 0
    else:
        encoded = [tok.encode(t) if t else [] for t in texts]
        if max(map(len, encoded)) + length > ctx:
            raise UnmaskError(f"--prompt of {max(map(len, encoded))} tokens + --length {length} exceeds the model's context of {ctx} tokens; shorten one of them")
        x, cond, width = make_canvas(encoded, length, tok.mask_id, tok.pad_id)
        cond = Conditioning(*(None if v is None else v.to(dev) for v in (cond.key_mask, cond.positions, cond.prompt_mask)))
        out = spec.run(model, x.to(dev), gen, cond, callback, start=width, stop_token=tok.eos_id if stop_at_eos else None)
        generated = out.tokens[:, width:]
    seconds = time.perf_counter() - start_time
    samples = []
    for text, row in zip(texts if infill is None else [""] * num_samples, generated.cpu().tolist()):
        ids = trim_at_eos(row, tok.eos_id) if stop_at_eos else row
        samples.append({"tokens": ids, "text": (text if infill is None else "") + tok.decode(ids)})
    return {
        "checkpoint": str(checkpoint), "objective": cfg.train.objective, "sampler": "ar" if cfg.model.causal else sampler,
        "nfe": out.nfe, "steps": out.steps, "seconds": seconds, "generated_tokens": num_samples * length, "samples": samples,
    }

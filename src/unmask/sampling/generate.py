"""Text in, text out: canvases for prompts (of different lengths) and infilling templates, any
sampler by name, EOS trimming, and the decoded samples.

Token-level API: :func:`make_canvas` / :func:`infill_canvas` build (x, Conditioning) and
:meth:`SamplerSpec.run` fills the MASKs of x; :func:`generate` does it all from a checkpoint.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Sequence

import torch

from unmask.checkpoint import checkpoint_tokenizer, load_model
from unmask.data import Tokenizer
from unmask.device import pick_device
from unmask.errors import UnmaskError
from unmask.objectives import device_of
from unmask.sampling.ancestral import ancestral
from unmask.sampling.ar import ARConfig, ar_sample, positions_from
from unmask.sampling.base import Conditioning, SampleOutput, Sampler, SamplerConfig, StepCallback
from unmask.sampling.blocks import semi_autoregressive
from unmask.sampling.cache import CacheConfig
from unmask.sampling.confidence import confidence
from unmask.sampling.first_hitting import first_hitting
from unmask.sampling.threshold import threshold

SAMPLERS: dict[str, Sampler] = {s.name: s for s in (ancestral, first_hitting, confidence, threshold)}
# other names of a sampler: RADD's cached sampler is the ancestral one, which already calls the
# network only on rows where a token unmasks (a row that does not move needs no new output)
ALIASES = {"cached": "ancestral"}
INFILL = re.compile(r"\[MASK(?::(\d+))?\]")
# the command-line flag of every sampler option, for error messages
FLAGS = {
    "steps": "--steps", "temperature": "--temperature", "top_k": "--top-k", "top_p": "--top-p", "precision": "--precision",
    "cfg_scale": "--cfg", "schedule": "schedule", "k": "--k", "score": "--score", "allocation": "--allocation", "tau": "--tau",
}


@dataclass(frozen=True)
class SamplerSpec:
    """A sampler by name with its own typed config (``None``: the sampler's defaults);
    ``block_len`` > 0 decodes semi-autoregressively; ``cache``: the KV cache of the canvas.

    With blocks, ``config.steps`` (samplers that take steps) is the total, split evenly over blocks.
    """

    sampler: str = "ancestral"
    config: SamplerConfig | None = None
    block_len: int = 0
    cache: CacheConfig = CacheConfig()

    def __post_init__(self) -> None:
        object.__setattr__(self, "sampler", sampler_name(self.sampler))
        if self.config is not None and not isinstance(self.config, SAMPLERS[self.sampler].config):
            raise UnmaskError(f"--sampler {self.sampler} takes a {SAMPLERS[self.sampler].config.__name__}, not a {type(self.config).__name__}")
        if self.block_len < 0:
            raise UnmaskError(f"--block-len={self.block_len} must be >= 0 (0: no blocks)")

    @classmethod
    def from_options(cls, sampler: str | None = None, block_len: int | None = None, cache: str | None = None,
                     cache_refresh: int | None = None, **options) -> "SamplerSpec":
        """The spec from command-line style options; None means "not given" (the sampler's default).
        A given option that the sampler does not take is refused, naming its flag."""
        sampler = sampler_name(sampler)
        given = {name: value for name, value in options.items() if value is not None}
        unknown = sorted(set(given) - set(FLAGS))
        if unknown:
            raise UnmaskError(f"unknown sampler option(s) {unknown}; known: {', '.join(FLAGS)}")
        takes = {f.name for f in fields(SAMPLERS[sampler].config)}
        foreign = [FLAGS[name] for name in given if name not in takes]
        if foreign:
            raise UnmaskError(
                f"{', '.join(foreign)}: not an option of --sampler {sampler}, which takes "
                f"{', '.join(FLAGS[name] for name in FLAGS if name in takes)}"
            )
        if cache_refresh is not None and (cache or "none") == "none":
            raise UnmaskError(f"--cache-refresh={cache_refresh} needs a cache: add --cache prefix, dual or delayed")
        return cls(sampler, SAMPLERS[sampler].config(**given), block_len or 0, CacheConfig(cache or "none", cache_refresh or 0))

    def sampler_config(self, num_blocks: int = 1) -> SamplerConfig:
        """The sampler's config for one block: its steps split evenly over ``num_blocks``."""
        config = self.config if self.config is not None else SAMPLERS[self.sampler].config()
        steps = getattr(config, "steps", None)
        if steps is None or num_blocks == 1:
            return config
        if steps % num_blocks:
            raise UnmaskError(f"--steps={steps} must be a multiple of the number of blocks ({num_blocks}) so each block gets the same steps")
        return replace(config, steps=steps // num_blocks)

    def run(self, model, x: torch.Tensor, generator: torch.Generator, cond: Conditioning | None = None,
            callback: StepCallback | None = None, start: int = 0, stop_token: int | None = None) -> SampleOutput:
        """Fill the MASKs of x (B, L); columns [start, L) are the generation region (blocks, EOS stops)."""
        gen_len = x.shape[1] - start
        if self.block_len and gen_len % self.block_len:
            raise UnmaskError(f"--block-len={self.block_len} must divide the generation length {gen_len}")
        block_len = self.block_len or gen_len
        if gen_len == 0 or (block_len == gen_len and self.cache.kind == "none" and stop_token is None):
            return SAMPLERS[self.sampler](model, x, generator, self.sampler_config(), cond, callback)
        return semi_autoregressive(model, x, generator, SAMPLERS[self.sampler], self.sampler_config(gen_len // block_len),
                                   block_len, start, cond, callback, stop_token, self.cache)


def sampler_name(name: str | None) -> str:
    """The sampler that ``name`` (None: ancestral) stands for: a key of SAMPLERS, or an alias of one."""
    name = ALIASES.get(name or "ancestral", name or "ancestral")
    if name not in SAMPLERS:
        raise UnmaskError(f"--sampler {name!r} is not one of: {', '.join(SAMPLERS)} (cached: another name of ancestral)")
    return name


def make_canvas(
    prompts: Sequence[Sequence[int]], length: int, mask_id: int, pad_id: int, separator: int | None = None
) -> tuple[torch.Tensor, Conditioning, int]:
    """[left padding ; separator ; prompt ; MASK x length] per row. Returns (x (B, P+length), cond, P).

    ``separator`` (the EOS that precedes every document in training) is a real token but not part
    of the prompt: the unconditional pass of CFG keeps it and replaces only the prompt by MASK.
    """
    lead = [] if separator is None else [separator]
    width = max((len(p) for p in prompts), default=0) + len(lead)
    rows, real, given = [], [], []
    for p in prompts:
        pad = width - len(lead) - len(p)
        rows.append([pad_id] * pad + lead + list(p) + [mask_id] * length)
        real.append([False] * pad + [True] * (len(lead) + len(p) + length))
        given.append([False] * (pad + len(lead)) + [True] * len(p) + [False] * length)
    x = torch.tensor(rows)
    key_mask = torch.tensor(real)
    prompt_mask = torch.tensor(given, dtype=torch.bool)
    if key_mask.all():  # no padding: the plain (faster) attention path
        return x, Conditioning(prompt_mask=prompt_mask), width
    return x, Conditioning(key_mask=key_mask, positions=positions_from(key_mask), prompt_mask=prompt_mask), width


def infill_ids(template: str, tok: Tokenizer) -> list[int]:
    """The tokens of a template: its fixed text encoded, each ``[MASK]`` one MASK id, each ``[MASK:n]`` n."""
    ids: list[int] = []
    pos = 0
    for m in INFILL.finditer(template):
        ids += tok.encode(template[pos : m.start()]) if m.start() > pos else []
        ids += [tok.mask_id] * int(m.group(1) or 1)
        pos = m.end()
    ids += tok.encode(template[pos:]) if pos < len(template) else []
    return ids


def infill_canvas(template: str, tok: Tokenizer) -> tuple[torch.Tensor, Conditioning]:
    """[EOS ; template] with ``[MASK]`` (one token) or ``[MASK:n]`` (n tokens) between fixed text -> (1, L).

    The template starts a document, after the EOS separator, like a prompt (see :func:`make_canvas`).
    """
    ids = infill_ids(template, tok)
    if tok.mask_id not in ids:
        raise UnmaskError("--infill template has no [MASK] or [MASK:n] span to fill")
    x = torch.tensor([[tok.eos_id] + ids])
    prompt_mask = x != tok.mask_id
    prompt_mask[:, 0] = False  # the separator is not part of the prompt (CFG keeps it)
    return x, Conditioning(prompt_mask=prompt_mask)


def sampling_generator(model, seed: int) -> torch.Generator:
    """A seeded generator on the model's device.

    Samplers draw their random numbers on the device of the logits, and torch refuses a generator
    of another device type (a CPU generator cannot draw on CUDA), so every entry point that samples
    makes its generator here. (The likelihood estimators draw on the CPU and need a CPU one.)
    """
    return torch.Generator(device=device_of(model)).manual_seed(seed)


# options of MDM sampling only, with the flag that sets each; on an AR checkpoint they are refused
MDM_ONLY = {
    "sampler": "--sampler", "infill": "--infill", "cfg_scale": "--cfg", "k": "--k", "score": "--score",
    "allocation": "--allocation", "tau": "--tau", "block_len": "--block-len", "schedule": "schedule", "cache": "--cache",
    "cache_refresh": "--cache-refresh",
}


def check_options(causal: bool, length: int | None, kv_cache: bool | None, given: dict) -> None:
    """Refuse options that the model kind would otherwise silently ignore, naming them."""
    if causal:
        flags = [MDM_ONLY[name] for name, value in given.items() if name in MDM_ONLY and value is not None]
        steps = given.get("steps")
        if steps is not None and length is not None and steps != length:  # an AR model takes exactly one step per token
            flags.append(f"--steps={steps} (an AR model takes exactly one step per token, --length {length})")
        if flags:
            raise UnmaskError(
                f"{', '.join(flags)}: MDM sampling only, but this checkpoint is an AR model, which decodes left to right, "
                "one token per network call; drop them (--temperature, --top-k, --top-p, --precision and --stop-at-eos apply to both)"
            )
    elif kv_cache is not None:
        raise UnmaskError(
            f"--{'' if kv_cache else 'no-'}kv-cache applies to AR models; this checkpoint is an MDM "
            "(use --cache prefix|dual|delayed for the MDM's caches)"
        )


def trim_at_eos(ids: list[int], eos: int) -> list[int]:
    return ids[: ids.index(eos)] if eos in ids else ids


def spec_for(model_config, train_config, length: int, **options) -> SamplerSpec:
    """The MDM sampler spec of ``options`` (as :meth:`SamplerSpec.from_options`) with the defaults
    that depend on the checkpoint: ``steps`` = the generation ``length`` (samplers that take steps)
    and the schedule the model was trained with (samplers that take one)."""
    name = options.get("sampler") or "ancestral"
    name = ALIASES.get(name, name)
    takes = {f.name for f in fields(SAMPLERS[name].config)} if name in SAMPLERS else set()
    if "schedule" in takes:
        options.setdefault("schedule", train_config.schedule)
    if "steps" in takes and options.get("steps") is None:
        options["steps"] = length
    return SamplerSpec.from_options(**options)


def ar_config(length: int, kv_cache: bool | None = None, **options) -> ARConfig:
    """The AR sampler's config from the shared sampler options (temperature, top_k, top_p, precision)."""
    given = {name: options[name] for name in ("temperature", "top_k", "top_p", "precision") if options.get(name) is not None}
    return ARConfig(max_new_tokens=length, kv_cache=kv_cache is not False, **given)


def generate(
    checkpoint: str | Path,
    prompt: str = "",
    num_samples: int = 2,
    length: int = 64,
    *,
    seed: int = 0,
    device: str = "auto",
    prompts: Sequence[str] | None = None,
    infill: str | None = None,
    stop_at_eos: bool = False,
    kv_cache: bool | None = None,
    callback: StepCallback | None = None,
    weights: str = "auto",
    **options,
) -> dict:
    """Samples from a checkpoint, each canvas starting with EOS (the document separator every
    document follows in training, also used by the lm-eval adapter), then the prompt; the
    generated tokens and text exclude it.

    ``options`` are the sampler options of every sampling entry point (the command-line flags of
    :mod:`unmask.cli.sampler_options`): sampler, steps, block_len, cache, cache_refresh, k, score,
    allocation, tau, cfg_scale, temperature, top_k, top_p, precision (and schedule). None or absent
    means the sampler's own default (threshold decodes at temperature 0, the others at 1).
    MDM: any sampler of SAMPLERS (default ancestral) over [EOS ; prompt ; MASK x length] (or
    [EOS ; ``infill`` template]); ``steps`` defaults to ``length``.
    AR: token by token after [EOS ; prompt], with an exact KV cache unless ``kv_cache=False``;
    temperature, top_k, top_p, precision and stop_at_eos apply, MDM-only options are refused (an
    error names them) and ``steps``, if given, must equal ``length``.

    ``prompts`` gives one prompt per sample (different lengths allowed); otherwise ``prompt`` is
    repeated ``num_samples`` times. Returns {"samples": [{"tokens", "text"}], "nfe", "steps", "seconds", ...}.
    """
    if num_samples < 1:
        raise UnmaskError(f"--num-samples={num_samples} must be a positive integer")
    known = {*FLAGS, "sampler", "block_len", "cache", "cache_refresh"}
    unknown = set(options) - known
    if unknown:
        raise UnmaskError(f"unknown sampler option(s) {sorted(unknown)}; known: {', '.join(sorted(known))}")
    if infill is not None and stop_at_eos:
        raise UnmaskError("--stop-at-eos cannot be combined with --infill: an EOS inside a span would cut off the fixed text after it")
    if length < 1:
        raise UnmaskError(f"--length={length} must be a positive integer")
    dev = pick_device(device)
    model, cfg = load_model(checkpoint, dev, weights=weights)  # weights: auto (EMA when kept), ema or raw
    check_options(cfg.model.causal, length, kv_cache, {"infill": infill, **options})
    tok = checkpoint_tokenizer(checkpoint)
    texts = list(prompts) if prompts else [prompt] * num_samples
    ctx = cfg.model.context_len
    gen = sampling_generator(model, seed)
    start_time = time.perf_counter()
    if infill is not None:
        x, cond = infill_canvas(infill, tok)
        if x.shape[1] > ctx:
            raise UnmaskError(f"--infill template of {x.shape[1] - 1} tokens (+ the EOS before it) exceeds the model's context of {ctx} tokens")
        x, cond, width = x.expand(num_samples, -1), Conditioning(prompt_mask=cond.prompt_mask.expand(num_samples, -1)), 1
    else:
        encoded = [tok.encode(t) if t else [] for t in texts]
        # the AR model never reads its last new token back, so its canvas may hold one token more
        room = ctx + int(cfg.model.causal) - 1
        if max(map(len, encoded)) + length > room and not cfg.model.block_causal:  # block models slide a window
            raise UnmaskError(
                f"--prompt of {max(map(len, encoded))} tokens + --length {length} (+ the EOS before the prompt) exceeds "
                f"the model's context of {ctx} tokens; shorten one of them"
            )
        x, cond, width = make_canvas(encoded, 0 if cfg.model.causal else length, tok.mask_id, tok.pad_id, separator=tok.eos_id)
    cond = Conditioning(*(None if v is None else v.to(dev) for v in (cond.key_mask, cond.positions, cond.prompt_mask)))
    x = x.to(dev)
    if cfg.model.causal:
        ar_cfg = ar_config(length, kv_cache, **options)
        out = ar_sample(model, x, gen, ar_cfg, Conditioning(key_mask=cond.key_mask) if cond.key_mask is not None else None, callback)
    else:
        block_cache = options.pop("cache", None) or "block" if cfg.model.block_causal else None
        spec = spec_for(cfg.model, cfg.train, length, **options)
        if cfg.model.block_causal:  # a block model (bd3): its exact cache of finished blocks unless --cache none
            from unmask.sampling.block_diffusion import run_spec

            out = run_spec(spec, model, x, gen, cond, callback, start=width, stop_token=tok.eos_id if stop_at_eos else None,
                           cache=block_cache)
        else:
            out = spec.run(model, x, gen, cond, callback, start=width, stop_token=tok.eos_id if stop_at_eos else None)
    generated = out.tokens[:, width:]
    seconds = time.perf_counter() - start_time
    samples = []
    for text, row in zip(texts if infill is None else [""] * num_samples, generated.cpu().tolist()):
        ids = trim_at_eos(row, tok.eos_id) if stop_at_eos else row
        samples.append({"tokens": ids, "text": text + tok.decode(ids)})
    return {
        "checkpoint": str(checkpoint), "objective": cfg.train.objective, "sampler": "ar" if cfg.model.causal else spec.sampler,
        "nfe": out.nfe, "steps": out.steps, "seconds": seconds, "generated_tokens": num_samples * length, "samples": samples,
        **({"cache": block_cache} if cfg.model.block_causal else {}),
    }

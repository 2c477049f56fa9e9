"""The sampler registry and :class:`SamplerSpec`: a sampler by name with its options, the defaults
that depend on the checkpoint, and the one call that fills a canvas's MASKs with it.

:meth:`SamplerSpec.run` picks how the canvas is decoded: a block model (``block_causal``) block by
block on its own grid with its exact cache of finished blocks (unless the spec says ``cache="none"``);
another MDM by the sampler over the whole canvas, or through semi-autoregressive blocks, a canvas
cache or a stop token (:func:`unmask.sampling.blocks.decode_blocks`). Any caller with a spec and a
canvas therefore decodes a block model with its block cache.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from unmask.errors import OptionError
from unmask.sampling.ancestral import ancestral
from unmask.sampling.base import Conditioning, SampleOutput, Sampler, SamplerConfig, StepCallback, check_guidance
from unmask.sampling.blocks import decode_blocks
from unmask.sampling.cache import CacheConfig
from unmask.sampling.confidence import confidence
from unmask.sampling.first_hitting import first_hitting
from unmask.sampling.options import LENGTH, OPTIONS, TRAINED, check_options, check_value
from unmask.sampling.plans import ColumnBlocks, GridBlocks
from unmask.sampling.threshold import threshold
from unmask.sampling.uniform import check_uniform, uniform

SAMPLERS: dict[str, Sampler] = {s.name: s for s in (ancestral, first_hitting, confidence, threshold, uniform)}
# other names of a sampler: RADD's cached sampler is the ancestral one, which already calls the
# network only on rows where a token unmasks (a row that does not move needs no new output)
ALIASES = {"cached": "ancestral"}


def sampler_name(name: str | None) -> str:
    """The sampler that ``name`` (None: ancestral) stands for: a key of SAMPLERS, or an alias of one."""
    name = ALIASES.get(name or "ancestral", name or "ancestral")
    if name not in SAMPLERS:
        raise OptionError("sampler", "{sampler} {_name!r} is not one of: {_known} (cached: another name of ancestral)",
                          _name=name, _known=", ".join(SAMPLERS))
    return name


def takes(sampler: str) -> set[str]:
    """The options of a sampler's config (the table's ``config`` options it takes)."""
    return {f.name for f in fields(SAMPLERS[sampler_name(sampler)].config)}


@dataclass(frozen=True)
class SamplerSpec:
    """A sampler by name with its own typed config (``None``: the sampler's defaults); ``block_len``
    > 0 decodes semi-autoregressively; ``cache``: the KV cache (None: the model's own, the block
    cache for a block model and none otherwise). ``config.steps`` is the total over the blocks."""

    sampler: str = "ancestral"
    config: SamplerConfig | None = None
    block_len: int = 0
    cache: CacheConfig | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "sampler", sampler_name(self.sampler))
        if self.config is not None and not isinstance(self.config, SAMPLERS[self.sampler].config):
            raise OptionError("sampler", "{sampler} {_name} takes a {_takes}, not a {_given}", _name=self.sampler,
                              _takes=SAMPLERS[self.sampler].config.__name__, _given=type(self.config).__name__)
        check_value(OPTIONS["block_len"], self.block_len)

    @classmethod
    def from_options(cls, sampler: str | None = None, block_len: int | None = None, cache: str | None = None,
                     cache_refresh: int | None = None, **options) -> "SamplerSpec":
        """The spec from the table's options (:mod:`unmask.sampling.options`); None means "not
        given" (the sampler's default). An option the sampler does not take is refused by name."""
        sampler = sampler_name(sampler)
        spec_options = {"block_len": block_len, "cache": cache, "cache_refresh": cache_refresh}
        given = check_options(sampler, takes(sampler), {**spec_options, **options})
        config = SAMPLERS[sampler].config(**{name: value for name, value in given.items() if name not in spec_options})
        kv = None if cache is None and cache_refresh is None else CacheConfig(cache or "none", cache_refresh or 0)
        return cls(sampler, config, block_len or 0, kv)

    @staticmethod
    def with_defaults(options: dict, length: int, schedule: str) -> dict:
        """``options`` with the defaults that depend on the checkpoint filled in where the sampler
        takes them and they are not given: ``steps`` = the generation ``length``, ``schedule`` =
        the one the model was trained with (the table's LENGTH and TRAINED defaults)."""
        own = takes(options.get("sampler"))
        checkpoint = {LENGTH: length, TRAINED: schedule}
        filled = {name: checkpoint[o.default] for name, o in OPTIONS.items() if o.default in (LENGTH, TRAINED) and name in own}
        return {**options, **{name: value for name, value in filled.items() if options.get(name) is None}}

    def sampler_config(self) -> SamplerConfig:
        """The sampler's config (its defaults when the spec has none)."""
        return self.config if self.config is not None else SAMPLERS[self.sampler].config()

    def cache_for(self, model_config) -> CacheConfig:
        """The cache that decodes a model of ``model_config``: the spec's, else the model's own."""
        return self.cache if self.cache is not None else CacheConfig("block" if model_config.block_causal else "none")

    def check(self, model_config, gen_len: int, cond: Conditioning | None = None) -> None:
        """Refuse what cannot decode ``gen_len`` tokens of a canvas with ``cond`` by a model of
        ``model_config``: guidance without a prompt, an approximate cache or foreign blocks on a
        block model, the block cache on another model, blocks that do not divide the length or
        steps that do not split evenly over them; a uniform-state model with another sampler, blocks
        or a cache, or the uniform sampler on another model (:func:`unmask.sampling.uniform.check_uniform`)."""
        if self.sampler == "uniform" or model_config.noise == "uniform":
            return check_uniform(model_config, self.sampler, self.block_len, self.cache, cond, self.sampler_config().cfg_scale)
        check_guidance(self.sampler_config().cfg_scale, cond)
        cache, size = self.cache_for(model_config), model_config.block_causal
        if size:
            if cache.kind not in ("block", "none"):
                raise OptionError("cache", "{cache} {_kind}: a block model decodes with its exact cache of finished blocks "
                                  "({cache} block, the default) or none", _kind=cache.kind)
            if self.block_len not in (0, size):
                raise OptionError("block_len", "{block_len}={_len}: a block model decodes in its own blocks of {_size} tokens; "
                                  "leave {block_len} out", _len=self.block_len, _size=size)
        elif cache.kind == "block":
            raise OptionError("cache", "{cache} block is the exact cache of a block model (bd3); this model takes none, prefix, dual "
                              "or delayed")
        elif self.block_len:
            ColumnBlocks(self.block_len).check(self.sampler_config(), gen_len)

    def run(self, model, x: torch.Tensor, generator: torch.Generator, cond: Conditioning | None = None,
            callback: StepCallback | None = None, start: int = 0, stop_token: int | None = None) -> SampleOutput:
        """Fill the MASKs of x (B, L); columns [start, L) are the generation region (blocks, EOS stops).
        With a guide in ``cond.steering`` the result is a :class:`unmask.steering.steering.SteeredOutput`."""
        gen_len = x.shape[1] - start
        self.check(model.config, gen_len, cond)
        sampler, config, cache = SAMPLERS[self.sampler], self.sampler_config(), self.cache_for(model.config)
        if cond is not None and cond.steering is not None:  # a guide (unmask.steering): its rows through this path, its step around the sampler's
            if not cond.steering.bound:
                return cond.steering.decode(self.run, model, x, generator, cond, callback, start, stop_token)
            sampler = cond.steering.wrap(sampler)
        if model.config.block_causal:
            return decode_blocks(model, x, generator, sampler, config, GridBlocks(), start, cond, callback, stop_token, cache)
        block_len = self.block_len or gen_len
        if gen_len == 0 or (block_len == gen_len and cache.kind == "none" and stop_token is None):
            return sampler(model, x, generator, config, cond, callback)
        return decode_blocks(model, x, generator, sampler, config, ColumnBlocks(block_len), start, cond, callback, stop_token, cache)

"""The one decoding path of every entry point: ``unmask sample`` and ``unmask.generate``, ``eval
genppl``, the lm-eval adapter, the experiments and the server all turn the sampler options of the
table (:mod:`unmask.sampling.options`) into a :class:`Decoding` for their model with
:func:`decoding_for`, build a canvas (:mod:`unmask.sampling.canvas`) and call :meth:`Decoding.run`.

An MDM decodes with its :class:`~unmask.sampling.spec.SamplerSpec` (a block model block by block
with its exact cache), a uniform-state model (``noise="uniform"``) with the uniform sampler
(:mod:`unmask.sampling.uniform`), an AR model token by token with the AR sampler. Options the model's kind
would otherwise silently ignore are refused by name.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from unmask.errors import OptionError
from unmask.device import device_of
from unmask.sampling.ar import ARConfig, ar_sample
from unmask.sampling.base import Conditioning, SampleOutput, StepCallback
from unmask.sampling.options import OPTIONS, known, spelled
from unmask.sampling.spec import SamplerSpec
from unmask.sampling.uniform import check_uniform


@dataclass(frozen=True)
class Decoding:
    """How a model fills a canvas: an MDM's sampler ``spec``, or the AR sampler's config ``ar``."""

    spec: SamplerSpec | None = None
    ar: ARConfig | None = None

    @property
    def sampler(self) -> str:
        """The sampler's name ("ar" for the AR sampler)."""
        return "ar" if self.ar is not None else self.spec.sampler

    def check(self, model_config, gen_len: int, cond: Conditioning | None = None) -> None:
        """Refuse now what :meth:`run` would refuse for ``gen_len`` generated tokens of a canvas with
        ``cond`` (guidance without a prompt, blocks, caches, a guide on an AR model)."""
        self.check_steering(cond)
        if self.spec is not None:
            self.spec.check(model_config, gen_len, cond)

    def check_steering(self, cond: Conditioning | None) -> None:
        """A guide (``cond.steering``) steers MDM decoding only."""
        if self.ar is not None and cond is not None and cond.steering is not None:
            raise OptionError("guide", "{guide} steers MDM decoding; this checkpoint is an AR model (for best-of-N, score its samples)")

    def run(self, model, x: torch.Tensor, generator: torch.Generator, cond: Conditioning | None = None,
            callback: StepCallback | None = None, start: int = 0, stop_token: int | None = None) -> SampleOutput:
        """Fill canvas x (B, L): an MDM its MASKs in columns [start, L) (``stop_token``: rows that
        produced it stop early), an AR model ``ar.max_new_tokens`` tokens appended after x."""
        self.check_steering(cond)
        if self.ar is not None:
            ar_cond = None if cond is None else Conditioning(key_mask=cond.key_mask, constraint=cond.constraint)
            return ar_sample(model, x, generator, self.ar, ar_cond, callback)
        return self.spec.run(model, x, generator, cond, callback, start=start, stop_token=stop_token)


def decoding_for(model_config, length: int, options: dict, schedule: str = "linear", kv_cache: bool | None = None,
                 infill: bool = False) -> Decoding:
    """The decoding of ``length`` new tokens by a model of ``model_config`` from the table's
    ``options`` (None or absent: not given, the sampler's own default). MDM: the spec, ``steps``
    defaulting to ``length`` and ``schedule`` to the model's (``schedule``: the one it was trained
    with). AR: the AR sampler with its exact KV cache unless ``kv_cache`` is False. A uniform-state
    model: the uniform sampler (its default), without blocks or caches."""
    given = known(options)
    check_kind(model_config, given, length, kv_cache, infill)
    if model_config.causal:
        honoured = {name: value for name, value in given.items() if OPTIONS[name].ar}
        return Decoding(ar=ARConfig(max_new_tokens=length, kv_cache=kv_cache is not False, **honoured))
    if model_config.noise == "uniform":
        given.setdefault("sampler", "uniform")
    spec = SamplerSpec.from_options(**SamplerSpec.with_defaults(given, length, schedule))
    if "uniform" in (spec.sampler, model_config.noise):  # a sampler of the other kind, blocks or a cache: refused now, by name
        check_uniform(model_config, spec.sampler, spec.block_len, spec.cache)
    return Decoding(spec=spec)


def check_kind(model_config, given: dict, length: int | None = None, kv_cache: bool | None = None, infill: bool = False) -> None:
    """Refuse options the model's kind would otherwise silently ignore, naming them: on an AR model
    the MDM-only ones (``infill`` and every option the AR sampler does not honour; ``steps`` only
    when it differs from ``length``, as an AR model takes one step per token), on an MDM ``kv_cache``."""
    given = known(given)
    if model_config.causal:
        foreign = ["infill"] if infill else []
        foreign += [name for name in given if not OPTIONS[name].ar and name != "steps"]
        parts = [f"{{{name}}}" for name in foreign]
        steps = given.get("steps")
        if steps is not None and length is not None and steps != length:
            foreign.append("steps")
            parts.append("{steps}={_steps} (an AR model takes exactly one step per token, {length} {_length})")
        if foreign:
            both = [name for name, option in OPTIONS.items() if option.ar]
            raise OptionError(foreign[0], f"{', '.join(parts)}: MDM sampling only, but this checkpoint is an AR model, which decodes "
                              f"left to right, one token per network call; drop them ({spelled(both)} apply to both)",
                              _steps=steps, _length=length)
    elif kv_cache is not None:
        name = "kv_cache" if kv_cache else "no_kv_cache"
        raise OptionError("kv_cache", f"{{{name}}} applies to AR models; this checkpoint is an MDM (use {{cache}} prefix, dual or "
                          "delayed for the MDM's caches)")


def sampling_generator(model, seed: int) -> torch.Generator:
    """A seeded generator on the model's device.

    Samplers draw their random numbers on the device of the logits, and torch refuses a generator
    of another device type (a CPU generator cannot draw on CUDA), so every entry point that samples
    makes its generator here. (The likelihood estimators draw on the CPU and need a CPU one.)
    """
    return torch.Generator(device=device_of(model)).manual_seed(seed)

"""The sampler options, declared once: per option its name, type, range or allowed values, default,
command-line flag, HTTP request field and help. docs/sampling.md, 'One set of options for every command'.

Everything else derives from :data:`OPTIONS`: the flags of every command that samples
(:mod:`unmask.cli.sampler_options`), the checks of :func:`check_value` (which the sampler configs
and :meth:`unmask.sampling.spec.SamplerSpec.from_options` run), the defaults that depend on the
checkpoint (:meth:`~unmask.sampling.spec.SamplerSpec.with_defaults`) and the sampler fields of the
server's requests. An option is either a field of the sampler configs that take it (``config``:
``steps`` is an option of the samplers whose config has a ``steps`` field) or the spec's own, taken
by every MDM sampler (``sampler``, ``block_len``, ``cache``, ``cache_refresh``).

Errors are :class:`~unmask.errors.OptionError`\\ s naming the option by its name; the command line
spells it as its flag, the server as its field.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from numbers import Integral, Real
from typing import Iterable

from unmask.errors import OptionError, broken_rule, not_one_of
from unmask.schedule import SCHEDULES

OWN = "own"  # default: the sampler config's own (the threshold sampler decodes at temperature 0, the others at 1)
LENGTH = "length"  # default: the generation length
TRAINED = "trained"  # default: the checkpoint's own setting (its training schedule)


@dataclass(frozen=True)
class Option:
    """One sampler option. ``name`` is its parameter (a keyword of ``SamplerSpec.from_options`` and,
    for ``config`` options, a field of the sampler configs that take it). ``rule``: the range of a
    number (:func:`unmask.errors.check_number`'s rule); ``choices``: the allowed strings (None: any,
    or checked elsewhere: sampler names are the registry's). ``default``: :data:`OWN`, :data:`LENGTH`,
    :data:`TRAINED` or a value. ``flag``: the command-line flag (None: not a flag); ``field``: the
    HTTP request field (None: not served) and ``field_rule`` the server's own, narrower range.
    ``ar``: the AR sampler honours it too."""

    name: str
    type: type
    help: str
    rule: str | None = None
    choices: tuple[str, ...] | None = None
    default: object = OWN
    flag: str | None = ""
    field: str | None = None
    field_rule: str | None = None
    config: bool = True
    ar: bool = False
    note: str = ""

    def __post_init__(self) -> None:
        if self.flag == "":
            object.__setattr__(self, "flag", "--" + self.name.replace("_", "-"))


CACHES = ("none", "prefix", "dual", "delayed", "block")
SCORES = ("low_confidence", "margin", "entropy", "random")
ALLOCATIONS = ("even", "schedule")
PRECISIONS = ("float64", "float32")

OPTIONS: dict[str, Option] = {o.name: o for o in (
    Option("sampler", str, "MDM: ancestral (default; cached is another name of it), first-hitting, confidence or threshold; "
           "a uniform-state model (noise uniform): uniform, its default and only sampler.",
           default="ancestral", field="sampler", config=False),
    Option("steps", int, "MDM: sampling steps (samplers that take steps: ancestral, confidence, uniform); the total, split over blocks. "
           "Default: the generation length.", rule=">= 1", default=LENGTH, field="steps"),
    Option("block_len", int, "MDM: decode semi-autoregressively in blocks of this many tokens, which must divide the generation "
           "length (default: no blocks).", rule=">= 0", default=0, field="block_length", field_rule=">= 1", config=False),
    Option("cache", str, "MDM: KV cache of the canvas, none (default), prefix, dual or delayed (approximate; quality next to "
           "speed in the README). Block models (bd3): block (their default; exact) or none.", choices=CACHES, default=None,
           field="cache", config=False),
    Option("cache_refresh", int, "MDM: with a cache, a full forward every N network calls of a row (default 0: at block starts only).",
           rule=">= 0", default=0, config=False),
    Option("k", int, "MDM first-hitting: positions per network call (default 1: exact).", rule=">= 1"),
    Option("score", str, "MDM confidence: low_confidence (default), margin, entropy or random.", choices=SCORES),
    Option("allocation", str, "MDM confidence: tokens per step, even (default) or schedule.", choices=ALLOCATIONS),
    Option("tau", float, "MDM threshold: commit the proposals whose probability under the model is >= tau, in (0, 1] "
           "(default 0.9).", rule="(0, 1]", field="threshold"),
    Option("cfg_scale", float, "MDM: unsupervised classifier-free guidance scale w (needs a prompt; default 0: off).", rule=">= 0",
           flag="--cfg", field="cfg_scale", field_rule="[0, 20]"),
    Option("temperature", float, "Sampling temperature, applied before top-k/top-p; 0 is greedy (default: the sampler's own, 1; "
           "threshold 0).", rule=">= 0", field="temperature", field_rule="[0, 2]", ar=True),
    Option("top_k", int, "Keep the k most likely tokens (default 0: off).", rule=">= 0", ar=True, note=" (0 switches it off)"),
    Option("top_p", float, "Nucleus sampling mass, in (0, 1] (default 1: off).", rule="(0, 1]", field="top_p", ar=True),
    Option("precision", str, "Categorical sampling precision: float64 (default, exact) or float32 (ablation only; biased).",
           choices=PRECISIONS, ar=True),
    Option("greedy_tail", bool, "Uniform-state models: the last step takes the argmax of the network's prediction instead of a "
           "draw (Duo's greedy tail; default off).", field="greedy_tail"),
    Option("schedule", str, "MDM ancestral, first-hitting and uniform: the noise schedule (default: the one the model was trained "
           "with).",
           choices=SCHEDULES, default=TRAINED, flag=None),
)}

_KINDS = {int: ("an integer", Integral), float: ("a number", Real), str: ("a string", str), bool: ("true or false", bool)}


def check_value(option: Option, value) -> None:
    """Refuse ``value`` unless it has the option's type and obeys its range or choices (None: not
    given, passes); NaN and the infinities never pass a range."""
    if value is None:
        return
    name = option.name
    kind, cls = _KINDS[option.type]
    if isinstance(value, bool) is not (option.type is bool) or not isinstance(value, cls):
        raise OptionError(name, f"{{{name}}}={{_value!r}} must be {kind}", _value=value)
    if option.rule is not None:
        words = broken_rule(value, option.rule)
        if words is not None:
            what = "an integer " if option.type is int else "" if math.isfinite(value) else "a finite number "
            raise OptionError(name, f"{{{name}}}={{_value}} must be {what}{{_words}}{{_note}}", _value=value, _words=words, _note=option.note)
    if option.choices is not None and value not in option.choices:
        raise not_one_of(name, value, option.choices)


def check_fields(config) -> None:
    """Check every field of a sampler config (a dataclass) that is an option of the table."""
    for f in fields(config):
        if f.name in OPTIONS:
            check_value(OPTIONS[f.name], getattr(config, f.name))


def spelled(names: Iterable[str]) -> str:
    """The template fields of option names, comma-separated: ``{k}, {tau}``."""
    return ", ".join(f"{{{name}}}" for name in names)


def known(given: dict) -> dict:
    """The options given (None: not given, left out); one the table does not know is refused by name."""
    given = {name: value for name, value in given.items() if value is not None}
    unknown = [name for name in given if name not in OPTIONS]
    if unknown:
        raise OptionError(unknown[0], f"{spelled(unknown)}: not a sampler option; the options are {spelled(OPTIONS)}")
    return given


def check_options(sampler: str, takes: Iterable[str], given: dict) -> dict:
    """The options given (None: not given, left out), each checked against the table: an option the
    table does not know, a sampler-config option that ``sampler`` (whose config has the fields
    ``takes``) does not take, or a value out of its type, range or choices is refused by name."""
    given = known(given)
    takes = set(takes)
    foreign = [name for name in given if OPTIONS[name].config and name not in takes]
    if foreign:
        own = [name for name in OPTIONS if OPTIONS[name].config and name in takes]
        raise OptionError(foreign[0], f"{spelled(foreign)}: not an option of {{sampler}} {{_sampler}}, which takes {spelled(own)}",
                          _sampler=sampler)
    for name, value in given.items():
        check_value(OPTIONS[name], value)
    return given

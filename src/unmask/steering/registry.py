"""The guides by name, and a guide's typed config from the options given."""

from __future__ import annotations

from dataclasses import fields

from unmask.errors import OptionError, not_one_of
from unmask.sampling.options import spelled
from unmask.steering.best_of import best_of
from unmask.steering.edlm import edlm
from unmask.steering.guide import Guide
from unmask.steering.options import GUIDE_OPTIONS
from unmask.steering.smc import smc
from unmask.steering.svdd import svdd

GUIDES: dict[str, Guide] = {g.name: g for g in (best_of, svdd, smc, edlm)}
NUMBERS = tuple(name for name, option in GUIDE_OPTIONS.items() if option.config)  # particles, alpha, ess, window


def guide_named(name: str) -> Guide:
    if name not in GUIDES:
        raise not_one_of("guide", name, GUIDES)
    return GUIDES[name]


def guide_config(name: str, **options):
    """The typed config of guide ``name`` from its numeric options (None: not given, its default). An
    option the guide does not take is refused by name, with the ones it takes."""
    guide = guide_named(name)
    given = {key: value for key, value in options.items() if value is not None}
    unknown = [key for key in given if key not in NUMBERS]
    if unknown:
        raise OptionError(unknown[0], f"{spelled(unknown)}: not a guide option; the options are {spelled(NUMBERS)}")
    takes = {f.name for f in fields(guide.config)}
    foreign = [key for key in given if key not in takes]
    if foreign:
        raise OptionError(foreign[0], f"{spelled(foreign)}: not an option of {{guide}} {{_guide}}, which takes "
                          f"{spelled(f.name for f in fields(guide.config))}", _guide=name)
    return guide.config(**given)

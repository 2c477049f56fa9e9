"""The guide options, declared once like the sampler options (:mod:`unmask.sampling.options`): name,
type, range or choices, command-line flag, HTTP request field and help. The command line
(``unmask sample``), :func:`unmask.generate` and the server's request fields derive from this table;
each guide's typed config checks its fields against it."""

from __future__ import annotations

from dataclasses import fields

from unmask.sampling.options import Option, check_value

GUIDE_NAMES = ("best-of", "svdd", "smc", "edlm")

GUIDE_OPTIONS: dict[str, Option] = {o.name: o for o in (
    Option("guide", str, "Reward- or energy-guided decoding around the sampler: best-of (N samples, the best kept), svdd (M "
           "candidates a step, valued by the score of their denoised estimate), smc (N particles, reweighted and resampled) or edlm "
           "(K full candidates a step early on, importance-weighted by an energy). Default: none.", choices=GUIDE_NAMES,
           default=None, field="guide", config=False),
    Option("reward", str, "The score best-of, svdd and smc maximise: ar:RUN (mean log-likelihood per token under an AR run), "
           "regex:PATTERN (1 on a full match), classifier:RUN:LABEL or python:MODULE:FUNCTION.", default=None, field="reward",
           config=False),
    Option("energy", str, "edlm's energy, as a log-density: ar:RUN (E = -log p_AR), classifier:RUN:LABEL or python:MODULE:FUNCTION.",
           default=None, field="energy", config=False),
    Option("particles", int, "Particles N (best-of, smc), candidates per step M (svdd) or candidates per step K (edlm).",
           rule=">= 1", field="particles"),
    Option("alpha", float, "Temperature of the reward: the target is p(x) exp(r(x) / alpha); svdd keeps a candidate by "
           "softmax(value / alpha), 0 the best (svdd's default); smc > 0 (default 0.1).", rule=">= 0", field="alpha"),
    Option("ess", float, "smc: resample a prompt's particles when their effective sample size falls below ess x N, in (0, 1] "
           "(default 0.5).", rule="(0, 1]", field="ess"),
    Option("window", float, "edlm: correct the steps while more than 1 - window of the block is still masked, in [0, 1] "
           "(default 0.25: the first quarter).", rule="[0, 1]", field="window"),
)}


def check_guide_fields(config) -> None:
    """Check every field of a guide config against the table."""
    for f in fields(config):
        if f.name in GUIDE_OPTIONS:
            check_value(GUIDE_OPTIONS[f.name], getattr(config, f.name))

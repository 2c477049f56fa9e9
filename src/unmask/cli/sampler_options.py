"""The sampler options, declared once for every command that samples (``unmask sample``,
``unmask eval genppl``, ``unmask eval harness``).

:func:`with_sampler_options` adds them to a Typer command, which receives them as one dict
``sampling`` of the options the user gave (an option left out is absent, so each sampler keeps its
own default: the threshold sampler decodes at temperature 0, the others at 1). The dict goes to
:meth:`unmask.sampling.generate.SamplerSpec.from_options`, which refuses an option the chosen
sampler does not take, naming its flag.
"""

from __future__ import annotations

import functools
import inspect
from typing import Callable, Optional

import typer

from unmask.sampling.cache import CACHES

# name: (type, option); every default is None ("not given"). Integers carry their range here (a usage
# error); floats are checked by the sampler configs, which also refuse NaN and infinities.
OPTIONS: dict[str, tuple[type, object]] = {
    "sampler": (Optional[str], typer.Option(None, help="MDM: ancestral (default; cached is another name of it), first-hitting, confidence or threshold.")),
    "steps": (Optional[int], typer.Option(None, min=1, help="MDM: sampling steps (ancestral/confidence; the total, split over blocks). Default: the generation length.")),
    "block_len": (Optional[int], typer.Option(None, min=0, help="MDM: decode semi-autoregressively in blocks of this many tokens (default: off).")),
    "cache": (Optional[str], typer.Option(None, help=f"MDM: KV cache of the canvas, one of {', '.join(CACHES)} (default none; an approximation, see README). "
                                                   "Block models (bd3): block (default; exact) or none.")),
    "cache_refresh": (Optional[int], typer.Option(None, min=0, help="MDM: with --cache, a full forward every N network calls of a row (default 0: at block starts only).")),
    "k": (Optional[int], typer.Option(None, min=1, help="MDM first-hitting: positions per network call (default 1: exact).")),
    "score": (Optional[str], typer.Option(None, help="MDM confidence: low_confidence (default), margin, entropy or random.")),
    "allocation": (Optional[str], typer.Option(None, help="MDM confidence: tokens per step, even (default) or schedule.")),
    "tau": (Optional[float], typer.Option(None, help="MDM threshold: commit proposals whose probability under the model is >= tau, in (0, 1] (default 0.9).")),
    "cfg_scale": (Optional[float], typer.Option(None, "--cfg", help="MDM: unsupervised classifier-free guidance scale w (needs a prompt; default 0: off).")),
    "temperature": (Optional[float], typer.Option(None, help="Sampling temperature, applied before top-k/top-p (default: the sampler's own, 1; threshold 0).")),
    "top_k": (Optional[int], typer.Option(None, min=0, help="Keep the k most likely tokens (default 0: off).")),
    "top_p": (Optional[float], typer.Option(None, help="Nucleus sampling mass, in (0, 1] (default 1: off).")),
    "precision": (Optional[str], typer.Option(None, help="Categorical sampling precision: float64 (default, exact) or float32 (ablation only; biased).")),
}


def with_sampler_options(command: Callable) -> Callable:
    """Add the sampler options to a Typer command that takes a ``sampling: dict`` parameter."""
    signature = inspect.signature(command)
    own = [p for p in signature.parameters.values() if p.name != "sampling"]
    added = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=kind) for name, (kind, option) in OPTIONS.items()]

    @functools.wraps(command)
    def wrapper(**kwargs):
        sampling = {name: kwargs.pop(name) for name in OPTIONS}
        return command(**kwargs, sampling={name: value for name, value in sampling.items() if value is not None})

    wrapper.__signature__ = signature.replace(parameters=[*own, *added])
    wrapper.__annotations__ = {
        **{name: kind for name, kind in command.__annotations__.items() if name != "sampling"},
        **{name: kind for name, (kind, _) in OPTIONS.items()},
    }
    return wrapper

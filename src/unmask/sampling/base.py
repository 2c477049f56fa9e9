"""What every sampler shares: the explicit state, the output, and float64 categorical sampling.

A sampler is a function ``sampler(model, x, generator, config) -> SampleOutput`` over an explicit
:class:`SamplerState`: no hidden state on an object, deterministic under a seeded generator, and
every network call counted (NFE = forward calls over the whole batch).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Literal

import torch

from unmask.errors import UnmaskError

Precision = Literal["float64", "float32"]
_DTYPES = {"float64": torch.float64, "float32": torch.float32}


@dataclass(frozen=True)
class SamplerState:
    """tokens (B, L) with MASK where still undecided; ``step`` steps done; ``nfe`` network calls so far."""

    tokens: torch.Tensor
    step: int = 0
    nfe: int = 0

    def advance(self, tokens: torch.Tensor, calls: int) -> "SamplerState":
        return replace(self, tokens=tokens, step=self.step + 1, nfe=self.nfe + calls)


StepCallback = Callable[[SamplerState], None]


@dataclass
class SampleOutput:
    tokens: torch.Tensor  # (B, L) final sequences, prompt included
    nfe: int  # network forward calls (each over the whole batch)
    steps: int


def dtype_of(precision: str) -> torch.dtype:
    if precision not in _DTYPES:
        raise UnmaskError(f"--precision {precision!r} is not one of: float64, float32")
    return _DTYPES[precision]


def exponential_race(log_weights: torch.Tensor, generator: torch.Generator, precision: Precision = "float64") -> torch.Tensor:
    """Index of a categorical draw over the last dim, proportional to exp(log_weights).

    argmax_i log w_i - log E_i with E_i ~ Exp(1) (equivalently Gumbel-max), computed in
    ``precision``. float64 is the default: in float32 the noise saturates near 16.6 and rare events
    are under-sampled (Zheng et al., reference section 4). float32 exists for that ablation only.
    """
    dtype = dtype_of(precision)
    u = torch.rand(log_weights.shape, generator=generator, dtype=dtype, device=log_weights.device)
    # E = -log(U); U = 0 has probability 2^-53 (float64) but would give E = 0, log E = -inf: keep it finite
    e = -torch.log(u.clamp_min(torch.finfo(dtype).tiny))
    return (log_weights.to(dtype) - torch.log(e)).argmax(dim=-1)


def sample_tokens(
    logits: torch.Tensor, generator: torch.Generator, temperature: float = 1.0, precision: Precision = "float64"
) -> torch.Tensor:
    """One token per row of logits (..., V) at the given temperature; temperature 0 is argmax."""
    if temperature < 0:
        raise UnmaskError(f"--temperature={temperature} must be >= 0")
    if temperature == 0:
        return logits.argmax(dim=-1)
    return exponential_race(logits.to(dtype_of(precision)) / temperature, generator, precision)


def check_steps(steps: int) -> None:
    if steps < 1:
        raise UnmaskError(f"--steps={steps} must be a positive integer")

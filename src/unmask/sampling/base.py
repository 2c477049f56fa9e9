"""What every sampler shares: the explicit state, the conditioning, the network call, and float64
categorical sampling.

A sampler is a function ``sampler(model, x, generator, config, cond=None, callback=None) ->
SampleOutput``: x (B, L) holds MASK where tokens are to be generated (anywhere: prompts, infilling
templates); the state is an explicit :class:`SamplerState` returned anew each step; everything is
deterministic under a seeded generator; every network call is counted (NFE = forward calls, each
over the rows that needed it).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable, Literal

import torch

from unmask.errors import UnmaskError
from unmask.guidance import guided_logits

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
    nfe: int  # network forward calls
    steps: int
    row_nfe: torch.Tensor | None = None  # (B,) calls each row took part in (cached sampler)


@dataclass(frozen=True)
class SamplerConfig:
    """Options every MDM sampler honours."""

    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    precision: Precision = "float64"  # float32 only for ablations: biased (reference section 4)
    cfg_scale: float = 0.0  # unsupervised classifier-free guidance w

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise UnmaskError(f"--temperature={self.temperature} must be >= 0")
        if self.top_k < 0:
            raise UnmaskError(f"--top-k={self.top_k} must be >= 0 (0 switches it off)")
        if not 0 < self.top_p <= 1:
            raise UnmaskError(f"--top-p={self.top_p} must be in (0, 1]")
        if self.cfg_scale < 0:
            raise UnmaskError(f"--cfg={self.cfg_scale} must be >= 0")
        dtype_of(self.precision)


@dataclass(frozen=True)
class Conditioning:
    """What the network sees besides the tokens, for batches of prompts of different lengths.

    key_mask (B, L): False at padding (never attended to, never generated); positions (B, L):
    rotary positions derived from the key mask; prompt_mask (B, L): the user-given tokens that
    the unconditional pass of classifier-free guidance replaces by MASK.
    """

    key_mask: torch.Tensor | None = None
    positions: torch.Tensor | None = None
    prompt_mask: torch.Tensor | None = None
    extra: dict = field(default_factory=dict)


def network(model, x: torch.Tensor, cond: Conditioning | None, cfg_scale: float, t: torch.Tensor | None = None) -> torch.Tensor:
    """float32 logits (B, L, V) for x (B, L), with padding masks, positions and guidance applied.

    ``t`` (B,): the chain time a time-conditioned network is given (ancestral, first-hitting);
    None: the masked fraction of each row's real positions (confidence, threshold; see
    :func:`unmask.guidance.network_time`). A time-agnostic network ignores it.
    """
    cond = cond or Conditioning()
    kwargs = {}
    if cond.key_mask is not None:
        kwargs["key_mask"] = cond.key_mask
    if cond.positions is not None:
        kwargs["positions"] = cond.positions
    t = None if t is None else t.to(x.device)
    if cfg_scale and (cond.prompt_mask is None or not cond.prompt_mask.any()):
        raise UnmaskError("--cfg needs a prompt: guidance contrasts the prompt with the prompt replaced by MASK")
    prompt = cond.prompt_mask if cond.prompt_mask is not None else torch.zeros_like(x, dtype=torch.bool)
    return guided_logits(model, x, prompt, cfg_scale, t, **kwargs).float()


def rows_of(cond: Conditioning | None, rows: torch.Tensor) -> Conditioning | None:
    """The conditioning of a subset of rows (for samplers that call the network on some rows only)."""
    if cond is None:
        return None
    pick = lambda v: None if v is None else v[rows]  # noqa: E731
    return Conditioning(pick(cond.key_mask), pick(cond.positions), pick(cond.prompt_mask), cond.extra)


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


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Logits (..., V) with everything outside the top-k / nucleus top-p set to -inf."""
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, -torch.inf)
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # drop a token when the mass before it already reaches top_p (the top-1 token always stays)
        drop_sorted = probs.cumsum(dim=-1) - probs >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, -torch.inf)
    return logits


def token_log_probs(logits: torch.Tensor, config: SamplerConfig) -> torch.Tensor:
    """log p_T(x) (..., V) in the sampling precision: temperature, top-k and top-p applied.

    Temperature 0 puts all the mass on the argmax (ties share it).
    """
    logits = filter_logits(logits.to(dtype_of(config.precision)), config.top_k, config.top_p)
    if config.temperature == 0:
        logits = torch.where(logits == logits.max(dim=-1, keepdim=True).values, 0.0, -torch.inf).to(logits.dtype)
        return logits - torch.logsumexp(logits, dim=-1, keepdim=True)
    return torch.log_softmax(logits / config.temperature, dim=-1)


def sample_from(logits: torch.Tensor, generator: torch.Generator, config: SamplerConfig) -> torch.Tensor:
    """One token per row of logits (..., V) under the config (temperature 0: argmax)."""
    if config.temperature == 0:
        return filter_logits(logits, config.top_k, config.top_p).argmax(dim=-1)
    return exponential_race(token_log_probs(logits, config), generator, config.precision)


def check_steps(steps: int) -> None:
    if steps < 1:
        raise UnmaskError(f"--steps={steps} must be a positive integer")


def random_subset(candidates: torch.Tensor, k: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Per row, k[b] positions chosen uniformly among the True entries of candidates (B, L) -> (B, L) bool."""
    keys = torch.rand(candidates.shape, generator=generator, device=candidates.device).masked_fill(~candidates, 2.0)
    ranks = keys.argsort(dim=1).argsort(dim=1)
    return candidates & (ranks < k[:, None])


def top_per_row(scores: torch.Tensor, candidates: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Per row, the k[b] candidates with the highest scores (B, L) -> (B, L) bool. Selection is
    per row: the anchor bug of selecting the top-k over the whole batch cannot happen."""
    keyed = scores.masked_fill(~candidates, -torch.inf)
    ranks = keyed.argsort(dim=1, descending=True, stable=True).argsort(dim=1)
    return candidates & (ranks < k[:, None])


def fill(tokens: torch.Tensor, where: torch.Tensor, logits: torch.Tensor, generator: torch.Generator, config: SamplerConfig) -> torch.Tensor:
    """tokens (B, L) with a fresh draw from logits (B, L, V) at the ``where`` positions only
    (one categorical over V per chosen position, not B x L of them)."""
    rows, cols = where.nonzero(as_tuple=True)
    if rows.numel() == 0:
        return tokens
    out = tokens.clone()
    out[rows, cols] = sample_from(logits[rows, cols], generator, config)
    return out


def open_positions(tokens: torch.Tensor, mask_id: int, eligible: torch.Tensor | None) -> torch.Tensor:
    """(B, L) bool: still-masked positions a sampler may fill now (all, or those in ``eligible``)."""
    can = tokens == mask_id
    return can if eligible is None else can & eligible

"""What every sampler shares: the explicit state, the conditioning, the network call, and float64
categorical sampling.

A sampler is a :class:`Sampler`: ``start(model, x, config, eligible, cache) -> state`` and
``step(model, state, generator, config, cond) -> state``, functions of an explicit state dataclass
(tokens, the positions being decoded, counters, per-row times, caches) that return a new state and
leave the one they were given as it was, so a step can be inspected, streamed or resumed. The one
exception is a KV cache: its key/value tensors are written in place by the network (a copy per
step would cost as much as the forward), so the state before a step shares them with the state
after it, and only the latest state's cache is valid. Calling a :class:`Sampler` runs it to the end:
``sampler(model, x, generator, config, cond=None, callback=None, eligible=None) -> SampleOutput``,
where x (B, L) holds MASK where tokens are to be generated (anywhere: prompts, infilling templates).
Everything is deterministic under a seeded generator.

NFE, everywhere: network forward calls. A call covers the rows that need it (rows with nothing to
predict this step are left out of the forward), so ``nfe`` counts calls and ``row_nfe`` (B,) counts
the calls each row took part in. Bookkeeping is proportional to the positions that can change: the
network's head, softmaxes and float64 draws run only at the positions a step needs.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable, Literal

import torch

from unmask.errors import OptionError
from unmask.guidance import combine, network_time
from unmask.sampling.cache import CanvasCache, fed_index
from unmask.sampling.options import OPTIONS, check_fields, check_value
from unmask.sampling.shapes import static_shapes

Precision = Literal["float64", "float32"]
_DTYPES = {"float64": torch.float64, "float32": torch.float32}


@dataclass(frozen=True)
class SamplerState:
    """tokens (B, L) with MASK where still undecided; ``eligible`` (B, L): the positions this phase
    may fill (None: every MASK); ``step`` steps done; ``nfe`` network calls so far, ``row_nfe`` (B,)
    per row; ``cache``: the KV cache of the canvas (None: no cache); ``done``: nothing left to do;
    ``mask_id``: the model's MASK token, read from its config once, at the start; ``static``: the
    step runs with static shapes (:mod:`unmask.sampling.shapes`), ``open_max`` is then the most
    positions any row had to fill at the start, read once, from which a sampler decides its steps,
    and ``width`` the positions per row at which each call's head and draws run (:func:`frame_index`)."""

    tokens: torch.Tensor
    eligible: torch.Tensor | None = None
    step: int = 0
    nfe: int = 0
    row_nfe: torch.Tensor | None = None
    cache: CanvasCache | None = None
    done: bool = False
    mask_id: int = -1
    static: bool = False
    open_max: int = 0
    width: int = 0

    def advance(self, tokens: torch.Tensor, called: torch.Tensor, cache: CanvasCache | None, **changes) -> "SamplerState":
        """The state after a step that wrote ``tokens`` and called the network on the ``called`` (B,) rows
        (static shapes: the call covered every row)."""
        if self.static:
            return replace(self, tokens=tokens, step=self.step + 1, nfe=self.nfe + 1, row_nfe=self.row_nfe + 1, cache=cache, **changes)
        return replace(self, tokens=tokens, step=self.step + 1, nfe=self.nfe + int(bool(called.any())),
                       row_nfe=self.row_nfe + called, cache=cache, **changes)

    def finished(self, new: torch.Tensor, last: int, poll: int = 0) -> bool:
        """Whether decoding is over after the step that wrote ``new``: ``last`` steps are done, or
        nothing is left to fill. With static shapes ``last`` is the bound the sampler decided at the
        start, and whether anything is left is read only every ``poll`` steps (0: never)."""
        if self.step + 1 >= last:
            return True
        if self.static and (not poll or (self.step + 1) % poll):
            return False
        return not bool(open_positions(new, self.mask_id, self.eligible).any())

    def frame(self, want: torch.Tensor) -> torch.Tensor | None:
        """With static shapes, the (B, width) columns of a step's ``want`` (B, L) positions
        (:func:`frame_index`), made once per step and handed to :func:`predict`, :func:`fill`,
        :func:`scatter_rows` and :func:`grid_uniforms`; None with dynamic shapes."""
        return frame_index(want, self.width) if self.static else None


StepCallback = Callable[[SamplerState], None]


@dataclass
class SampleOutput:
    tokens: torch.Tensor  # (B, L) final sequences, prompt included
    nfe: int  # network forward calls
    steps: int
    row_nfe: torch.Tensor | None = None  # (B,) calls each row took part in


@dataclass(frozen=True)
class SamplerConfig:
    """Options every MDM sampler honours."""

    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    precision: Precision = "float64"  # float32 only for ablations: biased (docs/algorithms.md, 'Categorical sampling precision')
    cfg_scale: float = 0.0  # unsupervised classifier-free guidance w

    def __post_init__(self) -> None:
        check_fields(self)  # every field that is a sampler option, against its type and range (unmask.sampling.options)


@dataclass(frozen=True)
class Conditioning:
    """What the network sees besides the tokens, for batches of prompts of different lengths.

    key_mask (B, L): False at padding (never attended to, never generated); positions (B, L):
    rotary positions derived from the key mask; prompt_mask (B, L): the user-given tokens that
    the unconditional pass of classifier-free guidance replaces by MASK; canvas_time: a
    time-conditioned network gets the masked fraction of its input row even from a sampler with a
    chain time (ancestral, first-hitting), because the sampler decodes one block of several and its
    chain's clock, restarted at 1 in each block, says nothing of the rest of the canvas;
    constraint: structured output (:class:`unmask.constraints.decode.CanvasConstraint`), applied by
    :func:`predict` to every call's logits and by :func:`settle` to every step's commits;
    classifier_guide: classifier guidance (D-CBG, :class:`unmask.classifier_guidance.ClassifierGuide`),
    which :func:`predict` applies to every call's logits at the positions being filled;
    steering: reward- or energy-guided decoding (:class:`unmask.steering.steering.Steering`), which
    :meth:`unmask.sampling.spec.SamplerSpec.run` hands the decoding to; target (B, L): the tokens a
    step moves toward (a guide's picked x0, EDLM): :func:`settle` gives every position a step
    commits the target's token there.
    """

    key_mask: torch.Tensor | None = None
    positions: torch.Tensor | None = None
    prompt_mask: torch.Tensor | None = None
    extra: dict = field(default_factory=dict)
    canvas_time: bool = False
    constraint: "CanvasConstraint | None" = None  # noqa: F821  (unmask.constraints sits above the samplers)
    classifier_guide: "ClassifierGuide | None" = None  # noqa: F821  (unmask.classifier_guidance, likewise)
    steering: "Steering | None" = None  # noqa: F821  (unmask.steering, likewise)
    target: torch.Tensor | None = None

    def rows(self, index: torch.Tensor) -> "Conditioning":
        """The conditioning of a subset of rows."""
        pick = lambda v: None if v is None else v[index]  # noqa: E731
        return replace(self, key_mask=pick(self.key_mask), positions=pick(self.positions), prompt_mask=pick(self.prompt_mask),
                       constraint=None if self.constraint is None else self.constraint.rows(index),
                       classifier_guide=None if self.classifier_guide is None else self.classifier_guide.rows(index),
                       steering=None if self.steering is None else self.steering.rows(index), target=pick(self.target))

    def to(self, device) -> "Conditioning":
        """The conditioning on ``device``."""
        move = lambda v: None if v is None else v.to(device)  # noqa: E731
        return replace(self, key_mask=move(self.key_mask), positions=move(self.positions), prompt_mask=move(self.prompt_mask),
                       target=move(self.target))


def start_state(model, x: torch.Tensor, eligible: torch.Tensor | None = None, cache: CanvasCache | None = None, **extra) -> SamplerState:
    """The state before the first step (``extra``: fields of a sampler's own state subclass)."""
    cls, mask_id = extra.pop("cls", SamplerState), model.config.mask_id
    done = not bool(open_positions(x, mask_id, eligible).any())
    return cls(x.clone(), eligible, row_nfe=torch.zeros(x.shape[0], dtype=torch.long, device=x.device), cache=cache, done=done,
               mask_id=mask_id, **extra)


def predict(
    model, state: SamplerState, want: torch.Tensor, cond: Conditioning | None, cfg_scale: float, t: torch.Tensor | None = None,
    frame: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, CanvasCache | None]:
    """float32 logits (N, V) at the N ``want`` (B, L) positions of ``state.tokens`` (row-major order),
    with padding masks, positions, guidance and the state's KV cache applied; with static shapes
    (``state.static``) at the N = B ``state.width`` columns of ``frame`` (``state.frame(want)``, made
    here when not given), which :func:`fill` and :func:`scatter_rows` place back given the same frame.

    One forward over the rows with a wanted position; returns (logits, called (B,) bool, cache after).
    ``t`` (B,): the chain time a time-conditioned network is given (ancestral, first-hitting); None,
    or ``cond.canvas_time``: the masked fraction of each row's real positions
    (:func:`unmask.guidance.network_time`).
    """
    x, mask_id = state.tokens, state.mask_id
    cond = cond or Conditioning()
    t = None if cond.canvas_time else t
    called = want.any(dim=1)
    static = state.static
    index = (frame if frame is not None else state.frame(want)) if static else None
    if not static and not bool(called.any()):
        return torch.empty((0, model.config.vocab_size), device=x.device), called, state.cache
    rows = None if static else called.nonzero().squeeze(1)
    everyone = static or rows.numel() == x.shape[0]
    pick = (lambda v: v) if everyone else (lambda v: None if v is None else v[rows])  # noqa: E731
    tokens, key_mask, positions, wanted = pick(x), pick(cond.key_mask), pick(cond.positions), pick(want)
    t = None if t is None else pick(t.to(x.device))
    guided = bool(cfg_scale)
    if guided:
        if cond.prompt_mask is None:  # a window of a checked canvas may hold none of the prompt (its keys are cached): no check of .any()
            check_guidance(cfg_scale, None)
        # the unconditional half: the same rows with the prompt replaced by MASK (docs/algorithms.md, 'Unsupervised classifier-free guidance')
        tokens = torch.cat([tokens, torch.where(pick(cond.prompt_mask), mask_id, tokens)])
        key_mask, positions, wanted = (None if v is None else torch.cat([v, v]) for v in (key_mask, positions, wanted))
        t = None if t is None else torch.cat([t, t])
    time = network_time(model, tokens, t, key_mask)
    cache = state.cache
    if cache is not None:
        logits, cache = _cached_forward(model, state, tokens, time, key_mask, positions, wanted, rows, index, guided)
    elif static:  # every row, ``width`` positions each: (B width, V), nothing read from the device (the canvas's span was checked when it was made)
        logits = model(tokens, t=time, key_mask=key_mask, positions=positions, check_span=False,
                       logits_at=torch.cat([index, index]) if guided else index)
    else:
        logits = model(tokens, t=time, key_mask=key_mask, positions=positions, logits_at=wanted)
    logits = logits.float()
    if guided:
        logits = combine(*logits.chunk(2), cfg_scale)
    if cond.classifier_guide is not None:  # D-CBG: the classifier sees the whole canvas (docs/algorithms.md, 'Classifier guidance (D-CBG)')
        logits = cond.classifier_guide.guide(x, want, logits, cond.key_mask, cond.positions)
    if cond.constraint is not None:
        logits = cond.constraint.restrict(x, want, logits)
    return logits, called, cache


def _cached_forward(model, state: SamplerState, tokens, time, key_mask, positions, wanted, rows, index, guided: bool):
    """:func:`predict`'s forward through the state's canvas cache: the fed slots of the called
    ``rows`` (all with static shapes, whose logits are at the frame ``index``) -> (logits, cache after)."""
    x, cache, length = state.tokens, state.cache, state.tokens.shape[1]
    if state.static:  # a contiguous run of slots [first, last), the same in every row: nothing read from the device
        fed, cache = cache.feed_static(length)
        heads = (index - fed[:, :1]).clamp(0, fed.shape[1] - 1)  # the frame's columns among the fed slots
        slots, real, kv_rows, kv = fed, None, None, cache.kv
        logits_at = torch.cat([heads, heads]) if guided else heads
        slots = torch.cat([slots, slots]) if guided else slots
    else:
        region = state.eligible[rows] if state.eligible is not None else x[rows] == state.mask_id
        fed, cache = cache.feed(rows, x[rows], region, state.mask_id)
        slots, real = fed_index(torch.cat([fed, fed]) if guided else fed)
        kv_rows = torch.cat([rows, rows + x.shape[0]]) if guided else rows
        kv = cache.kv if rows.numel() == x.shape[0] else cache.kv.rows(kv_rows)
    at = slots.clamp(max=length - 1)  # the scratch slot L reads any real slot; its outputs are discarded
    visible = torch.ones_like(tokens, dtype=torch.bool) if key_mask is None else key_mask
    visible = torch.cat([visible, torch.zeros_like(visible[:, :1])], dim=1)  # nobody attends to the scratch slot
    logits = model(tokens.gather(1, at), t=time, key_mask=visible, positions=(at if positions is None else positions.gather(1, at)),
                   kv_cache=kv, cache_index=slots, logits_at=logits_at if real is None else wanted.gather(1, at) & real, check_span=not state.static)
    if kv is not cache.kv:
        cache.kv.put_rows(kv_rows, kv)
    return logits, cache


def settle(state: SamplerState, new: torch.Tensor, want: torch.Tensor, logits: torch.Tensor, generator: torch.Generator,
           config: SamplerConfig, cond: Conditioning | None) -> torch.Tensor:
    """The tokens ``new`` a step wrote over ``state.tokens``: its commits take ``cond.target``'s
    tokens where it has one (not MASK), and in constrained rows are made jointly valid
    (``cond.constraint``, :meth:`unmask.constraints.decode.CanvasConstraint.settle`);
    ``logits`` (N, V) from :func:`predict` at the ``want`` positions."""
    if cond is not None and cond.target is not None:
        committed = (state.tokens == state.mask_id) & (new != state.mask_id) & (cond.target != state.mask_id)
        new = torch.where(committed, cond.target, new)
    if cond is None or cond.constraint is None:
        return new
    return cond.constraint.settle(state.tokens, new, want, logits, generator, config, state.mask_id)


def check_guidance(cfg_scale: float, cond: Conditioning | None) -> None:
    """Guidance (``cfg_scale`` > 0) needs a prompt in ``cond``: it contrasts the prompt with the prompt replaced by MASK."""
    if cfg_scale and (cond is None or cond.prompt_mask is None or not cond.prompt_mask.any()):
        raise OptionError("cfg_scale", "{cfg_scale} needs a prompt: guidance contrasts the prompt with the prompt replaced by MASK")


def dtype_of(precision: str) -> torch.dtype:
    check_value(OPTIONS["precision"], precision)
    return _DTYPES[precision]


def exponential_race(log_weights: torch.Tensor, generator: torch.Generator, precision: Precision = "float64") -> torch.Tensor:
    """Index of a categorical draw over the last dim, proportional to exp(log_weights), by the
    exponential race: argmax_i log w_i - log E_i with E_i ~ Exp(1) (equivalently Gumbel-max).

    In float32 the noise saturates near 16.6 and rare events are under-sampled (Zheng et al.;
    docs/algorithms.md, 'Categorical sampling precision'): that is the ``precision="float32"`` ablation. The samplers' exact float64
    draw is :func:`categorical` (the same distribution at a third of the cost).
    """
    dtype = dtype_of(precision)
    u = torch.rand(log_weights.shape, generator=generator, dtype=dtype, device=log_weights.device)
    # E = -log(U); U = 0 has probability 2^-53 (float64) but would give E = 0, log E = -inf: keep it finite
    e = -torch.log(u.clamp_min(torch.finfo(dtype).tiny))
    return (log_weights.to(dtype) - torch.log(e)).argmax(dim=-1)


def categorical(log_weights: torch.Tensor, generator: torch.Generator, precision: Precision = "float64",
                u: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A categorical draw over the last dim of log_weights (..., V), proportional to their exp,
    and the drawn outcome's normalised probability: (index (...,), probability (...,) float64).

    float64 (the default): inverse CDF, one uniform per row against the float64 cumulative sum
    of the weights: exact up to float64 rounding (outcomes below about 2^-53 of the total mass are
    never drawn), one exp and one cumsum per entry instead of V uniforms and two logs.
    float32: the float32 exponential race of the ablation (:func:`exponential_race`). ``u`` (...,)
    float64: the uniforms to use (:func:`grid_uniforms`); None: drawn here.
    """
    weights = (log_weights.double() - log_weights.amax(dim=-1, keepdim=True).double()).exp()
    if precision == "float64":
        cdf = weights.cumsum(dim=-1)
        total = cdf[..., -1]
        if u is None:
            u = torch.rand(cdf.shape[:-1], generator=generator, dtype=torch.float64, device=cdf.device)
        u = u[..., None]
        # u in [0, 1) times the total; searchsorted(right) never lands on a zero-weight outcome
        index = torch.searchsorted(cdf, u * total[..., None], right=True).squeeze(-1).clamp(max=cdf.shape[-1] - 1)
    else:
        index, total = exponential_race(log_weights, generator, precision), weights.sum(dim=-1)
    return index, weights.gather(-1, index[..., None]).squeeze(-1) / total


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
    """log p_T(x) (..., V) in the sampling precision: temperature first, then top-k and top-p (the
    order of HF transformers and vLLM: the nucleus is taken of the tempered distribution).

    Temperature 0 puts all the mass on the argmax (ties share it).
    """
    logits = logits.to(dtype_of(config.precision))
    if config.temperature == 0:
        logits = torch.where(logits == logits.max(dim=-1, keepdim=True).values, 0.0, -torch.inf).to(logits.dtype)
        return logits - torch.logsumexp(logits, dim=-1, keepdim=True)
    return torch.log_softmax(filter_logits(logits / config.temperature, config.top_k, config.top_p), dim=-1)


def _untouched(config: SamplerConfig) -> bool:
    """The sampling distribution is the network's own: temperature 1, no top-k/top-p."""
    return config.temperature == 1 and not (config.top_k and config.top_k > 0) and config.top_p >= 1


def sample_from(logits: torch.Tensor, generator: torch.Generator, config: SamplerConfig, u: torch.Tensor | None = None) -> torch.Tensor:
    """One token per row of logits (..., V) under the config (temperature 0: argmax); ``u``: the uniforms of :func:`categorical`."""
    if config.temperature == 0:
        return logits.argmax(dim=-1)
    if _untouched(config):
        return categorical(logits, generator, config.precision, u)[0]
    return categorical(token_log_probs(logits, config), generator, config.precision, u)[0]


def propose(logits: torch.Tensor, generator: torch.Generator, config: SamplerConfig, u: torch.Tensor | None = None
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """A proposal x0 per row of logits (N, V) drawn under the config, and its probability
    p_theta(x0) (N,) float64 under the network's own distribution softmax(logits): no temperature,
    no top-k/top-p renormalisation (which would inflate it). What confidence and threshold decoding
    compare. At temperature 1 without top-k/top-p, one pass over V gives both. ``u``: the uniforms of :func:`categorical`."""
    if config.temperature != 0 and _untouched(config):
        return categorical(logits, generator, config.precision, u)
    x0 = sample_from(logits, generator, config, u)
    return x0, model_probability(logits, x0)


def model_probability(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """p_theta(token) (...,) float64 under the network's own distribution softmax(logits) (..., V)."""
    logits = logits.double()
    return (logits.gather(-1, tokens[..., None]).squeeze(-1) - logits.logsumexp(dim=-1)).exp()


def frame_index(want: torch.Tensor, width: int) -> torch.Tensor:
    """(B, width) the columns of each row's ``want`` (B, L) positions in ascending order, then other
    columns up to ``width`` (static shapes: a fixed number per row, so nothing is read from the
    device; ``width`` >= the most positions any row wants)."""
    return want.to(torch.int8).argsort(dim=1, descending=True, stable=True)[:, :width]


def grid_uniforms(where: torch.Tensor, generator: torch.Generator, frame: torch.Tensor | None = None) -> torch.Tensor:
    """float64 uniforms (N,) for the N positions a step draws at, in the order of its logits: one
    drawn for every position of the (B, L) canvas, read at the ``where`` positions (static shapes:
    at the columns ``frame``, :meth:`SamplerState.frame`). Both layouts read the same uniform at a
    position, so static and dynamic shapes draw the same tokens from the same generator."""
    u = torch.rand(where.shape, generator=generator, dtype=torch.float64, device=where.device)
    return u[where] if frame is None else u.gather(1, frame).flatten()


def scatter_rows(values: torch.Tensor, where: torch.Tensor, fill_value: float, frame: torch.Tensor | None = None) -> torch.Tensor:
    """(B, L) tensor holding ``values`` (N,) at the N True positions of ``where`` (row-major), ``fill_value`` elsewhere.
    ``frame`` (B, W) (static shapes): ``values`` (B W,) at those columns of each row."""
    if frame is not None:
        placed = torch.full(where.shape, fill_value, dtype=values.dtype, device=values.device)
        placed = placed.scatter(1, frame, values.view(frame.shape))
        return torch.where(where, placed, fill_value)
    out = torch.full(where.shape, fill_value, dtype=values.dtype, device=values.device)
    out[where] = values
    return out


def random_subset(candidates: torch.Tensor, k: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Per row, k[b] positions chosen uniformly among the True entries of candidates (B, L) -> (B, L) bool."""
    keys = torch.rand(candidates.shape, generator=generator, device=candidates.device).masked_fill(~candidates, 2.0)
    ranks = keys.argsort(dim=1).argsort(dim=1)
    return candidates & (ranks < k[:, None])


def top_per_row(scores: torch.Tensor, candidates: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Per row, the k[b] candidates with the highest scores (B, L) -> (B, L) bool. The ranking is
    within each row: a top-k over the whole batch would let the most confident rows take every
    commit of a step while the other rows commit nothing (and a row's tokens would depend on the
    rows decoded beside it)."""
    keyed = scores.masked_fill(~candidates, -torch.inf)
    ranks = keyed.argsort(dim=1, descending=True, stable=True).argsort(dim=1)
    return candidates & (ranks < k[:, None])


def fill(tokens: torch.Tensor, where: torch.Tensor, logits: torch.Tensor, generator: torch.Generator, config: SamplerConfig,
         frame: torch.Tensor | None = None) -> torch.Tensor:
    """tokens (B, L) with a fresh draw at the N ``where`` positions from their logits (N, V) (one
    categorical over V per chosen position, not B x L of them); ``frame`` (B, W) (static shapes):
    the logits are at those columns of each row."""
    u = None if config.temperature == 0 else grid_uniforms(where, generator, frame)
    if frame is not None:
        drawn = sample_from(logits, generator, config, u).view(frame.shape)
        return torch.where(where, tokens.scatter(1, frame, drawn), tokens)
    if logits.shape[0] == 0:
        return tokens
    out = tokens.clone()
    out[where] = sample_from(logits, generator, config, u)
    return out


def open_positions(tokens: torch.Tensor, mask_id: int, eligible: torch.Tensor | None) -> torch.Tensor:
    """(B, L) bool: still-masked positions a sampler may fill now (all, or those in ``eligible``)."""
    can = tokens == mask_id
    return can if eligible is None else can & eligible


@dataclass(frozen=True)
class Sampler:
    """A sampler: its config type and its two pure functions. Calling it runs ``step`` until done."""

    name: str
    config: type
    start: Callable[..., SamplerState]
    step: Callable[..., SamplerState]
    static: bool = False  # its step can run with static shapes (:mod:`unmask.sampling.shapes`; docs/extending.md)
    width: Callable[..., int] | None = None  # static shapes: (config, most positions a row fills) -> positions per row each call covers

    @torch.no_grad()
    def __call__(
        self, model, x: torch.Tensor, generator: torch.Generator, config=None, cond: Conditioning | None = None,
        callback: StepCallback | None = None, eligible: torch.Tensor | None = None, cache: CanvasCache | None = None,
    ) -> SampleOutput:
        """Fill the MASKs of x (B, L) (those in ``eligible``, default all)."""
        state = self.run(model, x, generator, config, cond, callback, eligible, cache)
        return SampleOutput(state.tokens, state.nfe, state.step, state.row_nfe)

    @torch.no_grad()
    def run(self, model, x, generator, config=None, cond=None, callback=None, eligible=None, cache=None) -> SamplerState:
        """Like calling it, but returns the final state (with its cache)."""
        config = self.config() if config is None else config
        state = self.start(model, x, config, eligible, cache)
        if self.static and static_shapes(x) and (cache is None or cache.static) and (cond is None or cond.constraint is cond.classifier_guide is cond.steering is None):
            most = int(open_positions(x, state.mask_id, eligible).sum(dim=1).max())
            state = replace(state, static=True, open_max=most, width=self.width(config, most) if self.width else most)
        while not state.done:
            state = self.step(model, state, generator, config, cond)
            if callback is not None:
                callback(state)
        return state

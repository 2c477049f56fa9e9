"""Uniform-state ancestral sampler (UDLM, Schiff et al. 2024; Duo, Sahoo et al. 2025).
docs/algorithms.md, 'Uniform-state ancestral sampler'.

A uniform-state model (``ModelConfig.noise == "uniform"``) is trained on rows whose tokens are
replaced, with probability 1 - alpha(t), by tokens drawn uniformly from the K = ``vocab_size`` real
tokens: q(z_t | x) = Cat(alpha_t x + (1 - alpha_t) / K). There is no MASK and no commitment: every
generated position holds a token at every step and may change at every step.

The canvas of a decoding marks the positions to generate with MASK, as for every sampler; the first
step replaces them by uniform draws (z_1: the forward process's prior at t = 1) and the state keeps
them in ``free``; the other positions (prompt, template text, separator, padding) are never
changed. Steps 1 = t_0 > t_1 > ... > t_n = 0 are uniform in t. From t to s each free position draws
z_s from the posterior of the forward process with x replaced by the network's x_theta = softmax of
its logits (after temperature, top-k and top-p), the parameterisation of UDLM and Duo:

    q(z_s | z_t, x) = [K a_t x * z_t + (a_t|s - a_t) z_t + (a_s - a_t) x + (1 - a_t|s)(1 - a_s) / K]
                      / [K a_t <x, z_t> + 1 - a_t],           a_t|s = a_t / a_s,

(z_t one-hot). This is Bayes' rule for z_s with the prior a_s x + (1 - a_s) / K and the likelihood
q(z_t | z_s); for a soft x it is the exact reverse step when x_theta^i = p(x^i | z_t^{-i}) (the data
posterior of position i given the OTHER positions), which is what the UDLM/Duo ELBO trains
x_theta to be, and then equals sum_v p(x^i = v | z_t) q(z_s | z_t, x = e_v), the mixture over the
data posterior. The draw is a mixture of three parts with the same distribution (float64 by
default): keep z_t with weight K a_t x[z_t] + a_t|s - a_t, a token from x with weight a_s - a_t, a
uniform token with weight (1 - a_t|s)(1 - a_s); only the positions that take a token from x draw a
categorical over K. The last step (s = 0) draws z_0 from x_theta reweighted by the likelihood of
its own token; ``greedy_tail`` takes the argmax of x_theta there instead (Duo's greedy tail). The
network is called on every row at every step (its time changes and any token may): NFE = steps.
Positions are drawn independently given z_t, so the chain is exact as steps >> L.

The prompt is fed as it is (clean) at every step; the network, trained on rows noised at one level,
reads it as tokens at time t, which conditions as strongly as it trusts a token at that level.

Classifier-free guidance (``cfg_scale`` w) guides the logits of x_theta, (1 + w) l_c - w l_u, as for
the masked models, in one batched forward. UDLM's D-CFG contrasts the network with its condition
and without it; here the condition is the prompt, and a uniform-state network has no MASK to blank
it with (uniformly drawn tokens would be read as noisy evidence of some other prompt), so the
unconditional half is the same row with the prompt hidden from attention (key mask False, the
positions closed up as if it were absent). At the last step this equals D-CFG's product of the two
posteriors; before it D-CFG would mix the posteriors rather than x_theta.

Blocks and KV caches do not apply (every position may change at every step) and are refused, as are
structured output, classifier guidance and the steering guides other than best-of-N (they act on
masked positions as they are committed).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from unmask.errors import OptionError, UnmaskError
from unmask.guidance import combine
from unmask.sampling.ar import positions_from
from unmask.sampling.base import (
    Conditioning, Sampler, SamplerConfig, SamplerState, categorical, dtype_of, open_positions, start_state,
    token_log_probs,
)
from unmask.schedule import Schedule

MDM_SAMPLERS = "ancestral, first-hitting, confidence, threshold"


@dataclass(frozen=True)
class UniformConfig(SamplerConfig):
    """``steps`` n (time steps 1, 1 - 1/n, ..., 0); ``schedule`` alpha(t); ``greedy_tail``: the
    last step takes the argmax of x_theta (Duo) instead of drawing from the posterior."""

    steps: int = 128
    schedule: str = "linear"
    greedy_tail: bool = False


@dataclass(frozen=True)
class UniformState(SamplerState):
    """``free`` (B, L): the positions being generated (MASK in the canvas, uniform noise after the
    first step, a token of the chain after that)."""

    free: torch.Tensor | None = None


def posterior_parts(x_at_zt: torch.Tensor, alpha_t: float, alpha_s: float, vocab: int) -> tuple[torch.Tensor, ...]:
    """The unnormalised weights (N,) of the three parts of q(z_s | z_t, x): keep z_t, a token from
    x, a uniform token; ``x_at_zt`` (N,) is x[z_t]. Their sum is K a_t x[z_t] + 1 - a_t."""
    ratio = alpha_t / alpha_s
    keep = vocab * alpha_t * x_at_zt + (ratio - alpha_t)
    return keep, torch.full_like(keep, alpha_s - alpha_t), torch.full_like(keep, (1 - ratio) * (1 - alpha_s))


def draw_posterior(log_x: torch.Tensor, z_t: torch.Tensor, alpha_t: float, alpha_s: float, generator: torch.Generator,
                   precision: str = "float64", static: bool = False) -> torch.Tensor:
    """z_s (N,) drawn from q(z_s | z_t, x) per row, for alpha_s > 0: ``log_x`` (N, K) the log of x (a
    one-hot clean token, or x_theta), ``z_t`` (N,) the tokens at time t. One uniform per row picks
    the part (in ``precision``), then only the rows taking a token from x draw a categorical (every
    row with ``static`` shapes, :mod:`unmask.sampling.shapes`, the others' draws unused). Every row's
    uniforms are drawn either way, so both give the same z_s."""
    dtype, device = dtype_of(precision), log_x.device
    rows, vocab = log_x.shape
    x_at = log_x.gather(1, z_t[:, None]).squeeze(1).double().exp()
    keep, fresh, noise = (part.to(dtype) for part in posterior_parts(x_at, alpha_t, alpha_s, vocab))
    u = torch.rand(rows, generator=generator, dtype=dtype, device=device) * (keep + fresh + noise)
    pick = torch.rand(rows, generator=generator, dtype=torch.float64, device=device)  # the categorical's uniform of each row
    noisy = torch.randint(vocab, (rows,), generator=generator, device=device)
    stays = u < keep
    from_x = ~stays & (u < keep + fresh)
    if static:
        return torch.where(stays, z_t, torch.where(from_x, categorical(log_x, generator, precision, pick)[0], noisy))
    z_s = torch.where(stays, z_t, noisy)
    z_s[from_x] = categorical(log_x[from_x], generator, precision, pick[from_x])[0]
    return z_s


def check_uniform(model_config, sampler: str, block_len: int = 0, cache=None, cond: Conditioning | None = None,
                  cfg_scale: float = 0.0) -> None:
    """Refuse a decoding that pairs a uniform-state model and a sampler of another kind, or gives a
    uniform-state model what it cannot use: blocks, a KV cache (``cache``: a CacheConfig or None),
    a constraint, guidance without a prompt."""
    if model_config.noise != "uniform":
        raise OptionError("sampler", f"{{sampler}} uniform decodes uniform-state models (noise uniform); this checkpoint is a masked "
                          f"diffusion model: leave {{sampler}} out or take one of {MDM_SAMPLERS}")
    if sampler != "uniform":
        raise OptionError("sampler", "{sampler} {_name} commits masked positions; this checkpoint is a uniform-state model (noise "
                          "uniform), where every position holds a token and may change at every step: leave {sampler} out (uniform)",
                          _name=sampler)
    if model_config.block_causal:
        raise UnmaskError("a uniform-state model decodes its whole canvas at every step; model block_causal must be 0")
    why = "a uniform-state model may change every position at every step"
    if block_len:
        raise OptionError("block_len", f"{{block_len}}={{_len}}: {why}, so it decodes the whole region at once; leave {{block_len}} out",
                          _len=block_len)
    if cache is not None and cache.kind != "none":
        raise OptionError("cache", f"{{cache}} {{_kind}}: {why}, so no position's keys/values can be kept; leave {{cache}} out",
                          _kind=cache.kind)
    check_conditioning(cond, cfg_scale)


def check_conditioning(cond: Conditioning | None, cfg_scale: float) -> None:
    """Refuse structured output, classifier guidance, steering other than best-of-N and guidance
    without a prompt on a uniform-state decoding."""
    if cond is not None and cond.constraint is not None:
        raise OptionError("constraint", "{constraint}: structured output restricts masked positions, and a uniform-state model has "
                          "none (every position may change at every step); decode it without a constraint")
    if getattr(cond, "classifier_guide", None) is not None:
        raise OptionError("classifier", "{classifier} guidance tilts the tokens a masked model commits; a uniform-state model commits "
                          "none (every position may change at every step); decode it without a classifier")
    steering = getattr(cond, "steering", None)
    if steering is not None and steering.guide.name != "best-of":  # best-of-N only compares finished samples
        raise OptionError("guide", "{guide} {_name} steers the tokens a masked model commits; a uniform-state model commits none "
                          "(every position may change at every step): use {guide} best-of or none", _name=steering.guide.name)
    if cfg_scale and (cond is None or cond.prompt_mask is None or not cond.prompt_mask.any()):
        raise OptionError("cfg_scale", "{cfg_scale} needs a prompt: guidance contrasts the row with its prompt and without it")


def clean_logits(model, tokens: torch.Tensor, free: torch.Tensor, t: float, cond: Conditioning | None,
                 cfg_scale: float, index: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 logits (N, K) of x_theta at the N ``free`` (B, L) positions of ``tokens`` (row-major),
    the network at time t, guided when ``cfg_scale`` > 0 (the unconditional half: the prompt hidden);
    and the rows called (B,) (those with a free position). ``index`` (B, W): static shapes, every
    row called, the logits at these columns of each row (:func:`unmask.sampling.base.frame_index`)."""
    cond = cond or Conditioning()
    called = free.any(dim=1)
    rows = None if index is not None else called.nonzero().squeeze(1)
    everyone = index is not None or rows.numel() == tokens.shape[0]
    pick = (lambda v: v) if everyone else (lambda v: None if v is None else v[rows])  # noqa: E731
    x, key_mask, positions, want = pick(tokens), pick(cond.key_mask), pick(cond.positions), pick(free)
    time = torch.full((x.shape[0],), t, dtype=torch.float64, device=x.device)
    want, checked = (want, True) if index is None else (index, False)  # static shapes: the canvas's span was checked when it was made
    if not cfg_scale:
        return model(x, t=time, key_mask=key_mask, positions=positions, logits_at=want, check_span=checked).float(), called
    seen = torch.ones_like(want) if key_mask is None else key_mask
    hidden = seen & ~pick(cond.prompt_mask)
    own = positions if positions is not None else torch.arange(x.shape[1], device=x.device).expand_as(x)
    logits = model(torch.cat([x, x]), t=torch.cat([time, time]), key_mask=torch.cat([seen, hidden]),
                   positions=torch.cat([own, positions_from(hidden)]), logits_at=torch.cat([want, want]), check_span=checked).float()
    return combine(*logits.chunk(2), cfg_scale), called


def start(model, x: torch.Tensor, config: UniformConfig, eligible=None, cache=None) -> UniformState:
    """The state before the first step: ``free`` = the MASK positions of x (B, L) in ``eligible``."""
    check_uniform(model.config, "uniform", cache=cache)
    free = open_positions(x, model.config.mask_id, eligible)
    return start_state(model, x, eligible, None, cls=UniformState, free=free)


def step(model, state: UniformState, generator: torch.Generator, config: UniformConfig, cond: Conditioning | None = None) -> UniformState:
    """From t = 1 - step/steps to s = t - 1/steps; the first step first draws z_1 uniformly."""
    n, k, free = config.steps, state.step, state.free
    if k == 0:  # once, before the first call (it reads whether there is a prompt)
        check_conditioning(cond, config.cfg_scale)
    t, s = (n - k) / n, (n - k - 1) / n
    vocab = model.config.vocab_size
    x = state.tokens
    if k == 0:  # z_1 ~ Uniform over the K real tokens at the generated positions
        x = torch.where(free, torch.randint(vocab, free.shape, generator=generator, device=x.device), x)
    index = state.frame(free)  # static shapes: a fixed width per row
    logits, called = clean_logits(model, x, free, t, cond, config.cfg_scale, index)
    z_t = x[free] if index is None else x.gather(1, index).flatten()
    if config.greedy_tail and k + 1 == n:
        z_s = logits.argmax(dim=-1)
    else:
        schedule = Schedule(config.schedule)
        alpha_t, alpha_s = schedule.alpha(t), schedule.alpha(s)  # host arithmetic
        z_s = draw_posterior(token_log_probs(logits, config), z_t, alpha_t, alpha_s, generator, config.precision, state.static)
    if index is None:
        x = x.clone()
        x[free] = z_s
    else:
        x = torch.where(free, x.scatter(1, index, z_s.view(index.shape)), x)
    return state.advance(x, called, None, done=k + 1 == n)


uniform = Sampler("uniform", UniformConfig, start, step, static=True)

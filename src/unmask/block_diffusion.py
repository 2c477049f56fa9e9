"""Block diffusion (BD3-LM, Arriola et al. 2025): block-causal training and likelihood. docs/algorithms.md, 'Block diffusion (BD3-LM)'.

log p(x) = sum_b log p(x^b | x^{<b}) over the B = L / L' blocks of L' tokens. Each block gets its
own time t_b and is masked with the schedule; the loss scores its masked tokens given the noisy
block and the CLEAN earlier blocks, weighted by w(t_b). L' = 1 is exactly the AR NLL, L' = L the
MDM loss. The model is a time-agnostic Transformer with ``ModelConfig.block_causal = L'``.

Training runs one forward over [x_t ; x_0] (length 2L) with the boolean mask
[[M_BD, M_OBC], [0, M_BC]] (:func:`bd3_attention_mask`) through ``scaled_dot_product_attention``;
:func:`two_pass_logits` is the slow reference it is tested against (each noisy block with its clean
prefix, in a plain block-causal forward). Training may clip the mask rate to [beta, omega] for a
lower-variance gradient; the reported bound (:func:`block_elbo`) always integrates over the full
t range with eps = 0. :func:`block_chain_rule_nll` is the exact left-to-right score of a block
model, in L' forward passes per window (position j of every block at once).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Sequence

import torch

from unmask.errors import OptionError, UnmaskError, not_one_of
from unmask.device import device_of
from unmask.likelihood import LikelihoodResult, batch_slices, window_groups
from unmask.losses import token_nll
from unmask.schedule import Schedule


def check_block_size(length: int, block_size: int) -> None:
    if block_size < 1 or length % block_size:
        raise OptionError("block_size", "{block_size}={_size} must be a positive divisor of the context length {_length}", _size=block_size,
                          _length=length)


def bd3_attention_mask(length: int, block_size: int, device=None) -> torch.Tensor:
    """(2L, 2L) bool, True where a query may attend to a key, over [x_t ; x_0]:

    noisy query block b -> noisy keys of block b (M_BD) and clean keys of blocks < b (M_OBC);
    clean query block b -> clean keys of blocks <= b (M_BC, block-causal); clean never sees noisy.
    """
    if block_size < 1:
        raise UnmaskError(f"block size {block_size} must be a positive integer")
    block = torch.arange(length, device=device) // block_size  # a shorter last block is allowed
    q, k = block[:, None], block[None, :]
    noisy = torch.cat([q == k, k < q], dim=1)
    clean = torch.cat([torch.zeros(length, length, dtype=torch.bool, device=device), k <= q], dim=1)
    return torch.cat([noisy, clean], dim=0)


def bd3_mask_mod(length: int, block_size: int):
    """The mask of :func:`bd3_attention_mask` as a FlexAttention ``mask_mod(b, h, q, k) -> bool``."""

    def mask_mod(b, h, q, k):
        q_noisy, k_noisy = q < length, k < length
        qb, kb = (q % length) // block_size, (k % length) // block_size
        return (q_noisy & k_noisy & (qb == kb)) | (q_noisy & ~k_noisy & (kb < qb)) | (~q_noisy & ~k_noisy & (kb <= qb))

    return mask_mod


def flex_available() -> bool:
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


def bd3_block_mask(length: int, block_size: int, device):
    """The BD3 mask as a FlexAttention BlockMask over [x_t ; x_0] (2L). Its sparse blocks are 128
    tokens (FlexAttention's default), so a sparse block may mix allowed and masked pairs: the
    mask_mod decides inside every partial block (tested against the dense boolean mask)."""
    from torch.nn.attention.flex_attention import create_block_mask

    return create_block_mask(bd3_mask_mod(length, block_size), None, None, 2 * length, 2 * length, device=device)


@dataclass(frozen=True)
class BlockCorruption:
    """One draw of the block forward process for clean x0 (B, L): x_t, the masked positions, and
    per-position ELBO weights w(t_b) of each token's block (the loss of row b is
    sum over masked i of weight[b, i] * -log p(x0_i | ...) / L)."""

    xt: torch.Tensor  # (B, L)
    masked: torch.Tensor  # (B, L) bool
    weight: torch.Tensor  # (B, L) float32: w(t) of the position's block
    block_size: int
    flex: bool = False  # compute the loss's attention with FlexAttention (else SDPA with a boolean mask)

    def rows(self, index: slice) -> "BlockCorruption":
        return BlockCorruption(self.xt[index], self.masked[index], self.weight[index], self.block_size, self.flex)

    def to(self, device: torch.device) -> "BlockCorruption":
        return BlockCorruption(self.xt.to(device), self.masked.to(device), self.weight.to(device), self.block_size, self.flex)


def block_times(batch: int, num_blocks: int, generator: torch.Generator, low_discrepancy: bool = True) -> torch.Tensor:
    """u in (0, 1] per (row, block) (B, nb). Low-discrepancy over batch x blocks: u = (u0 + i / n) mod 1
    with the strata dealt out column by column, so every row spans the whole range."""
    n = batch * num_blocks
    if low_discrepancy:
        u = (torch.rand((), generator=generator) + torch.arange(n) / n) % 1.0
        u = u.view(num_blocks, batch).T
    else:
        u = torch.rand((batch, num_blocks), generator=generator)
    return u.clamp_min(1e-5)


def corrupt_blocks(
    x0: torch.Tensor,
    block_size: int,
    schedule: Schedule,
    mask_id: int,
    generator: torch.Generator,
    mask_rate: tuple[float, float] = (0.0, 1.0),
    u: torch.Tensor | None = None,
    low_discrepancy: bool = True,
    estimator: str = "t-dce",
) -> BlockCorruption:
    """Mask each block of x0 (B, L) at its own time t_b = beta + (omega - beta) u_b, u_b ~ U(0, 1]
    (``u`` (B, nb) may be given: stratified evaluation). ``mask_rate`` = (beta, omega): (0, 1) is the
    unbiased bound, a narrower range the clipped, lower-variance training objective.

    ``estimator`` "t-dce": each token masked with probability 1 - alpha(t_b), weight w(t_b) (with the
    linear schedule t is the mask rate, times 1 - eps). "k-dce" (within each block; docs/algorithms.md,
    'MDM loss: t-DCE and k-DCE'): k_b = ceil(t_b n_b) of the n_b tokens of block b masked, chosen
    uniformly, weight n_b / k_b; the schedule is not used. Over the full range the same bound for a
    time-agnostic network, with a far smaller variance for small blocks (L' = 1: exactly the AR NLL,
    zero variance). A shorter last block (windows of documents) is allowed. Random numbers are drawn
    on the CPU, so runs are reproducible across devices."""
    length = x0.shape[1]
    if u is None:
        u = block_times(x0.shape[0], -(-length // block_size), generator, low_discrepancy)
    beta, omega = mask_rate
    t = beta + (omega - beta) * u.double()
    if estimator == "t-dce":
        masked, weight = _masked_at_times(t.clamp_min(1e-5), length, block_size, schedule, generator)
    elif estimator == "k-dce":
        masked, weight = _masked_k_of_each_block(t, length, block_size, generator)
    else:
        raise not_one_of("estimator", estimator, "t-dce, k-dce")
    masked = masked.to(x0.device)
    xt = torch.where(masked, torch.full_like(x0, mask_id), x0)
    return BlockCorruption(xt, masked, weight.to(x0.device), block_size)


def _masked_at_times(t: torch.Tensor, length: int, block_size: int, schedule: Schedule, generator: torch.Generator
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """t-DCE: (masked, weight), both (B, L), for the block times t (B, nb)."""
    weight = schedule.weight(t).float().repeat_interleave(block_size, dim=1)[:, :length]
    prob = schedule.mask_prob(t).float().repeat_interleave(block_size, dim=1)[:, :length]
    return torch.rand(prob.shape, generator=generator) < prob, weight


def _masked_k_of_each_block(t: torch.Tensor, length: int, block_size: int, generator: torch.Generator
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """k-DCE: (masked, weight), both (B, L), for the block times t (B, nb)."""
    block = torch.arange(length) // block_size
    sizes = torch.bincount(block, minlength=t.shape[1]).double()  # the last block may be shorter
    k = torch.minimum(torch.ceil(t * sizes).clamp(min=1.0), sizes)
    keys = torch.rand((t.shape[0], length), generator=generator, dtype=torch.float64) + block.double()  # sort within blocks
    rank = keys.argsort(dim=1).argsort(dim=1) - (block * block_size)  # rank inside the block
    return rank < k[:, block], (sizes[None, :] / k)[:, block].float()


def bd3_logits(
    model, xt: torch.Tensor, x0: torch.Tensor, block_size: int, logits_at: torch.Tensor | None = None, flex: bool = False
) -> torch.Tensor:
    """Logits of the noisy half of one forward over [x_t ; x_0] (B, 2L) with the BD3 mask: (B, L, V),
    or (N, V) at the N ``logits_at`` (B, L) positions. Both halves carry positions 0..L-1.
    ``flex``: the mask as a FlexAttention BlockMask (skips fully masked 128 x 128 tiles; GPU)."""
    b, length = x0.shape
    mask = bd3_block_mask(length, block_size, x0.device) if flex else bd3_attention_mask(length, block_size, x0.device)
    positions = torch.arange(length, device=x0.device).repeat(2).expand(b, 2 * length)
    at = None if logits_at is None else torch.cat([logits_at, torch.zeros_like(logits_at)], dim=1)
    out = model(torch.cat([xt, x0], dim=1), positions=positions, attn_mask=mask, logits_at=at)
    return out if logits_at is not None else out[:, :length]


def bd3_loss(model, x0: torch.Tensor, noise: BlockCorruption) -> torch.Tensor:
    """The block-diffusion loss of given noise: x0 (B, L) -> (B,) nats/token (vectorised 2L forward;
    the head runs only at the masked positions). Only ``model(tokens, positions=, attn_mask=,
    logits_at=)`` is called, so DDP/FSDP/compile wrappers work unchanged."""
    logits = bd3_logits(model, noise.xt, x0, noise.block_size, logits_at=noise.masked, flex=noise.flex)
    nll = torch.nn.functional.cross_entropy(logits.float(), x0[noise.masked], reduction="none")
    per_pos = torch.zeros(x0.shape, dtype=nll.dtype, device=x0.device)
    per_pos[noise.masked] = nll * noise.weight[noise.masked]
    return per_pos.sum(dim=1) / x0.shape[1]


def two_pass_logits(model, xt: torch.Tensor, x0: torch.Tensor, block_size: int) -> torch.Tensor:
    """Slow reference for :func:`bd3_logits`: block b's logits from a forward over [x0 blocks < b ;
    x_t block b] of a model whose config has ``block_causal = block_size``. (B, L, V)."""
    if model.config.block_causal != block_size:
        raise UnmaskError(f"two_pass_logits needs a model with block_causal={block_size}, got {model.config.block_causal}")
    outs = []
    for start in range(0, x0.shape[1], block_size):
        end = start + block_size
        outs.append(model(torch.cat([x0[:, :start], xt[:, start:end]], dim=1))[:, start:end])
    return torch.cat(outs, dim=1)


@torch.no_grad()
def block_elbo(
    model,
    windows: torch.Tensor | Sequence[torch.Tensor],
    block_size: int,
    draws: int = 16,
    schedule: Schedule = Schedule(),
    batch_size: int = 16,
    seed: int = 0,
    progress: bool = False,
    estimator: str = "t-dce",
) -> LikelihoodResult:
    """Monte Carlo negative ELBO in nats/token of a block model on windows (N, L) (or groups).

    Every block has its own t; window s, block c gets the stratified u_scj = (u_sc + j/K) mod 1 over
    the K draws, over the full range (no clipping) with eps = 0, so each draw is an unbiased upper
    bound estimate. The standard error is std_j / sqrt(K) over the per-draw estimates.
    ``estimator`` "t-dce": t per block, weight w(t) (heavy-tailed for small blocks: with L' = 1 the
    weight 1/t has an unbounded second moment but for the clamp); "k-dce": k of the block's tokens
    masked, weight L'/k: the same bound with a bounded, far smaller variance.
    """
    if estimator not in ("t-dce", "k-dce"):
        raise OptionError("estimator", "{estimator} {_name!r}: a block model's bound is t-dce or k-dce (or chain-rule, exact)", _name=estimator)
    from tqdm.auto import tqdm

    if draws < 2:
        raise OptionError("draws", "{draws}={_draws}: the Monte Carlo ELBO needs at least 2 draws for a standard error", _draws=draws)
    groups = window_groups(windows)
    schedule = replace(schedule, eps=0.0)
    gen = torch.Generator().manual_seed(seed)
    device = device_of(model)
    per_draw = torch.zeros(draws, dtype=torch.float64)
    num_tokens = sum(g.numel() for g in groups)
    bar = tqdm(total=sum(g.shape[0] for g in groups) * draws, desc=f"block elbo (L'={block_size})", unit="seq", disable=not progress)
    for group in groups:
        length = group.shape[1]
        size = min(block_size, length)
        for sl in batch_slices(group.shape[0], batch_size):
            x0 = group[sl].to(device)
            u0 = torch.rand((x0.shape[0], -(-length // size)), generator=gen)
            for j in range(draws):
                u = ((u0 + j / draws) % 1.0).clamp_min(1e-5)
                noise = corrupt_blocks(x0, size, schedule, model.config.mask_id, gen, u=u, estimator=estimator)
                per_draw[j] += (bd3_loss(model, x0, noise).double() * length).sum().cpu()
                bar.update(x0.shape[0])
    bar.close()
    per_draw /= num_tokens
    mean = per_draw.mean().item()
    stderr = per_draw.std(unbiased=True).item() / math.sqrt(draws)
    return LikelihoodResult("elbo", mean, stderr, math.exp(mean), num_tokens, draws, f"block-{estimator} L'={block_size}")


@torch.no_grad()
def block_chain_rule_nll(
    model, windows: torch.Tensor | Sequence[torch.Tensor], block_size: int, batch_size: int = 16, progress: bool = False
) -> LikelihoodResult:
    """Exact NLL of a block model decoding each block left to right: log p(x) = sum_b sum_j
    log p(x^b_j | x^{<b}, x^b_{<j}, MASK at x^b_{>=j}). Pass j scores position j of EVERY block at
    once (the clean earlier blocks come from the clean half), so L' calls per window instead of L."""
    from tqdm.auto import tqdm

    groups = window_groups(windows)
    device = device_of(model)
    total = 0.0
    num_tokens = sum(g.numel() for g in groups)
    bar = tqdm(total=sum(g.shape[0] for g in groups), desc=f"block chain rule (L'={block_size})", unit="seq", disable=not progress)
    for group in groups:
        length = group.shape[1]
        size = min(block_size, length)
        offset = torch.arange(length, device=device) % size
        for sl in batch_slices(group.shape[0], batch_size):
            x0 = group[sl].to(device)
            for j in range(size):
                xt = torch.where(offset >= j, model.config.mask_id, x0)
                now = (offset == j).expand_as(x0)
                logits = bd3_logits(model, xt, x0, size, logits_at=now)
                total += token_nll(logits[None], x0[now][None]).double().sum().item()
            bar.update(x0.shape[0])
    bar.close()
    mean = total / num_tokens
    return LikelihoodResult("exact", mean, 0.0, math.exp(mean), num_tokens, 1, f"block-chain-rule L'={block_size}")

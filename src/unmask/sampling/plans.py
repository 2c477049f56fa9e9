"""Block plans: how the generation region of a canvas is cut into blocks decoded left to right, which
columns each network call sees, and how the steps are split over the blocks.
docs/algorithms.md, 'Semi-autoregressive blocks' and 'Block diffusion (BD3-LM)'.

* :class:`ColumnBlocks` (semi-autoregressive decoding, LLaDA and SMDM): blocks of ``block_len``
  canvas columns from the generation start; every call sees the whole canvas, the positions right
  of the block still MASK.
* :class:`GridBlocks` (a block model, ``ModelConfig.block_causal = L'``): blocks on the model's grid
  of each row's positions, the first one the rest of the block the prompt ends in. A left-padded
  row is moved left by its padding for the decoding (its real tokens at slots = positions, the
  padding at the right end, hidden by the key mask), so a row decodes as it would alone whatever
  the other rows' prompt lengths. A call sees the blocks up to the current one, at most the last
  ``window`` columns (default the model's context, whole blocks): a canvas longer than the context
  slides a window over it.

Steps, one rule: a ``steps`` option S over a generation length L gives every block
round(S L' / L) steps, at least 1, where L' is the plan's block size (a partial block, the rest of
a prompt's block or a shorter last block, gets as many, so a row's steps do not depend on the other
rows). Semi-autoregressive blocks tile the region with equal blocks, so there S must be a multiple
of their number, which makes every block's share exact and the total S.

With more than one block a chain sampler's clock covers one block only, so a time-conditioned
network gets the canvas's masked fraction (``Conditioning.canvas_time``), never a chain time
restarted at 1 in each block.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from unmask.errors import OptionError, UnmaskError
from unmask.sampling.base import Conditioning


@dataclass
class Layout:
    """A canvas laid out for block decoding: ``tokens`` (B, L) as decoded (rows moved left by
    ``shift`` (B,), None: not moved), ``cond`` for the laid-out rows, ``region`` (B, L) each row's
    generated columns, ``blocks``: (b0, b1, w0, w1) per block, the columns [b0, b1) decoded while
    a call sees columns [w0, w1), and ``config`` the sampler's config for one block."""

    tokens: torch.Tensor
    cond: Conditioning | None
    region: torch.Tensor
    blocks: list[tuple[int, int, int, int]]
    config: object
    shift: torch.Tensor | None = None

    def restore(self, tokens: torch.Tensor) -> torch.Tensor:
        """Laid-out rows (B', L) (all B rows) back on the canvas's columns."""
        return tokens if self.shift is None else roll_rows(tokens, -self.shift)


def block_steps(config, size: int, gen_len: int):
    """The config of every block of ``size`` columns: a ``steps`` option (the total over ``gen_len``
    generated tokens) becomes round(steps x size / gen_len), at least 1 (the module's one rule)."""
    steps = getattr(config, "steps", None)
    return config if steps is None else replace(config, steps=max(1, round(steps * size / max(gen_len, 1))))


@dataclass(frozen=True)
class ColumnBlocks:
    """Semi-autoregressive blocks of ``block_len`` columns over the generation region (it must
    divide the generation length; ``block_len`` = the length decodes the region as one block)."""

    block_len: int

    def check(self, config, gen_len: int) -> None:
        """Refuse a block length that does not divide ``gen_len`` or steps that do not split evenly."""
        if self.block_len < 1 or gen_len % self.block_len:
            raise OptionError("block_len", "{block_len}={_len} must divide the generation length {_gen}", _len=self.block_len, _gen=gen_len)
        steps, blocks = getattr(config, "steps", None), gen_len // self.block_len
        if steps is not None and steps % blocks:
            raise OptionError("steps", "{steps}={_steps} must be a multiple of the number of blocks ({_blocks}) so each block gets "
                              "the same steps", _steps=steps, _blocks=blocks)

    def layout(self, model, x: torch.Tensor, cond: Conditioning | None, start: int, config) -> Layout:
        b, length = x.shape
        gen_len = length - start
        self.check(config, gen_len)
        region = (torch.arange(length, device=x.device) >= start)[None].expand(b, length)
        blocks = [(b0, b0 + self.block_len, 0, length) for b0 in range(start, length, self.block_len)]
        work_cond = cond if len(blocks) == 1 else replace(cond or Conditioning(), canvas_time=True)
        return Layout(x.clone(), work_cond, region, blocks, block_steps(config, self.block_len, gen_len))

    def window_cond(self, cond: Conditioning | None, w0: int, w1: int, rows: int, device) -> Conditioning | None:
        return cond  # a call sees the whole canvas


@dataclass(frozen=True)
class GridBlocks:
    """A block model's blocks on the grid of each row's positions; ``window``: the most columns a
    call sees (None: the model's context), rounded down to whole blocks."""

    window: int | None = None

    def layout(self, model, x: torch.Tensor, cond: Conditioning | None, start: int, config) -> Layout:
        size = model.config.block_causal
        if size < 1:
            raise UnmaskError("block-diffusion decoding needs a block model (ModelConfig.block_causal > 0: one trained with objective bd3)")
        b, length = x.shape
        if not 0 <= start <= length:
            raise UnmaskError(f"generation start {start} is outside the canvas of {length} columns")
        window = (model.config.context_len if self.window is None else self.window) // size * size
        if window < size:
            raise UnmaskError(f"the window of {window} columns holds no whole block of {size}")
        pad, work_cond = on_positions(cond, b, x.device)
        cols = torch.arange(length, device=x.device)
        region = (cols[None] >= start - pad[:, None]) & (cols[None] < length - pad[:, None])
        blocks = [(b0, b1, max(0, -(-(b1 - window) // size) * size), b1) for b0, b1 in block_spans(int((start - pad).min()), length, size)]
        return Layout(roll_rows(x, pad), work_cond, region, blocks, block_steps(config, size, length - start), pad)

    def window_cond(self, cond: Conditioning, w0: int, w1: int, rows: int, device) -> Conditioning:
        """The conditioning of columns [w0, w1) of ``rows`` rows laid out on their positions (slot = position)."""
        pick = lambda v: None if v is None else v[:, w0:w1]  # noqa: E731
        positions = torch.arange(w0, w1, device=device)[None].expand(rows, -1)
        return replace(cond, key_mask=pick(cond.key_mask), positions=positions, prompt_mask=pick(cond.prompt_mask))


def block_spans(start: int, length: int, block_size: int) -> list[tuple[int, int]]:
    """The decoding blocks [b0, b1) of columns [start, length), on the grid of ``block_size`` slots:
    the first may be the rest of the block the prompt ends in."""
    spans, b0 = [], start
    while b0 < length:
        b1 = min((b0 // block_size + 1) * block_size, length)
        spans.append((b0, b1))
        b0 = b1
    return spans


def on_positions(cond: Conditioning | None, rows: int, device) -> tuple[torch.Tensor, Conditioning]:
    """Each row's left padding (B,) (the count of slots before its first real one) and the
    conditioning of the rows moved left by it, so that a real token's slot is its position and
    the padding sits at the right end (still hidden by the key mask). A chain sampler's clock covers
    one block, so the network gets the canvas's masked fraction (``canvas_time``)."""
    if cond is None or cond.key_mask is None:
        pad = torch.zeros(rows, dtype=torch.long, device=device)
        return pad, replace(cond or Conditioning(), positions=None, canvas_time=True)
    pad = cond.key_mask.long().argmax(dim=1)
    move = lambda v: None if v is None else roll_rows(v, pad)  # noqa: E731
    return pad, replace(cond, key_mask=move(cond.key_mask), positions=None, prompt_mask=move(cond.prompt_mask), canvas_time=True)


def roll_rows(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Row b of x (B, L) rotated left by shift[b] (right by -shift[b])."""
    cols = torch.arange(x.shape[1], device=x.device)
    return x.gather(1, (cols[None] + shift[:, None]) % x.shape[1])

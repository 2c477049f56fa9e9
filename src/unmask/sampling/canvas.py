"""Canvases: the token rows a decoding fills, for prompts (of different lengths) and infilling
templates, and the trimming of a generated row at EOS.

Every canvas starts with the separator (the EOS that precedes every document in training), then
the prompt or template; the generation region is what follows. The separator is a real token but
not part of the prompt: the unconditional pass of classifier-free guidance keeps it and replaces
only the prompt (``Conditioning.prompt_mask``) by MASK.
"""

from __future__ import annotations

import re
from typing import Sequence

import torch

from unmask.errors import OptionError
from unmask.sampling.ar import positions_from
from unmask.sampling.base import Conditioning

INFILL = re.compile(r"\[MASK(?::(\d+))?\]")


def make_canvas(
    prompts: Sequence[Sequence[int]], length: int, mask_id: int, pad_id: int, separator: int | None = None, *,
    width: int | None = None, explicit: bool = False, device=None,
) -> tuple[torch.Tensor, Conditioning, int]:
    """[left padding ; separator ; prompt ; MASK x length] per row. Returns (x (B, W), cond, start),
    ``start`` = W - length the first column of the generation region.

    ``width``: the canvas's columns W, more than the longest row to pad every row further on the
    left (a server pads to a multiple of a fixed width so that requests share forwards); default
    the longest row. A prompt's MASK tokens (an infilling template) are generated, not given. The
    conditioning has a key mask and positions where a row is padded, or always with ``explicit``;
    otherwise none (the plain, faster attention path).
    """
    lead = [] if separator is None else [separator]
    longest = max((len(p) for p in prompts), default=0) + len(lead)
    start = max(longest, (width or 0) - length)
    rows, real = [], []
    for p in prompts:
        pad = start - len(lead) - len(p)
        rows.append([pad_id] * pad + lead + list(p) + [mask_id] * length)
        real.append([False] * pad + [True] * (len(lead) + len(p) + length))
    x = torch.tensor(rows, dtype=torch.long, device=device).reshape(len(rows), start + length)
    key_mask = torch.tensor(real, dtype=torch.bool, device=device).reshape(x.shape)
    cols = torch.arange(x.shape[1], device=device)
    lead_end = (key_mask.long().argmax(dim=1) + len(lead))[:, None]
    prompt_mask = (cols[None] >= lead_end) & (cols[None] < start) & (x != mask_id) & key_mask
    if key_mask.all() and not explicit:
        return x, Conditioning(prompt_mask=prompt_mask), start
    return x, Conditioning(key_mask=key_mask, positions=positions_from(key_mask), prompt_mask=prompt_mask), start


def infill_ids(template: str, tok) -> list[int]:
    """The tokens of a template: its fixed text encoded, each ``[MASK]`` one MASK id, each ``[MASK:n]`` n."""
    ids: list[int] = []
    pos = 0
    for m in INFILL.finditer(template):
        ids += tok.encode(template[pos : m.start()]) if m.start() > pos else []
        ids += [tok.mask_id] * int(m.group(1) or 1)
        pos = m.end()
    ids += tok.encode(template[pos:]) if pos < len(template) else []
    return ids


def infill_canvas(ids: Sequence[int], tok, rows: int = 1, **canvas) -> tuple[torch.Tensor, Conditioning, int]:
    """``rows`` rows [EOS ; template], the template's tokens ``ids`` (:func:`infill_ids`: fixed text
    and the MASKs of its spans), as :func:`make_canvas` lays them out (``canvas``: its keywords).
    Returns (x, cond, start), ``start`` the column after the EOS: the MASKs are the region's to fill."""
    if tok.mask_id not in ids:
        raise OptionError("infill", "{infill} template has no [MASK] or [MASK:n] span to fill")
    x, cond, start = make_canvas([ids] * rows, 0, tok.mask_id, tok.pad_id, tok.eos_id, **canvas)
    return x, cond, start - len(ids)


def trim_at_eos(ids: list[int], eos: int) -> list[int]:
    """A generated row up to its first EOS."""
    return ids[: ids.index(eos)] if eos in ids else ids

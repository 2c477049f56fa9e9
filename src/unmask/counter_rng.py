"""Counter-based random numbers: each number a pure function of (seed, row, position).

A stream generator (``torch.Generator``) must draw a whole batch in order, on one device, to give
every row its numbers; a counter-based generator (Salmon et al. 2011, "Parallel random numbers:
as easy as 1, 2, 3") hashes the coordinates of each number instead. Any process, micro-batch or
device computes row r's numbers of a step without drawing the other rows', and they are the same
bits on a CPU and on a GPU, since the hash is exact integer arithmetic. The training loop uses it
for the MDM's masked positions: the host draws one seed per step and a few numbers per row, the
device makes the (B, L) positions where the loss needs them (docs/training.md, 'Masking noise').

The hash is Wellons' ``lowbias32`` (xor-shifts and odd multiplications, a bijection of 32-bit
words with near-ideal avalanche), in int64 tensor arithmetic that never overflows: every word is
kept in [0, 2^32) and a product by a 32-bit constant is taken as two 16-bit halves. Because each
stage is a bijection, the L words of one row are distinct (for L <= 2^32): sorting them orders
the positions without ties on any device.
"""

from __future__ import annotations

import torch

WORD = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """x * c mod 2^32 for x in [0, 2^32) int64: (x c_lo + ((x c_hi) mod 2^16) 2^16) mod 2^32, every product < 2^48."""
    low, high = c & 0xFFFF, c >> 16
    return (x * low + (((x * high) & 0xFFFF) << 16)) & WORD


def mix32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 of int64 words in [0, 2^32): a bijection of 32-bit words, elementwise."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def hashed_words(seed: int, rows: torch.Tensor, length: int) -> torch.Tensor:
    """Pseudo-random 32-bit words (B, length) int64 in [0, 2^32) on ``rows``' device for the rows ``rows`` (B,) int64.

    Word (r, i) = mix32(a_r xor mix32(i)) with a_r = mix32(mix32(r xor seed_hi) xor seed_lo): the
    words of a row are distinct; those of distinct rows or seeds are unrelated.
    """
    lo, hi = seed & WORD, (seed >> 32) & WORD
    a = mix32(mix32((rows.long() & WORD) ^ hi) ^ lo)
    b = mix32(torch.arange(length, device=rows.device, dtype=torch.int64))
    return mix32(a[:, None] ^ b[None, :])


def hashed_uniform(seed: int, rows: torch.Tensor, length: int) -> torch.Tensor:
    """U[0, 1) float32 (B, length) from :func:`hashed_words`: the top 24 bits, the resolution of ``torch.rand``'s float32."""
    return (hashed_words(seed, rows, length) >> 8).float() * 2.0**-24

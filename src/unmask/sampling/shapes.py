"""Static or dynamic shapes for a decode: how a step's work is laid out, not what it computes.

* dynamic (the default on a CPU): a network call covers only the rows with a position to predict,
  its head runs only at those positions, and the sampler's draws and softmaxes run at those
  positions only. Least arithmetic, but the number of rows and positions is read from the device
  every step, and a step ends by reading whether anything is left to decode.
* static (the default on a GPU): every call covers every row of the canvas and computes the logits
  at every position; each step's selections are masks (``torch.where``), never boolean indexing;
  how many steps a sampler runs is decided when it starts (one read of the most positions any row
  has to fill) and never read again inside the step loop, except threshold decoding, whose number
  of steps depends on the model's confidence and which reads it every :data:`POLL` steps. A
  step then queues its kernels without waiting for the device, and its shapes are the same at
  every step (what CUDA graphs need). The extra arithmetic is cheap where a step is bound by
  launches and weight reads (small batches on a GPU).

Both give the same tokens at temperature 0; at other temperatures both draw from the same
distribution, but from the generator in a different order (static draws at every position). The
exact-distribution tests run in both. Decodes that read the host by nature stay dynamic: canvas
KV caches (the fed slots vary per row), structured output (its automata live on the host),
classifier guidance and reward-guided decoding.

    with decode_shapes("static"):   # or "dynamic"; "auto" (the default): static on CUDA
        ...

The environment variable ``UNMASK_DECODE_SHAPES`` (auto, static or dynamic) sets the default of a process.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from contextvars import ContextVar

import torch

from unmask.errors import not_one_of

SHAPES = ("auto", "static", "dynamic")
POLL = 4  # static threshold decoding reads whether it is done every POLL steps
DEFAULT = os.environ.get("UNMASK_DECODE_SHAPES", "auto")  # the process's choice, in every thread (a server's workers too)
_CHOICE: ContextVar[str | None] = ContextVar("unmask_decode_shapes", default=None)


@contextmanager
def decode_shapes(kind: str):
    """Decode with ``kind`` shapes inside the block, in this thread (auto: static on CUDA, dynamic elsewhere)."""
    if kind not in SHAPES:
        raise not_one_of("shapes", kind, SHAPES)
    token = _CHOICE.set(kind)
    try:
        yield
    finally:
        _CHOICE.reset(token)


def static_shapes(x: torch.Tensor) -> bool:
    """Whether a decode of canvas ``x`` runs with static shapes (the choice in force, auto: on CUDA)."""
    kind = _CHOICE.get() or DEFAULT
    if kind not in SHAPES:
        raise not_one_of("UNMASK_DECODE_SHAPES", kind, SHAPES)
    return x.is_cuda if kind == "auto" else kind == "static"

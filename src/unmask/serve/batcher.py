"""Decoding many requests together, one network forward per step and shape, without changing any result.

Every request runs its own, ordinary sampler loop (its own seeded generator, its own state) in a
worker thread, against :class:`BatchedModel`: a proxy of the network whose forward hands its
inputs to the one :class:`Scheduler`. The scheduler waits until every running request has handed
in its next call (requests join and leave between steps), concatenates the calls that fit together
along the batch dimension, runs the network once per such group and gives every request its own
rows of the output. A request's samples are therefore those of its own loop alone: the scheduler
only decides which rows share a forward.

Calls fit together when their inputs have the same shape apart from the batch dimension and pass the
same keywords (``t``, ``key_mask``, ``positions``, ``logits_at``, ``kv_cache``, ``cache_index``).
Requiring equal shapes, rather than padding calls of different lengths to a common one, keeps
every row's arithmetic that of a forward of its own: the float reductions inside a row (attention
over its keys, the dot products of its linear layers) do not depend on how many rows run beside
it, as long as every matrix product has enough rows for BLAS to use the same kernel (below about
six rows it switches to another, with other low bits). So every forward, merged or not, is topped
up with filler rows to at least ``min_rows`` rows per product; the tests compare concurrent requests
with the same requests made one at a time, bit for bit. (On GPUs the libraries pick kernels by
shape more freely: there batching is only guaranteed to give samples of the same distribution.)
The server makes equal shapes common by padding every canvas on the left to a multiple of a
fixed width. A call with a keyword the proxy does not know runs as a forward of its own. KV caches
(the AR cache, the MDM canvas caches) are concatenated into the merged forward and the keys/values
it writes are copied back into each request's cache: a copy per step, cheap for the small models
served here.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import torch

from unmask.model import KVCache

MERGEABLE = ("t", "key_mask", "positions", "logits_at", "kv_cache", "cache_index", "check_span")


class Cancelled(Exception):
    """Raised inside a request's sampler loop when its client went away or its time ran out."""


class Ticket:
    """A request's seat at the scheduler: a cancel flag (with its reason) and a deadline (monotonic s)."""

    def __init__(self, deadline: float | None = None) -> None:
        self.deadline = deadline
        self.reason: str | None = None
        self._cancelled = threading.Event()

    def cancel(self, reason: str) -> None:
        if not self._cancelled.is_set():
            self.reason = reason
            self._cancelled.set()

    def check(self) -> None:
        """Raise :class:`Cancelled` if the request was cancelled or is past its deadline."""
        if self.deadline is not None and time.monotonic() > self.deadline:
            self.cancel("timeout")
        if self._cancelled.is_set():
            raise Cancelled(self.reason)


@dataclass
class _Call:
    ticket: Ticket
    tokens: torch.Tensor
    kwargs: dict
    done: threading.Event = field(default_factory=threading.Event)
    result: torch.Tensor | None = None
    error: BaseException | None = None


def signature(tokens: torch.Tensor, kwargs: dict) -> tuple | None:
    """What calls must share to run as one forward; None: this call runs alone."""
    b = tokens.shape[0]
    parts: list = [tuple(tokens.shape[1:]), tokens.dtype, tokens.device]
    for name in sorted(kwargs):
        value = kwargs[name]
        if name not in MERGEABLE:
            return None
        if value is None:
            parts.append((name, None))
        elif isinstance(value, torch.Tensor):
            if value.shape[0] != b:
                return None
            parts.append((name, tuple(value.shape[1:]), value.dtype))
        elif isinstance(value, KVCache):
            if value.k[0].shape[0] != b:
                return None
            parts.append((name, len(value.k), tuple(value.k[0].shape[1:]), value.k[0].dtype, value.length))
        elif isinstance(value, bool):  # a flag: calls merge when they give the same
            parts.append((name, value))
        else:
            return None
    return tuple(parts)


class Scheduler:
    """Runs the forwards of all requests, in one thread, grouping the calls of each step.

    ``max_wait`` (s): how long the first call of a step waits for the other running requests
    (a safety net; normally every request hands in its call within the step's bookkeeping time).
    ``min_rows``: every forward multiplies matrices of at least this many rows (filler rows are
    added to small calls), so that a row's arithmetic does not depend on the rows beside it.
    ``stats``: forwards run, calls served, rows, and the sum of requests over forwards (occupancy).
    """

    def __init__(self, model: torch.nn.Module, max_wait: float = 0.25, min_rows: int = 32) -> None:
        self.model, self.max_wait, self.min_rows = model, max_wait, min_rows
        self._cv = threading.Condition()
        self._active: set[Ticket] = set()
        self._pending: dict[Ticket, _Call] = {}
        self.stats = {"forwards": 0, "calls": 0, "rows": 0, "ticks": 0, "requests_per_forward": 0, "max_requests_per_forward": 0}
        self._thread = threading.Thread(target=self._loop, name="unmask-scheduler", daemon=True)
        self._thread.start()

    @property
    def active(self) -> int:
        with self._cv:
            return len(self._active)

    def join(self, ticket: Ticket) -> "BatchedModel":
        """Seat a request; its sampler loop calls the returned proxy instead of the network."""
        with self._cv:
            self._active.add(ticket)
            self._cv.notify_all()
        return BatchedModel(self, ticket)

    def leave(self, ticket: Ticket) -> None:
        """Free a request's seat (finished, failed or cancelled): the others stop waiting for it."""
        with self._cv:
            self._active.discard(ticket)
            self._pending.pop(ticket, None)
            self._cv.notify_all()

    def submit(self, ticket: Ticket, tokens: torch.Tensor, kwargs: dict) -> torch.Tensor:
        """The network's output for one call of a seated request (blocks until its group has run)."""
        ticket.check()
        call = _Call(ticket, tokens, kwargs)
        with self._cv:
            if ticket not in self._active:
                raise RuntimeError("a request called the network after leaving the scheduler")
            self._pending[ticket] = call
            self._cv.notify_all()
        call.done.wait()
        if call.error is not None:
            raise call.error
        return call.result

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._pending:
                    self._cv.wait()
                first = time.monotonic()
                # wait for every seated request to hand in its call (they join and leave between steps)
                while len(self._pending) < len(self._active):
                    left = self.max_wait - (time.monotonic() - first)
                    if left <= 0:
                        break
                    self._cv.wait(left)
                calls = list(self._pending.values())
                self._pending.clear()
            self._run(calls)

    def _run(self, calls: list[_Call]) -> None:
        groups: dict = {}
        for i, call in enumerate(calls):
            key = signature(call.tokens, call.kwargs)
            groups.setdefault(("alone", i) if key is None else key, []).append(call)
        self.stats["ticks"] += 1
        for group in groups.values():
            try:
                with torch.no_grad():  # grad mode is per thread: the request threads' no_grad does not reach here
                    self._forward(group)
            except BaseException as exc:  # noqa: BLE001  (handed to the requests, which raise it)
                for call in group:
                    call.error = exc
            for call in group:
                call.done.set()

    def _forward(self, group: list[_Call]) -> None:
        stats = self.stats
        stats["forwards"] += 1
        stats["calls"] += len(group)
        stats["rows"] += sum(c.tokens.shape[0] for c in group)
        stats["requests_per_forward"] += len(group)
        stats["max_requests_per_forward"] = max(stats["max_requests_per_forward"], len(group))
        first = group[0]
        length, rows = first.tokens.shape[1], sum(c.tokens.shape[0] for c in group)
        wanted = sum(_outputs(c.tokens, c.kwargs) for c in group)
        # filler rows (copies of the first row, outputs discarded) so that every matrix product has
        # at least min_rows rows: below a few rows BLAS switches kernels, and a row's low bits with it
        extra = max(0, -(-(self.min_rows - rows * length) // length), -(-(self.min_rows - wanted) // length))
        parts = [(c.tokens, c.kwargs) for c in group]
        if extra:
            parts.append((first.tokens[:1].expand(extra, -1), {name: _filler(name, value, extra) for name, value in first.kwargs.items()}))
        kwargs = {}
        for name, value in first.kwargs.items():
            if value is None or isinstance(value, bool):
                kwargs[name] = value
            elif isinstance(value, KVCache):
                caches = [kw[name] for _, kw in parts]
                kwargs[name] = KVCache([torch.cat(layer) for layer in zip(*(c.k for c in caches))],
                                       [torch.cat(layer) for layer in zip(*(c.v for c in caches))], value.length)
            else:
                kwargs[name] = torch.cat([kw[name] for _, kw in parts])
        out = self.model(torch.cat([tokens for tokens, _ in parts]), **kwargs)
        # logits_at: (N, V) rows in row-major order, so each call's rows are consecutive
        sizes = [_outputs(tokens, kw) if kw.get("logits_at") is not None else tokens.shape[0] for tokens, kw in parts]
        for call, part in zip(group, out.split(sizes)):
            call.result = part
        merged = kwargs.get("kv_cache")
        if merged is not None:  # the network wrote keys/values into the merged copy: back into each request's cache
            start = 0
            for call in group:
                cache, b = call.kwargs["kv_cache"], call.tokens.shape[0]
                for mine, theirs in zip(cache.k + cache.v, merged.k + merged.v):
                    mine.copy_(theirs[start : start + b])
                cache.length = merged.length
                start += b


def _outputs(tokens: torch.Tensor, kwargs: dict) -> int:
    """The positions a call's logits cover: its ``logits_at`` mask's True entries or index's entries, else every position."""
    at = kwargs.get("logits_at")
    if at is None:
        return tokens.numel()
    return int(at.sum()) if at.dtype == torch.bool else at.numel()


def _filler(name: str, value, rows: int):
    """``rows`` copies of the first row of a keyword's value (logits_at: every position; a flag as it is)."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, KVCache):
        return KVCache([k[:1].expand(rows, *k.shape[1:]) for k in value.k], [v[:1].expand(rows, *v.shape[1:]) for v in value.v], value.length)
    if name == "logits_at":
        return torch.ones((rows, *value.shape[1:]), dtype=value.dtype, device=value.device)
    return value[:1].expand(rows, *value.shape[1:])


class BatchedModel:
    """What a request's sampler loop sees as its network: the config and parameters of the real one;
    a call goes through the scheduler."""

    def __init__(self, scheduler: Scheduler, ticket: Ticket) -> None:
        self._scheduler, self._ticket = scheduler, ticket
        self.config = scheduler.model.config

    def parameters(self, recurse: bool = True):
        return self._scheduler.model.parameters(recurse)

    def buffers(self, recurse: bool = True):
        return self._scheduler.model.buffers(recurse)

    def __call__(self, tokens: torch.Tensor, **kwargs) -> torch.Tensor:
        return self._scheduler.submit(self._ticket, tokens, kwargs)

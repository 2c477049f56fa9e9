"""Count the operations that make the host wait for the device: the check that a decode step runs
without host synchronisation, on any machine.

On a GPU, reading a value computed on the device (``.item()``, ``bool(t)``, ``int(t)``,
``.tolist()``) or running an operation whose output shape depends on device data (``nonzero``,
indexing with a boolean mask, ``masked_select``, ``unique``, ``repeat_interleave`` without an output
size) blocks the host until the device has caught up: the host can no longer queue the next kernels
while the device computes, so every step pays its launch overhead in full, and a step that
synchronises cannot be captured in a CUDA graph. On a CPU these operations cost nothing extra, which
is why such reads creep in unnoticed. :class:`HostReads` counts them wherever the code runs, through
a dispatch hook that sees every ATen operation (the same operations synchronise on CUDA), plus the
Python-level reads that bypass dispatch (``tolist``, ``numpy``). On CUDA,
``torch.cuda.set_sync_debug_mode("error")`` is the device's own check of the same thing.

    with HostReads() as reads:
        ...                       # reads.count: host reads so far; reads.names: which operations
"""

from __future__ import annotations

from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
# operations whose result the host must read (or whose output shape depends on device data)
_ALWAYS = {
    aten._local_scalar_dense.default, aten.nonzero.default, aten.argwhere.default, aten.masked_select.default,
    aten.is_nonzero.default, aten.equal.default, aten._unique2.default, aten.unique_consecutive.default, aten.unique_dim.default,
    aten.repeat_interleave.Tensor,
}
_INDEXING = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default}


def _boolean_index(args) -> bool:
    """Indexing with a boolean mask: its number of selected entries is read from the device."""
    indices = args[1] if len(args) > 1 else ()
    return any(torch.is_tensor(i) and i.dtype in (torch.bool, torch.uint8) for i in indices or ())


class HostReads(TorchDispatchMode):
    """Counts host reads of device data while active: ``count`` in all, ``names`` by operation."""

    def __init__(self) -> None:
        super().__init__()
        self.names: Counter = Counter()
        self._saved: dict = {}

    @property
    def count(self) -> int:
        return sum(self.names.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in _ALWAYS or (func in _INDEXING and _boolean_index(args)):
            self.names[func.__name__ if hasattr(func, "__name__") else str(func)] += 1
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        for name in ("tolist", "numpy"):  # reads that bypass the dispatcher
            original = self._saved[name] = getattr(torch.Tensor, name)
            setattr(torch.Tensor, name, self._counted(name, original))
        return super().__enter__()

    def __exit__(self, *exc):
        for name, original in self._saved.items():
            setattr(torch.Tensor, name, original)
        return super().__exit__(*exc)

    def _counted(self, name: str, original):
        def read(tensor, *args, **kwargs):
            self.names[name] += 1
            return original(tensor, *args, **kwargs)
        return read

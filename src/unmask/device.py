"""Device choice shared by every entry point, and the device a model lives on."""

from __future__ import annotations

import torch

from unmask.errors import OptionError


def pick_device(device: str = "auto") -> torch.device:
    """"auto" -> CUDA if available, else CPU; otherwise the named device ("cpu", "cuda", "cuda:1", "mps")."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise OptionError("device", "{device} {_device!r} is not a device; use auto, cpu, cuda or cuda:N", _device=device) from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise OptionError("device", "{device} {_device}: CUDA is not available on this machine; use {device} cpu", _device=device)
    return dev


def device_of(model) -> torch.device:
    """The device of a model's first parameter or buffer (CPU for a model with neither)."""
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")

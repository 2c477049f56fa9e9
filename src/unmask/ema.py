"""Exponential moving average of the weights (MDLM, BD3-LM and Duo evaluate and sample from it).

After every optimizer step ``ema <- decay * ema + (1 - decay) * weights``, starting from the
initial weights, so after k steps ``ema_k = decay^k w_0 + sum_i (1 - decay) decay^(k-i) w_i``.
Kept in fp32 whatever the training precision. Under FSDP each process keeps the EMA of its own
shards (the same sharding as the parameters), so the average costs no communication; the
checkpoint stores it beside the weights, under the same names.
"""

from __future__ import annotations

import torch
from torch import nn


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """The local part of a DTensor (shares its storage), or the tensor itself."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


class EMA:
    """fp32 moving average of a model's parameters (sharded like them under FSDP)."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0 < decay < 1:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.names = [name for name, _ in model.named_parameters()]
        self.params = [p for _, p in model.named_parameters()]
        self.shadow = [p.detach().float().clone() for p in self.params]

    @torch.no_grad()
    def update(self) -> None:
        """One step of the average toward the current weights."""
        torch._foreach_lerp_([_local(s) for s in self.shadow], [_local(p).float() for p in self.params], 1.0 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """{parameter name: fp32 average} (DTensors under FSDP)."""
        return dict(zip(self.names, self.shadow))

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = [n for n in self.names if n not in state]
        if missing:
            raise KeyError(f"EMA state lacks {missing[:3]}")
        for name, shadow in zip(self.names, self.shadow):
            value = state[name]
            if value is not shadow:
                _local(shadow).copy_(_local(value).to(shadow.dtype))

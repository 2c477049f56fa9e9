"""The Transformer: a pure ``nn.Module`` that maps tokens to logits.

LLaMA-style blocks (RMSNorm, SwiGLU, rotary positions, ``scaled_dot_product_attention``).
``config.causal`` selects the AR baseline; otherwise attention is bidirectional (MDM). The
model knows nothing of diffusion: the MASK token is just input id ``vocab_size`` (one extra
embedding row) and the head covers the real vocabulary only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from unmask.config import ModelConfig
from unmask.errors import UnmaskError


@dataclass
class KVCache:
    """Keys/values of earlier positions, per layer: ``k[i], v[i]`` are (B, H, max_len, Dh).

    ``length`` positions are filled. Used by exact AR decoding; the caller owns the object.
    """

    k: list[torch.Tensor]
    v: list[torch.Tensor]
    length: int = 0

    @classmethod
    def empty(cls, config: ModelConfig, batch: int, max_len: int, device, dtype) -> "KVCache":
        shape = (batch, config.n_head, max_len, config.head_dim)
        return cls(
            k=[torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)],
            v=[torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)],
        )


def rotary_tables(head_dim: int, positions: torch.Tensor, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables for integer ``positions`` (B, L) -> two (B, 1, L, head_dim/2) float32 tensors."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    angles = positions.float()[..., None] * inv_freq
    return angles.cos()[:, None], angles.sin()[:, None]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[..., :D/2], x[..., D/2:]) of (B, H, L, D) by the given angles."""
    x1, x2 = x.float().chunk(2, dim=-1)
    out = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    return out.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_head, self.head_dim = config.n_head, config.head_dim
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd, bias=False)
        self.proj = nn.Linear(config.n_embd, config.n_embd, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        attn_mask: torch.Tensor | None,
        is_causal: bool,
        cache: tuple[torch.Tensor, torch.Tensor, int] | None,
    ) -> torch.Tensor:
        b, l, d = x.shape
        q, k, v = self.qkv(x).view(b, l, 3, self.n_head, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k_cache, v_cache, start = cache
            k_cache[:, :, start : start + l] = k.to(k_cache.dtype)
            v_cache[:, :, start : start + l] = v.to(v_cache.dtype)
            k, v = k_cache[:, :, : start + l].to(q.dtype), v_cache[:, :, : start + l].to(q.dtype)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)
        return self.proj(y.transpose(1, 2).reshape(b, l, d))


class SwiGLU(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate_up = nn.Linear(config.n_embd, 2 * config.ffn_dim, bias=False)
        self.down = nn.Linear(config.ffn_dim, config.n_embd, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.attn_norm = nn.RMSNorm(config.n_embd, eps=config.norm_eps)
        self.attn = Attention(config)
        self.mlp_norm = nn.RMSNorm(config.n_embd, eps=config.norm_eps)
        self.mlp = SwiGLU(config)

    def forward(self, x, cos, sin, attn_mask, is_causal, cache):
        x = x + self.attn(self.attn_norm(x), cos, sin, attn_mask, is_causal, cache)
        return x + self.mlp(self.mlp_norm(x))


class TimeEmbedding(nn.Module):
    """Sinusoidal features of t in [0, 1] through a small MLP (used only when time-conditioned)."""

    dim = 256

    def __init__(self, n_embd: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(self.dim, n_embd), nn.SiLU(), nn.Linear(n_embd, n_embd))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        angles = 1000.0 * t.float()[:, None] * freqs
        return self.mlp(torch.cat([angles.cos(), angles.sin()], dim=-1))


class Transformer(nn.Module):
    """``forward(tokens) -> logits``; tokens (B, L) int64 in [0, vocab_size], logits (B, L, vocab_size)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size + 1, config.n_embd)
        self.time_embed = TimeEmbedding(config.n_embd) if config.time_conditioning else None
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm = nn.RMSNorm(config.n_embd, eps=config.norm_eps)
        self.head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        std = self.config.init_std
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.RMSNorm):
                nn.init.ones_(module.weight)
        for block in self.blocks:  # GPT-2 style residual scaling keeps the stream's variance flat with depth
            nn.init.normal_(block.attn.proj.weight, std=std / math.sqrt(2 * self.config.n_layer))
            nn.init.normal_(block.mlp.down.weight, std=std / math.sqrt(2 * self.config.n_layer))

    def forward(
        self,
        tokens: torch.Tensor,
        *,
        t: torch.Tensor | None = None,
        key_mask: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
    ) -> torch.Tensor:
        """Logits for every position.

        Args:
            tokens: (B, L) ids; ``vocab_size`` is MASK.
            t: (B,) diffusion time, required iff ``config.time_conditioning``.
            key_mask: (B, S) bool, False for padding keys that no query may attend to; S = L, or
                the cache length + L when decoding with ``kv_cache``.
            positions: (B, L) rotary positions; default 0..L-1 (offset by the cache length).
            kv_cache: AR only: keys/values of earlier positions, extended in place.
        Returns:
            (B, L, vocab_size) logits (in the autocast dtype when autocast is on).
        """
        b, l = tokens.shape
        cfg = self.config
        start = kv_cache.length if kv_cache is not None else 0
        if positions is None:
            positions = torch.arange(start, start + l, device=tokens.device).expand(b, l)
        cos, sin = rotary_tables(cfg.head_dim, positions, cfg.rope_theta)
        x = self.embed(tokens)
        if self.time_embed is not None:
            if t is None:
                raise UnmaskError(
                    "this network is time-conditioned (ModelConfig.time_conditioning): pass t (B,) to forward(), "
                    "e.g. the fraction of masked positions of each row (unmask.schedule.masked_fraction)"
                )
            x = x + self.time_embed(t)[:, None, :].to(x.dtype)

        attn_mask, is_causal = None, False
        if cfg.causal and (key_mask is not None or start > 0):
            q_pos = torch.arange(start, start + l, device=tokens.device)
            k_pos = torch.arange(start + l, device=tokens.device)
            attn_mask = (k_pos[None, :] <= q_pos[:, None])[None, None]  # (1, 1, L, S)
        elif cfg.causal:
            is_causal = True
        if key_mask is not None:
            q_pos = torch.arange(start, start + l, device=tokens.device)
            own = torch.arange(key_mask.shape[1], device=tokens.device)[None, :] == q_pos[:, None]
            # a padding query still sees itself: a row with no visible key would make NaNs that leak
            km = key_mask[:, None, None, :].bool() | own[None, None]
            attn_mask = km if attn_mask is None else attn_mask & km
        for i, block in enumerate(self.blocks):
            cache = (kv_cache.k[i], kv_cache.v[i], start) if kv_cache is not None else None
            x = block(x, cos, sin, attn_mask, is_causal, cache)
        if kv_cache is not None:
            kv_cache.length = start + l
        return self.head(self.norm(x))

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

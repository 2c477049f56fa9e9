"""The Transformer: a pure ``nn.Module`` that maps tokens to logits.

LLaMA-style blocks (RMSNorm, SwiGLU, rotary positions, ``scaled_dot_product_attention``; learned
absolute positions instead of rotary ones with ``ModelConfig.positions="absolute"``).
``config.causal`` selects the AR baseline; otherwise attention is bidirectional (MDM). The
model knows nothing of diffusion: the MASK token is just an input id (``config.mask_id``: by
default ``vocab_size``, one extra embedding row) and the head covers the real vocabulary only. Published layouts switch on
grouped-query attention, q/k/v biases, tied embeddings, LLaMA-3 RoPE scaling, a MASK id inside
the vocabulary (its logit pinned to ``NEVER_LOGIT``), Dream's one-position logit shift and
Mistral's sliding-window attention, all from :class:`ModelConfig`, so callers always see
per-position logits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from unmask.config import ModelConfig
from unmask.errors import UnmaskError

# The logit given to a MASK id that lies inside the vocabulary (ModelConfig.mask_token_id): finite, so
# that guidance arithmetic and entropies stay NaN-free, yet exp() of it is exactly 0 in every dtype.
NEVER_LOGIT = -1e4


@dataclass
class KVCache:
    """Keys/values per layer: ``k[i], v[i]`` are (B, H, slots, Dh); the caller owns the object.

    Two ways to use it, one attention code path:
    * AR decoding appends: each forward writes its tokens at slots [length, length + L) and
      attends causally to the slots before; ``length`` counts the filled slots.
    * MDM decoding over a canvas of ``slots`` positions: a forward with ``cache_index`` (B, Q)
      writes the fed tokens' keys/values at those slots and attends to every slot (the others
      keep what an earlier forward wrote there).

    With ``ModelConfig.sliding_window`` every slot is kept and the window is a mask over slots, so
    cached decoding computes exactly what a forward over the whole sequence does.
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

    def rows(self, index: torch.Tensor) -> "KVCache":
        """A copy holding the rows ``index`` (R,) of every layer."""
        return KVCache([k[index] for k in self.k], [v[index] for v in self.v], self.length)

    def put_rows(self, index: torch.Tensor, part: "KVCache") -> None:
        """Write ``part`` (from :meth:`rows`) back into the rows ``index``."""
        for mine, theirs in zip(self.k + self.v, part.k + part.v):
            mine[index] = theirs


def at_positions(x: torch.Tensor, logits_at: torch.Tensor) -> torch.Tensor:
    """The rows (N, ...) of x (B, L, ...) at ``logits_at``: a (B, L) bool mask (row-major order), or
    a (B, Q) index of columns per row (N = B Q, nothing read from the device)."""
    if logits_at.dtype == torch.bool:
        return x[logits_at]
    return x.gather(1, logits_at.view(*logits_at.shape, *[1] * (x.dim() - 2)).expand(-1, -1, *x.shape[2:])).flatten(0, 1)


def rope_frequencies(config: ModelConfig, device=None) -> torch.Tensor:
    """(head_dim/2,) float32 rotary frequencies, with LLaMA-3.1 scaling when ``config.rope_scaling == "llama3"``.

    The scaling keeps the high frequencies (wavelength under original_context / high_freq_factor),
    divides the low ones (wavelength over original_context / low_freq_factor) by ``rope_factor``, and
    interpolates linearly in original_context / wavelength between the two bands.
    """
    dim = config.head_dim
    inv_freq = 1.0 / config.rope_theta ** (torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim)
    if config.rope_scaling != "llama3":
        return inv_freq
    lo, hi, ctx = config.rope_low_freq_factor, config.rope_high_freq_factor, config.rope_original_context
    ratio = ctx / (2 * math.pi / inv_freq)  # original context over wavelength
    smooth = ((ratio - lo) / (hi - lo)).clamp(0.0, 1.0)  # 0: low band (scaled), 1: high band (kept)
    return (1 - smooth) * inv_freq / config.rope_factor + smooth * inv_freq


def rotary_tables(positions: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables for integer ``positions`` (B, L) and frequencies ``inv_freq`` (head_dim/2,) (see
    :func:`rope_frequencies`) -> two (B, 1, L, head_dim/2) float32 tensors."""
    angles = positions.float()[..., None] * inv_freq
    return angles.cos()[:, None], angles.sin()[:, None]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[..., :D/2], x[..., D/2:]) of (B, H, L, D) by the given angles."""
    x1, x2 = x.float().chunk(2, dim=-1)
    out = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    return out.to(x.dtype)


_FLEX: dict[bool, object] = {}


def _flex_attention(cuda: bool):
    """FlexAttention, compiled on CUDA (its fused kernel; eager it materialises the scores)."""
    if cuda not in _FLEX:
        from torch.nn.attention.flex_attention import flex_attention

        _FLEX[cuda] = torch.compile(flex_attention) if cuda else flex_attention
    return _FLEX[cuda]


class Attention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_head, self.head_dim, self.n_kv_head = config.n_head, config.head_dim, config.kv_heads
        # rows: n_head query heads, then n_kv_head key heads, then n_kv_head value heads
        self.qkv = nn.Linear(config.n_embd, (config.n_head + 2 * config.kv_heads) * config.head_dim, bias=config.qkv_bias)
        self.proj = nn.Linear(config.n_embd, config.n_embd, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        attn_mask: torch.Tensor | None,
        is_causal: bool,
        cache: tuple[torch.Tensor, torch.Tensor, int | torch.Tensor] | None,
    ) -> torch.Tensor:
        b, l, d = x.shape
        q, k, v = self.qkv(x).view(b, l, -1, self.head_dim).transpose(1, 2).split([self.n_head, self.n_kv_head, self.n_kv_head], dim=1)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if self.n_kv_head != self.n_head:  # grouped-query attention: query head h reads key/value head h // group
            group = self.n_head // self.n_kv_head
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        if cache is not None:
            k_cache, v_cache, where = cache
            if isinstance(where, int):  # append at slots [where, where + l), attend to the filled ones
                k_cache[:, :, where : where + l] = k.to(k_cache.dtype)
                v_cache[:, :, where : where + l] = v.to(v_cache.dtype)
                k, v = k_cache[:, :, : where + l].to(q.dtype), v_cache[:, :, : where + l].to(q.dtype)
            else:  # write at the slots where (B, L), attend to every slot
                index = where[:, None, :, None].expand(-1, self.n_head, -1, self.head_dim)
                k_cache.scatter_(2, index, k.to(k_cache.dtype))
                v_cache.scatter_(2, index, v.to(v_cache.dtype))
                k, v = k_cache.to(q.dtype), v_cache.to(q.dtype)
        if attn_mask is not None and not torch.is_tensor(attn_mask):  # a FlexAttention BlockMask (block diffusion, optional)
            y = _flex_attention(q.is_cuda)(q, k, v, block_mask=attn_mask)
        else:
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
        """t (B,) -> (B, n_embd) in the weights' dtype; the angles (up to 1000 rad) are computed in
        float32 at least, since bf16 would round them to whole radians."""
        weight = self.mlp[0].weight.dtype
        dtype = torch.promote_types(weight, torch.float32)
        half = self.dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=dtype) / half)
        angles = 1000.0 * t.to(dtype)[:, None] * freqs
        return self.mlp(torch.cat([angles.cos(), angles.sin()], dim=-1).to(weight))


class Transformer(nn.Module):
    """``forward(tokens) -> logits``; tokens (B, L) int64 in [0, config.embed_rows), logits (B, L, vocab_size)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.embed_rows, config.n_embd)
        # learned absolute positions (ModelConfig.positions); rotary positions have no weights
        self.pos_embed = nn.Embedding(config.context_len, config.n_embd) if config.positions == "absolute" else None
        self.time_embed = TimeEmbedding(config.n_embd) if config.time_conditioning else None
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm = nn.RMSNorm(config.n_embd, eps=config.norm_eps)
        # tied: the head is the embedding's first vocab_size rows (no weight of its own)
        self.head = None if config.tie_embeddings or config.labels else nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # a classifier (ModelConfig.labels): one pooled vector per row through this head instead of logits per position
        self.label_head = nn.Linear(config.n_embd, config.num_labels) if config.labels else None
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
        cache_index: torch.Tensor | None = None,
        logits_at: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        soft_tokens: torch.Tensor | None = None, check_span: bool = True,
    ) -> torch.Tensor:
        """Logits for every position (or for the ``logits_at`` ones).

        Args:
            tokens: (B, L) ids; MASK is ``config.mask_id`` (``vocab_size``, the extra input row, unless
                ``mask_token_id`` puts it inside the vocabulary).
            t: (B,) diffusion time, required iff ``config.time_conditioning``.
            key_mask: (B, S) bool, False for padding keys that no query may attend to; S = L, or
                the cache's slots (AR: the cache length + L) when decoding with ``kv_cache``.
            positions: (B, L) rotary positions; default: the slots (0..L-1, offset by the AR
                cache length, or ``cache_index``).
            kv_cache: keys/values of other positions (see :class:`KVCache`); AR: appended to.
            cache_index: (B, L) the canvas slots of ``tokens`` in ``kv_cache`` (MDM decoding):
                their keys/values are written there and every slot is attended to.
            logits_at: (B, L) bool: apply the head only at these positions; or (B, Q) long: these columns of each row.
            attn_mask: (L, S) or (B, 1, L, S) bool, True where a query may attend to a key: replaces
                the causal / block-causal mask of the config (e.g. the 2L block-diffusion training
                mask, :mod:`unmask.block_diffusion`, or the annealed mask of AR -> MDM adaptation,
                :mod:`unmask.adaptation`); ``key_mask`` still applies. Or a FlexAttention
                ``BlockMask`` (then without key_mask and cache).
            soft_tokens: (B, L, vocab_size) weights: embed ``soft_tokens @ embed.weight[:vocab_size]``, not ``tokens`` (Duo).
            check_span: False: the caller checked that ``positions`` span at most the context (the check reads the device).
        Returns:
            (B, L, vocab_size) logits, or (N, vocab_size) for the N ``logits_at`` positions in
            row-major order (B Q of them for an index) (in the autocast dtype when autocast is on); a classifier
            (``config.labels``): (B, num_labels) label logits of each row.
        Raises:
            UnmaskError: for positions spanning more than ``config.context_len`` (an input, with
                the AR cache's slots, longer than the context). Positions may start anywhere
                (block diffusion's window over a long canvas).
        """
        b, l = tokens.shape
        cfg = self.config
        if cache_index is not None and kv_cache is None:
            raise UnmaskError("cache_index needs a kv_cache to write the keys/values into")
        start = kv_cache.length if kv_cache is not None and cache_index is None else 0
        # slot of every query and of every key: the causal, block-causal and window masks are over slots
        q_slot = cache_index if cache_index is not None else torch.arange(start, start + l, device=tokens.device).expand(b, l)
        num_keys = kv_cache.k[0].shape[2] if cache_index is not None else start + l
        placed = positions if positions is not None else cache_index
        appending = kv_cache is not None and cache_index is None  # the AR cache: its slots and the new ones
        self._check_context(start + l if appending or placed is None else placed if check_span else 0)
        if positions is None:
            positions = q_slot
        cos, sin = rotary_tables(positions, rope_frequencies(cfg, tokens.device))
        x = self._embed(tokens, t, soft_tokens)
        if self.pos_embed is not None:  # absolute positions: added to the input, and no rotation (angle 0)
            x = x + self._absolute(positions, check_span)
            cos, sin = torch.ones_like(cos), torch.zeros_like(sin)
        attn_mask, is_causal = self._attention_mask(attn_mask, key_mask, q_slot, num_keys, start, kv_cache, cache_index)
        for i, block in enumerate(self.blocks):
            cache = None if kv_cache is None else (kv_cache.k[i], kv_cache.v[i], start if cache_index is None else cache_index)
            x = block(x, cos, sin, attn_mask, is_causal, cache)
        if kv_cache is not None and cache_index is None:
            kv_cache.length = start + l
        if self.label_head is not None:
            return self._classify(x, key_mask)
        if cfg.shift_logits:  # Dream: position i reads the hidden state of i - 1 (ModelConfig.shift_logits)
            if kv_cache is not None:
                raise UnmaskError("a model with shift_logits (Dream layout) cannot decode with a KV cache; sample without a cache")
            x = torch.cat([x[:, :1], x[:, :-1]], dim=1)
        if logits_at is not None:
            x = at_positions(x, logits_at)
        x = self.norm(x)
        logits = self.head(x) if self.head is not None else F.linear(x, self.embed.weight[: cfg.vocab_size])
        if cfg.mask_token_id >= 0:  # MASK inside the vocabulary is never a prediction
            logits = logits.index_fill(-1, torch.full((1,), cfg.mask_token_id, device=logits.device), NEVER_LOGIT)  # no copy from the host
        return logits

    def _classify(self, x: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        """A classifier's (B, num_labels) logits: its head on the mean of the normalised final states
        over each row's real positions (``key_mask``; all without one), MASKs included."""
        x = self.norm(x)
        if key_mask is None:
            return self.label_head(x.mean(dim=1))
        weight = key_mask.to(x.dtype)[..., None]
        return self.label_head((x * weight).sum(dim=1) / weight.sum(dim=1).clamp_min(1))

    def _embed(self, tokens: torch.Tensor, t: torch.Tensor | None, soft_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """The input embeddings (B, L, D) of ``tokens`` (or the ``soft_tokens`` mixtures of the real tokens' rows),
        plus the time embedding of a time-conditioned network."""
        if soft_tokens is None:
            x = self.embed(tokens)
        else:  # in the embedding's dtype, as a lookup is (autocast would make it bf16)
            rows = self.embed.weight[: self.config.vocab_size]
            with torch.autocast(rows.device.type, enabled=False):
                x = soft_tokens.to(rows.dtype) @ rows
        if self.time_embed is None:
            return x
        if t is None:
            raise UnmaskError(
                "this network is time-conditioned (ModelConfig.time_conditioning): pass t (B,) to forward(), "
                "e.g. the fraction of masked positions of each row (unmask.schedule.masked_fraction)"
            )
        return x + self.time_embed(t)[:, None, :].to(x.dtype)

    def _absolute(self, positions: torch.Tensor, check: bool = True) -> torch.Tensor:
        """The learned embeddings (B, L, D) of ``positions`` (B, L), which must lie in [0, context_len) (``check``: read them to see)."""
        if check and positions.numel() and (int(positions.min()) < 0 or int(positions.max()) >= self.config.context_len):
            raise UnmaskError(
                f"positions {int(positions.min())}..{int(positions.max())} lie outside the learned absolute positions "
                f"0..{self.config.context_len - 1} (ModelConfig.positions='absolute'); feed positions within the context"
            )
        return self.pos_embed(positions)

    def _attention_mask(self, given, key_mask: torch.Tensor | None, q_slot: torch.Tensor, num_keys: int, start: int,
                        kv_cache: KVCache | None, cache_index: torch.Tensor | None) -> tuple[torch.Tensor | None, bool]:
        """(attention mask, is_causal) of a forward (see :meth:`forward`): the ``given`` mask, or the config's causal /
        block-causal pattern over the slots (``q_slot`` (B, L) of the queries, ``num_keys`` keys), then its sliding
        window and the ``key_mask``; ``is_causal`` where the fused causal kernel does it all (mask None)."""
        cfg = self.config
        attn_mask, is_causal = None, False
        k_slot = torch.arange(num_keys, device=q_slot.device)
        if given is not None and not torch.is_tensor(given):  # a FlexAttention BlockMask: used as it is
            if key_mask is not None or kv_cache is not None or cfg.sliding_window:
                raise UnmaskError("a FlexAttention block mask cannot be combined with key_mask, a KV cache or a sliding window; pass a boolean attn_mask")
            attn_mask = given
        elif given is not None:
            attn_mask = given.bool() if given.dim() == 4 else given.bool()[None, None]
        elif cfg.causal and key_mask is None and start == 0 and cache_index is None and not cfg.sliding_window:
            is_causal = True  # the fused kernel
        elif cfg.causal:
            attn_mask = (k_slot[None, None, :] <= q_slot[:, :, None])[:, None]  # (B, 1, L, S)
        if cfg.block_causal and given is None:
            blocks = (k_slot[None, None, :] // cfg.block_causal <= q_slot[:, :, None] // cfg.block_causal)[:, None]
            attn_mask = blocks if attn_mask is None else attn_mask & blocks
        if cfg.sliding_window:
            slots = q_slot if cache_index is not None else q_slot[:1]  # rows share their slots outside a canvas cache
            ahead = slots[:, :, None] - k_slot[None, None, :]  # (B or 1, L, S): how far each key lies before its query
            near = (ahead < cfg.sliding_window if cfg.causal else ahead.abs() < cfg.sliding_window)[:, None]
            attn_mask = near if attn_mask is None else attn_mask & near
        if key_mask is not None:
            # a padding query still sees itself: a row with no visible key would make NaNs that leak
            own = k_slot[None, None, :] == q_slot[:, :, None]
            km = key_mask[:, None, None, :].bool() | own[:, None]
            attn_mask = km if attn_mask is None else attn_mask & km
        return attn_mask, is_causal

    def _check_context(self, span: int | torch.Tensor) -> None:
        """Refuse a forward whose positions span more than ``config.context_len``: ``span`` is the
        number of slots (the AR cache's and the new ones), or the positions (B, L) given."""
        if torch.is_tensor(span):
            span = int(span.max() - span.min()) + 1 if span.numel() else 0
        if span > self.config.context_len:
            raise UnmaskError(
                f"input spanning {span} positions exceeds the model's context_len={self.config.context_len}; "
                f"feed at most {self.config.context_len} consecutive positions"
            )

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

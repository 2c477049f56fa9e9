"""Published checkpoint layouts: how their ``config.json`` and tensor names map onto :class:`ModelConfig`.

Five families share one network (pre-norm RMSNorm blocks, SwiGLU, rotary positions with the
half-split rotation) and differ in names and a few switches:

* ``LlamaForCausalLM``, ``MistralForCausalLM``: ``model.layers.{i}.self_attn.q_proj`` etc.;
  Mistral's sliding window equals full attention within ``context_len = sliding_window``.
* ``Qwen2ForCausalLM``: the same names, biases on q/k/v.
* Dream (``DreamModel``): Qwen2's names and biases, bidirectional, MASK inside the vocabulary
  (``mask_token_id``, 151666), and the AR model's one-position logit shift kept.
* LLaDA (``LLaDAModelLM``, OLMo-style names): ``model.transformer.blocks.{i}.q_proj``,
  ``attn_out``, ``ff_proj`` (the SwiGLU gate), ``up_proj``, ``ff_out`` (down), ``attn_norm``,
  ``ff_norm``; ``model.transformer.wte``/``ln_f``/``ff_out``; bidirectional, MASK 126336.

A folder written by ``unmask export`` carries its exact ModelConfig under ``config["unmask"]``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from unmask.config import ModelConfig
from unmask.errors import UnmaskError

ROLES = ("q", "k", "v", "o", "gate", "up", "down", "attn_norm", "mlp_norm")


@dataclass(frozen=True)
class Layout:
    """Tensor names of one family (``{i}``: the layer), without the ``.weight``/``.bias`` suffix."""

    name: str
    default_as: str  # "ar" or "mdm": what the published model is
    embed: str
    norm: str
    head: str
    layer: dict[str, str]


_HF_LAYER = {
    "q": "model.layers.{i}.self_attn.q_proj",
    "k": "model.layers.{i}.self_attn.k_proj",
    "v": "model.layers.{i}.self_attn.v_proj",
    "o": "model.layers.{i}.self_attn.o_proj",
    "gate": "model.layers.{i}.mlp.gate_proj",
    "up": "model.layers.{i}.mlp.up_proj",
    "down": "model.layers.{i}.mlp.down_proj",
    "attn_norm": "model.layers.{i}.input_layernorm",
    "mlp_norm": "model.layers.{i}.post_attention_layernorm",
}
_LLADA_BLOCK = "model.transformer.blocks.{i}."
_LLADA_LAYER = {
    "q": _LLADA_BLOCK + "q_proj",
    "k": _LLADA_BLOCK + "k_proj",
    "v": _LLADA_BLOCK + "v_proj",
    "o": _LLADA_BLOCK + "attn_out",
    "gate": _LLADA_BLOCK + "ff_proj",
    "up": _LLADA_BLOCK + "up_proj",
    "down": _LLADA_BLOCK + "ff_out",
    "attn_norm": _LLADA_BLOCK + "attn_norm",
    "mlp_norm": _LLADA_BLOCK + "ff_norm",
}


def _hf(name: str, default_as: str) -> Layout:
    return Layout(name, default_as, "model.embed_tokens", "model.norm", "lm_head", _HF_LAYER)


LAYOUTS: dict[str, Layout] = {
    "llama": _hf("llama", "ar"),
    "mistral": _hf("mistral", "ar"),
    "qwen2": _hf("qwen2", "ar"),
    "dream": _hf("dream", "mdm"),
    "llada": Layout("llada", "mdm", "model.transformer.wte", "model.transformer.ln_f", "model.transformer.ff_out", _LLADA_LAYER),
}
_BY_NAME = {
    "llamaforcausallm": "llama",
    "llama": "llama",
    "mistralforcausallm": "mistral",
    "mistral": "mistral",
    "qwen2forcausallm": "qwen2",
    "qwen2": "qwen2",
    "dreammodel": "dream",
    "dream": "dream",
    "lladamodellm": "llada",
    "llada": "llada",
}
LLADA_MASK_ID = 126336
DREAM_MASK_ID = 151666


def detect_layout(config: dict[str, Any], source: str) -> Layout:
    """The layout named by ``architectures`` (or ``model_type``) of a ``config.json``."""
    names = [str(a) for a in config.get("architectures") or []] + [str(config.get("model_type", ""))]
    for name in names:
        if name.lower() in _BY_NAME:
            return LAYOUTS[_BY_NAME[name.lower()]]
    raise UnmaskError(
        f"{source}: architectures={config.get('architectures')} model_type={config.get('model_type')!r} is not a supported layout; "
        "supported: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, LLaDAModelLM (LLaDA), DreamModel (Dream)"
    )


def _need(config: dict[str, Any], key: str, source: str) -> Any:
    if key not in config:
        raise UnmaskError(f"{source}: config.json has no {key!r}, which this layout needs")
    return config[key]


def _refuse(source: str, what: str) -> UnmaskError:
    return UnmaskError(f"{source}: {what} is not supported by unmask's network (it would change the computation); convert without it or open an issue with the checkpoint's config")


def _rope(config: dict[str, Any], source: str) -> dict[str, Any]:
    """RoPE fields of an HF config (``rope_theta``/``rope_scaling``, or the newer ``rope_parameters``)."""
    params = config.get("rope_parameters") or config.get("rope_scaling") or {}
    theta = config.get("rope_theta", params.get("rope_theta", 10000.0))
    kind = params.get("rope_type", params.get("type", "default"))
    out: dict[str, Any] = {"rope_theta": float(theta)}
    if kind in (None, "default"):
        return out
    if kind != "llama3":
        raise _refuse(source, f"rope scaling {kind!r} (only 'llama3' is)")
    return {
        **out,
        "rope_scaling": "llama3",
        "rope_factor": float(params["factor"]),
        "rope_low_freq_factor": float(params["low_freq_factor"]),
        "rope_high_freq_factor": float(params["high_freq_factor"]),
        "rope_original_context": int(params["original_max_position_embeddings"]),
    }


def model_config(layout: Layout, config: dict[str, Any], as_: str, tied: bool, source: str) -> ModelConfig:
    """The :class:`ModelConfig` of a published ``config.json``; ``as_`` "ar" (causal) or "mdm"; ``tied``:
    whether the checkpoint's head is its embedding (a fallback when the config does not say)."""
    if as_ not in ("ar", "mdm"):
        raise UnmaskError(f"--as {as_!r} is not one of: ar, mdm")
    if layout.default_as == "mdm" and as_ == "ar":
        raise UnmaskError(f"--as ar: a {layout.name} checkpoint is a masked diffusion model; import it with --as mdm")
    if isinstance(config.get("unmask"), dict) and "model" in config["unmask"]:  # written by `unmask export`
        saved = ModelConfig.from_dict(config["unmask"]["model"])
        if saved.causal != (as_ == "ar"):
            saved = dataclasses.replace(saved, causal=as_ == "ar", shift_logits=False, time_conditioning=False)
        return saved
    if layout.name == "llada":
        return _llada_config(config, as_, source)
    return _hf_config(layout, config, as_, tied, source)


def _hf_config(layout: Layout, config: dict[str, Any], as_: str, tied: bool, source: str) -> ModelConfig:
    d = int(_need(config, "hidden_size", source))
    heads = int(_need(config, "num_attention_heads", source))
    head_dim = config.get("head_dim")
    if head_dim is not None and int(head_dim) * heads != d:
        raise _refuse(source, f"head_dim={head_dim} with hidden_size={d} and {heads} heads (head_dim must be hidden_size / heads)")
    if config.get("hidden_act", "silu") != "silu":
        raise _refuse(source, f"hidden_act={config.get('hidden_act')!r} (SwiGLU with silu is)")
    if config.get("mlp_bias"):
        raise _refuse(source, "mlp_bias (biases in the MLP)")
    # LLaMA's attention_bias also puts a bias on the output projection: imported only when it is zero
    context = int(config.get("max_position_embeddings", 2048))
    window = config.get("sliding_window")
    if window and (layout.name == "mistral" or config.get("use_sliding_window")):
        context = min(context, int(window))  # within the window, sliding-window attention is full attention
    mdm = as_ == "mdm"
    return ModelConfig(
        name=f"{layout.name}-import",
        vocab_size=int(_need(config, "vocab_size", source)),
        context_len=context,
        n_layer=int(_need(config, "num_hidden_layers", source)),
        n_head=heads,
        n_embd=d,
        intermediate=int(_need(config, "intermediate_size", source)),
        causal=not mdm,
        norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        n_kv_head=int(config.get("num_key_value_heads") or heads),
        qkv_bias=layout.name in ("qwen2", "dream") or bool(config.get("attention_bias")),
        tie_embeddings=bool(config.get("tie_word_embeddings", tied)),
        mask_token_id=int(config.get("mask_token_id", DREAM_MASK_ID)) if layout.name == "dream" else -1,
        shift_logits=layout.name == "dream",
        **_rope(config, source),
    )


def _llada_config(config: dict[str, Any], as_: str, source: str) -> ModelConfig:
    checks = {
        "block_type": ("llama", None),
        "layer_norm_type": ("rms", None),
        "activation_type": ("silu", "swiglu", None),
        "rope": (True, None),
        "alibi": (False, None),
        "scale_logits": (False, None),
        "input_emb_norm": (False, None),
        "attention_layer_norm": (False, None),
        "include_bias": (False, None),
        "clip_qkv": (None,),
    }
    for key, allowed in checks.items():
        if config.get(key) not in allowed:
            raise _refuse(source, f"{key}={config.get(key)!r}")
    d = int(_need(config, "d_model", source))
    heads = int(_need(config, "n_heads", source))
    ffn = config.get("mlp_hidden_size") or int(config.get("mlp_ratio", 4)) * d
    return ModelConfig(
        name="llada-import",
        vocab_size=int(config.get("embedding_size") or _need(config, "vocab_size", source)),
        context_len=int(config.get("max_sequence_length", 4096)),
        n_layer=int(_need(config, "n_layers", source)),
        n_head=heads,
        n_embd=d,
        intermediate=int(ffn),
        causal=False,
        norm_eps=float(config.get("rms_norm_eps", 1e-5)),
        rope_theta=float(config.get("rope_theta", 10000.0)),
        n_kv_head=int(config.get("n_kv_heads") or heads),
        qkv_bias=bool(config.get("include_qkv_bias", False)),
        tie_embeddings=bool(config.get("weight_tying", False)),
        mask_token_id=int(config.get("mask_token_id", LLADA_MASK_ID)),
    )

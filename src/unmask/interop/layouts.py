"""Published checkpoint layouts: how their ``config.json`` and tensor names map onto :class:`ModelConfig`.

Five families share one network (pre-norm RMSNorm blocks, SwiGLU, rotary positions with the
half-split rotation) and differ in names and a few switches:

* ``LlamaForCausalLM``, ``MistralForCausalLM``: ``model.layers.{i}.self_attn.q_proj`` etc.;
  Mistral's ``sliding_window`` becomes ``ModelConfig.sliding_window`` (the context stays
  ``max_position_embeddings``).
* ``Qwen2ForCausalLM``: the same names, biases on q/k/v; a window when ``use_sliding_window``
  puts every layer in it (``layer_types``, or ``max_window_layers`` 0); a mix is refused.
* Dream (``DreamModel``): Qwen2's names and biases, bidirectional, MASK inside the vocabulary
  (``mask_token_id``, 151666), and the AR model's one-position logit shift kept.
* LLaDA (``LLaDAModelLM``, OLMo-style names): ``model.transformer.blocks.{i}.q_proj``,
  ``attn_out``, ``ff_proj`` (the SwiGLU gate), ``up_proj``, ``ff_out`` (down), ``attn_norm``,
  ``ff_norm``; ``model.transformer.wte``/``ln_f``/``ff_out``; bidirectional, MASK 126336.

A folder written by ``unmask export`` carries its exact ModelConfig under ``config["unmask"]``
(an MDM as ``model_type`` ``unmask_mdm``, the LLaMA names, with its own modeling code).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from unmask.config import ModelConfig
from unmask.errors import OptionError, UnmaskError, not_one_of

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
# how `unmask export` publishes an MDM: a model type transformers does not know without the folder's code
MDM_MODEL_TYPE = "unmask_mdm"
MDM_ARCHITECTURE = "UnmaskForMaskedDiffusion"
_BY_NAME |= {MDM_MODEL_TYPE: "llama", MDM_ARCHITECTURE.lower(): "llama"}
_WINDOWED = ("mistral", "qwen2", "dream")  # layouts whose configs may name a sliding window
_REQUIRED: Any = object()


def detect_layout(config: dict[str, Any], source: str) -> Layout:
    """The layout named by ``architectures`` (or ``model_type``) of a ``config.json``."""
    archs = config.get("architectures") or []
    names = [str(a) for a in (archs if isinstance(archs, list) else [archs])] + [str(config.get("model_type", ""))]
    for name in names:
        if name.lower() in _BY_NAME:
            return LAYOUTS[_BY_NAME[name.lower()]]
    raise UnmaskError(
        f"{source}: architectures={config.get('architectures')} model_type={config.get('model_type')!r} is not a supported layout; "
        "supported: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, LLaDAModelLM (LLaDA), DreamModel (Dream)"
    )


def _number(config: dict[str, Any], key: str, kind: type, source: str, default: Any = _REQUIRED) -> Any:
    """``config[key]`` as ``kind`` (int or float); ``default`` when the key is absent, or null when
    ``default`` is None; anything else that is not such a number is an error naming the field."""
    value = config.get(key)
    if key not in config or (value is None and default is None):
        if default is _REQUIRED:
            raise UnmaskError(f"{source}: config.json has no {key!r}, which this layout needs")
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not float(value).is_integer()):
        raise UnmaskError(f"{source}: {key}={value!r} must be {'an integer' if kind is int else 'a number'}")
    return kind(value)


def _dict(config: dict[str, Any], key: str, source: str) -> dict[str, Any]:
    value = config.get(key) or {}
    if not isinstance(value, dict):
        raise UnmaskError(f"{source}: {key}={value!r} must be an object (or null)")
    return value


def _refuse(source: str, what: str) -> UnmaskError:
    return UnmaskError(f"{source}: {what} is not supported by unmask's network (it would change the computation); convert without it or open an issue with the checkpoint's config")


def _rope(config: dict[str, Any], source: str) -> dict[str, Any]:
    """RoPE fields of an HF config (``rope_theta``/``rope_scaling``, or the newer ``rope_parameters``)."""
    key = "rope_parameters" if config.get("rope_parameters") else "rope_scaling"
    params = _dict(config, key, source)
    where = f"{source} {key}"
    holder, named_in = (config, source) if "rope_theta" in config else (params, where)  # a null top-level one is refused
    theta = _number(holder, "rope_theta", float, named_in, 10000.0)
    kind = params.get("rope_type", params.get("type", "default"))
    out: dict[str, Any] = {"rope_theta": theta}
    if kind in (None, "default"):
        return out
    if kind != "llama3":
        raise _refuse(source, f"rope scaling {kind!r} (only 'llama3' is)")
    return {
        **out,
        "rope_scaling": "llama3",
        "rope_factor": _number(params, "factor", float, where),
        "rope_low_freq_factor": _number(params, "low_freq_factor", float, where),
        "rope_high_freq_factor": _number(params, "high_freq_factor", float, where),
        "rope_original_context": _number(params, "original_max_position_embeddings", int, where),
    }


def _sliding_window(layout: Layout, config: dict[str, Any], n_layer: int, source: str) -> int:
    """The attention window of every layer (0: none); a model mixing full and windowed layers is refused."""
    if layout.name not in _WINDOWED:
        return 0
    window = _number(config, "sliding_window", int, source, None)
    named, kinds = "layer_types", config.get("layer_types")
    if kinds is None and layout.name == "mistral":
        kinds = ["sliding_attention"] * n_layer
    elif kinds is None and config.get("use_sliding_window"):  # Qwen2: layers from max_window_layers on
        named, first = "max_window_layers", _number(config, "max_window_layers", int, source, 0)
        kinds = ["full_attention" if i < first else "sliding_attention" for i in range(n_layer)]
    elif kinds is None:
        return 0
    if not isinstance(kinds, list) or not all(k in ("full_attention", "sliding_attention") for k in kinds):
        raise _refuse(source, f"layer_types={kinds!r} (only full_attention and sliding_attention layers are)")
    if window is None or "sliding_attention" not in kinds:
        return 0
    if "full_attention" in kinds:
        raise _refuse(source, f"{named}={config.get(named)!r} (layers of full attention mixed with layers of a {window}-token window)")
    return window


def model_config(layout: Layout, config: dict[str, Any], as_: str, tied: bool, source: str) -> ModelConfig:
    """The :class:`ModelConfig` of a published ``config.json``; ``as_`` "ar" (causal) or "mdm"; ``tied``:
    whether the checkpoint's head is its embedding (a fallback when the config does not say)."""
    if as_ not in ("ar", "mdm"):
        raise not_one_of("as_", as_, "ar, mdm")
    if layout.default_as == "mdm" and as_ == "ar":
        raise OptionError("as_", "{as_} ar: a {_layout} checkpoint is a masked diffusion model; import it with {as_} mdm", _layout=layout.name)
    if isinstance(config.get("unmask"), dict) and "model" in config["unmask"]:  # written by `unmask export`
        saved = ModelConfig.from_dict(config["unmask"]["model"])
        if saved.causal != (as_ == "ar"):
            saved = dataclasses.replace(saved, causal=as_ == "ar", shift_logits=False, time_conditioning=False)
        return saved
    if layout.name == "llada":
        return _llada_config(config, as_, source)
    return _hf_config(layout, config, as_, tied, source)


def _hf_config(layout: Layout, config: dict[str, Any], as_: str, tied: bool, source: str) -> ModelConfig:
    d = _number(config, "hidden_size", int, source)
    heads = _number(config, "num_attention_heads", int, source)
    head_dim = _number(config, "head_dim", int, source, None)
    if head_dim is not None and head_dim * heads != d:
        raise _refuse(source, f"head_dim={head_dim} with hidden_size={d} and {heads} heads (head_dim must be hidden_size / heads)")
    if config.get("hidden_act", "silu") != "silu":
        raise _refuse(source, f"hidden_act={config.get('hidden_act')!r} (SwiGLU with silu is)")
    if config.get("mlp_bias"):
        raise _refuse(source, "mlp_bias (biases in the MLP)")
    # LLaMA's attention_bias also puts a bias on the output projection: imported only when it is zero
    n_layer = _number(config, "num_hidden_layers", int, source)
    mdm = as_ == "mdm"
    return ModelConfig(
        name=f"{layout.name}-import",
        vocab_size=_number(config, "vocab_size", int, source),
        context_len=_number(config, "max_position_embeddings", int, source, 2048),
        n_layer=n_layer,
        n_head=heads,
        n_embd=d,
        intermediate=_number(config, "intermediate_size", int, source),
        causal=not mdm,
        norm_eps=_number(config, "rms_norm_eps", float, source, 1e-6),
        n_kv_head=_number(config, "num_key_value_heads", int, source, None) or heads,
        qkv_bias=layout.name in ("qwen2", "dream") or bool(config.get("attention_bias")),
        tie_embeddings=bool(config.get("tie_word_embeddings", tied)),
        mask_token_id=_number(config, "mask_token_id", int, source, DREAM_MASK_ID) if layout.name == "dream" else -1,
        shift_logits=layout.name == "dream",
        sliding_window=_sliding_window(layout, config, n_layer, source),
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
    d = _number(config, "d_model", int, source)
    heads = _number(config, "n_heads", int, source)
    ffn = _number(config, "mlp_hidden_size", int, source, None) or _number(config, "mlp_ratio", int, source, 4) * d
    return ModelConfig(
        name="llada-import",
        vocab_size=_number(config, "embedding_size", int, source, None) or _number(config, "vocab_size", int, source),
        context_len=_number(config, "max_sequence_length", int, source, 4096),
        n_layer=_number(config, "n_layers", int, source),
        n_head=heads,
        n_embd=d,
        intermediate=ffn,
        causal=False,
        norm_eps=_number(config, "rms_norm_eps", float, source, 1e-5),
        rope_theta=_number(config, "rope_theta", float, source, 10000.0),
        n_kv_head=_number(config, "n_kv_heads", int, source, None) or heads,
        qkv_bias=bool(config.get("include_qkv_bias", False)),
        tie_embeddings=bool(config.get("weight_tying", False)),
        mask_token_id=_number(config, "mask_token_id", int, source, LLADA_MASK_ID),
    )

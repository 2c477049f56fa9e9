"""Export a run as a LLaMA-layout folder that ``transformers`` loads.

The folder holds ``config.json``, ``model.safetensors``, ``tokenizer.json`` with
``tokenizer_config.json`` and ``special_tokens_map.json`` (EOS, padding, an MDM's MASK) and
``generation_config.json`` (``generate()`` stops at EOS). An AR run becomes a ``LlamaForCausalLM``
(with a sliding window: ``MistralForCausalLM``, or ``Qwen2ForCausalLM`` with q/k/v biases) that
``transformers`` loads natively with the same logits. An MDM is published as LLaDA and Dream are,
with its own code: ``model_type`` ``unmask_mdm``, which ``transformers`` loads only with
``trust_remote_code=True`` (``modeling_unmask.py``, a bidirectional LLaMA), never as a causal
model. Its MASK, when an extra input row, gets row ``vocab_size`` of the embedding and a zero head
row (the layout needs equal sizes). ``config.json`` also records the exact ModelConfig under
``"unmask"``, so ``unmask import`` of the folder restores the run exactly.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Iterator

import torch

from unmask.checkpoint import checkpoint_tokenizer, resolve_checkpoint
from unmask.config import ModelConfig, RunConfig
from unmask.data.tokenizer import Tokenizer
from unmask.errors import OptionError, UnmaskError
from unmask.interop.hf_import import _progress, requested_dtype
from unmask.interop.layouts import MDM_ARCHITECTURE, MDM_MODEL_TYPE
from unmask.interop.staging import staged
from unmask.interop.tensors import DTYPE_NAMES, TensorReader, write_streaming

_TORCH_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
MODELING = Path(__file__).with_name("modeling_unmask.py")  # an MDM's code, copied into its folder


def is_mdm(cfg: ModelConfig) -> bool:
    """Whether the network is published as an MDM: any network that is not causal (bidirectional, or
    block-causal), whatever objective trained it."""
    return not cfg.causal


def architecture(cfg: ModelConfig) -> tuple[str, str]:
    """(class, model_type) that ``transformers`` runs the network as."""
    if is_mdm(cfg):
        return MDM_ARCHITECTURE, MDM_MODEL_TYPE
    if not cfg.sliding_window:
        return "LlamaForCausalLM", "llama"
    return ("Qwen2ForCausalLM", "qwen2") if cfg.qkv_bias else ("MistralForCausalLM", "mistral")


def _output_bias(cfg: ModelConfig) -> bool:
    """LLaMA's ``attention_bias`` also biases the output projection: written as zeros (Qwen2 has none)."""
    return cfg.qkv_bias and architecture(cfg)[1] != "qwen2"


def _window_fields(cfg: ModelConfig) -> dict:
    kind = architecture(cfg)[1]
    if kind == "qwen2":  # every layer windowed
        return {"use_sliding_window": True, "sliding_window": cfg.sliding_window, "max_window_layers": 0}
    if kind in ("mistral", MDM_MODEL_TYPE):
        return {"sliding_window": cfg.sliding_window or None}
    return {}


def hf_config(cfg: ModelConfig, dtype: torch.dtype, eos_id: int, pad_id: int) -> dict:
    """The ``config.json`` of a model (see :func:`architecture`); an MDM (:func:`is_mdm`) records
    ``"objective": "mdm"``, which ``unmask import`` reads back, a causal model ``"ar"``."""
    mdm = is_mdm(cfg)
    cls, kind = architecture(cfg)
    out = {
        "architectures": [cls],
        "model_type": kind,
        "vocab_size": cfg.embed_rows if mdm else cfg.vocab_size,
        "hidden_size": cfg.n_embd,
        "intermediate_size": cfg.ffn_dim,
        "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.context_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "attention_bias": cfg.qkv_bias,  # LLaMA's flag also adds an output bias: exported as zeros
        "mlp_bias": False,
        "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": cfg.init_std,
        "bos_token_id": eos_id,  # unmask starts a text after EOS
        "eos_token_id": eos_id,
        "pad_token_id": pad_id,
        "torch_dtype": _TORCH_NAMES[dtype],
        "use_cache": not mdm,
        **_window_fields(cfg),
    }
    if cfg.rope_scaling == "llama3":
        out["rope_scaling"] = {
            "rope_type": "llama3",
            "factor": cfg.rope_factor,
            "low_freq_factor": cfg.rope_low_freq_factor,
            "high_freq_factor": cfg.rope_high_freq_factor,
            "original_max_position_embeddings": cfg.rope_original_context,
        }
    if mdm:
        module = MODELING.stem
        out["auto_map"] = {
            "AutoConfig": f"{module}.UnmaskConfig",
            "AutoModel": f"{module}.{MDM_ARCHITECTURE}",
            "AutoModelForMaskedLM": f"{module}.{MDM_ARCHITECTURE}",
        }
        out |= {"mask_token_id": cfg.mask_id, "shift_logits": cfg.shift_logits}
    out["unmask"] = {
        "objective": "mdm" if mdm else "ar",
        "bidirectional": not cfg.causal,
        "mask_token_id": cfg.mask_id if mdm else None,
        "shift_logits": cfg.shift_logits,
        "model": cfg.to_dict(),
        "load_with": "unmask import THIS_FOLDER --out RUN, or transformers "
        + ("AutoModel.from_pretrained(THIS_FOLDER, trust_remote_code=True) (bidirectional)" if mdm else "AutoModelForCausalLM"),
    }
    return out


def tokenizer_files(tok: Tokenizer, context: int, mdm: bool) -> dict[str, dict]:
    """``tokenizer_config.json``, ``special_tokens_map.json`` and ``generation_config.json``: the
    special tokens ``transformers`` reads (EOS, padding, an MDM's MASK) and that ``generate()`` stops at EOS."""
    special = {"bos_token": tok.hf.id_to_token(tok.eos_id), "eos_token": tok.hf.id_to_token(tok.eos_id), "pad_token": tok.hf.id_to_token(tok.pad_id)}
    if mdm:
        special["mask_token"] = tok.hf.id_to_token(tok.mask_id)
    return {
        "tokenizer_config.json": {"tokenizer_class": "PreTrainedTokenizerFast", **special, "model_max_length": context, "clean_up_tokenization_spaces": False},
        "special_tokens_map.json": special,
        "generation_config.json": {"bos_token_id": tok.eos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id},
    }


def _tensors(cfg: ModelConfig, reader: TensorReader, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of the LLaMA layout, in file order, one layer at a time."""
    mdm = is_mdm(cfg)
    q_rows, kv_rows, f = cfg.n_head * cfg.head_dim, cfg.kv_heads * cfg.head_dim, cfg.ffn_dim

    def get(name: str) -> torch.Tensor:
        return reader.get(name).to(dtype)

    embed = get("embed.weight")
    yield "model.embed_tokens.weight", embed if mdm else embed[: cfg.vocab_size].contiguous()
    del embed
    for i in range(cfg.n_layer):
        p, o = f"blocks.{i}.", f"model.layers.{i}."
        yield o + "input_layernorm.weight", get(p + "attn_norm.weight")
        qkv = get(p + "attn.qkv.weight")
        for name, part in zip("qkv", qkv.split([q_rows, kv_rows, kv_rows])):
            yield o + f"self_attn.{name}_proj.weight", part.contiguous()
        if cfg.qkv_bias:
            bias = get(p + "attn.qkv.bias")
            for name, part in zip("qkv", bias.split([q_rows, kv_rows, kv_rows])):
                yield o + f"self_attn.{name}_proj.bias", part.contiguous()
        yield o + "self_attn.o_proj.weight", get(p + "attn.proj.weight")
        if _output_bias(cfg):
            yield o + "self_attn.o_proj.bias", torch.zeros(cfg.n_embd, dtype=dtype)
        yield o + "post_attention_layernorm.weight", get(p + "mlp_norm.weight")
        gate, up = get(p + "mlp.gate_up.weight").split([f, f])
        yield o + "mlp.gate_proj.weight", gate.contiguous()
        yield o + "mlp.up_proj.weight", up.contiguous()
        yield o + "mlp.down_proj.weight", get(p + "mlp.down.weight")
    yield "model.norm.weight", get("norm.weight")
    if not cfg.tie_embeddings:
        head = get("head.weight")
        if mdm and cfg.embed_rows > cfg.vocab_size:  # a zero row for the extra MASK id
            head = torch.cat([head, torch.zeros(1, cfg.n_embd, dtype=dtype)])
        yield "lm_head.weight", head


def _specs(cfg: ModelConfig, dtype: torch.dtype) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    d, f, hd = cfg.n_embd, cfg.ffn_dim, cfg.head_dim
    rows = cfg.embed_rows if is_mdm(cfg) else cfg.vocab_size
    specs = [("model.embed_tokens.weight", (rows, d))]
    for i in range(cfg.n_layer):
        o = f"model.layers.{i}."
        specs += [(o + "input_layernorm.weight", (d,))]
        specs += [(o + f"self_attn.{n}_proj.weight", (h * hd, d)) for n, h in (("q", cfg.n_head), ("k", cfg.kv_heads), ("v", cfg.kv_heads))]
        if cfg.qkv_bias:
            specs += [(o + f"self_attn.{n}_proj.bias", (h * hd,)) for n, h in (("q", cfg.n_head), ("k", cfg.kv_heads), ("v", cfg.kv_heads))]
        specs += [(o + "self_attn.o_proj.weight", (d, d))]
        if _output_bias(cfg):
            specs += [(o + "self_attn.o_proj.bias", (d,))]
        specs += [(o + "post_attention_layernorm.weight", (d,)), (o + "mlp.gate_proj.weight", (f, d)), (o + "mlp.up_proj.weight", (f, d))]
        specs += [(o + "mlp.down_proj.weight", (d, f))]
    specs += [("model.norm.weight", (d,))]
    if not cfg.tie_embeddings:
        specs += [("lm_head.weight", (rows, d))]
    return [(name, dtype, shape) for name, shape in specs]


def export_run(run: str | Path, out: str | Path, dtype: str | None = None) -> Path:
    """Write the run (or checkpoint) folder ``run`` as a LLaMA-layout folder ``out``. Returns ``out``."""
    from safetensors import safe_open

    ckpt = resolve_checkpoint(run)
    out = Path(out)
    if out.is_dir() and any(out.iterdir()):
        raise OptionError("out", "{out} {_out} exists and is not empty; choose a new folder", _out=out)
    requested = requested_dtype(dtype, "the run's")
    with safe_open(str(ckpt / "model.safetensors"), framework="pt") as f:
        run_cfg = RunConfig.from_dict(json.loads((f.metadata() or {})["config"]))
    cfg = run_cfg.model
    if cfg.noise == "uniform":
        raise UnmaskError(f"{ckpt}: a uniform-state network ({run_cfg.train.objective}) has no Hugging Face layout: its tokens are "
                          "corrupted by other tokens rather than MASK and it needs the time t, which the exported MDM layout "
                          "(bidirectional LLaMA with a MASK token) cannot express; sample and score it with unmask itself")
    if cfg.time_conditioning:
        raise UnmaskError(f"{ckpt}: a time-conditioned network has no LLaMA layout; export a time-agnostic run (the default)")
    if cfg.block_causal:
        raise UnmaskError(f"{ckpt}: a block-causal network has no LLaMA layout")
    if cfg.positions != "rope":
        raise UnmaskError(f"{ckpt}: a network with learned absolute positions has no LLaMA layout (rotary positions only)")
    reader = TensorReader(ckpt, files=["model.safetensors"])
    cast = requested or reader.dtype("norm.weight")
    if cast not in DTYPE_NAMES:
        raise UnmaskError(f"{ckpt}: weights of dtype {cast} cannot be exported")
    mdm = is_mdm(cfg)
    tok = checkpoint_tokenizer(ckpt)

    specs = _specs(cfg, cast)
    files = {"config.json": hf_config(cfg, cast, tok.eos_id, tok.pad_id), **tokenizer_files(tok, cfg.context_len, mdm)}
    with staged(out) as tmp:  # a failed export leaves --out as it was
        write_streaming(tmp / "model.safetensors", specs, _progress(_tensors(cfg, reader, cast), len(specs), "export"), {"format": "pt"})
        for name, content in files.items():
            (tmp / name).write_text(json.dumps(content, indent=2) + "\n", encoding="utf-8")
        (tmp / "tokenizer.json").write_text(tok.to_json(), encoding="utf-8")
        if mdm:
            shutil.copyfile(MODELING, tmp / MODELING.name)
    return out

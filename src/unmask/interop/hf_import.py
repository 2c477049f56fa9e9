"""Import a published checkpoint folder (``config.json`` + ``*.safetensors`` + ``tokenizer.json``) as a run folder.

Nothing is downloaded: the folder is read locally. Tensors are converted one at a time (q/k/v
fused into our ``qkv``, gate/up into ``gate_up``) and streamed into the run's
``model.safetensors``, so a 7-8B checkpoint converts without two copies in memory.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Iterator

import torch

from unmask.checkpoint import TrainerState, save_checkpoint, write_text_atomic
from unmask.config import ModelConfig, RunConfig, TrainConfig
from unmask.data.tokenizer import MASK, MASK_NAMES, Tokenizer, read_tokenizer_json
from unmask.errors import OptionError, UnmaskError
from unmask.interop.layouts import Layout, detect_layout, model_config
from unmask.interop.staging import staged
from unmask.interop.tensors import TensorReader, write_streaming

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def requested_dtype(dtype: str | None, keeps: str) -> torch.dtype | None:
    """The torch dtype named ``dtype`` (one of :data:`DTYPES`), or None when it is not given (the
    conversion keeps ``keeps``' own, e.g. "the checkpoint's")."""
    if dtype is None:
        return None
    if dtype not in DTYPES:
        raise OptionError("dtype", "{dtype} {_dtype!r} is not one of: {_names} (or leave it out to keep {_keeps})", _dtype=dtype,
                          _names=", ".join(DTYPES), _keeps=keeps)
    return DTYPES[dtype]
RESERVED = "<|unmask_reserved_{}|>"  # fills tokenizer ids the model has but the tokenizer lacks
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # buffers some older checkpoints saved


def read_config(folder: Path) -> dict:
    file = folder / "config.json"
    if not file.is_file():
        raise UnmaskError(f"{folder} has no config.json; pass a folder saved with save_pretrained (config.json + *.safetensors)")
    try:
        config = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UnmaskError(f"cannot read {file}: {exc}") from None
    if not isinstance(config, dict):
        raise UnmaskError(f"{file}: config.json must be a JSON object ({{\"architectures\": [...], ...}}), got {json.dumps(config)[:60]}")
    return config


def _meta_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the Transformer's state dict, without allocating it."""
    from unmask.model import Transformer

    with torch.device("meta"):
        model = Transformer(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


class Conversion:
    """One checkpoint folder seen as our state dict: ``specs`` and a generator of tensors in that order."""

    def __init__(self, folder: str | Path, as_: str | None = None, dtype: str | None = None) -> None:
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise UnmaskError(f"checkpoint folder {str(folder)!r} does not exist")
        self.cast = requested_dtype(dtype, "the checkpoint's")
        self.hf_config = read_config(self.folder)
        self.layout: Layout = detect_layout(self.hf_config, str(self.folder / "config.json"))
        self.reader = TensorReader(self.folder)
        tied = self.layout.head + ".weight" not in self.reader
        saved = self.hf_config.get("unmask") if isinstance(self.hf_config.get("unmask"), dict) else {}
        default_as = saved.get("objective") or self.layout.default_as  # a folder from `unmask export` says what it is
        self.config = model_config(self.layout, self.hf_config, as_ or default_as, tied, str(self.folder / "config.json"))
        self.recipes = self._recipes()
        self.shapes = _meta_shapes(self.config)
        self._check_keys()

    # each of our tensors: (source keys, how to combine them)
    def _recipes(self) -> dict[str, tuple[list[str], Callable[[list[torch.Tensor]], torch.Tensor]]]:
        cfg, lay = self.config, self.layout
        one = lambda ts: ts[0]  # noqa: E731
        cat = lambda ts: torch.cat(ts, dim=0)  # noqa: E731
        out: dict = {"embed.weight": ([lay.embed + ".weight"], self._embed)}
        for i in range(cfg.n_layer):
            key = {role: name.format(i=i) for role, name in lay.layer.items()}
            out[f"blocks.{i}.attn_norm.weight"] = ([key["attn_norm"] + ".weight"], one)
            out[f"blocks.{i}.attn.qkv.weight"] = ([key[r] + ".weight" for r in ("q", "k", "v")], cat)
            if cfg.qkv_bias:
                out[f"blocks.{i}.attn.qkv.bias"] = ([key[r] + ".bias" for r in ("q", "k", "v")], cat)
            out[f"blocks.{i}.attn.proj.weight"] = ([key["o"] + ".weight"], one)
            out[f"blocks.{i}.mlp_norm.weight"] = ([key["mlp_norm"] + ".weight"], one)
            out[f"blocks.{i}.mlp.gate_up.weight"] = ([key["gate"] + ".weight", key["up"] + ".weight"], cat)
            out[f"blocks.{i}.mlp.down.weight"] = ([key["down"] + ".weight"], one)
        out["norm.weight"] = ([lay.norm + ".weight"], one)
        if not cfg.tie_embeddings:
            out["head.weight"] = ([lay.head + ".weight"], self._head)
        return out

    def _embed(self, ts: list[torch.Tensor]) -> torch.Tensor:
        (w,) = ts
        rows = self.config.embed_rows
        if w.shape[0] == rows:
            return w
        if w.shape[0] == rows - 1:  # MASK outside the vocabulary: a new row, the mean embedding
            return torch.cat([w, w.float().mean(0, keepdim=True).to(w.dtype)])
        raise UnmaskError(f"{self.folder}: embedding has {w.shape[0]} rows; the config's vocab_size={self.config.vocab_size} needs {rows - 1} or {rows}")

    def _head(self, ts: list[torch.Tensor]) -> torch.Tensor:
        (w,) = ts
        # an exported MDM's head has a zero row for its MASK id (the LLaMA layout needs equal sizes)
        return w[: self.config.vocab_size] if "unmask" in self.hf_config else w

    def _check_keys(self) -> None:
        used = {k for keys, _ in self.recipes.values() for k in keys}
        missing = sorted(k for k in used if k not in self.reader)
        if missing:
            raise UnmaskError(f"{self.folder}: the {self.layout.name} layout needs tensors the checkpoint lacks: {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        if self.config.tie_embeddings:
            used.add(self.layout.head + ".weight")  # a tied head saved anyway is the embedding
        if self.config.qkv_bias:  # an output-projection bias (LLaMA's attention_bias) is accepted only when zero
            for i in range(self.config.n_layer):
                key = self.layout.layer["o"].format(i=i) + ".bias"
                if key in self.reader:
                    if self.reader.get(key).any():
                        raise UnmaskError(f"{self.folder}: {key} is not zero; an output-projection bias is not part of unmask's network")
                    used.add(key)
        unexpected = sorted(k for k in self.reader.keys() if k not in used and not k.endswith(_IGNORED_SUFFIXES))
        if unexpected:
            raise UnmaskError(f"{self.folder}: tensors the {self.layout.name} layout does not use (a different architecture?): {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
        for name, (keys, _) in self.recipes.items():
            want = self.shapes[name]
            got = [self.reader.shape(k) for k in keys]
            rows = sum(s[0] for s in got)
            if name == "embed.weight":
                ok = got[0][1:] == want[1:] and rows in (want[0], want[0] - 1)
            elif name == "head.weight" and "unmask" in self.hf_config:
                ok = got[0][1:] == want[1:] and rows >= want[0]
            else:
                ok = all(s[1:] == want[1:] for s in got) and rows == want[0]
            if not ok:
                raise UnmaskError(f"{self.folder}: {keys} have shapes {got}, but the config implies {want} for our {name}; config.json and the weights disagree")
        if set(self.shapes) != set(self.recipes):
            raise UnmaskError(f"internal: no recipe for {sorted(set(self.shapes) - set(self.recipes))}")

    def dtype_of(self, name: str) -> torch.dtype:
        return self.cast or self.reader.dtype(self.recipes[name][0][0])

    def specs(self) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
        return [(name, self.dtype_of(name), self.shapes[name]) for name in self.shapes]

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Our tensors in state-dict order, each built from its sources and dropped before the next."""
        for name in self.shapes:
            keys, combine = self.recipes[name]
            yield name, combine([self.reader.get(k) for k in keys]).to(self.dtype_of(name)).contiguous()

    def tokenizer(self, path: str | Path | None = None) -> Tokenizer:
        """The checkpoint's ``tokenizer.json`` (or ``path``), with ids padded to the model's vocabulary and MASK mapped."""
        def missing(file: Path) -> UnmaskError:
            return OptionError("tokenizer", "{_file} not found: the checkpoint's tokenizer must come along (pass {tokenizer} "
                               "PATH/tokenizer.json)", _file=file)

        hf, file = read_tokenizer_json(path if path is not None else self.folder, missing)
        cfg = self.config
        total = hf.get_vocab_size(with_added_tokens=True)
        has_mask = next((hf.token_to_id(n) for n in MASK_NAMES if hf.token_to_id(n) is not None), None)

        def pad_to(n: int) -> None:
            have = hf.get_vocab_size(with_added_tokens=True)
            if n > have:
                hf.add_special_tokens([RESERVED.format(i) for i in range(have, n)])

        if cfg.mask_token_id >= 0:
            if has_mask is None:
                if total > cfg.mask_id:
                    raise UnmaskError(f"{file}: id {cfg.mask_id} (the model's MASK) is {hf.id_to_token(cfg.mask_id)!r}, not a mask token ({', '.join(MASK_NAMES)})")
                pad_to(cfg.mask_id)
                hf.add_special_tokens([MASK])
            pad_to(cfg.vocab_size)
        elif has_mask is None:
            if total > cfg.vocab_size:
                raise UnmaskError(f"{file} has {total} ids, more than the model's vocab_size={cfg.vocab_size}")
            pad_to(cfg.vocab_size)  # Tokenizer then appends MASK at vocab_size
        tok = Tokenizer(hf, str(file))
        if tok.mask_id != cfg.mask_id or tok.vocab_size != cfg.vocab_size:
            raise UnmaskError(
                f"{file}: MASK id {tok.mask_id} / {tok.vocab_size} ids, but the model has MASK {cfg.mask_id} and vocab_size {cfg.vocab_size}"
            )
        return tok

    def state_dict(self) -> dict[str, torch.Tensor]:
        """All tensors in memory (for small models and ``--init-from``)."""
        return dict(self.tensors())


def import_checkpoint(
    folder: str | Path, out: str | Path, as_: str | None = None, dtype: str | None = None, tokenizer: str | Path | None = None
) -> tuple[Path, RunConfig]:
    """Convert ``folder`` into the run folder ``out`` (one checkpoint, step 0). Returns (checkpoint dir, config).

    ``as_``: "ar" (causal) or "mdm"; default what the checkpoint is (LLaMA/Qwen2/Mistral: ar,
    LLaDA/Dream: mdm). ``dtype``: float32/bfloat16/float16, default the checkpoint's own.
    """
    out = Path(out)
    if (out / "checkpoints").exists():
        raise OptionError("out", "{out} {_out} already holds a run; choose a new folder", _out=out)
    conv = Conversion(folder, as_, dtype)
    tok = conv.tokenizer(tokenizer)
    objective = "ar" if conv.config.causal else "mdm"
    run = RunConfig(model=conv.config, train=TrainConfig(objective=objective), data_dir="", tokenizer_fingerprint=tok.fingerprint)
    with staged(out) as tmp:  # a failed import leaves --out as it was
        write_text_atomic(tmp / "config.json", json.dumps(run.to_dict(), indent=2) + "\n")
        specs = conv.specs()

        def write(file: Path, metadata: dict[str, str]) -> None:
            write_streaming(file, specs, _progress(conv.tensors(), len(specs), f"import {conv.layout.name}"), metadata)

        ckpt = save_checkpoint(tmp, None, run, TrainerState(step=0, tokens=0), tok.to_json(), write_weights=write)
    return out / ckpt.relative_to(tmp), run


def _progress(items: Iterator, total: int, desc: str) -> Iterator:
    from tqdm import tqdm

    return iter(tqdm(items, total=total, desc=desc, unit="tensor", leave=False))


def load_pretrained(path: str | Path, as_: str | None = None):
    """A Transformer (eval mode) from a run/checkpoint folder or a published checkpoint folder.

    Used by ``train --init-from``: a folder with ``config.json`` that is not a run folder is
    converted in memory (its layout detected from the config); anything else is read as a run.
    """
    from unmask.checkpoint import load_model
    from unmask.model import Transformer

    path = Path(path)
    is_run = (path / "checkpoints").is_dir() or (path / "trainer.json").is_file()  # a run folder or one of its checkpoints
    if not is_run and (path / "config.json").is_file():
        conv = Conversion(path, as_)
        model = Transformer(conv.config)
        model.load_state_dict(conv.state_dict())
        return model.eval()
    return load_model(path)[0]

"""Packed token shards: documents joined with EOS into flat uint16/uint32 arrays, memory-mapped.

A prepared data folder holds ``meta.json``, ``tokenizer.json`` and ``{train,val}_NNN.bin`` raw
numpy arrays. Training reads uniformly random windows; evaluation reads consecutive
non-overlapping windows from the start of a split, so every model is scored on the same tokens.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from functools import cached_property
from pathlib import Path
from typing import Iterable, Iterator, Literal

import numpy as np
from tqdm.auto import tqdm

from unmask.data.tokenizer import Tokenizer, default_tokenizer
from unmask.errors import UnmaskError

FORMAT_VERSION = 1
Split = Literal["train", "val"]


def _is_val(doc: str, fraction: float) -> bool:
    """Deterministic document-level split: a hash of the text, not its position."""
    h = int.from_bytes(hashlib.sha1(doc.encode("utf-8")).digest()[:8], "big")
    return h / 2**64 < fraction


class _ShardWriter:
    def __init__(self, folder: Path, split: str, dtype: np.dtype, shard_tokens: int) -> None:
        self.folder, self.split, self.dtype, self.shard_tokens = folder, split, dtype, shard_tokens
        self.names: list[str] = []
        self.buffer: list[np.ndarray] = []
        self.buffered = 0
        self.num_tokens = 0
        self.num_documents = 0

    def add(self, ids: list[int], eos: int) -> None:
        self.buffer.append(np.asarray(ids + [eos], dtype=self.dtype))
        self.buffered += len(ids) + 1
        self.num_documents += 1
        if self.buffered >= self.shard_tokens:
            self.flush()

    def flush(self) -> None:
        if not self.buffered:
            return
        name = f"{self.split}_{len(self.names):03d}.bin"
        np.concatenate(self.buffer).tofile(self.folder / name)
        self.names.append(name)
        self.num_tokens += self.buffered
        self.buffer, self.buffered = [], 0

    def meta(self) -> dict:
        return {"shards": self.names, "num_tokens": self.num_tokens, "num_documents": self.num_documents}


def _chunks(docs: Iterable[str], size: int) -> Iterator[list[str]]:
    chunk: list[str] = []
    for doc in docs:
        if doc.strip():
            chunk.append(doc)
            if len(chunk) == size:
                yield chunk
                chunk = []
    if chunk:
        yield chunk


def prepare_dataset(
    out_dir: str | Path,
    tokenizer: Tokenizer,
    train_docs: Iterable[str],
    val_docs: Iterable[str] | None = None,
    val_fraction: float = 0.05,
    shard_tokens: int = 2**26,
    progress: bool = True,
) -> Path:
    """Tokenise documents into a prepared data folder (written atomically). Returns its path.

    Without ``val_docs``, a ``val_fraction`` of the documents (chosen by a hash of their text) is
    held out; at least one document lands on each side.
    """
    out = Path(out_dir)
    dtype = np.dtype(np.uint16 if tokenizer.mask_id < 2**16 else np.uint32)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        writers = {s: _ShardWriter(tmp, s, dtype, shard_tokens) for s in ("train", "val")}
        bar = tqdm(desc="tokenising", unit="doc", disable=not progress)
        held_back: list[int] | None = None  # the first document, in case the hash split leaves a side empty
        for split_name, source in (("train", train_docs), ("val", val_docs or [])):
            for chunk in _chunks(source, 256):
                for doc, ids in zip(chunk, tokenizer.encode_batch(chunk)):
                    side = split_name
                    if val_docs is None:
                        side = "val" if _is_val(doc, val_fraction) else "train"
                    writers[side].add(ids, tokenizer.eos_id)
                    if held_back is None:
                        held_back = ids
                bar.update(len(chunk))
        bar.close()
        total = writers["train"].num_documents + writers["val"].num_documents
        if total == 0:
            raise UnmaskError("the corpus is empty: no document has any text; check the input files and --text-field")
        if val_docs is None and (writers["train"].num_documents == 0 or writers["val"].num_documents == 0):
            if total < 2:
                raise UnmaskError("the corpus has a single document; give more documents or a separate --val-input")
            side = "val" if writers["val"].num_documents == 0 else "train"
            writers[side].add(held_back, tokenizer.eos_id)  # duplicate one document so neither side is empty
        if writers["val"].num_documents == 0:
            raise UnmaskError("the validation documents are empty; check --val-input")
        for w in writers.values():
            w.flush()
        meta = {
            "format_version": FORMAT_VERSION, "dtype": dtype.name, "vocab_size": tokenizer.vocab_size, "mask_id": tokenizer.mask_id,
            "eos_id": tokenizer.eos_id, "tokenizer_fingerprint": tokenizer.fingerprint,
            "splits": {s: w.meta() for s, w in writers.items()},
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        tokenizer.save(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.rename(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


class TokenDataset:
    """One split of a prepared data folder, memory-mapped."""

    def __init__(self, data_dir: str | Path, split: Split) -> None:
        self.dir = Path(data_dir)
        meta_path = self.dir / "meta.json"
        if not meta_path.is_file():
            raise UnmaskError(f"{str(self.dir)!r} is not a prepared data folder (no meta.json); make one with `unmask data prepare`")
        self.meta = json.loads(meta_path.read_text())
        if split not in self.meta["splits"]:
            raise UnmaskError(f"split {split!r} is not in {self.dir}; splits: {', '.join(self.meta['splits'])}")
        self.split = split
        dtype = np.dtype(self.meta["dtype"])
        self.shards = [np.memmap(self.dir / name, dtype=dtype, mode="r") for name in self.meta["splits"][split]["shards"]]
        self.num_tokens = sum(len(s) for s in self.shards)

    @cached_property
    def tokenizer(self) -> Tokenizer:
        return Tokenizer.from_file(self.dir / "tokenizer.json")

    def _check(self, length: int) -> None:
        if max((len(s) for s in self.shards), default=0) < length:
            raise UnmaskError(f"the {self.split} split of {self.dir} has {self.num_tokens} tokens, fewer than one window of {length}")

    def sample_windows(self, rng: np.random.Generator, batch_size: int, length: int) -> np.ndarray:
        """(batch_size, length) int64 windows at uniformly random positions; deterministic given rng."""
        self._check(length)
        usable = np.array([max(len(s) - length + 1, 0) for s in self.shards], dtype=np.float64)
        shard_ids = rng.choice(len(self.shards), size=batch_size, p=usable / usable.sum())
        starts = (rng.random(batch_size) * usable[shard_ids]).astype(np.int64)
        return np.stack([self.shards[s][o : o + length] for s, o in zip(shard_ids, starts)]).astype(np.int64)

    def eval_windows(self, length: int, max_windows: int | None = None) -> np.ndarray:
        """(N, length) int64 consecutive non-overlapping windows from the start of the split (tail dropped)."""
        self._check(length)
        stream = np.concatenate(self.shards) if len(self.shards) > 1 else self.shards[0]
        n = len(stream) // length
        if max_windows is not None:
            n = min(n, max_windows)
        return np.asarray(stream[: n * length], dtype=np.int64).reshape(n, length)


def cache_root() -> Path:
    return Path(os.environ.get("UNMASK_CACHE", Path.home() / ".cache" / "unmask"))


def default_dataset(cache_dir: str | Path | None = None) -> Path:
    """The embedded corpus prepared with the shipped tokenizer, built once and cached.

    Train works -> train split, the held-out works -> val split. Safe against concurrent callers:
    each writes a private temporary folder and renames it into place.
    """
    from unmask.data.corpus import shakespeare_works

    tok = default_tokenizer()
    path = Path(cache_dir) if cache_dir is not None else cache_root()
    target = path / f"shakespeare-{tok.fingerprint}"
    if (target / "meta.json").is_file():
        return target
    path.mkdir(parents=True, exist_ok=True)
    train = [text for _, text in shakespeare_works("train")]
    val = [text for _, text in shakespeare_works("validation")]
    try:
        prepare_dataset(target, tok, train, val, progress=False)
    except OSError:
        if not (target / "meta.json").is_file():  # lost a race: the other process's folder is complete
            raise
    return target

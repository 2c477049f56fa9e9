"""Packed token shards: documents joined with EOS into flat uint16/uint32 arrays, memory-mapped.

A prepared data folder holds ``meta.json``, ``tokenizer.json`` and ``{train,val}_NNN.bin`` raw
numpy arrays; ``meta.json`` records each shard's SHA-256 and a fingerprint of them all, which a run
records so that it never resumes on other data. Training reads uniformly random windows; evaluation reads non-overlapping windows
spread evenly over a split, the same for every model, so every model is scored on the same tokens.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
import re
import shutil
import tempfile
from functools import cached_property
from pathlib import Path
from typing import Callable, Iterable, Iterator, Literal

import numpy as np
from tqdm.auto import tqdm

from unmask.data.stream import Encoder, Spill, TextFile, batches, doc_chunks, doc_scan, one_line_corpus, pieces
from unmask.data.tokenizer import Tokenizer, default_tokenizer
from unmask.errors import OptionError, UnmaskError, check_number

FORMAT_VERSION = 1
Split = Literal["train", "val"]


def spread(total: int, n: int | None) -> np.ndarray:
    """(min(total, n),) int64 indices of n items spread evenly over range(total): item j is the one
    at fraction (j + 1/2) / n, so they cover the whole range; all of range(total) when n >= total."""
    n = total if n is None else min(total, n)
    if n < 1:
        raise OptionError("windows", "the number of evaluation windows ({windows}, eval_windows) must be positive, not {_n}", _n=n)
    return ((np.arange(n) + 0.5) * total / n).astype(np.int64)


def _hold_out_tail(text: str, fraction: float) -> tuple[str, str, str]:
    """Split one document into (train text, validation text, description of the split).

    The validation text is the last ``fraction`` of the characters, cut at the line start nearest
    that point, so that no line is split and both sides hold text. A single big file is usually one
    work or one stream; holding out its end (not scattered pieces) keeps validation text unseen.
    """
    first, last = len(text) - len(text.lstrip()), len(text.rstrip())  # the text lies in [first, last)
    cuts = [m.end() for m in re.finditer("\n", text) if first < m.end() < last]
    if not cuts:
        raise one_line_corpus()
    target = len(text) * (1 - fraction)
    i = bisect.bisect_left(cuts, target)
    cut = min(cuts[max(i - 1, 0) : i + 1], key=lambda c: abs(c - target))
    line = text.count("\n", 0, cut) + 1
    share = 100 * (len(text) - cut) / len(text)
    return text[:cut], text[cut:], f"the last {share:.1f}% of the text of the single document (from line {line})"


def _is_val(doc: str, fraction: float) -> bool:
    """Deterministic document-level split: a hash of the text, not its position."""
    return _is_val_digest(hashlib.sha1(doc.encode("utf-8")).digest(), fraction)


def _is_val_digest(digest: bytes, fraction: float) -> bool:
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


class _ShardWriter:
    """Writes one split's tokens straight to its shard files; a shard ends after the document that
    brings it to ``shard_tokens`` tokens (documents never straddle shards)."""

    def __init__(self, folder: Path, split: str, dtype: np.dtype, shard_tokens: int) -> None:
        self.folder, self.split, self.dtype, self.shard_tokens = folder, split, dtype, shard_tokens
        self.names: list[str] = []
        self.hashes: list = []  # one running SHA-256 per shard
        self.file = None
        self.in_shard = 0
        self.num_tokens = 0
        self.num_documents = 0

    def write(self, ids: np.ndarray) -> None:
        """Tokens of the current document (a part of it, or all)."""
        if self.file is None:
            self.names.append(f"{self.split}_{len(self.names):03d}.bin")
            self.hashes.append(hashlib.sha256())
            self.file = open(self.folder / self.names[-1], "wb")
        data = np.asarray(ids).astype(self.dtype, copy=False).tobytes()
        self.file.write(data)
        self.hashes[-1].update(data)
        self.in_shard += len(ids)
        self.num_tokens += len(ids)

    def end_document(self, eos: int) -> None:
        self.write(np.array([eos]))
        self.num_documents += 1
        if self.in_shard >= self.shard_tokens:
            self.flush()

    def flush(self) -> None:
        if self.file is not None:
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
        self.file, self.in_shard = None, 0

    def meta(self) -> dict:
        return {"shards": self.names, "sha256": [h.hexdigest() for h in self.hashes], "num_tokens": self.num_tokens,
                "num_documents": self.num_documents}


def content_fingerprint(splits: dict, tokenizer_fingerprint: str) -> str:
    """A short hash of the tokens of a prepared folder: of the tokenizer and every shard's name and
    SHA-256 (sizes follow from the token counts). Equal for the same corpus prepared again anywhere."""
    listing = json.dumps({"tokenizer": tokenizer_fingerprint, "splits": {s: [m["shards"], m["sha256"], m["num_tokens"]]
                                                                          for s, m in sorted(splits.items())}}, sort_keys=True)
    return hashlib.sha256(listing.encode("utf-8")).hexdigest()[:16]


def check_out_dir(out: Path, overwrite: bool) -> None:
    # refuse to delete anything that is not a previous prepared folder, and that one unless asked to
    if out.exists() and not (out / "meta.json").is_file() and (not out.is_dir() or any(out.iterdir())):
        raise OptionError("out", "{out} {_out} exists and is not a prepared data folder; give a new or empty folder", _out=out)
    if (out / "meta.json").is_file() and not overwrite:
        raise OptionError("out", "{out} {_out} already holds prepared data; pass {overwrite} to replace it (runs trained on it will "
                          "then refuse to {resume} on it) or give another {out}", _out=out)


def _publish(tmp: Path, out: Path, replace: bool) -> None:
    """Move the finished folder ``tmp`` to ``out`` by renames, so no reader sees a half-written folder."""
    if out.exists() and replace:
        trash = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
        os.rename(out, trash / out.name)
        os.rename(tmp, out)
        shutil.rmtree(trash, ignore_errors=True)
        return
    try:
        os.rename(tmp, out)  # fails on an existing non-empty folder: never clobbers another writer's result
    except OSError:
        if not (out / "meta.json").is_file():
            raise
        # lost a race against another process building the same folder: keep its (identical) result


def prepare_dataset(
    out_dir: str | Path,
    tokenizer: Tokenizer,
    train_docs: Iterable[str | TextFile],
    val_docs: Iterable[str | TextFile] | None = None,
    val_fraction: float = 0.05,
    shard_tokens: int = 2**26,
    progress: bool = True,
    workers: int = 0,
    overwrite: bool = False,
) -> Path:
    """Tokenise documents into a prepared data folder and return its path.

    Every non-blank document becomes its tokens followed by EOS, packed back to back into flat
    shards ``{train,val}_NNN.bin`` (uint16 when the tokenizer has <= 65536 ids incl. MASK, else
    uint32) of about ``shard_tokens`` tokens, plus ``meta.json`` and ``tokenizer.json``. Without
    ``val_docs``, a ``val_fraction`` of the documents, chosen by a hash of their text, is held out,
    with at least one document on each side; a corpus of one document (one big text file) instead
    holds out the last ``val_fraction`` of its text, cut at a line start. ``meta.json`` says which
    was done under "validation", and under "fingerprint" a hash of the shards' contents
    (:func:`content_fingerprint`). The folder is built next to ``out_dir`` and renamed into place;
    an earlier prepared folder there is an UnmaskError unless ``overwrite``.

    Streaming (:mod:`unmask.data.stream`): documents may be strings or lazily read
    :class:`~unmask.data.stream.TextFile` s, sources may be one-pass iterators (HF streaming),
    ``workers`` processes tokenise (0: this process), tokens go to the shard files as they come,
    and memory does not grow with the corpus.
    """
    out = Path(out_dir)
    check_out_dir(out, overwrite)
    return _prepare(out, tokenizer, train_docs, val_docs, val_fraction, shard_tokens, progress, replace=overwrite, workers=workers)


def _tagged(texts: Iterable[str], target: str) -> Iterator[tuple[str, tuple[str, bool]]]:
    """(piece, (target, is the last piece of its document)) for the pieces of one document."""
    prev = None
    for text in texts:
        if prev is not None:
            yield prev, (target, False)
        prev = text
    if prev is not None:
        yield prev, (target, True)


def _prepare(
    out: Path,
    tokenizer: Tokenizer,
    train_docs: Iterable,
    val_docs: Iterable | None,
    val_fraction: float,
    shard_tokens: int,
    progress: bool,
    replace: bool,
    workers: int = 0,
) -> Path:
    _check_settings(val_docs is None, val_fraction, shard_tokens, workers)
    check_out_dir(out, overwrite=True)  # the caller decided whether an earlier folder may go
    dtype = np.dtype(np.uint16 if max(tokenizer.mask_id, tokenizer.vocab_size - 1) < 2**16 else np.uint32)
    eos = tokenizer.eos_id
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))  # same file system: rename is atomic
    writers = {s: _ShardWriter(tmp, s, dtype, shard_tokens) for s in ("train", "val")}
    # With a hash split, the first document waits (its tokens spilled to disk) until the end so that
    # it can go to whichever side would otherwise be empty (a tiny corpus); no document is ever on both sides.
    held: dict = {}
    encoder = Encoder(tokenizer, dtype, workers)
    bar = tqdm(desc="tokenising", unit="tok", unit_scale=True, disable=not progress)

    def items() -> Iterator[tuple[str, tuple[str, bool]]]:
        for split_name, source in (("train", train_docs), ("val", val_docs or ())):
            for doc in source:
                digest, has_text = doc_scan(doc)
                if not has_text:
                    continue
                if val_docs is not None:
                    target = split_name
                elif not held:
                    held.update(doc=doc, digest=digest, spill=Spill(tmp, dtype))
                    target = "held"
                else:
                    target = "val" if _is_val_digest(digest, val_fraction) else "train"
                yield from _tagged(pieces(doc_chunks(doc)), target)

    def consume(tagged: Iterable[tuple[str, tuple[str, bool]]]) -> None:
        for arrays, tags in encoder.map(batches(tagged)):
            for ids, (target, last) in zip(arrays, tags):
                if target == "held":
                    held["spill"].write(ids)
                    continue
                writers[target].write(ids)
                if last:
                    writers[target].end_document(eos)
            bar.update(sum(len(ids) for ids in arrays))

    try:
        consume(items())
        how = ("the given validation documents (--val-input)" if val_docs is not None
               else f"{100 * val_fraction:g}% of the documents, chosen by a hash of their text")
        if held:
            how = _place_held(held, writers, consume, val_fraction, eos) or how
        if writers["train"].num_documents == 0:
            raise OptionError("text_field", "the corpus is empty: no document has any text; check the input files and {text_field}")
        if writers["val"].num_documents == 0:
            raise OptionError("val_input", "the validation documents are empty: none has any text; check {val_input} and {text_field}")
        for w in writers.values():
            w.flush()
        meta = _meta(tokenizer, dtype, {name: w.meta() for name, w in writers.items()}, how)
        if held:
            held["spill"].remove()
        tokenizer.save(tmp)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")  # last: marks the folder complete
        _publish(tmp, out, replace)
    finally:
        bar.close()
        encoder.close()
        for w in writers.values():
            if w.file is not None:
                w.file.close()
        if held:
            held["spill"].remove()
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _check_settings(hash_split: bool, val_fraction: float, shard_tokens: int, workers: int) -> None:
    if hash_split:
        check_number("val_fraction", val_fraction, "(0, 1)")
    check_number("shard_tokens", shard_tokens, "> 0")
    check_number("workers", workers, ">= 0", " (0: tokenise in the main process)")


def _place_held(held: dict, writers: dict, consume: Callable, val_fraction: float, eos: int) -> str | None:
    """Write the document a hash split held back: to the side that would otherwise be empty (the side
    its hash picks when neither is); a corpus of one document gives the end of its text to validation,
    and the description of that split is returned (else None)."""
    n_train, n_val = writers["train"].num_documents, writers["val"].num_documents
    doc = held["doc"]
    if n_train == n_val == 0:  # one document (one big text file): hold out the end of its text
        if isinstance(doc, TextFile):
            train_range, val_range, how = doc.hold_out_tail(val_fraction)
            parts = [(doc_chunks(doc, *train_range), "train"), (doc_chunks(doc, *val_range), "val")]
        else:
            train_text, val_text, how = _hold_out_tail(doc, val_fraction)
            parts = [(doc_chunks(train_text), "train"), (doc_chunks(val_text), "val")]
        for chunks, side in parts:
            consume(_tagged(pieces(chunks), side))
        return how
    side = "val" if n_val == 0 else "train" if n_train == 0 else "val" if _is_val_digest(held["digest"], val_fraction) else "train"
    for ids in held["spill"].read():
        writers[side].write(ids)
    writers[side].end_document(eos)
    return None


def _meta(tokenizer: Tokenizer, dtype: np.dtype, splits: dict, how: str) -> dict:
    """``meta.json`` of a prepared folder: format, token dtype, tokenizer, the splits' shards and the content fingerprint."""
    meta = {
        "format_version": FORMAT_VERSION, "dtype": dtype.name, "vocab_size": tokenizer.vocab_size, "mask_id": tokenizer.mask_id,
        "eos_id": tokenizer.eos_id, "tokenizer_fingerprint": tokenizer.fingerprint, "splits": splits, "validation": how,
    }
    meta["fingerprint"] = content_fingerprint(splits, tokenizer.fingerprint)
    return meta


class TokenDataset:
    """One split of a prepared data folder, memory-mapped read-only (opening is instant at any size)."""

    def __init__(self, data_dir: str | Path, split: Split) -> None:
        self.dir = Path(data_dir)
        meta_path = self.dir / "meta.json"
        if not meta_path.is_file():
            raise UnmaskError(f"{str(self.dir)!r} is not a prepared data folder (no meta.json); make one with `unmask data prepare`")
        try:
            self.meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise UnmaskError(f"{meta_path} is corrupt ({exc}); prepare the folder again with `unmask data prepare`") from None
        if self.meta.get("format_version") != FORMAT_VERSION:
            raise UnmaskError(
                f"{meta_path} has format_version {self.meta.get('format_version')!r}, this unmask reads {FORMAT_VERSION}; "
                "prepare the folder again with `unmask data prepare`"
            )
        if split not in self.meta["splits"]:
            raise UnmaskError(f"split {split!r} is not in {self.dir}; splits: {', '.join(self.meta['splits'])}")
        self.split = split
        dtype = np.dtype(self.meta["dtype"])
        self.shards: list[np.memmap] = []
        for name in self.meta["splits"][split]["shards"]:
            if not (self.dir / name).is_file():
                raise UnmaskError(f"shard {self.dir / name} listed in meta.json is missing; prepare the folder again")
            self.shards.append(np.memmap(self.dir / name, dtype=dtype, mode="r"))
        self.num_tokens: int = sum(len(s) for s in self.shards)
        # the content fingerprint (folders prepared before it was recorded have none)
        self.fingerprint: str = self.meta.get("fingerprint", "")

    @cached_property
    def tokenizer(self) -> Tokenizer:
        """The tokenizer the folder was prepared with (its own copy of ``tokenizer.json``)."""
        return Tokenizer.from_file(self.dir / "tokenizer.json")

    def _check(self, length: int) -> None:
        if length < 1:
            raise UnmaskError(f"window length {length} must be positive")
        # windows never straddle shards, so one shard must hold a whole window
        if max((len(s) for s in self.shards), default=0) < length:
            raise UnmaskError(
                f"the {self.split} split of {self.dir} has {self.num_tokens} tokens, fewer than one window of {length}; "
                "use a shorter sequence length or more data"
            )

    def sample_windows(self, rng: np.random.Generator, batch_size: int, length: int) -> np.ndarray:
        """(batch_size, length) int64 windows at uniformly random token positions.

        A shard is drawn with probability proportional to its number of window starts, then a start
        within it, so every start in the split is equally likely. Uses only ``rng``: restoring its
        state (``rng.bit_generator.state``) replays exactly the same batches.
        """
        self._check(length)
        if batch_size < 1:
            raise UnmaskError(f"batch size {batch_size} must be positive")
        usable = np.array([max(len(s) - length + 1, 0) for s in self.shards], dtype=np.float64)
        shard_ids = rng.choice(len(self.shards), size=batch_size, p=usable / usable.sum())
        starts = (rng.random(batch_size) * usable[shard_ids]).astype(np.int64)
        return np.stack([self.shards[s][o : o + length] for s, o in zip(shard_ids, starts)]).astype(np.int64)

    def eval_starts(self, length: int, max_windows: int | None = None) -> np.ndarray:
        """(N,) int64 start offsets, in the split's token stream, of the evaluation windows.

        The stream is cut into G = num_tokens // length consecutive windows (the tail is dropped);
        N = min(G, max_windows) of them are taken by :func:`spread`, so they cover the whole split
        (every work of a multi-work split, not the opening of the first), never overlap, and are
        all G windows in order when N = G.
        """
        self._check(length)
        return spread(self.num_tokens // length, max_windows) * length

    def _read(self, start: int, count: int) -> np.ndarray:
        """Tokens [start, start + count) of the split's stream, across shard boundaries, as int64."""
        parts, offset = [], 0
        for shard in self.shards:
            lo, hi = max(start - offset, 0), min(start + count - offset, len(shard))
            if lo < hi:
                parts.append(np.asarray(shard[lo:hi], dtype=np.int64))
            offset += len(shard)
        return np.concatenate(parts)

    def eval_windows(self, length: int, max_windows: int | None = None) -> np.ndarray:
        """(N, length) int64 non-overlapping windows spread evenly over the split (see :meth:`eval_starts`).

        The windows are a pure function of the folder, so every model (MDM and AR) is scored on the
        same tokens; only the tokens needed are read.
        """
        starts = self.eval_starts(length, max_windows)
        return np.stack([self._read(int(s), length) for s in starts])

    def eval_previous(self, length: int, max_windows: int | None = None) -> np.ndarray:
        """(N,) int64 token before each window of :meth:`eval_windows` (the AR model's context);
        EOS before the split's first token, since every document follows an EOS in training."""
        eos = int(self.meta["eos_id"])
        return np.array([eos if s == 0 else self._read(int(s) - 1, 1)[0] for s in self.eval_starts(length, max_windows)], dtype=np.int64)

def cache_root() -> Path:
    """Where :func:`default_dataset` caches: ``$UNMASK_CACHE`` or ``~/.cache/unmask``."""
    return Path(os.environ.get("UNMASK_CACHE") or Path.home() / ".cache" / "unmask")


def default_dataset(cache_dir: str | Path | None = None) -> Path:
    """The embedded corpus prepared with the shipped tokenizer, built once (a few seconds) and cached.

    Train works -> train split, the held-out works -> val split, in
    ``(cache_dir or cache_root()) / shakespeare-<tokenizer fingerprint>``. Safe against concurrent
    callers: each builds a private temporary folder and renames it into place; a loser of the race
    keeps the winner's folder.
    """
    from unmask.data.corpus import shakespeare_works

    tok = default_tokenizer()
    target = (Path(cache_dir) if cache_dir is not None else cache_root()) / f"shakespeare-{tok.fingerprint}"
    if (target / "meta.json").is_file():
        return target
    train = [text for _, text in shakespeare_works("train")]
    val = [text for _, text in shakespeare_works("validation")]
    return _prepare(target, tok, train, val, 0.05, 2**26, progress=False, replace=False)

"""Streaming corpus preparation: tokenise in worker processes, write shards as tokens arrive.

Memory stays bounded whatever the corpus size: ``.txt`` files are read lazily in pieces of about
``PIECE_CHARS`` characters (:class:`TextFile`), long in-memory documents are cut the same way,
at most ``2 x workers`` batches of text are in flight, and tokens go straight to the open shard
file. A piece ends before a space or line break that follows a non-space character: with a
byte-level BPE and the GPT-2 split pattern (the shipped tokenizer, GPT-2 and similar ones) no
pre-token crosses such a place, so the pieces give exactly the tokens of the whole document
(tested against whole-document encoding); only a run of MAX_PIECE characters without a space or
line break is cut elsewhere. The output equals the in-memory preparation's byte for
byte: the same documents, validation split, order and shard boundaries.
"""

from __future__ import annotations

import collections
import hashlib
import multiprocessing
import os
import re
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from unmask.errors import OptionError, UnmaskError

# Text handed to the tokenizer at once. Its memory is ~100 bytes per character of a text, and it is
# fastest on short texts: 4 KiB pieces tokenise ~2x faster than 1 MiB ones.
PIECE_CHARS = 1 << 12
READ_CHARS = 1 << 20  # characters read from a file at once
BATCH_CHARS = 1 << 20  # text per worker task
BATCH_DOCS = 1024
_SPACE = re.compile(r"\s")


# A cut before a space or line break that follows a non-space character: with the GPT-2 split
# pattern no pre-token runs from a non-space character into whitespace, and a whitespace run is
# split by what it holds and the character after it, so both sides tokenise as in the whole text.
_CUT = re.compile(r"(?<=\S)[ \n]")
MAX_PIECE = 1 << 18  # a longer run without such a place (no space, no line break) is cut anyway


def _safe_cut(text: str, limit: int, lo: int = 0) -> int:
    """The largest cut p in (lo, limit] (text[p] is a space or line break after a non-space
    character); else the smallest one after limit; 0 if there is none."""
    i = limit
    while True:  # backwards: usually the first space or line break before the limit
        j = max(text.rfind(" ", lo + 1, i + 1), text.rfind("\n", lo + 1, i + 1))
        if j <= lo:
            break
        if not text[j - 1].isspace():
            return j
        i = j - 1
    m = _CUT.search(text, limit + 1)
    return m.start() if m else 0


def pieces(chunks: Iterable[str], size: int | None = None) -> Iterator[str]:
    """Re-cut a stream of text chunks into pieces of about ``size`` (default PIECE_CHARS) characters
    at places where the tokens do not change (see _CUT); pieces join to the text."""
    size = size or PIECE_CHARS
    buffer = ""
    for chunk in chunks:
        buffer = buffer + chunk if buffer else chunk
        start = 0
        while len(buffer) - start >= size:
            cut = _safe_cut(buffer, start + size, start)
            if cut == 0:
                if len(buffer) - start < MAX_PIECE:
                    break  # no such place yet: read on
                cut = start + MAX_PIECE
            yield buffer[start:cut]
            start = cut
        buffer = buffer[start:]
    if buffer:
        yield buffer


@dataclass(frozen=True)
class TextFile:
    """A ``.txt`` document read lazily (UTF-8, newlines kept as they are), never whole in memory."""

    path: Path

    def chunks(self, start: int = 0, stop: int | None = None, size: int | None = None) -> Iterator[str]:
        """The characters [start, stop) of the file, in chunks of at most ``size`` (default READ_CHARS)."""
        size, pos = size or READ_CHARS, 0
        with open(self.path, encoding="utf-8", newline="") as f:
            while stop is None or pos < stop:
                try:
                    chunk = f.read(size)
                except UnicodeDecodeError as exc:
                    raise UnmaskError(
                        f"{self.path} is not UTF-8 text (invalid byte near character {pos}: {exc.reason}); re-encode it as UTF-8, "
                        "e.g. `iconv -f latin1 -t utf-8`"
                    ) from None
                if not chunk:
                    return
                lo, hi = max(start - pos, 0), len(chunk) if stop is None else min(stop - pos, len(chunk))
                if lo < hi:
                    yield chunk[lo:hi]
                pos += len(chunk)

    def scan(self) -> tuple[bytes, bool]:
        """(sha1 digest of the text, whether it holds any non-space character)."""
        digest, has_text = hashlib.sha1(), False
        for chunk in self.chunks():
            digest.update(chunk.encode("utf-8"))
            has_text = has_text or bool(chunk.strip())
        return digest.digest(), has_text

    def hold_out_tail(self, fraction: float) -> tuple[tuple[int, int], tuple[int, int], str]:
        """Character ranges (train, validation) of ``shards._hold_out_tail`` for this file, in two passes."""
        n, first, last = 0, None, 0
        for chunk in self.chunks():
            stripped = chunk.lstrip()
            if first is None and stripped:
                first = n + len(chunk) - len(stripped)
            body = chunk.rstrip()
            if body:
                last = n + len(body)
            n += len(chunk)
        target, best, line, newlines = n * (1 - (fraction)), None, 0, 0
        pos = 0
        for chunk in self.chunks():
            for m in re.finditer("\n", chunk):
                end = pos + m.end()
                newlines += 1
                if first is not None and first < end < last and (best is None or abs(end - target) < abs(best - target)):
                    best, line = end, newlines  # newlines before the cut, the "\n" ending at it included
            pos += len(chunk)
        if best is None:
            raise one_line_corpus()
        share = 100 * (n - best) / n
        return (0, best), (best, n), f"the last {share:.1f}% of the text of the single document (from line {line + 1})"


Document = "str | TextFile"


def one_line_corpus() -> OptionError:
    """The error for a corpus of one document of one line, where a split has to hold out the end of
    its text: no line start lies inside it."""
    return OptionError("val_input", "the corpus is a single document of one line, so no validation text can be held out; "
                       "give more documents, a file with several lines, or a separate {val_input}")


def doc_chunks(doc, start: int = 0, stop: int | None = None) -> Iterator[str]:
    if isinstance(doc, TextFile):
        return doc.chunks(start, stop)
    text = doc[start:stop]
    return (text[i : i + READ_CHARS] for i in range(0, len(text), READ_CHARS))


def doc_scan(doc) -> tuple[bytes, bool]:
    if isinstance(doc, TextFile):
        return doc.scan()
    return hashlib.sha1(doc.encode("utf-8")).digest(), bool(doc.strip())


# ---- tokenising workers -------------------------------------------------------------------------

_WORKER_TOKENIZER = None


def _init_worker(tokenizer_json: str) -> None:
    global _WORKER_TOKENIZER
    from tokenizers import Tokenizer as HFTokenizer

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # one worker process per core instead
    _WORKER_TOKENIZER = HFTokenizer.from_str(tokenizer_json)


def _encode(texts: list[str], dtype: str) -> list[np.ndarray]:
    return [np.asarray(e.ids, dtype=dtype) for e in _WORKER_TOKENIZER.encode_batch(texts, add_special_tokens=False)]


class Encoder:
    """Ordered, bounded-memory tokenisation of batches of texts in ``workers`` processes (0: here)."""

    def __init__(self, tokenizer, dtype: np.dtype, workers: int) -> None:
        self.dtype, self.workers = np.dtype(dtype).name, workers
        self.pool = None
        if workers > 0:
            ctx = multiprocessing.get_context("spawn")  # no fork of a process that may hold tokenizer threads
            self.pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=(tokenizer.to_json(),))
        else:
            global _WORKER_TOKENIZER
            _WORKER_TOKENIZER = tokenizer.hf

    def map(self, batches: Iterable[tuple[list[str], object]]) -> Iterator[tuple[list[np.ndarray], object]]:
        """(token arrays, tag) for each (texts, tag), in order; at most 2 x workers batches in flight."""
        if self.pool is None:
            for texts, tag in batches:
                yield _encode(texts, self.dtype), tag
            return
        pending: collections.deque = collections.deque()
        for texts, tag in batches:
            pending.append((self.pool.submit(_encode, texts, self.dtype), tag))
            if len(pending) >= 2 * self.workers:
                future, old = pending.popleft()
                yield future.result(), old
        while pending:
            future, old = pending.popleft()
            yield future.result(), old

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)


def batches(items: Iterable[tuple[str, object]]) -> Iterator[tuple[list[str], list]]:
    """Group (text, tag) items into batches of at most BATCH_DOCS texts / about BATCH_CHARS characters."""
    texts, tags, size = [], [], 0
    for text, tag in items:
        texts.append(text)
        tags.append(tag)
        size += len(text)
        if len(texts) >= BATCH_DOCS or size >= BATCH_CHARS:
            yield texts, tags
            texts, tags, size = [], [], 0
    if texts:
        yield texts, tags


class Spill:
    """Tokens of one document kept on disk (the held first document) instead of in memory."""

    def __init__(self, folder: Path, dtype: np.dtype) -> None:
        fd, name = tempfile.mkstemp(dir=folder, prefix=".held-", suffix=".bin")
        self.file, self.path, self.dtype = os.fdopen(fd, "wb"), Path(name), np.dtype(dtype)

    def write(self, ids: np.ndarray) -> None:
        self.file.write(ids.astype(self.dtype, copy=False).tobytes())

    def read(self, size: int = 1 << 22) -> Iterator[np.ndarray]:
        self.file.close()
        data = np.memmap(self.path, dtype=self.dtype, mode="r") if self.path.stat().st_size else np.zeros(0, self.dtype)
        for i in range(0, len(data), size):
            yield np.array(data[i : i + size])

    def remove(self) -> None:
        if not self.file.closed:
            self.file.close()
        self.path.unlink(missing_ok=True)

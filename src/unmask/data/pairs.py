"""Prompt/response pairs for supervised fine-tuning (SFT; docs/algorithms.md, 'Conditional bound and fine-tuning').

A pair becomes one row of ``length`` tokens, ``[EOS ; prompt ; response ; EOS ... EOS]``: the
separator every training document follows, the prompt, then the response padded with EOS to the
end of the row. The response region (the response and its pads, at least one EOS) is what the
model learns: the pads are targets, which is how an MDM learns where its answer ends. Rows of all
pairs have the same length, so a batch needs no attention mask.

A pairs folder holds ``pairs.json`` (lengths and counts), ``tokenizer.json`` and, per split,
``{split}_tokens.npy`` (N, length) and ``{split}_start.npy`` (N,), the first position of each row's
response region.
"""

from __future__ import annotations

import json
import random
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from unmask.data.corpus import jsonl_records
from unmask.data.tokenizer import Tokenizer
from unmask.errors import OptionError, UnmaskError

PAIRS_FILE = "pairs.json"
PAIRS_VERSION = 1


@dataclass(frozen=True)
class Pair:
    prompt: str
    response: str


def read_pairs(path: str | Path, prompt_field: str = "prompt", response_field: str = "response") -> list[Pair]:
    """The pairs of a JSONL file, one ``{"prompt": ..., "response": ...}`` object per line."""
    path = Path(path)
    if not path.is_file():
        raise UnmaskError(f"pairs file {str(path)!r} does not exist; give a JSONL file of {{'{prompt_field}': ..., '{response_field}': ...}} lines")
    pairs = []
    for n, row in jsonl_records(path):
        if not isinstance(row.get(prompt_field), str) or not isinstance(row.get(response_field), str):
            raise UnmaskError(f"{path} line {n}: each line needs string fields {prompt_field!r} and {response_field!r}")
        if not row[response_field].strip():
            raise UnmaskError(f"{path} line {n}: the {response_field!r} is empty; a pair needs a response to learn")
        pairs.append(Pair(row[prompt_field], row[response_field]))
    if not pairs:
        raise UnmaskError(f"pairs file {path} has no pairs")
    return pairs


def encode_pair(tokenizer: Tokenizer, pair: Pair) -> tuple[list[int], list[int]]:
    """(prompt ids, response ids); the response is encoded as it follows the prompt, after a space
    unless the prompt ends in whitespace or the response starts with it."""
    joiner = "" if not pair.prompt or pair.prompt[-1].isspace() or pair.response[0].isspace() else " "
    return tokenizer.encode(pair.prompt), tokenizer.encode(joiner + pair.response)


def pair_rows(encoded: list[tuple[list[int], list[int]]], length: int, eos: int) -> tuple[np.ndarray, np.ndarray]:
    """(tokens (N, length), start (N,)) of the rows ``[EOS ; prompt ; response ; EOS pads]``."""
    tokens = np.full((len(encoded), length), eos, dtype=np.int64)
    start = np.zeros(len(encoded), dtype=np.int64)
    for i, (prompt, response) in enumerate(encoded):
        need = 1 + len(prompt) + len(response) + 1
        if need > length:
            raise UnmaskError(f"pair {i}: prompt ({len(prompt)} tokens) + response ({len(response)}) + 2 EOS need {need} tokens, "
                              f"more than the row length {length}")
        tokens[i, 1 : 1 + len(prompt)] = prompt
        tokens[i, 1 + len(prompt) : 1 + len(prompt) + len(response)] = response
        start[i] = 1 + len(prompt)
    return tokens, start


def prepare_pairs(out_dir: str | Path, tokenizer: Tokenizer, train: list[Pair], val: list[Pair] | None = None,
                  length: int | None = None, max_length: int | None = None, val_fraction: float = 0.05, seed: int = 0) -> Path:
    """Tokenise pairs into a pairs folder (built beside ``out_dir`` and renamed into place).

    ``length``: the row length; None: the longest pair plus its EOS separator and one pad.
    ``max_length`` (the model's context): a longer row is refused. Without ``val``, a
    ``val_fraction`` of the pairs (at least one) is held out, chosen with ``seed``.
    """
    out = Path(out_dir)
    if val is None:
        train, val = hold_out(train, val_fraction, seed, "pairs")
    encoded = {split: [encode_pair(tokenizer, p) for p in pairs] for split, pairs in (("train", train), ("val", val))}
    longest = max(2 + len(p) + len(r) for rows in encoded.values() for p, r in rows)
    if length is not None and length < longest:
        raise OptionError("length", "{length} {_length}: the longest pair needs {_longest} tokens (EOS, prompt, response and one EOS "
                          "pad); use {length} {_longest} or more", _length=length, _longest=longest)
    length = length or longest
    if max_length is not None and length > max_length:
        raise UnmaskError(f"the pairs need rows of {length} tokens (the longest pair: {longest}), more than the model's context of "
                          f"{max_length}; shorten the pairs or use a model with a longer context")
    with replaced_folder(out) as tmp:
        meta = {"kind": "pairs", "format_version": PAIRS_VERSION, "length": length, "eos_id": tokenizer.eos_id, "splits": {}}
        for split, rows in encoded.items():
            tokens, start = pair_rows(rows, length, tokenizer.eos_id)
            np.save(tmp / f"{split}_tokens.npy", tokens.astype(np.int32))
            np.save(tmp / f"{split}_start.npy", start)
            meta["splits"][split] = {"pairs": len(rows), "response_tokens": int((length - start).sum())}
        tokenizer.save(tmp)
        (tmp / PAIRS_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return out


def hold_out(rows: list, fraction: float, seed: int, what: str) -> tuple[list, list]:
    """(train, held out): a ``fraction`` of ``rows`` (at least one) held out, chosen with ``seed``,
    both in their original order; ``what`` names the rows in the error when there are fewer than 2."""
    if len(rows) < 2:
        raise UnmaskError(f"a held-out split needs at least 2 {what}; give more {what} or a validation file")
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    cut = max(1, round(fraction * len(rows)))
    return [rows[i] for i in sorted(order[cut:])], [rows[i] for i in sorted(order[:cut])]


@contextmanager
def replaced_folder(out: Path) -> Iterator[Path]:
    """A fresh folder beside ``out`` to write a prepared folder into; on success it replaces ``out``
    (one rename on the same file system), on failure it is removed and ``out`` stays as it was."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        yield tmp
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def is_pairs_folder(path: str | Path) -> bool:
    return (Path(path) / PAIRS_FILE).is_file()


class PairDataset:
    """One split of a pairs folder: rows (N, length) and their response masks."""

    def __init__(self, data_dir: str | Path, split: str) -> None:
        self.dir = Path(data_dir)
        if not is_pairs_folder(self.dir):
            raise OptionError("pairs", "{_dir!r} is not a pairs folder (no {_file}); fine-tuning on a JSONL file of pairs ({pairs}) makes one",
                              _dir=str(self.dir), _file=PAIRS_FILE)
        self.meta = json.loads((self.dir / PAIRS_FILE).read_text(encoding="utf-8"))
        if self.meta.get("format_version") != PAIRS_VERSION:
            raise UnmaskError(f"{self.dir / PAIRS_FILE} has format_version {self.meta.get('format_version')!r}, this unmask reads {PAIRS_VERSION}")
        if split not in self.meta["splits"]:
            raise UnmaskError(f"split {split!r} is not in {self.dir}; splits: {', '.join(self.meta['splits'])}")
        self.length: int = self.meta["length"]
        self.tokens = np.load(self.dir / f"{split}_tokens.npy").astype(np.int64)
        self.start = np.load(self.dir / f"{split}_start.npy")

    @cached_property
    def tokenizer(self) -> Tokenizer:
        return Tokenizer.from_file(self.dir / "tokenizer.json")

    def response_mask(self, index: np.ndarray | slice) -> np.ndarray:
        """(n, length) bool: True on the response region (response and EOS pads) of the rows ``index``."""
        return np.arange(self.length)[None, :] >= self.start[index][:, None]

    def sample(self, rng: np.random.Generator, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
        """(tokens, response mask) of ``batch_size`` rows drawn uniformly with replacement, using only ``rng``."""
        index = rng.integers(0, len(self.tokens), size=batch_size)
        return self.tokens[index], self.response_mask(index)

    def eval_rows(self, max_rows: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The first ``max_rows`` rows (all by default) and their response masks: the held-out set."""
        index = np.arange(min(len(self.tokens), max_rows or len(self.tokens)))
        return self.tokens[index], self.response_mask(index)


def write_pairs(path: str | Path, pairs: Iterable[Pair]) -> Path:
    """Pairs as a JSONL file (the format :func:`read_pairs` reads)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"prompt": p.prompt, "response": p.response}) + "\n" for p in pairs), encoding="utf-8")
    return path

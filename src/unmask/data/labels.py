"""Labelled texts for a classifier of noisy canvases (``unmask train --objective classifier``;
docs/training.md, 'Training a classifier').

The input is a JSONL file of ``{"text": ..., "label": ...}`` lines (a label is a string or an
integer, kept as its string). A labels folder holds each text as one row of ``length`` tokens,
``[EOS ; text ; PAD ...]``: the separator every document follows (as on the samplers' canvases),
the text, then padding that the key mask hides. ``labels.json`` records the row length, the label
names (sorted: class k is the k-th name) and each split's counts; per split ``{split}_tokens.npy``
(N, length), ``{split}_lengths.npy`` (N,) (real positions, the EOS included) and
``{split}_labels.npy`` (N,) class indices; and ``tokenizer.json``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Sequence

import numpy as np

from unmask.data.corpus import jsonl_records
from unmask.data.pairs import hold_out, replaced_folder
from unmask.data.shards import spread
from unmask.data.tokenizer import Tokenizer
from unmask.errors import OptionError, UnmaskError

LABELS_FILE = "labels.json"
LABELS_VERSION = 1


@dataclass(frozen=True)
class Labelled:
    """One labelled text and where it was read (``file line n``, for errors about it)."""

    text: str
    label: str
    where: str = ""


def read_labelled(path: str | Path, labels: Sequence[str] | None = None, text_field: str = "text",
                  label_field: str = "label") -> list[Labelled]:
    """The labelled texts of a JSONL file; ``labels``: the only label names allowed (None: any).
    Errors name the file and line: a line that is not a JSON object, a missing or empty text, a
    missing label or one that is not among ``labels``."""
    path = Path(path)
    if not path.is_file():
        raise OptionError("data", "{data} {_path!r} does not exist; give a JSONL file of {{\"text\": ..., \"label\": ...}} lines",
                          _path=str(path))
    rows = []
    for n, record in jsonl_records(path):
        text, label = record.get(text_field), record.get(label_field)
        if not isinstance(text, str) or not text.strip():
            raise UnmaskError(f"{path} line {n}: needs a non-empty string field {text_field!r}")
        if isinstance(label, bool) or not isinstance(label, (str, int)) or str(label) == "":
            raise UnmaskError(f"{path} line {n}: needs a field {label_field!r}, a non-empty string or an integer")
        if labels is not None and str(label) not in labels:
            raise UnmaskError(f"{path} line {n}: label {str(label)!r} is not one of the classifier's labels: {', '.join(labels)}")
        rows.append(Labelled(text, str(label), f"{path} line {n}"))
    if not rows:
        raise UnmaskError(f"{path} has no labelled texts")
    return rows


def label_rows(tokenizer: Tokenizer, rows: list[Labelled], labels: Sequence[str], length: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(tokens (N, length), lengths (N,), class indices (N,)) of the rows ``[EOS ; text ; PAD ...]``."""
    tokens = np.full((len(rows), length), tokenizer.pad_id, dtype=np.int64)
    lengths = np.zeros(len(rows), dtype=np.int64)
    for i, row in enumerate(rows):
        ids = [tokenizer.eos_id] + tokenizer.encode(row.text)
        if len(ids) > length:
            raise UnmaskError(f"{row.where}: the text is {len(ids) - 1} tokens, more than the {length - 1} a row of the model's context "
                              f"({length}) holds after its EOS; shorten it or use a model with a longer context")
        tokens[i, : len(ids)], lengths[i] = ids, len(ids)
    return tokens, lengths, np.array([labels.index(row.label) for row in rows], dtype=np.int64)


def prepare_labels(out_dir: str | Path, tokenizer: Tokenizer, train: list[Labelled], val: list[Labelled] | None = None,
                   max_length: int = 256, val_fraction: float = 0.1, seed: int = 0) -> Path:
    """Tokenise labelled texts into a labels folder (built beside ``out_dir`` and renamed into place).

    Rows are as long as the longest text plus its EOS (at most ``max_length``, the model's context;
    a longer text is an error naming its line). Without ``val`` a ``val_fraction`` of the texts (at
    least one) is held out, chosen with ``seed``. The label names are the train split's, sorted;
    a validation label outside them is an error naming its line.
    """
    if val is None:
        train, val = hold_out(train, val_fraction, seed, "labelled texts")
    labels = sorted({row.label for row in train})
    if len(labels) < 2:
        raise UnmaskError(f"the training texts have one label ({labels[0]!r}); a classifier needs two or more")
    for row in val:
        if row.label not in labels:
            raise UnmaskError(f"{row.where}: label {row.label!r} is not among the training labels: {', '.join(labels)}")
    longest = max(1 + len(tokenizer.encode(row.text)) for row in train + val)
    length = min(longest, max_length)
    out = Path(out_dir)
    with replaced_folder(out) as tmp:
        meta = {"kind": "labels", "format_version": LABELS_VERSION, "length": length, "labels": labels, "splits": {}}
        for split, rows in (("train", train), ("val", val)):
            tokens, lengths, classes = label_rows(tokenizer, rows, labels, length)
            np.save(tmp / f"{split}_tokens.npy", tokens.astype(np.int32))
            np.save(tmp / f"{split}_lengths.npy", lengths)
            np.save(tmp / f"{split}_labels.npy", classes)
            meta["splits"][split] = {"rows": len(rows), "counts": {name: int((classes == k).sum()) for k, name in enumerate(labels)}}
        tokenizer.save(tmp)
        (tmp / LABELS_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return out


def is_labels_folder(path: str | Path) -> bool:
    return (Path(path) / LABELS_FILE).is_file()


def folder_labels(path: str | Path) -> tuple[str, ...]:
    """The label names of a labels folder, in class order."""
    return tuple(LabelDataset(path, "train").meta["labels"])


class LabelDataset:
    """One split of a labels folder: rows (N, length), their real lengths and class indices."""

    def __init__(self, data_dir: str | Path, split: str) -> None:
        self.dir = Path(data_dir)
        if not is_labels_folder(self.dir):
            raise OptionError("data", "{data} {_dir!r} is not a labels folder (no {_file}); a classifier trains on a JSONL file of "
                              "{{\"text\": ..., \"label\": ...}} lines", _dir=str(self.dir), _file=LABELS_FILE)
        self.meta = json.loads((self.dir / LABELS_FILE).read_text(encoding="utf-8"))
        if self.meta.get("format_version") != LABELS_VERSION:
            raise UnmaskError(f"{self.dir / LABELS_FILE} has format_version {self.meta.get('format_version')!r}, this unmask reads {LABELS_VERSION}")
        self.length: int = self.meta["length"]
        self.tokens = np.load(self.dir / f"{split}_tokens.npy").astype(np.int64)
        self.lengths = np.load(self.dir / f"{split}_lengths.npy")
        self.labels = np.load(self.dir / f"{split}_labels.npy")

    @cached_property
    def tokenizer(self) -> Tokenizer:
        return Tokenizer.from_file(self.dir / "tokenizer.json")

    def rows(self, index: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(tokens (n, length), text mask (n, length) bool: the text after each row's EOS, class indices (n,)) of rows ``index``."""
        cols = np.arange(self.length)[None, :]
        return self.tokens[index], (cols >= 1) & (cols < self.lengths[index][:, None]), self.labels[index]

    def sample(self, rng: np.random.Generator, batch_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``batch_size`` rows drawn uniformly with replacement, using only ``rng``."""
        return self.rows(rng.integers(0, len(self.tokens), size=batch_size))

    def eval_rows(self, max_rows: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The held-out set: ``max_rows`` rows spread evenly over the split (all by default), the same every time."""
        return self.rows(spread(len(self.tokens), max_rows))

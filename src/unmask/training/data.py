"""The data an objective learns from, as :class:`unmask.objectives.Batch` rows: windows of a prepared
token folder or the rows of a pairs folder (an objective's ``data``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from unmask.data import TokenDataset
from unmask.data.labels import LabelDataset
from unmask.data.pairs import PairDataset
from unmask.data.tokenizer import Tokenizer
from unmask.objectives import Batch


class WindowData:
    """Windows of L+1 tokens of a prepared folder (``unmask.data.shards``): the first token of each is
    context only (the AR model's input before its first target), the other L are learned."""

    def __init__(self, data_dir: str | Path, context_len: int) -> None:
        self.train, self.val = TokenDataset(data_dir, "train"), TokenDataset(data_dir, "val")
        self.length = context_len

    @property
    def tokenizer(self) -> Tokenizer:
        return self.train.tokenizer

    @property
    def fingerprint(self) -> str:
        """The content fingerprint of the folder ("" for folders prepared without one)."""
        return self.train.fingerprint

    def sample(self, rng: np.random.Generator, rows: int) -> Batch:
        """``rows`` windows at random positions of the train split, from ``rng`` only."""
        return Batch(torch.from_numpy(self.train.sample_windows(rng, rows, self.length + 1)))

    def held_out(self, count: int) -> Batch:
        """The same ``count`` windows of the val split every time (for every model), each after the token before it."""
        windows = torch.from_numpy(self.val.eval_windows(self.length, count))
        previous = torch.from_numpy(self.val.eval_previous(self.length, count))
        return Batch(torch.cat([previous[:, None], windows], dim=1))


class PairData:
    """Rows ``[EOS ; prompt ; response ; EOS ...]`` of a pairs folder (``unmask.data.pairs``), with their response masks."""

    fingerprint = ""  # a pairs folder is made for its run (RUN/pairs), from the source run's tokenizer
    dataset = PairDataset  # one split of the folder

    def __init__(self, data_dir: str | Path, context_len: int) -> None:
        self.train, self.val = self.dataset(data_dir, "train"), self.dataset(data_dir, "val")
        self.length = self.train.length

    @property
    def tokenizer(self) -> Tokenizer:
        return self.train.tokenizer

    def sample(self, rng: np.random.Generator, rows: int) -> Batch:
        return Batch(*map(torch.from_numpy, self.train.sample(rng, rows)))

    def held_out(self, count: int) -> Batch:
        return Batch(*map(torch.from_numpy, self.val.eval_rows(count)))


class LabelData(PairData):
    """Labelled rows ``[EOS ; text ; PAD ...]`` of a labels folder (``unmask.data.labels``), with their
    text masks and class indices: what a classifier learns from."""

    fingerprint = ""  # a labels folder is made for its run (RUN/labels), with the tokenizer of the model it guides
    dataset = LabelDataset


DATA: dict[str, type] = {"windows": WindowData, "pairs": PairData, "labels": LabelData}


def open_data(kind: str, data_dir: str | Path, context_len: int) -> WindowData | PairData | LabelData:
    """The train and val splits of ``data_dir`` as the data ``kind`` an objective learns from."""
    return DATA[kind](data_dir, context_len)

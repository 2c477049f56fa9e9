"""Streaming preparation equals whole-document tokenisation, and its memory does not grow with the corpus.

The reference packs every document tokenised whole (one ``encode`` call per document, no pieces,
no workers) with the documented split rules, in a few plain lines; the streaming path reads files
lazily in small pieces, tokenises them in 2 worker processes and writes shards as it goes.
"""

import hashlib
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from unmask.data import default_tokenizer, prepare_dataset, read_documents, shakespeare_works
from unmask.data import stream
from unmask.data.shards import _hold_out_tail


def reference_shards(tok, docs: list[str], fraction: float, shard_tokens: int) -> dict[str, list[np.ndarray]]:
    """Shards of the documented rules: first non-blank document held to the end, the others by hash."""
    docs = [d for d in docs if d.strip()]
    is_val = lambda d: int.from_bytes(hashlib.sha1(d.encode()).digest()[:8], "big") / 2**64 < fraction  # noqa: E731
    order = {"train": [], "val": []}
    for doc in docs[1:]:
        order["val" if is_val(doc) else "train"].append(tok.encode(doc))
    if not order["train"] and not order["val"]:
        train_text, val_text, _ = _hold_out_tail(docs[0], fraction)
        order = {"train": [tok.encode(train_text)], "val": [tok.encode(val_text)]}
    else:
        side = "val" if not order["val"] else "train" if not order["train"] else "val" if is_val(docs[0]) else "train"
        order[side].append(tok.encode(docs[0]))
    shards = {}
    for split, encoded in order.items():
        shards[split], current = [], []
        for ids in encoded:
            current += ids + [tok.eos_id]
            if len(current) >= shard_tokens:
                shards[split].append(np.array(current, dtype=np.uint16))
                current = []
        if current:
            shards[split].append(np.array(current, dtype=np.uint16))
    return shards


def read_shards(folder) -> dict[str, list[np.ndarray]]:
    meta = json.loads((folder / "meta.json").read_text())
    return {s: [np.fromfile(folder / n, dtype=np.uint16) for n in meta["splits"][s]["shards"]] for s in ("train", "val")}


def assert_same(a: dict, b: dict) -> None:
    for split in ("train", "val"):
        assert len(a[split]) == len(b[split]), split
        for x, y in zip(a[split], b[split]):
            np.testing.assert_array_equal(x, y)


def test_streamed_shards_equal_whole_document_tokenisation(tmp_path, monkeypatch):
    """Several .txt works and a .jsonl file, read lazily in ~200-character pieces by 2 worker processes;
    then one big file alone (the tail hold-out, computed in passes over the file)."""
    monkeypatch.setattr(stream, "PIECE_CHARS", 200)
    monkeypatch.setattr(stream, "READ_CHARS", 5000)
    tok = default_tokenizer()
    works = shakespeare_works("train")[:5]
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    texts = []
    for name, text in works[:4]:
        (corpus / f"{name}.txt").write_text(text, encoding="utf-8")
    lines = [works[4][1][i : i + 3000] for i in range(0, 30000, 3000)] + ["   \n"]
    (corpus / "z.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in lines), encoding="utf-8")
    texts = [t for _, t in works[:4]] + lines  # the sorted order read_documents yields
    assert any(isinstance(d, stream.TextFile) for d in read_documents([corpus], lazy=True))
    out = prepare_dataset(tmp_path / "out", tok, read_documents([corpus], lazy=True), val_fraction=0.3, shard_tokens=10_000,
                          progress=False, workers=2)
    expected = reference_shards(tok, texts, 0.3, 10_000)
    assert len(expected["train"]) > 1 and expected["val"]
    assert_same(read_shards(out), expected)

    big = tmp_path / "one.txt"
    big.write_text(works[0][1], encoding="utf-8")
    out = prepare_dataset(tmp_path / "one", tok, read_documents([big], lazy=True), val_fraction=0.1, shard_tokens=2**26,
                          progress=False, workers=0)
    assert_same(read_shards(out), reference_shards(tok, [works[0][1]], 0.1, 2**26))
    meta = json.loads((out / "meta.json").read_text())
    assert meta["validation"] == _hold_out_tail(works[0][1], 0.1)[2]


def test_pieces_are_cut_only_before_a_space_or_line_break_after_a_non_space_character():
    text = "ab\n\ncd\n ef gh  \nij\tkl mn"
    got = list(stream.pieces([text[:5], text[5:]], size=3))
    assert "".join(got) == text and len(got) > 3
    end = 0
    for piece in got[:-1]:
        end += len(piece)
        assert text[end] in " \n" and not text[end - 1].isspace(), (got, end)
    tok = default_tokenizer()
    assert sum((tok.encode(p) for p in got), []) == tok.encode(text)


# VmHWM: the peak resident set of this process's own memory. (ru_maxrss would not do: Linux keeps
# across fork and exec the peak of the parent, here the whole pytest process.)
CHILD = textwrap.dedent(
    """
    import re, sys
    from pathlib import Path
    from unmask.data import default_tokenizer, prepare_dataset, read_documents
    prepare_dataset(sys.argv[2], default_tokenizer(), read_documents([sys.argv[1]], lazy=True), progress=False, workers=0)
    print(int(re.search(r"VmHWM:\\s+(\\d+) kB", Path("/proc/self/status").read_text()).group(1)) / 1024)
    """
)


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads the peak resident set from /proc (Linux)")
def test_memory_does_not_grow_with_the_corpus(tmp_path):
    """One big single-document file (the worst case: no document boundaries) at 1 MB and at 4 MB:
    peak RSS (~280 MiB of it is torch, imported by the package) stays under a fixed ceiling and
    grows by less than 24 MiB, allocator noise. Tokenising a text whole takes ~300 bytes per
    character (1.2 GB for 4 MB), so holding the 4 MB file would add about 1 GB."""
    text = "".join(t for _, t in shakespeare_works("train")[:3])
    peaks = {}
    for mb in (1, 4):
        path = tmp_path / f"c{mb}.txt"
        with open(path, "w", encoding="utf-8") as f:
            written = 0
            while written < mb * 1_000_000:
                f.write(text)
                written += len(text)
        out = subprocess.run([sys.executable, "-c", CHILD, str(path), str(tmp_path / f"out{mb}")], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr[-2000:]
        peaks[mb] = float(out.stdout.strip().splitlines()[-1])
    assert peaks[4] < 400, peaks
    assert peaks[4] - peaks[1] < 24, peaks

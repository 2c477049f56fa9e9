"""Embedded corpus, tokenizer conventions, packed shards, and clear errors for bad corpora."""

import json

import numpy as np
import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers, trainers

from unmask.data import (
    VALIDATION_WORKS, TokenDataset, Tokenizer, default_tokenizer, load_tokenizer, prepare_dataset, read_documents,
    shakespeare_notice, shakespeare_works, train_bpe,
)
from unmask.errors import UnmaskError


def test_corpus_split_by_whole_work():
    train, val = shakespeare_works("train"), shakespeare_works("validation")
    assert len(train) == 38 and len(val) == 4 and len(shakespeare_works("all")) == 42
    names = [n for n, _ in train + val]
    assert len(set(names)) == 42 and not any(n.endswith("_f") for n in names)
    assert sorted(n for n, _ in val) == sorted(VALIDATION_WORKS)
    assert all(len(text) > 2_000 for _, text in train + val)  # the shortest, The Phoenix and the Turtle, is a poem
    assert "To be, or not to be" in dict(val)["hamlet"]
    assert "Creative Commons Attribution" in shakespeare_notice() and "Gutenberg" in shakespeare_notice()


def test_default_tokenizer_conventions_and_round_trip():
    tok = default_tokenizer()
    assert tok.vocab_size == 4096 and tok.mask_id == 4096 and tok.eos_id == 0 and tok.pad_id == 1
    for text in (dict(shakespeare_works("validation"))["sonnets"][:2000], "Ünïcødé ✓ — naïve café 日本"):
        assert tok.decode(tok.encode(text)) == text
    assert tok.decode([tok.encode("a")[0], tok.mask_id], mask_text="_") == "a_"
    assert load_tokenizer("default").fingerprint == tok.fingerprint


def test_foreign_tokenizer_json_gets_mask_appended(tmp_path):
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.train_from_iterator(["hello world"] * 10, trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"]))
    (tmp_path / "gpt").mkdir()
    hf.save(str(tmp_path / "gpt" / "tokenizer.json"))
    tok = Tokenizer.from_file(tmp_path / "gpt")
    assert tok.mask_id == hf.get_vocab_size() and tok.vocab_size == hf.get_vocab_size()
    assert tok.eos_id == hf.token_to_id("<|endoftext|>") and tok.pad_id == tok.eos_id


def test_tokenizer_without_eos_is_refused(tmp_path):
    hf = HFTokenizer(models.BPE())
    hf.train_from_iterator(["abc"], trainers.BpeTrainer(vocab_size=50))
    hf.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(UnmaskError, match="end-of-text"):
        Tokenizer.from_file(tmp_path / "tokenizer.json")
    with pytest.raises(UnmaskError, match="not found"):
        load_tokenizer(str(tmp_path / "missing"))


@pytest.fixture
def corpus(tmp_path):
    (tmp_path / "a.txt").write_text("First document. " * 50)
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps({"text": f"record {i} " * 40}) for i in range(6)) + "\n")
    return tmp_path


def test_prepare_and_read_windows(corpus, tmp_path):
    tok = train_bpe([p.read_text() for p in corpus.iterdir()], vocab_size=300)
    out = prepare_dataset(tmp_path / "data", tok, read_documents([corpus]), val_fraction=0.3, progress=False)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["dtype"] == "uint16" and meta["mask_id"] == tok.mask_id
    splits = meta["splits"]
    assert splits["train"]["num_documents"] + splits["val"]["num_documents"] == 7
    assert splits["train"]["num_documents"] >= 1 and splits["val"]["num_documents"] >= 1
    train = TokenDataset(out, "train")
    stream = np.concatenate(train.shards)
    assert stream[-1] == tok.eos_id and (stream == tok.eos_id).sum() == splits["train"]["num_documents"]
    a = train.sample_windows(np.random.default_rng(3), 5, 16)
    b = train.sample_windows(np.random.default_rng(3), 5, 16)
    assert a.shape == (5, 16) and a.dtype == np.int64 and np.array_equal(a, b)
    assert a.max() < tok.vocab_size
    w = train.eval_windows(16)
    assert w.shape == (len(stream) // 16, 16) and np.array_equal(w.reshape(-1), stream[: w.size])
    assert train.tokenizer.fingerprint == tok.fingerprint


def test_default_dataset_is_cached(tmp_path):
    from unmask.data import default_dataset

    first = default_dataset(tmp_path)
    assert default_dataset(tmp_path) == first
    val = TokenDataset(first, "val")
    assert val.num_tokens > 100_000 and TokenDataset(first, "train").num_tokens > 1_000_000


def test_errors_name_the_input(tmp_path):
    with pytest.raises(UnmaskError, match="missing.txt"):
        list(read_documents([tmp_path / "missing.txt"]))
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"ok \xff\xfe")
    with pytest.raises(UnmaskError, match=r"bad.txt is not UTF-8 text \(invalid byte at offset 3\)"):
        list(read_documents([bad]))
    rec = tmp_path / "r.jsonl"
    rec.write_text('{"text": "fine"}\n{"body": "no text field"}\n')
    with pytest.raises(UnmaskError, match=r"r.jsonl line 2 has no string field 'text'"):
        list(read_documents([rec]))
    with pytest.raises(UnmaskError, match="empty"):
        prepare_dataset(tmp_path / "d", default_tokenizer(), ["", "  "], progress=False)
    with pytest.raises(UnmaskError, match="meta.json"):
        TokenDataset(tmp_path, "train")
    with pytest.raises(UnmaskError, match="unsupported extension"):
        (tmp_path / "x.csv").write_text("a,b")
        list(read_documents([tmp_path / "x.csv"]))

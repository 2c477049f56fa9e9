"""Held-out text for zero-shot likelihood: the usual benchmark sets, their detokenisers, local files.

The benchmark sets (WikiText, PTB, LAMBADA, LM1B, OpenWebText) are fetched by name through HF
``datasets`` when online; the same detokenisers apply to local copies (``--text FILE
--detokenizer NAME``). Detokenisers undo the sets' own tokenisation (" @-@ ", " n't", ...) so the
model sees ordinary text, as in the SEDD/MDLM/SMDM zero-shot protocol.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np

from unmask.data import Tokenizer, hf_documents
from unmask.errors import OptionError, not_one_of


def wikitext_detokenize(text: str) -> str:
    text = text.replace("s '", "s'")
    text = re.sub(r"/' [0-9]/", r"/'[0-9]/", text)
    for a, b in ((" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", "."), (" : ", ": "), (" ; ", "; "), (" . ", ". "), (" ! ", "! "),
                 (" ? ", "? "), (" , ", ", "), ("= = = =", "===="), ("= = =", "==="), ("= =", "=="), (" \n", "\n"), ("\n ", "\n"),
                 (" N ", " 1 "), (" 's", "'s")):
        text = text.replace(a, b)
    text = re.sub(r"\(\s*([^\)]*?)\s*\)", r"(\1)", text)
    text = re.sub(r"\[\s*([^\]]*?)\s*\]", r"[\1]", text)
    text = re.sub(r"{\s*([^}]*?)\s*}", r"{\1}", text)
    text = re.sub(r"\"\s*([^\"]*?)\s*\"", r'"\1"', text)
    text = re.sub(r"'\s*([^']*?)\s*'", r"'\1'", text)
    return text


def ptb_detokenize(text: str) -> str:
    for a, b in ((" 's", "'s"), ("s ' ", "s' "), (" n't", "n't"), (" \n ", "\n"), ("\\/", "/"), (" ;", ";"), (" ,", ","),
                 (" .", "."), ("$ ", "$"), (" %", "%"), (" N ", " 1 "), ("<unk>", "?")):
        text = text.replace(a, b)
    return text


def lm1b_detokenize(text: str) -> str:
    text = text.replace("http : / / ", "http://").replace("https : / / ", "https://")
    text = re.sub(r" '(\w+)", r"'\1", text)
    text = re.sub(r" ([.,?!:;%])(?=\s|$)", r"\1", text)  # no space before punctuation
    text = text.replace(" n't", "n't").replace("$ ", "$").replace("# ", "#").replace(" / ", "/")
    text = re.sub(r"\" ([^\"]+) \"", r'"\1"', text)
    return re.sub(r"\( ([^()]+) \)", r"(\1)", text)


def lambada_detokenize(text: str) -> str:
    return text.replace("“", '"').replace("”", '"').replace("‘", "'").replace("’", "'").strip()


DETOKENIZERS: dict[str, Callable[[str], str]] = {
    "none": lambda s: s,
    "wikitext": wikitext_detokenize,
    "ptb": ptb_detokenize,
    "lm1b": lm1b_detokenize,
    "lambada": lambada_detokenize,
}


@dataclass(frozen=True)
class ZeroShotSet:
    hf_name: str
    hf_config: str | None
    split: str
    field: str
    detokenizer: str
    packed: bool  # the usual protocol: documents concatenated (True) or scored one by one (False)


ZERO_SHOT: dict[str, ZeroShotSet] = {
    "wikitext103": ZeroShotSet("wikitext", "wikitext-103-raw-v1", "test", "text", "wikitext", True),
    "wikitext2": ZeroShotSet("wikitext", "wikitext-2-raw-v1", "test", "text", "wikitext", True),
    "ptb": ZeroShotSet("ptb_text_only", None, "test", "sentence", "ptb", True),
    "lambada": ZeroShotSet("EleutherAI/lambada_openai", "default", "test", "text", "lambada", False),
    "lm1b": ZeroShotSet("lm1b", None, "test", "text", "lm1b", False),
    "openwebtext": ZeroShotSet("openwebtext", None, "train", "text", "none", True),
}


def detokenizer(name: str) -> Callable[[str], str]:
    if name not in DETOKENIZERS:
        raise not_one_of("detokenizer", name, DETOKENIZERS)
    return DETOKENIZERS[name]


def zero_shot_documents(name: str, limit: int | None = None) -> Iterator[str]:
    """Detokenised documents of a named zero-shot set (needs network and `unmask[hf]`)."""
    if name not in ZERO_SHOT:
        raise not_one_of("dataset", name, ZERO_SHOT)
    spec = ZERO_SHOT[name]
    detok = DETOKENIZERS[spec.detokenizer]
    for i, doc in enumerate(hf_documents(spec.hf_name, spec.hf_config, spec.split, spec.field)):
        if limit is not None and i >= limit:
            return
        yield detok(doc)


def packed_windows(docs: list[str], tokenizer: Tokenizer, length: int) -> tuple[np.ndarray, np.ndarray]:
    """Documents joined with EOS, cut into consecutive windows (N, length); plus the token before each."""
    stream: list[int] = []
    for ids in tokenizer.encode_batch(docs):
        stream.extend(ids + [tokenizer.eos_id])
    n = len(stream) // length
    if n == 0:
        raise OptionError("packed", "the text has {_n} tokens, fewer than one window of {_length}; give more text, or score each "
                          "document alone ({no_packed})", _n=len(stream), _length=length)
    arr = np.asarray(stream[: n * length], dtype=np.int64).reshape(n, length)
    prev = np.concatenate([[tokenizer.eos_id], arr[:-1, -1]])
    return arr, prev


def unpacked_windows(docs: list[str], tokenizer: Tokenizer, length: int) -> list[np.ndarray]:
    """Each document on its own (followed by EOS), in chunks of at most ``length`` tokens, grouped
    by chunk length (N_g, L_g). Every chunk is scored without context from other chunks."""
    by_len: dict[int, list[list[int]]] = {}
    for ids in tokenizer.encode_batch(docs):
        ids = ids + [tokenizer.eos_id]
        for start in range(0, len(ids), length):
            chunk = ids[start : start + length]
            by_len.setdefault(len(chunk), []).append(chunk)
    return [np.asarray(chunks, dtype=np.int64) for _, chunks in sorted(by_len.items())]

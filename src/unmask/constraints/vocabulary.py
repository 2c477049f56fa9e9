"""The bytes each token id stands for: what a constraint automaton reads.

Two families of ``tokenizer.json`` are understood, told apart by their decoder and pre-tokenizer
(never by a name):

* byte-level BPE (GPT-2, the shipped default tokenizer, Qwen2, LLaMA-3): every character of a
  token is one byte, written in GPT-2's byte-to-unicode alphabet (``Ġ`` is the space byte 0x20).
* SentencePiece-style BPE (LLaMA-1/2, Mistral, Gemma; ``Metaspace`` or a ``Replace("▁", " ")``
  decoder): ``▁`` is a space, ``<0xAB>`` is the single byte 0xAB when the model or decoder has byte
  fallback, any other token is the UTF-8 of its text.

Special tokens (MASK, EOS, PAD and every added token marked special) stand for no bytes: None.

What holds, for ids without special tokens: the concatenated bytes of ids equal the UTF-8 of
``tokenizer.decode(ids)`` for byte-level tokenizers. SentencePiece decoders drop one leading space
of the decoded text (the ``▁`` their normalizer or pre-tokenizer put before the first word), so
there the concatenated bytes equal ``b" " + decode(ids)`` when they begin with a space, and
``decode(ids)`` otherwise. Constraints apply to the bytes: the text as it continues what comes
before it, which is what a generated region is.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from typing import Literal

from unmask.data.tokenizer import Tokenizer
from unmask.errors import UnmaskError

TokenKind = Literal["byte_level", "sentencepiece"]
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


@lru_cache(maxsize=1)
def byte_decoder() -> dict[str, int]:
    """GPT-2's byte-to-unicode alphabet, reversed: {character: byte}. Printable Latin-1 bytes are
    their own character; the other 68 bytes are shifted to U+0100 onwards in byte order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, shifted = {}, 0
    for b in range(256):
        if b in keep:
            chars[chr(b)] = b
        else:
            chars[chr(256 + shifted)] = b
            shifted += 1
    return chars


def _parts(component: dict | None) -> list[dict]:
    """A decoder / pre-tokenizer / normalizer and, for a ``Sequence``, its members (flattened)."""
    if not component:
        return []
    members = component.get("decoders") or component.get("pretokenizers") or component.get("normalizers")
    if component.get("type") == "Sequence" and members:
        return [part for member in members for part in _parts(member)]
    return [component]


def token_kind(spec: dict) -> tuple[TokenKind, bool]:
    """(family, byte fallback) of a parsed ``tokenizer.json``, read from its decoder and pre-tokenizer."""
    decoders, pre = _parts(spec.get("decoder")), _parts(spec.get("pre_tokenizer"))
    types = {part.get("type") for part in decoders + pre}
    if "ByteLevel" in types:
        return "byte_level", False
    metaspace = "Metaspace" in types or any(
        part.get("type") == "Replace" and part.get("pattern", {}).get("String") == "▁" for part in decoders
    )
    if metaspace:
        fallback = "ByteFallback" in types or bool((spec.get("model") or {}).get("byte_fallback"))
        return "sentencepiece", fallback
    raise UnmaskError(
        f"cannot tell which bytes the tokens stand for: decoder {spec.get('decoder')!r}, pre-tokenizer "
        f"{spec.get('pre_tokenizer')!r}; structured output needs a byte-level (GPT-2 style) or "
        "SentencePiece-style (▁ for space) tokenizer"
    )


def piece_bytes(piece: str, kind: TokenKind, fallback: bool) -> bytes:
    """The bytes of one vocabulary entry ``piece`` of a tokenizer of the given family.

    Byte-level: each character through :func:`byte_decoder`; a piece with a character outside the
    alphabet (an added token such as ``"a b"``) is its UTF-8, as the ``tokenizers`` ByteLevel
    decoder does.
    """
    if kind == "byte_level":
        table = byte_decoder()
        if all(c in table for c in piece):
            return bytes(table[c] for c in piece)
        return piece.encode("utf-8")
    match = _BYTE_TOKEN.fullmatch(piece) if fallback else None
    if match:
        return bytes([int(match.group(1), 16)])
    return piece.replace("▁", " ").encode("utf-8")


def token_bytes(tokenizer: Tokenizer) -> list[bytes | None]:
    """The bytes of every id in [0, tokenizer.vocab_size): None for special tokens (MASK, EOS,
    PAD, added tokens marked special) and for ids without a vocabulary entry."""
    spec = json.loads(tokenizer.to_json())
    kind, fallback = token_kind(spec)
    added = tokenizer.hf.get_added_tokens_decoder()
    special = {i for i, token in added.items() if token.special} | {tokenizer.mask_id, tokenizer.eos_id, tokenizer.pad_id}
    out: list[bytes | None] = []
    for i in range(tokenizer.vocab_size):
        piece = tokenizer.hf.id_to_token(i)
        # added tokens that are not special go through the decoder like the others (tokenizers does)
        out.append(None if i in special or piece is None else piece_bytes(piece, kind, fallback) or None)
    return out

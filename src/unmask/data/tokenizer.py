"""Tokenizers: the shipped byte-level BPE, new BPEs trained on a corpus, or any local tokenizer.json.

Id conventions the model relies on: ``<|mask|>`` is the LAST id, ``mask_id == vocab_size``, so the
output head covers ids [0, vocab_size) and MASK is an input-only extra embedding row. Published MDM
tokenizers (LLaDA's ``<|mdm_mask|>``, Dream's ``<|mask|>``) have MASK inside the vocabulary instead:
then ``vocab_size`` counts every id and ``mask_id`` is that token's (ModelConfig.mask_token_id). ``<|eos|>``
ends every document (a real target); ``<|pad|>`` pads batches (the EOS when a tokenizer has none).

Rebuild the shipped tokenizer with ``python -m unmask.data.tokenizer``.
"""

from __future__ import annotations

import hashlib
from functools import cached_property
from importlib import resources
from pathlib import Path
from typing import Callable, Iterable, Sequence

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from unmask.errors import OptionError, UnmaskError

MASK, EOS, PAD = "<|mask|>", "<|eos|>", "<|pad|>"
MASK_NAMES = (MASK, "<|mdm_mask|>")  # the MASK token of this package (and Dream's), LLaDA's
EOS_NAMES = (EOS, "<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>")
PAD_NAMES = (PAD, "<pad>", "[PAD]")
DEFAULT_VOCAB = 4096


class Tokenizer:
    """A ``tokenizers.Tokenizer`` with the MASK/EOS/PAD conventions of this package."""

    def __init__(self, hf: HFTokenizer, source: str = "<memory>") -> None:
        mask = next((hf.token_to_id(n) for n in MASK_NAMES if hf.token_to_id(n) is not None), None)
        if mask is None:
            hf.add_special_tokens([MASK])
            mask = hf.token_to_id(MASK)
        total = hf.get_vocab_size(with_added_tokens=True)
        # MASK last: an input-only id after the vocabulary; anywhere else: an id inside it (LLaDA, Dream)
        self.mask_id: int = mask
        self.vocab_size: int = mask if mask == total - 1 else total
        self.hf = hf
        self.source = source
        eos = next((hf.token_to_id(n) for n in EOS_NAMES if hf.token_to_id(n) is not None), None)
        if eos is None:
            raise UnmaskError(f"tokenizer {source} has no end-of-text token; looked for {', '.join(EOS_NAMES)}")
        self.eos_id: int = eos
        self.pad_id: int = next((hf.token_to_id(n) for n in PAD_NAMES if hf.token_to_id(n) is not None), eos)

    @property
    def mask_inside(self) -> bool:
        """True when MASK is an id inside the vocabulary (LLaDA, Dream) rather than the id after it."""
        return self.mask_id < self.vocab_size

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; no special tokens added (documents get their EOS when packed)."""
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text (parallel in Rust); no special tokens added."""
        return [e.ids for e in self.hf.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int], mask_text: str = "_", skip_special: bool = True) -> str:
        """Text of ids; MASK shown as ``mask_text``, EOS/PAD dropped when ``skip_special``."""
        out, run = [], []
        for i in ids:
            i = int(i)
            if i == self.mask_id:
                out.append(self.hf.decode(run, skip_special_tokens=skip_special))
                out.append(mask_text)
                run = []
            else:
                run.append(i)
        out.append(self.hf.decode(run, skip_special_tokens=skip_special))
        return "".join(out)

    def to_json(self) -> str:
        """The serialized tokenizer (the content of ``tokenizer.json``)."""
        return self.hf.to_str()

    @cached_property
    def fingerprint(self) -> str:
        """Short hash of the serialized tokenizer: ties prepared data and checkpoints to it."""
        return hashlib.sha256(self.to_json().encode("utf-8")).hexdigest()[:12]

    def save(self, directory: str | Path) -> Path:
        """Write ``directory/tokenizer.json`` (MASK included) and return its path."""
        path = Path(directory) / "tokenizer.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_json(), encoding="utf-8")
        return path

    @classmethod
    def from_file(cls, path: str | Path) -> "Tokenizer":
        """Load a local ``tokenizer.json`` (or a folder holding one), e.g. GPT-2's or LLaMA's."""
        def missing(file: Path) -> UnmaskError:
            return UnmaskError(f"tokenizer {str(path)!r} not found; pass 'default', a tokenizer.json file, or a folder holding one")

        hf, file = read_tokenizer_json(path, missing)
        return cls(hf, str(file))


def read_tokenizer_json(path: str | Path, missing: Callable[[Path], UnmaskError]) -> tuple[HFTokenizer, Path]:
    """(the ``tokenizers`` tokenizer, its file) of ``path``: a ``tokenizer.json`` file, or a folder
    holding one, read as it is. ``missing(file)`` is the error when there is no such file."""
    path = Path(path)
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise missing(file)
    try:
        return HFTokenizer.from_file(str(file)), file
    except Exception as exc:  # tokenizers raises a bare Exception on malformed JSON
        raise UnmaskError(f"cannot read tokenizer {file}: {exc}") from None


def train_bpe(texts: Iterable[str], vocab_size: int = DEFAULT_VOCAB) -> Tokenizer:
    """Byte-level BPE with ``vocab_size`` real tokens (EOS=0 and PAD=1 among them) plus MASK after them.

    ``vocab_size`` is the trainer's target, so the model's output size is exactly that number
    (or fewer, when the corpus is too small to learn that many merges).
    """
    if vocab_size < 300:
        raise OptionError("vocab_size", "{vocab_size}={_n} is too small for byte-level BPE (256 bytes + specials); use >= 300",
                          _n=vocab_size)
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS, PAD], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    hf.train_from_iterator(texts, trainer)
    return Tokenizer(hf, f"bpe-{vocab_size}")


def default_tokenizer() -> Tokenizer:
    """The shipped 4096-token BPE, trained on the training works of the embedded corpus."""
    path = resources.files("unmask.data").joinpath("assets", "tokenizer.json")
    return Tokenizer(HFTokenizer.from_str(path.read_text(encoding="utf-8")), "default")


def load_tokenizer(spec: str | None) -> Tokenizer:
    """``None``/"default" -> the shipped BPE; otherwise a tokenizer.json path or a folder with one."""
    if spec is None or spec == "default":
        return default_tokenizer()
    return Tokenizer.from_file(spec)


def build_default_tokenizer(out_dir: str | Path | None = None) -> Path:
    """Retrain the shipped BPE on the training works and write ``tokenizer.json`` (default: the package assets).

    BPE training on a fixed corpus is deterministic, so this reproduces the shipped file byte for byte.
    """
    from unmask.data.corpus import shakespeare_works

    tok = train_bpe((text for _, text in shakespeare_works("train")), DEFAULT_VOCAB)
    return tok.save(Path(out_dir) if out_dir is not None else Path(__file__).parent / "assets")


if __name__ == "__main__":  # python -m unmask.data.tokenizer [OUT_DIR]
    import sys

    path = build_default_tokenizer(sys.argv[1] if len(sys.argv) > 1 else None)
    print(f"wrote {path} (fingerprint {Tokenizer.from_file(path).fingerprint})")

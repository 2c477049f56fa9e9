"""Named datasets through HF ``datasets`` (needs network; install with ``pip install 'unmask[hf]'``)."""

from __future__ import annotations

from typing import Iterator

from unmask.errors import UnmaskError


def hf_documents(name: str, config: str | None = None, split: str = "train", text_field: str = "text") -> Iterator[str]:
    """Documents of an HF dataset, streamed (e.g. ``hf_documents("wikitext", "wikitext-103-raw-v1")``)."""
    try:
        import datasets
    except ImportError:
        raise UnmaskError("--hf-dataset needs the `datasets` package: pip install 'unmask[hf]'") from None
    dataset = datasets.load_dataset(name, config, split=split, streaming=True)
    for record in dataset:
        if text_field not in record:
            raise UnmaskError(f"HF dataset {name!r} has no field {text_field!r} (fields: {sorted(record)}); pass --text-field")
        text = record[text_field]
        if text:
            yield text

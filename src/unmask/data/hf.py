"""Named datasets through HF ``datasets`` (needs network; install with ``pip install 'unmask[hf]'``)."""

from __future__ import annotations

from typing import Iterator

from unmask.errors import OptionError


def hf_documents(name: str, config: str | None = None, split: str = "train", text_field: str = "text") -> Iterator[str]:
    """Documents of an HF dataset, streamed (e.g. ``hf_documents("wikitext", "wikitext-103-raw-v1")``)."""
    try:
        import datasets
    except ImportError:
        raise OptionError("hf_dataset", "{hf_dataset} needs the `datasets` package: pip install 'unmask[hf]'") from None
    dataset = datasets.load_dataset(name, config, split=split, streaming=True)
    for record in dataset:
        if text_field not in record:
            raise OptionError("text_field", "HF dataset {_name!r} has no field {_field!r} (fields: {_fields}); pass {text_field}",
                              _name=name, _field=text_field, _fields=sorted(record))
        text = record[text_field]
        if text:
            yield text

"""``unmask data prepare``: the user's corpus -> packed token shards."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import typer

from unmask.cli.app import data_app
from unmask.errors import UnmaskError


@data_app.command("prepare")
def prepare(
    inputs: Optional[list[Path]] = typer.Argument(None, help="Text files, folders (*.txt, *.jsonl inside) or .jsonl files."),
    out: Path = typer.Option(..., "--out", help="Folder to write the packed token shards to."),
    tokenizer: str = typer.Option("default", help="'default' (shipped BPE), 'train' (new BPE on your corpus), or a tokenizer.json / folder."),
    vocab_size: int = typer.Option(4096, help="Vocabulary size when --tokenizer train."),
    val_input: Optional[list[Path]] = typer.Option(None, help="Validation documents; default: a --val-fraction of the inputs, by document (of a single document: the last --val-fraction of its text)."),
    val_fraction: float = typer.Option(0.05, help="Fraction of documents (of a single document's text) held out when no --val-input is given."),
    text_field: str = typer.Option("text", help="Field holding the text in .jsonl files / HF datasets."),
    hf_dataset: Optional[str] = typer.Option(None, help="Name of an HF dataset (needs network and `pip install 'unmask[hf]'`)."),
    hf_config: Optional[str] = typer.Option(None, help="HF dataset configuration."),
    hf_split: str = typer.Option("train", help="HF dataset split."),
    workers: int = typer.Option(min(4, os.cpu_count() or 1), min=0, help="Tokenising processes (0: the main process only)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace prepared data already in --out (runs trained on it then refuse to --resume on it)."),
) -> None:
    """Tokenise a corpus into packed shards for `unmask train --data`."""
    from unmask.data import TokenDataset, hf_documents, load_tokenizer, prepare_dataset, read_documents, train_bpe
    from unmask.data.shards import check_out_dir
    from unmask.data.stream import doc_chunks, pieces

    if not inputs and not hf_dataset:
        raise UnmaskError("data prepare: give input files/folders or --hf-dataset NAME")
    if not 0 < val_fraction < 1:
        raise UnmaskError(f"--val-fraction={val_fraction} must be between 0 and 1")
    check_out_dir(out, overwrite)  # before tokenising, not after
    # streamed: files are read lazily and HF datasets record by record, so memory stays bounded
    def documents():
        return hf_documents(hf_dataset, hf_config, hf_split, text_field) if hf_dataset else read_documents(inputs, text_field, lazy=True)

    val_docs = read_documents(val_input, text_field, lazy=True) if val_input else None
    docs = documents()
    if tokenizer == "train":
        if hf_dataset:  # a one-pass stream: keep it for the second pass
            docs = list(docs)
            tok = train_bpe(docs, vocab_size)
        else:
            tok = train_bpe((piece for doc in documents() for piece in pieces(doc_chunks(doc))), vocab_size)
    else:
        tok = load_tokenizer(tokenizer)
    path = prepare_dataset(out, tok, docs, val_docs, val_fraction=val_fraction, workers=workers, overwrite=overwrite)
    meta = TokenDataset(path, "train").meta
    train, val = meta["splits"]["train"], meta["splits"]["val"]
    typer.echo(
        f"wrote {path}: {train['num_documents']:,} train / {val['num_documents']:,} validation documents "
        f"({train['num_tokens']:,} / {val['num_tokens']:,} tokens); validation: {meta['validation']}"
    )

"""Corpora, tokenizers and packed token shards."""

from unmask.data.corpus import VALIDATION_WORKS, read_documents, shakespeare_notice, shakespeare_works
from unmask.data.hf import hf_documents
from unmask.data.shards import TokenDataset, cache_root, default_dataset, prepare_dataset
from unmask.data.tokenizer import Tokenizer, build_default_tokenizer, default_tokenizer, load_tokenizer, train_bpe

__all__ = [
    "VALIDATION_WORKS", "read_documents", "shakespeare_notice", "shakespeare_works", "hf_documents", "TokenDataset",
    "cache_root", "default_dataset", "prepare_dataset", "Tokenizer", "build_default_tokenizer", "default_tokenizer",
    "load_tokenizer", "train_bpe",
]

"""Data: documents -> tokenizer -> cached token streams -> next-token blocks.

``TextDataModule`` is imported lazily (it pulls in Lightning); the rest is light.
"""

from nexttoken.data.documents import (
    Document,
    default_corpus,
    find_documents,
    iter_documents,
    load_documents,
    read_document,
)
from nexttoken.data.tokenizers import Tokenizer, build_tokenizer
from nexttoken.errors import DataError, DataWarning

__all__ = [
    "DataError",
    "DataWarning",
    "Document",
    "TextDataModule",
    "Tokenizer",
    "build_tokenizer",
    "default_corpus",
    "find_documents",
    "iter_documents",
    "load_documents",
    "read_document",
]


def __getattr__(name: str):
    if name == "TextDataModule":
        from nexttoken.data.datamodule import TextDataModule

        return TextDataModule
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

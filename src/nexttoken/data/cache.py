"""The token cache: each split of a corpus tokenized once into ``.npy`` token streams, reused by
every later run and every process (keyed by the split's content and the tokenizer)."""

from __future__ import annotations

import json
import os
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from nexttoken.data.documents import DataWarning, Document
from nexttoken.data.packing import concat_byte_counts, concat_documents, token_dtype
from nexttoken.data.tokenizers import Tokenizer, document_frame
from nexttoken.io import write_atomically

# Bump when the layout of the cached files changes, so old caches are never misread.
# 2: documents framed by document_frame() (pretrained tokenizers without a BOS: "doc EOS doc EOS").
CACHE_FORMAT = 2
# Texts per call to the batch encoder: big enough to keep every core busy, small enough that the
# encoder's per-token offsets (Python objects) stay a few hundred MB at most.
_ENCODE_CHUNK_CHARS = 1 << 23


def default_cache_dir() -> Path:
    """``$NEXTTOKEN_CACHE`` if set, else ``~/.cache/nexttoken``."""
    return Path(os.environ.get("NEXTTOKEN_CACHE") or Path.home() / ".cache" / "nexttoken").expanduser()


def _chunks(documents: Sequence[Document], max_chars: int) -> Iterator[list[Document]]:
    chunk: list[Document] = []
    size = 0
    for doc in documents:
        chunk.append(doc)
        size += len(doc.text)
        if size >= max_chars:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def tokenize_documents(
    tokenizer: Tokenizer, documents: Sequence[Document], with_bytes: bool
) -> tuple[np.ndarray, np.ndarray | None]:
    """The split's token stream (each document framed by :func:`document_frame`) and, if asked,
    per-token byte counts (frame tokens cover 0 bytes)."""
    token_lists: list[np.ndarray] = []
    byte_lists: list[np.ndarray] = []
    for chunk in _chunks(documents, _ENCODE_CHUNK_CHARS):
        texts = [doc.text for doc in chunk]
        if with_bytes:
            for ids, counts in tokenizer.encode_batch_with_bytes(texts):
                token_lists.append(ids)
                byte_lists.append(counts)
        else:
            token_lists.extend(np.asarray(ids, dtype=np.int64) for ids in tokenizer.encode_batch(texts))
    before, after = document_frame(tokenizer)
    stream = concat_documents(token_lists, before, after, dtype=token_dtype(tokenizer.vocab_size))
    byte_counts = concat_byte_counts(byte_lists, before, after, dtype=np.uint32) if with_bytes else None
    return stream, byte_counts


class TokenCache:
    """The files of one tokenized corpus: ``train.npy``, ``val.npy``, ``val_bytes.npy``, ``val.txt``
    and ``meta.json`` (written last: its presence means the rest is complete)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.train = directory / "train.npy"
        self.val = directory / "val.npy"
        self.val_bytes = directory / "val_bytes.npy"
        self.val_text = directory / "val.txt"
        self.meta = directory / "meta.json"

    def exists(self) -> bool:
        return self.meta.is_file() and all(
            p.is_file() for p in (self.train, self.val, self.val_bytes, self.val_text)
        )

    def write(
        self,
        tokenizer: Tokenizer,
        train_docs: Sequence[Document],
        val_docs: Sequence[Document],
        check: Callable[[dict[str, Any]], None] | None = None,
    ) -> dict[str, Any]:
        """Tokenize both splits with ``tokenizer`` and write every file, ``meta.json`` last; returns
        what ``meta.json`` holds (document, token and validation byte counts, seconds taken).
        ``check(meta)`` may refuse the result (by raising) before any file is written."""
        started = time.perf_counter()
        train_stream, _ = tokenize_documents(tokenizer, train_docs, with_bytes=False)
        val_stream, val_bytes = tokenize_documents(tokenizer, val_docs, with_bytes=True)
        val_text = b"".join(doc.text.encode("utf-8") for doc in val_docs)
        if int(val_bytes.sum()) != len(val_text):
            # Only possible when a tokenizer turns a whole non-empty document into no tokens at all.
            warnings.warn(
                f"the tokenizer covers {int(val_bytes.sum())} of the {len(val_text)} validation bytes",
                DataWarning,
                stacklevel=2,
            )
        meta = {
            "format": CACHE_FORMAT,
            "tokenizer": tokenizer.to_dict(),
            "train_documents": len(train_docs),
            "val_documents": len(val_docs),
            "train_tokens": len(train_stream),
            "val_tokens": len(val_stream),
            "val_bytes": int(val_bytes.sum()),
            "seconds": round(time.perf_counter() - started, 3),
        }
        if check is not None:
            check(meta)
        write_atomically(self.train, lambda f: np.save(f, train_stream))
        write_atomically(self.val, lambda f: np.save(f, val_stream))
        write_atomically(self.val_bytes, lambda f: np.save(f, val_bytes))
        write_atomically(self.val_text, val_text)
        write_atomically(self.meta, json.dumps(meta, indent=1))
        return meta

    def read_meta(self) -> dict[str, Any]:
        return json.loads(self.meta.read_text())

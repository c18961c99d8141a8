"""The corpus ``nexttoken fit`` trains on, as one stream: every document of ``data.path`` marked
training or validation by one stable rule, the corpus's identity (what the token cache is keyed by),
and a bounded, seeded sample of the training text (what a BPE tokenizer is trained on).

Nothing here holds the corpus in memory: documents are read one source at a time (see
:func:`nexttoken.data.documents.iter_documents`), and a text file, on request, in parts, so a corpus
may be far larger than RAM, and so may one file of it.
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
import json
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

from nexttoken.data.documents import (
    Document,
    as_parts,
    corpus_root,
    held_out,
    is_text_file,
    iter_documents,
    no_text_error,
    split_text_file,
    unit_hash,
)
from nexttoken.data.records import Record, RecordSource
from nexttoken.errors import DataError, setting

# A saved DatasetDict's own held-out split, in order of preference.
VAL_SPLITS = ("validation", "test")
# Bump when the rule that turns files into split documents changes: it is part of the identity.
CORPUS_RULES = 1
# The sample for BPE is chosen by a hash salted differently from the split's, so that it is not
# the documents nearest to the validation threshold.
_SAMPLE_SALT = "bpe-sample\0"
_HASH_BLOCK = 1 << 20


class Corpus:
    """Training and validation documents of a set of sources, streamed.

    Args:
        paths: sources as :func:`nexttoken.data.documents.find_documents` returns them.
        val_fraction: share of documents held out (of bytes, for a corpus of one text file).
        val_paths: sources that are the validation set instead (removed from ``paths``).
        errors: ``"strict"`` or ``"replace"`` for invalid UTF-8.
        text_field: the field of each record that holds its text (dotted for a nested field).

    The split: ``val_paths`` when given; else a saved ``DatasetDict``'s own ``validation`` (or
    ``test``) split for its records; else a corpus of one text file holds out the end of its bytes;
    else each document goes by :func:`nexttoken.data.documents.held_out` (a hash of its name, a path
    relative to the corpus root with ``#index`` for a record), the same on every machine and for any
    number of workers. A corpus of text files keeps at least one file on each side.
    """

    def __init__(
        self,
        paths: Sequence[str | os.PathLike],
        val_fraction: float,
        val_paths: Sequence[str | os.PathLike] | None = None,
        *,
        errors: str = "strict",
        text_field: str = "text",
    ) -> None:
        resolved = [Path(p).resolve() for p in paths]
        self.val_paths = [Path(p).resolve() for p in val_paths or []]
        held = set(self.val_paths)
        self.train_paths = [p for p in resolved if p not in held]
        if self.val_paths and not self.train_paths:
            raise DataError(
                f"every training document is also in {setting('data.val_path')}; give training text too"
            )
        if not self.val_paths and not 0.0 < val_fraction < 1.0:
            raise DataError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction}")
        if not self.train_paths:
            raise DataError(
                f"no documents to read; pass {setting('data.path')} with at least one file or folder"
            )
        self.val_fraction = val_fraction
        self.errors = errors
        self.text_field = text_field
        self.root = corpus_root(self.train_paths + self.val_paths)
        self.one_file = (
            not self.val_paths and len(self.train_paths) == 1 and is_text_file(self.train_paths[0])
        )
        # Splits of saved DatasetDicts: path -> (split read for training, its own held-out split or None).
        self._splits: dict[Path, tuple[str, str | None]] = {}
        self._val_splits: dict[Path, list[str] | None] = {}
        for path in self.train_paths:
            splits = self._dataset_splits(path)
            if splits is not None:
                if "train" not in splits:
                    raise DataError(
                        f"{path} has no 'train' split (its splits: {', '.join(splits)}); point "
                        f"{setting('data.path')} at a split folder inside it, or re-save it with a 'train' "
                        "split"
                    )
                own = None if self.val_paths else next((s for s in VAL_SPLITS if s in splits), None)
                self._splits[path] = ("train", own)
        for path in self.val_paths:
            splits = self._dataset_splits(path)
            own = next((s for s in VAL_SPLITS if s in splits), None) if splits else None
            self._val_splits[path] = [own] if own else None
        # A corpus of text files keeps at least one (non-empty) file on each side.
        self._val_names: set[str] | None = None
        if not self.val_paths and not self.one_file and all(is_text_file(p) for p in self.train_paths):
            names = [self._name(p) for p in self.train_paths if p.stat().st_size > 0]
            n_val = sum(held_out(name, val_fraction) for name in names)
            n_val = min(max(n_val, 1), len(names) - 1)
            self._val_names = set(sorted(names, key=unit_hash)[:n_val])

    def _name(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()

    def _dataset_splits(self, path: Path) -> list[str] | None:
        """The splits of a saved ``DatasetDict`` at ``path``; None for any other source."""
        return RecordSource(path, self._name(path)).splits() if path.is_dir() else None

    def _splits_read(self, path: Path) -> list[str] | None:
        """The ``DatasetDict`` splits :meth:`documents` reads from ``path`` (None: all, or not one)."""
        if path in self._splits:
            return [s for s in self._splits[path] if s is not None]
        return self._val_splits.get(path)

    # ------------------------------------------------------------------ the split
    def _hash_split(self, path: Path) -> bool:
        """True when the documents of training source ``path`` are split by their names."""
        return not self.val_paths and self._splits.get(path, (None, None))[1] is None

    def _held_out_name(self, name: str) -> bool:
        if self._val_names is not None:
            return name in self._val_names
        return held_out(name, self.val_fraction)

    def _is_val(self, path: Path, name: str, split: str | None) -> bool:
        """Whether the document or record ``name`` (of ``split``) of training source ``path`` is held out."""
        if path in self._splits and self._splits[path][1] is not None:
            return split == self._splits[path][1]
        return self._hash_split(path) and self._held_out_name(name)

    def documents(
        self, on_read: Callable[[int], None] | None = None, *, parts: bool = False
    ) -> Iterator[tuple[bool, Document]]:
        """Every document as ``(is_validation, document)``, in corpus order (training sources, then
        ``val_paths``). ``on_read`` gets the number of source bytes read since its last call.

        ``parts``: text files come in parts as they are read (see
        :class:`~nexttoken.data.documents.Document`), so that not even one is held whole; the two
        halves of a one-file corpus too, each a document of its own."""
        if self.one_file:
            path = self.train_paths[0]
            if path.stat().st_size == 0:
                raise no_text_error(self.train_paths)
            name = self._name(path)
            halves = split_text_file(path, name, self.val_fraction, self.errors, on_read)
            for is_val, texts in itertools.groupby(halves, key=lambda half: half[0]):
                half = f"{name}[{'val' if is_val else 'train'}]"
                texts = (text for _, text in texts)
                for document in as_parts(half, texts if parts else ["".join(texts)]):
                    yield is_val, document
            return
        for path in self.train_paths:
            for document in self._read(path, self._splits_read(path), on_read=on_read, parts=parts):
                yield self._is_val(path, document.name, document.split), document
        for path in self.val_paths:
            for document in self._read(path, self._splits_read(path), on_read=on_read, parts=parts):
                yield True, document

    def records(
        self,
        fields: Sequence[str],
        *,
        optional: Sequence[str] = (),
        on_read: Callable[[int], None] | None = None,
    ) -> Iterator[tuple[bool, Record]]:
        """Every record as ``(is_validation, record)`` with the named fields (required and
        ``optional``), split by the same rule as :meth:`documents` (a record is a document); for
        data whose records are not one text, such as conversations. Text files are an error."""
        for is_val, path in [(False, p) for p in self.train_paths] + [(True, p) for p in self.val_paths]:
            if is_text_file(path):
                raise DataError(
                    f"{path} is a text file, but this data is read as records (JSON Lines, JSON, Parquet or a "
                    f"saved dataset); remove it from {setting('data.path')}, or use {setting('data.format')} "
                    "text"
                )
            source = RecordSource(path, self._name(path))
            for record in source.read(
                fields,
                optional=optional,
                splits=self._splits_read(path),
                errors=self.errors,
                on_read=on_read,
                field_setting="data.format",
            ):
                name = source.record_name(record.index, record.split)
                yield is_val or self._is_val(path, name, record.split), record

    def _read(self, path: Path, splits, **kwargs) -> Iterator[Document]:
        return iter_documents(
            [path], self.errors, self.root, text_field=self.text_field, splits=splits, **kwargs
        )

    def check_split(self, train_documents: int, val_documents: int, unit: str = "document") -> None:
        """An error unless both sides of the split got documents (or records: ``unit``)."""
        if not train_documents and not val_documents:
            raise no_text_error(self.train_paths + self.val_paths)
        if not val_documents:
            raise DataError(
                f"no {unit} fell into the validation split (of {train_documents:,} {unit}s, val_fraction "
                f"{self.val_fraction}); raise {setting('data.val_fraction')} or pass "
                f"{setting('data.val_path')}"
            )
        if not train_documents:
            raise DataError(
                f"every one of the {val_documents:,} {unit}s fell into the validation split; lower "
                f"{setting('data.val_fraction')}, or give training text besides {setting('data.val_path')}"
            )

    # ------------------------------------------------------------------ identity and size
    def identity(self) -> str:
        """A sha256 of everything the split documents depend on: each source's bytes and name
        relative to the corpus root, and the settings (so a copy elsewhere has the same identity)."""
        digest = hashlib.sha256()
        settings = [CORPUS_RULES, self.text_field, self.errors, None if self.val_paths else self.val_fraction]
        digest.update(json.dumps(settings).encode())
        for side, paths in (("train", self.train_paths), ("val", self.val_paths)):
            for path in paths:
                digest.update(json.dumps([side, self._name(path), _source_digest(path)]).encode())
        return digest.hexdigest()

    def size(self) -> int:
        """Bytes on disk of what :meth:`documents` reads (the progress bar's total)."""
        total = 0
        for path in self.train_paths + self.val_paths:
            splits = self._splits_read(path)
            if path.is_dir():
                folders = [path / s for s in splits] if splits else [path]
                total += sum(f.stat().st_size for folder in folders for f in folder.rglob("*.arrow"))
            else:
                total += path.stat().st_size
        return total

    # ------------------------------------------------------------------ a sample for BPE
    def sample(self, max_bytes: int, on_read: Callable[[int], None] | None = None) -> list[str]:
        """A uniform, seeded sample of the training documents' text: about ``max_bytes`` of UTF-8
        (at most one document more), or all of it when it is smaller, in corpus order.

        The documents kept are those with the smallest hashes of their names (a fixed salt: the
        same sample on every machine and run). The hash threshold falls as the sample fills, so
        documents above it are never read (text files) or parsed (records); the sample never holds
        more than ``max_bytes`` plus one document. A single text file gives the first ``max_bytes``
        of its training part (read only so far).
        """
        if self.one_file:
            head, size = [], 0
            for is_val, document in self.documents(on_read, parts=True):
                if is_val or size >= max_bytes:
                    break
                head.append(document.text.encode("utf-8"))
                size += len(head[-1])
            return [b"".join(head)[:max_bytes].decode("utf-8", errors="ignore")]
        sample = _SmallestHashes(max_bytes)
        for path in self.train_paths:
            plan = self._splits.get(path)

            def wanted(name: str, path: Path = path) -> bool:
                if not sample.wants(unit_hash(_SAMPLE_SALT + name)):
                    return False
                return not (self._hash_split(path) and self._held_out_name(name))

            splits = None if plan is None else [plan[0]]
            for document in self._read(path, splits, select=wanted, on_read=on_read):
                sample.add(unit_hash(_SAMPLE_SALT + document.name), document.text)
        return sample.texts()


def bounded_sample(named_texts: Iterable[tuple[str, str]], max_bytes: int) -> list[str]:
    """The rule of :meth:`Corpus.sample` for texts already at hand, as ``(name, text)``: about
    ``max_bytes`` of them (at most one more), those with the smallest salted hashes of their names,
    in the order they came; all of them when they are smaller."""
    sample = _SmallestHashes(max_bytes)
    for name, text in named_texts:
        sample.add(unit_hash(_SAMPLE_SALT + name), text)
    return sample.texts()


class _SmallestHashes:
    """The texts with the smallest hashes that fit in ``max_bytes`` of UTF-8 (plus at most one):
    a uniform sample of a stream of unknown length in bounded memory (bottom-k sampling by size)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.threshold = 1.0  # texts hashed at or above it can never be kept
        self._kept: list[tuple[float, int, int, str]] = []  # (-hash, order, bytes, text): a max-heap
        self._bytes = 0
        self._order = 0

    def wants(self, key: float) -> bool:
        return key < self.threshold

    def add(self, key: float, text: str) -> None:
        if not self.wants(key):
            return
        size = len(text.encode("utf-8"))
        heapq.heappush(self._kept, (-key, self._order, size, text))
        self._order += 1
        self._bytes += size
        while self._bytes > self.max_bytes and len(self._kept) > 1:
            negative_key, _, dropped, _ = heapq.heappop(self._kept)
            self._bytes -= dropped
            self.threshold = -negative_key

    def texts(self) -> list[str]:
        """The kept texts in the order they came."""
        return [text for _, _, _, text in sorted(self._kept, key=lambda item: item[1])]


def _source_digest(path: Path) -> str:
    """sha256 of a file's bytes, or of every file in a folder with its relative path."""
    if path.is_dir():
        digest = hashlib.sha256()
        for file in sorted(p for p in path.rglob("*") if p.is_file()):
            digest.update(json.dumps([file.relative_to(path).as_posix(), _source_digest(file)]).encode())
        return digest.hexdigest()
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()

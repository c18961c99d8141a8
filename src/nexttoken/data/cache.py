"""The token cache: a corpus tokenized once into ``.npy`` token streams, reused by every later run
and every process (keyed by the corpus's identity and the tokenizer).

Building one streams: documents are read one at a time, a text file in parts
(:class:`nexttoken.data.corpus.Corpus`), gathered into chunks of about ``CHUNK_CHARS`` characters,
tokenized by worker processes, and the results appended in order to the stream files, so memory
does not grow with the corpus. The result does not depend on the number of workers or the chunk
size: each document's tokens are framed by :func:`nexttoken.data.tokenizers.document_frame`, and
they are the tokens of the whole document, also when a long one is tokenized in pieces.

Pieces: a document longer than ``PIECE_CHARS`` is cut into pieces of about that size, and only where
the tokenizer's own rules make the cut invisible (:func:`piece_cuts`): for the ``bytes`` tokenizer
anywhere, for byte-level BPEs (nexttoken's own, GPT-2's, SmolLM2's, Llama 3's, Qwen2's) just before a
space that follows a character other than whitespace, which is where their pre-tokenizer starts a
word anyway. A tokenizer whose rules are not known to allow a cut tokenizes each document whole.

Kill-safety: the files are written into a staging folder beside the cache folder, ``meta.json``
last, and the folder is renamed into place only when all is written; a killed build leaves only
the staging folder, which no reader takes for a cache and the next build removes. One process
builds a given cache at a time (a lock file beside it): others wait, then read what it wrote.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

import numpy as np

from nexttoken.data.corpus import Corpus
from nexttoken.data.documents import Document
from nexttoken.data.packing import token_dtype
from nexttoken.data.parallel import WorkerDied, memory_words, ordered_map
from nexttoken.data.tokenizers import Tokenizer, document_frame
from nexttoken.errors import DataError, DataWarning, setting
from nexttoken.io import atomic_folder, write_atomically

log = logging.getLogger(__name__)

# Bump when the layout of the cached files changes, so old caches are never misread.
# 2: documents framed by document_frame() (pretrained tokenizers without a BOS: "doc EOS doc EOS").
# 3: record formats and streamed builds; meta.json holds the tokenizer and is all a reader needs.
CACHE_FORMAT = 3
# Characters of text per job handed to a worker: enough to amortize the hand-off (a few ms) over
# the tokenizing (~0.2 s per MB per core), small enough that jobs in flight hold a few MB each.
CHUNK_CHARS = 1 << 20
# Characters of a long document tokenized at a time (where the tokenizer allows a cut, see
# piece_cuts): while it works, the encoder holds 100-400 bytes per token (ids, offsets, token
# strings; the bytes tokenizer makes a token of every byte), so a 50 MB file tokenized whole took
# 6.5 GB; a piece of 256K characters takes 50-100 MB.
PIECE_CHARS = 1 << 18
# Characters per call to the batch encoder (texts are gathered up to it): what the encoder holds is
# then a piece's worth or two, also when a job is many small documents.
_ENCODE_CHUNK_CHARS = PIECE_CHARS
STREAM_FILES = ("train.npy", "val.npy", "val_bytes.npy", "val.txt")
Result = TypeVar("Result")


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
    """The token stream of ``documents`` (each framed by :func:`document_frame`) and, if asked,
    per-token byte counts (frame tokens cover 0 bytes). A document in pieces (see
    :class:`~nexttoken.data.documents.Document`) has its frame before its first piece and after its
    last one."""
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
    starts = [doc.part == 0 for doc in documents]
    ends = [not doc.more for doc in documents]
    stream = _framed(token_lists, before, after, starts, ends, token_dtype(tokenizer.vocab_size))
    byte_counts = None
    if with_bytes:
        byte_counts = _framed(byte_lists, [0] * len(before), [0] * len(after), starts, ends, np.uint32)
    return stream, byte_counts


def _framed(
    arrays: Sequence[np.ndarray],
    before: Sequence[int],
    after: Sequence[int],
    starts: Sequence[bool],
    ends: Sequence[bool],
    dtype,
) -> np.ndarray:
    """The arrays in one stream, ``before`` in front of each that starts a document and ``after``
    behind each that ends one (:func:`nexttoken.data.packing.concat_documents` for whole documents)."""
    lengths = [
        len(before) * s + len(a) + len(after) * e for a, s, e in zip(arrays, starts, ends, strict=True)
    ]
    stream = np.empty(sum(lengths), dtype=dtype)
    position = 0
    for array, start, end in zip(arrays, starts, ends, strict=True):
        if start:
            stream[position : position + len(before)] = before
            position += len(before)
        stream[position : position + len(array)] = array
        position += len(array)
        if end:
            stream[position : position + len(after)] = after
            position += len(after)
    return stream


# --------------------------------------------------------------------------- pieces
# Whitespace by any definition a tokenizer's regex may use (Python's ``\s`` is str.isspace; the rest
# were whitespace in some Unicode version or are invisible): a cut never follows one of these.
_NOT_SPACE = r"[^\s\u180e\u200b\u2060\ufeff]"
_LAST_SPACE_CUT = re.compile(rf"(?s).*{_NOT_SPACE}(?= )")
_SPACE_CUT = re.compile(rf"{_NOT_SPACE}(?= )")
# Split pre-tokenizer patterns known to allow a cut before a space that follows a non-space: no
# alternative matches a non-space followed by a space, none looks behind, and the only look-ahead,
# (?!\S), sees a space there as it sees the end of a piece. GPT-2's; Llama 3's (= GPT-4's cl100k); Qwen2's.
_KNOWN_SPLIT_PATTERNS = frozenset(
    {
        r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+",
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
        r"|\s+(?!\S)|\s+",
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
        r"|\s+(?!\S)|\s+",
    }
)


class Cuts:
    """Where a text may be cut so that its pieces, tokenized apart and concatenated, give exactly the
    tokens of the whole: between any two characters (``anywhere``), or just before a space (U+0020)
    that follows a character that is not whitespace."""

    def __init__(self, anywhere: bool) -> None:
        self.anywhere = anywhere

    def __repr__(self) -> str:
        return f"Cuts(anywhere={self.anywhere})"

    def last(self, text: str, start: int, stop: int) -> int:
        """The last cut ``c`` with ``start < c <= stop`` and ``c < len(text)``, or -1."""
        stop = min(stop, len(text) - 1)
        if stop <= start:
            return -1
        if self.anywhere:
            return stop
        found = _LAST_SPACE_CUT.match(text, start, stop + 1)
        return found.end() if found else -1

    def first(self, text: str, start: int) -> int:
        """The first cut ``c`` with ``start < c < len(text)``, or -1."""
        if self.anywhere:
            return start + 1 if start + 1 < len(text) else -1
        found = _SPACE_CUT.search(text, start)
        return found.end() if found else -1

    def between(self, before: str, after: str) -> bool:
        """Whether a cut may fall between the texts ``before`` and ``after`` (both non-empty)."""
        return self.anywhere or (after[0] == " " and _SPACE_CUT.match(before[-1] + " ") is not None)


def piece_cuts(tokenizer: Tokenizer) -> Cuts | None:
    """Where this tokenizer allows a text to be cut (:class:`Cuts`), or None where its rules are not
    known to allow any cut (then each document is tokenized whole).

    Read from its ``tokenizer.json``: the model must work on each pre-token alone (BPE without
    dropout, Unigram, WordPiece, WordLevel); the normalizer must be none, NFC or NFD (a space starts
    no composition, so they never act across one); no added token that is matched in the text may
    hold whitespace or take the whitespace after it (``rstrip``); and the pre-tokenizer must start a
    pre-token at every space that follows a non-space (ByteLevel with its regex, Metaspace that
    splits, Split with a known pattern), possibly with ones that only split further (Digits,
    ByteLevel without its regex). The ``bytes`` tokenizer (ByteLevel without its regex, a BPE with
    no merges, so one token per byte) may be cut anywhere.
    """
    spec = json.loads(tokenizer.to_dict()["tokenizer_json"])
    model = spec.get("model") or {}
    if model.get("type") not in ("BPE", "Unigram", "WordPiece", "WordLevel") or model.get("dropout"):
        return None
    for token in spec.get("added_tokens") or []:
        if not token.get("special") and (token.get("rstrip") or any(c.isspace() for c in token["content"])):
            return None
    normalizer = spec.get("normalizer")
    normalizers = (
        normalizer.get("normalizers", []) if normalizer and normalizer["type"] == "Sequence" else [normalizer]
    )
    if any(n is not None and n.get("type") not in ("NFC", "NFD") for n in normalizers):
        return None
    pre = spec.get("pre_tokenizer")
    members = pre.get("pretokenizers", []) if pre and pre["type"] == "Sequence" else [pre]
    kinds = [_pre_tokenizer_kind(member) for member in members]
    if None in kinds:
        return None
    if "splits" in kinds:
        return Cuts(anywhere=False)
    no_merges = model.get("type") == "BPE" and not model.get("merges")
    if kinds == ["keeps"] and no_merges and normalizer is None:
        return Cuts(anywhere=True)
    return None


def _pre_tokenizer_kind(spec: dict[str, Any] | None) -> str | None:
    """``"splits"``: starts a pre-token at every space after a non-space, and looks no further than
    the next character; ``"keeps"``: never joins or looks across characters; None: not known."""
    if spec is None:
        return None
    kind = spec.get("type")
    if kind == "ByteLevel":
        return "splits" if spec.get("use_regex", True) else "keeps"
    if kind == "Metaspace":
        return "splits" if spec.get("split", True) and spec.get("replacement") == "\u2581" else None
    if kind == "Split":
        pattern = spec.get("pattern") or {}
        known = pattern.get("Regex") in _KNOWN_SPLIT_PATTERNS
        return "splits" if known and spec.get("behavior") == "Isolated" and not spec.get("invert") else None
    if kind == "Digits":
        return "keeps"
    return None


def _pieces(
    documents: Iterator[tuple[bool, Document]], piece_chars: int, cuts: Cuts | None
) -> Iterator[tuple[bool, Document]]:
    """The documents (whole, or in consecutive parts as read) as pieces of about ``piece_chars``
    characters, cut only where ``cuts`` allows (None: whole documents); the pieces of each document
    are numbered from 0, as its parts were (:class:`~nexttoken.data.documents.Document`). A piece is
    longer only where there is no cut near enough."""
    held: list[str] = []  # the current document's text not yet handed on
    held_chars = 0
    piece = 0
    for is_val, document in documents:
        text, start = document.text, 0
        while cuts is not None and len(text) - start > piece_chars - held_chars:
            room = piece_chars - held_chars
            cut = cuts.last(text, start, start + room) if room > 0 else -1
            if cut == -1 and held and cuts.between(held[-1], text):
                cut = 0
            if cut == -1:
                cut = cuts.first(text, start + max(room, 0))
            if cut == -1:
                break
            yield (
                is_val,
                Document(document.name, "".join([*held, text[start:cut]]), document.split, piece, True),
            )
            held, held_chars, start = [], 0, cut
            piece += 1
        rest = text[start:] if start else text
        if document.more:
            held.append(rest)
            held_chars += len(rest)
            continue
        yield is_val, Document(document.name, "".join([*held, rest]), document.split, piece)
        held, held_chars, piece = [], 0, 0


# --------------------------------------------------------------------------- jobs
Job = tuple[bool, list[Document]]  # (is_val, documents or pieces of documents of one split)


def _tokenize_job(tokenizer: Tokenizer, job: Job):
    """One chunk of one split: ``(is_val, stream, byte_counts, documents, utf8_bytes)`` (documents:
    those whose last piece is in it)."""
    is_val, documents = job
    stream, byte_counts = tokenize_documents(tokenizer, documents, with_bytes=is_val)
    ended = sum(not d.more for d in documents)
    return is_val, stream, byte_counts, ended, sum(len(d.text.encode("utf-8")) for d in documents)


_worker_tokenizer: Tokenizer | None = None


def _start_worker(tokenizer_state: dict[str, Any]) -> None:
    # One thread per worker process: the tokenizer's own thread pool would only compete with the
    # other workers for the same cores.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    global _worker_tokenizer
    _worker_tokenizer = Tokenizer.from_dict(tokenizer_state)


def _tokenize_in_worker(job: Job):
    return _tokenize_job(_worker_tokenizer, job)


def _jobs(
    documents: Iterator[tuple[bool, Document]],
    chunk_chars: int,
    write_val_text: Callable[[bytes], object],
    *,
    piece_chars: int | None = None,
    cuts: Cuts | None = None,
) -> Iterator[Job]:
    """Chunks of about ``chunk_chars`` characters, each of one split, in order, of the documents cut
    into pieces (:func:`_pieces`). Validation texts are written as they are read: jobs come back in
    the order they are made, so they match the stream."""

    def read() -> Iterator[tuple[bool, Document]]:
        for is_val, document in documents:
            if is_val:
                write_val_text(document.text.encode("utf-8"))
            yield is_val, document

    pending: dict[bool, list[Document]] = {False: [], True: []}
    sizes = {False: 0, True: 0}
    for is_val, document in _pieces(read(), piece_chars or PIECE_CHARS, cuts):
        pending[is_val].append(document)
        sizes[is_val] += len(document.text)
        if sizes[is_val] >= chunk_chars:
            yield is_val, pending[is_val]
            pending[is_val], sizes[is_val] = [], 0
    for is_val in (False, True):
        if pending[is_val]:
            yield is_val, pending[is_val]


def tokenize_jobs(
    tokenizer: Tokenizer, jobs: Iterator[tuple[bool, list[str]]], workers: int
) -> Iterator[tuple]:
    """:func:`_tokenize_job` of each job, in order: in this process (``workers=0``) or in
    ``workers`` processes, each with the tokenizer's own threads off. A worker that dies is a
    :class:`~nexttoken.errors.DataError` naming what it was tokenizing."""
    if workers == 0:
        return ordered_map(partial(_tokenize_job, tokenizer), jobs, 0)
    results = ordered_map(
        _tokenize_in_worker, jobs, workers, initializer=_start_worker, initargs=(tokenizer.to_dict(),)
    )
    return _naming_deaths(results, workers)


def _naming_deaths(results: Iterator[tuple], workers: int) -> Iterator[tuple]:
    try:
        yield from results
    except WorkerDied as died:
        how = f": {died.how}" if died.how else ""
        if workers > 1:
            advice = f"use fewer workers ({setting('data.num_workers')} {workers // 2}) or free memory"
        else:
            advice = "free memory, or split the longest documents"
        raise DataError(
            f"a tokenizing worker died while tokenizing {describe_jobs(died.items)}{how}; {memory_words()}, "
            f"for {workers} worker{'s' if workers > 1 else ''} and this process; {advice}; nothing was cached"
        ) from died


def describe_jobs(jobs: Sequence[Job]) -> str:
    """What ``jobs`` hold, for a message: ``big.txt[train] (pieces 12-15)``, ``a.txt to c.txt``,
    ``big.txt[train] (piece 40) to big.txt[val] (piece 2)``."""
    pieces = [piece for _, job in jobs for piece in job]
    if not pieces:
        return "nothing"
    first, last = pieces[0], pieces[-1]
    if first.name == last.name:
        if first.part == 0 and not last.more:
            return first.name
        span = f"piece {first.part}" if first.part == last.part else f"pieces {first.part}-{last.part}"
        return f"{first.name} ({span})"

    def label(piece: Document) -> str:
        return piece.name if piece.part == 0 and not piece.more else f"{piece.name} (piece {piece.part})"

    return f"{label(first)} to {label(last)}"


class _NpyAppender:
    """A 1-D ``.npy`` file written by appending arrays; the header, which holds the length, is
    rewritten on :meth:`close`. numpy pads every header to fit any length of the first axis
    (``GROWTH_AXIS_MAX_DIGITS``), so rewriting it never moves the data."""

    def __init__(self, file: BinaryIO, dtype: np.dtype) -> None:
        self.file = file
        self.dtype = np.dtype(dtype)
        self.length = 0
        self._write_header()
        self._data_start = file.tell()

    def _write_header(self) -> None:
        header = {
            "descr": np.lib.format.dtype_to_descr(self.dtype),
            "fortran_order": False,
            "shape": (self.length,),
        }
        np.lib.format.write_array_header_1_0(self.file, header)

    def append(self, array: np.ndarray) -> None:
        self.file.write(np.ascontiguousarray(array, dtype=self.dtype).data)
        self.length += len(array)

    def close(self) -> None:
        end = self.file.tell()
        self.file.seek(0)
        self._write_header()
        if self.file.tell() != self._data_start:
            raise RuntimeError("the .npy header changed size; numpy's header padding has changed")
        self.file.seek(end)


def progress_bar(total: int, description: str, enabled: bool = True):
    """A tqdm bar over source bytes on stderr (MB, MB/s, ETA); silent when stderr is not a terminal."""
    from tqdm import tqdm

    return tqdm(
        total=total,
        desc=description,
        unit="B",
        unit_scale=True,
        dynamic_ncols=True,
        mininterval=0.5,
        disable=not (enabled and sys.stderr.isatty()),
        file=sys.stderr,
    )


# --------------------------------------------------------------------------- the cache
class TokenCache:
    """The files of one tokenized corpus: ``train.npy``, ``val.npy``, ``val_bytes.npy``, ``val.txt``
    and ``meta.json`` (counts and the tokenizer; written last: its presence means the rest is complete)."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.train = self.directory / "train.npy"
        self.val = self.directory / "val.npy"
        self.val_bytes = self.directory / "val_bytes.npy"
        self.val_text = self.directory / "val.txt"
        self.meta = self.directory / "meta.json"

    def exists(self) -> bool:
        return self.meta.is_file() and all(
            p.is_file() for p in (self.train, self.val, self.val_bytes, self.val_text)
        )

    def read_meta(self) -> dict[str, Any]:
        return json.loads(self.meta.read_text())

    def tokenizer(self) -> Tokenizer:
        """The tokenizer the streams were made with."""
        return Tokenizer.from_dict(self.read_meta()["tokenizer"])

    def get_or_build(
        self,
        corpus: Corpus,
        make_tokenizer: Callable[[], Tokenizer],
        *,
        workers: int = 0,
        progress: bool = True,
        chunk_chars: int = CHUNK_CHARS,
        check: Callable[[dict[str, Any]], None] | None = None,
    ) -> tuple[dict[str, Any], bool]:
        """``(meta, built)``: the cache's meta, building it first (under the lock) if it is absent.

        ``make_tokenizer`` is called only when building. ``workers``: tokenizing processes (0: this
        process, with the tokenizer's own threads). ``check(meta)`` may refuse a new build by raising
        before it is renamed into place; a refused or failed build leaves nothing behind, not even
        the lock file or the folders it made.
        """

        def write(staging: Path) -> dict[str, Any]:
            meta = self._write(staging, corpus, make_tokenizer(), workers, progress, chunk_chars)
            if check is not None:
                check(meta)
            return meta

        return build_once(self.directory, self.exists, self.read_meta, write, doing="tokenizing into")

    def _write(
        self,
        staging: Path,
        corpus: Corpus,
        tokenizer: Tokenizer,
        workers: int,
        progress: bool,
        chunk_chars: int,
    ) -> dict[str, Any]:
        started = time.perf_counter()
        dtype = token_dtype(tokenizer.vocab_size)
        documents = {False: 0, True: 0}
        text_bytes = {False: 0, True: 0}
        covered_bytes = 0
        bar = progress_bar(corpus.size(), "tokenizing", enabled=progress)
        try:
            with (
                open(staging / "train.npy", "wb") as train_file,
                open(staging / "val.npy", "wb") as val_file,
                open(staging / "val_bytes.npy", "wb") as bytes_file,
                open(staging / "val.txt", "wb") as val_text,
            ):
                streams = {False: _NpyAppender(train_file, dtype), True: _NpyAppender(val_file, dtype)}
                val_bytes = _NpyAppender(bytes_file, np.uint32)

                documents_read = corpus.documents(on_read=bar.update, parts=True)
                jobs = _jobs(
                    documents_read,
                    chunk_chars,
                    write_val_text=val_text.write,
                    piece_chars=PIECE_CHARS,
                    cuts=piece_cuts(tokenizer),
                )
                for is_val, stream, byte_counts, n_documents, n_bytes in tokenize_jobs(
                    tokenizer, jobs, workers
                ):
                    streams[is_val].append(stream)
                    if is_val:
                        val_bytes.append(byte_counts)
                        covered_bytes += int(byte_counts.sum(dtype=np.int64))
                    documents[is_val] += n_documents
                    text_bytes[is_val] += n_bytes
                    bar.set_postfix(docs=f"{documents[False] + documents[True]:,}", refresh=False)
                for appender in (*streams.values(), val_bytes):
                    appender.close()
        finally:
            bar.close()
        corpus.check_split(documents[False], documents[True])
        if covered_bytes != text_bytes[True]:
            # Only possible when a tokenizer turns a whole non-empty document into no tokens at all.
            warnings.warn(
                f"the tokenizer covers {covered_bytes} of the {text_bytes[True]} validation bytes",
                DataWarning,
                stacklevel=3,
            )
        seconds = time.perf_counter() - started
        meta = {
            "format": CACHE_FORMAT,
            "tokenizer": tokenizer.to_dict(),
            "train_documents": documents[False],
            "val_documents": documents[True],
            "train_tokens": streams[False].length,
            "val_tokens": streams[True].length,
            "train_text_bytes": text_bytes[False],
            "val_bytes": covered_bytes,
            "workers": workers,
            "seconds": round(seconds, 3),
        }
        write_atomically(staging / "meta.json", json.dumps(meta, indent=1))
        return meta


def build_once(
    directory: Path,
    exists: Callable[[], bool],
    read: Callable[[], Result],
    write: Callable[[Path], Result],
    doing: str = "building",
) -> tuple[Result, bool]:
    """``(result, built)``: ``read()`` of the complete cache folder ``directory``, or, when it is
    absent, ``write(staging)`` into a staging folder that is renamed to ``directory`` once ``write``
    returns. One process builds at a time (a lock file beside the folder); the others wait, then
    read what it wrote. ``write`` may refuse a build by raising; a refused or failed build leaves
    nothing behind, not even the lock file or the folders it made. Warnings raised while building
    (skipped documents) are shown only once the build is known to be usable. ``doing``: what a
    waiting process says the other one is doing ("tokenizing into").
    """
    from filelock import FileLock

    made = [p for p in (directory.parent, directory.parent.parent) if not p.exists()]
    lock_file = Path(str(directory) + ".lock")
    had_lock_file = lock_file.exists()
    try:
        with warnings.catch_warnings(record=True) as held:
            warnings.simplefilter("always")
            result = _build_locked(FileLock(str(lock_file)), directory, exists, read, write, doing)
        for warning in held:
            warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
        return result
    except BaseException:
        if not had_lock_file:
            lock_file.unlink(missing_ok=True)
        for folder in made:  # deepest first; only if nothing else appeared in them
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise


def _build_locked(lock, directory: Path, exists, read, write, doing):
    from filelock import Timeout

    try:
        lock.acquire(timeout=0)
    except Timeout:
        log.warning("waiting for another process to finish %s %s", doing, directory)
        lock.acquire()
    try:
        if exists():
            return read(), False
        # Whoever held the lock before us and left a staging folder was killed: it is garbage.
        for partial_folder in directory.parent.glob(f".{directory.name}.*.partial"):
            shutil.rmtree(partial_folder, ignore_errors=True)
        try:
            with atomic_folder(directory) as staging:
                result = write(staging)
        except OSError:
            # Where the filesystem does not share locks between machines, another one may have
            # renamed its complete folder into place first: use it.
            if exists():
                return read(), False
            raise
        return result, True
    finally:
        lock.release()


def cached_json(cache: TokenCache, name: str, compute: Callable[[], Any]) -> Any:
    """A small JSON result about a cached corpus (such as the compressors' bits per byte on its
    held-out text), computed once and kept as ``name`` beside the token files. A cache folder that
    cannot be written only means computing it again next time."""
    path = cache.directory / name
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        pass
    value = compute()
    try:
        write_atomically(path, json.dumps(value, indent=1))
    except OSError:
        pass
    return value

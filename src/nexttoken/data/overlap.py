"""N-gram overlap between an evaluation text and a training corpus: can this score be trusted?

A score on text the model has trained on measures memory, not language. :func:`measure_overlap`
finds the evaluation text's word n-grams (13 by default) that also occur in the training corpus, read
in any of the corpus formats (:func:`nexttoken.data.documents.iter_documents`), and reports for each
evaluation document the share of its words covered by such n-grams and its longest shared spans, with
where they are on both sides.

**Normalisation** (:func:`normalize`, :func:`words`): NFKC, case folded, punctuation and symbols
(Unicode categories P and S: curly and straight quotes, every dash) turned into separators, format
characters (soft hyphen, zero-width joiners) deleted, and any run of whitespace one separator. So
line wrapping, typography and case do not hide a copy. Lines are the text's ``\\n`` lines, counted
from 1.

**Hashing**, all in numpy, with no Python step per word or per n-gram: each word's hash is a
polynomial of its UTF-8 bytes mod 2**64 (from prefix sums over the whole text, so every word at once),
its length added, then mixed (splitmix64's finalizer); an n-gram's hash is the polynomial
``sum(word[i + j] * B ** (n - 1 - j)) mod 2**64`` of its words' hashes, for every position at once
(n multiply-adds over the array). Why not ``blake2b`` or Python's ``hash``: a Python call per word
or n-gram costs more than everything else together (a plain set of word tuples is as fast), and
Python's ``hash`` is salted per process, so worker processes would disagree. ``B`` is odd, so every
power of it is invertible mod 2**64: two different n-grams collide with a probability of about
``2**-58`` (the tests check the answers against a plain set of word tuples).

**Memory**: only the evaluation side's n-gram hashes are held (a sorted array, 8 bytes each); the
training corpus is streamed, a text file in parts of about 1 MB, and each part's n-gram hashes are
looked up in the sorted array (``searchsorted``). The training sources are scanned by worker
processes in parallel (:func:`nexttoken.data.parallel.ordered_map`), one source at a time each; a
single large file is scanned by one process.
"""

from __future__ import annotations

import os
import re
import unicodedata
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np

from nexttoken.data.documents import Document, corpus_root, find_documents, iter_documents
from nexttoken.data.parallel import available_cores, ordered_map
from nexttoken.errors import DataError, setting

DEFAULT_N = 13
# The odd multiplier of the n-gram hash (the golden ratio's 64 bits; 5 mod 8).
_BASE = 0x9E3779B97F4A7C15
# Characters of a text without a newline kept waiting for one before the text is cut at a space.
_LONGEST_LINE = 4 << 20
_FILTER_BITS = 22

# ASCII: letters lowered; punctuation, symbols and controls (but the newline) to a space (in C).
_ASCII = bytes(
    b + 32 if 65 <= b <= 90 else b if b == 10 or b >= 128 or chr(b).isalnum() else 32 for b in range(256)
)
_NON_ASCII_RUN = re.compile(r"[^\x00-\x7f]+")


class _NonAsciiTable(dict):
    """``str.translate``'s table for characters above ASCII, filled as characters are met:
    punctuation, symbols, separators and controls -> a space; format characters (soft hyphen,
    zero-width joiners, BOM) -> deleted; everything else itself."""

    def __missing__(self, code: int):
        category = unicodedata.category(chr(code))
        value = 32 if category[0] in "PSZ" or category == "Cc" else None if category == "Cf" else code
        self[code] = value
        return value


_NON_ASCII = _NonAsciiTable()


def normalized_bytes(text: str) -> bytes:
    """``text`` normalised (see the module's notes) as UTF-8, words separated by ASCII whitespace,
    its ``\\n`` lines kept (NFKC and case folding neither make nor take a newline)."""
    if text.isascii():
        return text.encode("ascii").translate(_ASCII)
    text = unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", text).casefold())
    folded = text.encode("utf-8").translate(_ASCII).decode("utf-8")
    return _NON_ASCII_RUN.sub(lambda m: m.group().translate(_NON_ASCII), folded).encode("utf-8")


def words(text: str) -> list[bytes]:
    """The words of ``text`` after normalisation, each its UTF-8 bytes."""
    return normalized_bytes(text).split()


def normalize(text: str) -> str:
    """``text`` normalised: its words joined by single spaces."""
    return b" ".join(words(text)).decode("utf-8")


_U64 = np.uint64
_BYTE_BASE = 0x100000001B3  # the word hash's multiplier (FNV's prime: odd)
_BYTE_BASE_INVERSE = pow(_BYTE_BASE, -1, 2**64)
_SEPARATOR = np.zeros(256, dtype=bool)
_SEPARATOR[[10, 32]] = True  # the only whitespace normalised text has
# Words are hashed in slices of about this many bytes (cut at a separator): memory stays ~40 bytes a byte of it.
_SLICE_BYTES = 1 << 20


def _mix(z: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer, in place: every bit of the word hash reaches every bit of its value."""
    z ^= z >> _U64(30)
    z *= _U64(0xBF58476D1CE4E5B9)
    z ^= z >> _U64(27)
    z *= _U64(0x94D049BB133111EB)
    z ^= z >> _U64(31)
    return z


def word_hashes(data: bytes) -> tuple[np.ndarray, np.ndarray]:
    """``(hashes, lines)`` of the words of normalised ``data`` (:func:`normalized_bytes`), in order: a
    stable 64-bit hash of each word's bytes (a polynomial of its bytes mod 2**64, length added,
    mixed), and the line it is on (0 for the first). All in numpy: no Python step per word."""
    hashes, lines, line = [], [], 0
    position = 0
    while position < len(data) or not hashes:
        end = min(len(data), position + _SLICE_BYTES)
        if end < len(data):
            cut = max(data.rfind(b" ", position, end), data.rfind(b"\n", position, end))
            end = cut + 1 if cut >= position else len(data)  # no separator: the rest in one slice
        h, first_lines, newlines = _slice_word_hashes(data[position:end])
        hashes.append(h)
        lines.append(first_lines + line)
        line += newlines
        position = end
        if position >= len(data):
            break
    return np.concatenate(hashes), np.concatenate(lines)


def _slice_word_hashes(data: bytes) -> tuple[np.ndarray, np.ndarray, int]:
    text = np.frombuffer(data, dtype=np.uint8)
    word = ~_SEPARATOR[text]
    edges = np.diff(np.concatenate(([False], word, [False])).view(np.int8))
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    newline = text == 10
    newlines = int(np.count_nonzero(newline))
    lines = np.cumsum(newline)[starts] if len(starts) else np.zeros(0, dtype=np.int64)
    if not len(starts):
        return np.zeros(0, dtype=_U64), lines, newlines
    powers = np.full(len(text), _BYTE_BASE, dtype=_U64)
    np.cumprod(powers, out=powers)  # B**(k+1), wrapping mod 2**64
    prefix = np.zeros(len(text) + 1, dtype=_U64)
    np.cumsum(text.astype(_U64) * powers, out=prefix[1:])
    inverse = np.full(len(text), _BYTE_BASE_INVERSE, dtype=_U64)
    np.cumprod(inverse, out=inverse)  # B**-(k+1)
    hashes = (prefix[ends] - prefix[starts]) * inverse[starts]  # sum of byte * B**(its place in the word)
    hashes += (ends - starts).astype(_U64) * _U64(0x9E3779B97F4A7C15)
    return _mix(hashes), lines, newlines


def ngram_hashes(word_hashes: np.ndarray, n: int) -> np.ndarray:
    """The hash of every n-gram of ``word_hashes`` (position ``i``: words ``i .. i+n-1``), ``len - n + 1``
    of them (none when there are fewer than ``n`` words)."""
    count = len(word_hashes) - n + 1
    if count <= 0:
        return np.zeros(0, dtype=np.uint64)
    out = np.zeros(count, dtype=np.uint64)
    factor = np.uint64(1)
    for j in range(n - 1, -1, -1):  # uint64 arithmetic wraps: mod 2**64
        out += word_hashes[j : j + count] * factor
        factor = np.uint64((int(factor) * _BASE) % 2**64)
    return out


# --------------------------------------------------------------------------- results
@dataclass(frozen=True)
class SharedSpan:
    """A run of consecutive evaluation words covered by n-grams that occur in training. ``train_*``:
    where the span's first n-gram was first seen in training (document name and line)."""

    words: int
    eval_document: str
    eval_line: int
    train_document: str
    train_line: int
    text: str

    def to_dict(self) -> dict:
        return {
            "words": self.words,
            "eval_document": self.eval_document,
            "eval_line": self.eval_line,
            "train_document": self.train_document,
            "train_line": self.train_line,
            "text": self.text,
        }


@dataclass(frozen=True)
class DocumentOverlap:
    """One evaluation document: its words, how many are covered by shared n-grams, its longest spans."""

    name: str
    eval_words: int
    overlap_words: int
    spans: list[SharedSpan] = field(default_factory=list)

    @property
    def overlap_fraction(self) -> float:
        return self.overlap_words / self.eval_words if self.eval_words else 0.0

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "overlap_fraction": self.overlap_fraction,
            "eval_words": self.eval_words,
            "overlap_words": self.overlap_words,
            "longest_spans": [span.to_dict() for span in self.spans],
        }


@dataclass(frozen=True)
class OverlapResult:
    n: int
    documents: list[DocumentOverlap]
    train_documents: int
    train_bytes: int

    @property
    def eval_words(self) -> int:
        return sum(d.eval_words for d in self.documents)

    @property
    def overlap_words(self) -> int:
        return sum(d.overlap_words for d in self.documents)

    @property
    def overlap_fraction(self) -> float:
        return self.overlap_words / self.eval_words if self.eval_words else 0.0

    def longest_spans(self, top: int = 5) -> list[SharedSpan]:
        spans = [span for document in self.documents for span in document.spans]
        return sorted(spans, key=lambda s: -s.words)[:top]

    def to_dict(self) -> dict:
        return {
            "n": self.n,
            "overlap_fraction": self.overlap_fraction,
            "eval_words": self.eval_words,
            "overlap_words": self.overlap_words,
            "eval_documents": len(self.documents),
            "documents_with_overlap": sum(1 for d in self.documents if d.overlap_words),
            "train_documents": self.train_documents,
            "train_bytes": self.train_bytes,
            "longest_spans": [span.to_dict() for span in self.longest_spans()],
            "documents": [d.to_dict() for d in self.documents],
        }


# --------------------------------------------------------------------------- the evaluation side
@dataclass
class _EvalDocument:
    name: str
    words: list[bytes]
    lines: np.ndarray  # each word's line, from 1
    hashes: np.ndarray  # its n-grams' hashes


class EvalNgrams:
    """The evaluation documents' n-grams: the one thing held in memory while training is scanned."""

    def __init__(self, documents: Iterable[Document], n: int = DEFAULT_N) -> None:
        check_n(n)
        self.n = n
        self.documents: list[_EvalDocument] = []
        for document in documents:
            data = normalized_bytes(document.text)
            hashes, lines = word_hashes(data)
            self.documents.append(
                _EvalDocument(document.name, data.split(), lines + 1, ngram_hashes(hashes, n))
            )
        if not any(d.words for d in self.documents):
            raise DataError(f"the evaluation text has no words; point {setting('eval_path')} at text")
        if not any(len(d.hashes) for d in self.documents):
            longest = max(len(d.words) for d in self.documents)
            raise DataError(
                f"no evaluation document has {n} words (the longest has {longest}), so there is no "
                f"{n}-gram to look for; pass a smaller {setting('data.overlap_n')}"
            )
        self.hashes = np.unique(np.concatenate([d.hashes for d in self.documents]))

    def scan(self, documents: Iterable[Document]) -> ScanSummary:
        """Mark the n-grams that occur in ``documents`` (a text's parts, as ``iter_documents(parts=True)``
        gives them, may come in order)."""
        scan = _Scan(self.hashes, self.n)
        scan.read(documents)
        return scan.summary()

    def result(self, scans: Iterable[ScanSummary], top: int = 5) -> OverlapResult:
        """The overlap, from the scans of the training corpus (in the corpus's order: the first scan
        that saw an n-gram gives its training location)."""
        found = np.zeros(len(self.hashes), dtype=bool)
        where: dict[int, tuple[str, int]] = {}
        train_documents = train_bytes = 0
        for scan in scans:
            found[scan.found] = True
            for index, location in scan.where.items():
                where.setdefault(index, location)
            train_documents += scan.documents
            train_bytes += scan.bytes
        return OverlapResult(
            self.n,
            [self._document_overlap(d, found, where, top) for d in self.documents],
            train_documents,
            train_bytes,
        )

    def _document_overlap(
        self, document: _EvalDocument, found: np.ndarray, where: dict[int, tuple[str, int]], top: int
    ) -> DocumentOverlap:
        n = self.n
        if not len(document.hashes):
            return DocumentOverlap(document.name, len(document.words), 0)
        index = np.searchsorted(self.hashes, document.hashes)
        shared = found[index]
        covered = np.zeros(len(document.words) + 1, dtype=np.int64)  # +1 at a start, -1 after its end
        starts = np.flatnonzero(shared)
        np.add.at(covered, starts, 1)
        np.add.at(covered, starts + n, -1)
        overlap_words = int(np.count_nonzero(np.cumsum(covered)[:-1]))
        spans = []
        if len(starts):
            breaks = np.flatnonzero(np.diff(starts) != 1)
            run_starts = starts[np.r_[0, breaks + 1]]
            run_ends = starts[np.r_[breaks, len(starts) - 1]]
            for first, last in sorted(zip(run_starts, run_ends), key=lambda r: -(r[1] - r[0]))[:top]:
                length = int(last - first) + n
                train_name, train_line = where.get(int(index[first]), ("?", 0))
                text = b" ".join(document.words[first : first + min(length, 40)]).decode("utf-8")
                spans.append(
                    SharedSpan(
                        length,
                        document.name,
                        int(document.lines[first]),
                        train_name,
                        train_line,
                        text + (" ..." if length > 40 else ""),
                    )
                )
        return DocumentOverlap(document.name, len(document.words), overlap_words, spans)


@dataclass(frozen=True)
class ScanSummary:
    """The evaluation n-grams (indices into :attr:`EvalNgrams.hashes`) that a stretch of the training
    corpus holds, where each was first seen there, and how much it read."""

    found: np.ndarray
    where: dict[int, tuple[str, int]]
    documents: int
    bytes: int


class _Scan:
    """Which evaluation n-grams one stretch of the training corpus holds, and where each was first seen."""

    def __init__(self, eval_hashes: np.ndarray, n: int) -> None:
        self.eval_hashes = eval_hashes
        self.n = n
        self.found = np.zeros(len(eval_hashes), dtype=bool)
        self.where: dict[int, tuple[str, int]] = {}
        self.documents = 0
        self.bytes = 0
        # A first look-up: one bit per value of a hash's top 22 bits (4 MB); most n-grams stop here.
        self._maybe = np.zeros(1 << _FILTER_BITS, dtype=bool)
        self._maybe[eval_hashes >> _U64(64 - _FILTER_BITS)] = True

    def summary(self) -> ScanSummary:
        """What the scan found, without the evaluation side's array (what a worker sends back)."""
        return ScanSummary(np.flatnonzero(self.found), self.where, self.documents, self.bytes)

    def read(self, documents: Iterable[Document]) -> None:
        """Scan ``documents``; a document's parts are joined at line ends, so an n-gram across a part's
        end is seen, and its lines are counted through."""
        buffer, line = "", 1
        for document in documents:
            if document.part == 0:
                buffer, line = "", 1
                self.documents += 1
            buffer += document.text
            if document.more:
                cut = buffer.rfind("\n") + 1
                if cut == 0 and len(buffer) > _LONGEST_LINE:
                    cut = max(buffer.rfind(" "), buffer.rfind("\t")) + 1
                if cut == 0:
                    continue
            else:
                cut = len(buffer)
            head = buffer[:cut]
            self._read_text(document.name, head, line)
            if not document.more:
                buffer = ""
                continue
            # The next stretch starts again with the last words read: an n-gram across the cut is seen
            # (those within them are looked up twice, which marks nothing new).
            start = _start_of_last_words(head, self.n - 1)
            line += head.count("\n", 0, start)
            buffer = buffer[start:]

    def _read_text(self, name: str, text: str, first_line: int) -> None:
        words_hashes, lines = word_hashes(normalized_bytes(text))
        hashes = ngram_hashes(words_hashes, self.n)
        candidates = np.flatnonzero(self._maybe[hashes >> _U64(64 - _FILTER_BITS)])
        if not len(candidates):
            return
        index = np.searchsorted(self.eval_hashes, hashes[candidates])
        np.minimum(index, len(self.eval_hashes) - 1, out=index)
        hit = self.eval_hashes[index] == hashes[candidates]
        positions, index = candidates[hit], index[hit]
        for position, found in zip(positions[~self.found[index]], index[~self.found[index]]):
            self.where.setdefault(int(found), (name, first_line + int(lines[position])))
        self.found[index] = True


def _start_of_last_words(text: str, count: int) -> int:
    """Where in ``text`` a stretch holding at least its last ``count`` words begins (words between
    whitespace, which normalisation never joins: it only splits them further)."""
    window = 4096
    while window < len(text):
        tail = text[-window:]
        pieces = tail.rsplit(None, count)
        if len(pieces) > count:
            return len(text) - window + len(pieces[0])
        window *= 4
    return 0


# --------------------------------------------------------------------------- files
def check_n(n: int) -> None:
    if not isinstance(n, int) or n < 1:
        raise DataError(f"{setting('data.overlap_n')} must be a whole number of words, 1 or more; got {n}")


_WORKER_EVAL: dict[str, np.ndarray] = {}


def _start_scan_worker(eval_hashes: np.ndarray) -> None:
    _WORKER_EVAL["hashes"] = eval_hashes


def _scan_source(
    source: Path,
    root: Path,
    n: int,
    text_field: str,
    errors: str,
    eval_hashes: np.ndarray | None = None,
) -> ScanSummary:
    scan = _Scan(_WORKER_EVAL["hashes"] if eval_hashes is None else eval_hashes, n)

    def on_read(size: int) -> None:
        scan.bytes += size

    scan.read(iter_documents([source], errors, root, text_field=text_field, parts=True, on_read=on_read))
    return scan.summary()


def measure_overlap(
    train_paths: Sequence[str | os.PathLike] | str | os.PathLike,
    eval_paths: Sequence[str | os.PathLike] | str | os.PathLike,
    n: int = DEFAULT_N,
    *,
    text_field: str = "text",
    errors: str = "strict",
    workers: int | None = None,
    top: int = 5,
) -> OverlapResult:
    """The n-gram overlap of the documents of ``eval_paths`` with the training corpus ``train_paths``
    (files or folders, in any corpus format). ``workers``: processes scanning the training sources
    (default: one per core, at most one per source; 0 or 1: this process alone)."""
    check_n(n)
    eval_sources = find_documents(eval_paths, setting_name="eval_path")
    train_sources = find_documents(train_paths, setting_name="data.path")
    with warnings.catch_warnings(record=True) as caught:  # an empty evaluation text: one error, no warning
        warnings.simplefilter("always")
        evaluation = EvalNgrams(iter_documents(eval_sources, errors, text_field=text_field), n)
    for warning in caught:
        warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    root = corpus_root(train_sources)
    workers = available_cores() if workers is None else workers
    workers = min(workers, len(train_sources))
    if workers <= 1:
        job = partial(
            _scan_source, root=root, n=n, text_field=text_field, errors=errors, eval_hashes=evaluation.hashes
        )
        scans: Iterator[ScanSummary] = ordered_map(job, train_sources, 0)
    else:
        job = partial(_scan_source, root=root, n=n, text_field=text_field, errors=errors)
        scans = ordered_map(
            job, train_sources, workers, initializer=_start_scan_worker, initargs=(evaluation.hashes,)
        )
    return evaluation.result(scans, top)


def scan_documents(eval_hashes: np.ndarray, n: int, documents: Iterable[Document]) -> ScanSummary:
    """:meth:`EvalNgrams.scan` given only the evaluation side's sorted n-gram hashes
    (:attr:`EvalNgrams.hashes`): what a worker process holds."""
    scan = _Scan(eval_hashes, n)
    scan.read(documents)
    return scan.summary()

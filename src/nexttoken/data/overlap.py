"""N-gram overlap between an evaluation text and a training corpus: can this score be trusted?

A score on text the model has trained on measures memory, not language. :func:`measure_overlap`
finds the evaluation text's word n-grams (13 by default) that also occur in the training corpus, read
in any of the corpus formats (:func:`nexttoken.data.documents.iter_documents`), and reports for each
evaluation document the share of its words covered by such n-grams and its longest shared spans, with
where they are on both sides.

**Normalisation** (:func:`normalize`, :func:`words`): NFKC, case folded, punctuation and symbols
(Unicode categories P and S: curly and straight quotes, every dash) turned into separators, format
characters (soft hyphen, zero-width joiners) deleted, and any run of whitespace one separator. So
line wrapping, typography and case do not hide a copy. ASCII goes through a byte table; only the
words holding a character above ASCII go through Unicode's functions. Lines are the text's ``\\n``
lines, counted from 1.

**Near copies**: an evaluation n-gram (n >= 3) that occurs in training with its middle word changed
covers its words as a *near copy*. A copy with one word in ten changed shares no 13-gram, but every
tenth of its 13-word windows has its changed word in the middle, and those cover it: such a document
is ``partial``, not ``clean`` (:attr:`DocumentOverlap.kind`).

**Hashing**, all in numpy, with no Python step per word or per n-gram: each word's hash is a
polynomial of its UTF-8 bytes mod 2**64 (from prefix sums over the whole text, so every word at once),
its length added, then mixed (splitmix64's finalizer); an n-gram's hash is the polynomial
``sum(word[i + j] * B ** (n - 1 - j)) mod 2**64`` of its words' hashes, for every position at once
from prefix sums of ``word[m] * B ** -m`` (four passes whatever n), and its near-copy hash the same
less the middle word's term. Why not ``blake2b`` or Python's ``hash``: a Python call per word or
n-gram costs more than everything else together (a plain set of word tuples is as fast), and
Python's ``hash`` is salted per process, so worker processes would disagree. ``B`` is odd, so every
power of it is invertible mod 2**64: two different n-grams collide with a probability of about
``2**-58`` (the tests check the answers against a plain set of word tuples).

**Memory**: only the evaluation side's hashes are held (two sorted arrays, 8 bytes an n-gram each);
the training corpus is streamed, a text file in parts of about 1 MB; each part's near-copy hashes go
through a table of flags first (an exact copy is also a near copy), and the few that pass are
looked up in the sorted arrays (``searchsorted``); a training line is only counted for an n-gram
found for the first time. The training sources are scanned by worker processes in parallel
(:func:`nexttoken.data.parallel.ordered_map`), a text file above 64 MB in ranges cut after a
newline, each range read with the last n - 1 words before it so no n-gram across a cut is missed.

**Words back to characters** (:func:`word_character_spans`, :func:`covered_character_spans`,
:func:`overlapping_tokens`): which characters of a document, and which of its tokens, the covered
words come from, for the split of ``nexttoken eval``'s score by overlap with training.
"""

from __future__ import annotations

import codecs
import ctypes
import dataclasses
import itertools
import os
import re
import unicodedata
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np

from nexttoken.data.documents import (
    BINARY_SNIFF_BYTES,
    READ_BYTES,
    Document,
    as_parts,
    corpus_root,
    find_documents,
    is_text_file,
    iter_documents,
)
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
    # Unicode's normalisation only for the words (between ASCII spaces, tabs and newlines) that hold a
    # character above ASCII, found in the UTF-8 bytes with numpy: NFKC composes a character with the
    # marks after it, never across an ASCII space, and case folding and the tables act one character at
    # a time, so the rest is ASCII's. (An ASCII byte is never inside a longer character's bytes.)
    data = text.encode("utf-8")
    array = np.frombuffer(data, dtype=np.uint8)
    spaces = np.r_[-1, np.flatnonzero((array == 32) | (array == 10) | (array == 9)), len(data)]
    word = np.searchsorted(spaces, np.flatnonzero(array >= 128))  # the space after each such word, in order
    word = word[np.r_[True, word[1:] != word[:-1]]]
    starts, ends = spaces[word - 1] + 1, spaces[word]
    # Words one space apart are normalised as one piece (fewer calls on text with few ASCII letters).
    new_piece = np.r_[True, starts[1:] > ends[:-1] + 1]
    starts, ends = starts[new_piece], ends[np.r_[np.flatnonzero(new_piece)[1:] - 1, len(new_piece) - 1]]
    pieces, done = [], 0
    for start, end in zip(starts.tolist(), ends.tolist()):
        pieces.append(data[done:start])
        pieces.append(_normalize_unicode(data[start:end].decode("utf-8")).encode("utf-8"))
        done = end
    pieces.append(data[done:])
    return b"".join(pieces).translate(_ASCII)


def _normalize_unicode(text: str) -> str:
    """NFKC, case folded, NFKC again; characters above ASCII through :data:`_NON_ASCII`'s table."""
    text = unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", text).casefold())
    return _NON_ASCII_RUN.sub(lambda m: m.group().translate(_NON_ASCII), text)


def words(text: str) -> list[bytes]:
    """The words of ``text`` after normalisation, each its UTF-8 bytes."""
    return normalized_bytes(text).split()


def normalize(text: str) -> str:
    """``text`` normalised: its words joined by single spaces."""
    return b" ".join(words(text)).decode("utf-8")


_U64 = np.uint64
_BYTE_BASE = 0x100000001B3  # the word hash's multiplier (FNV's prime: odd)
_WORD_LENGTH_MIX = _U64(0x9E3779B97F4A7C15)
# Words are hashed in slices of about this many bytes (cut at a separator): memory stays ~30 bytes a byte of it.
_SLICE_BYTES = 1 << 20


class _Powers:
    """``base ** (k + 1)`` and ``base ** -(k + 1)`` mod 2**64 for ``k = 0, 1, ...``, computed once per
    process and grown on demand (a slice's hashing then costs a multiply and a prefix sum, not four
    passes of ``cumprod``)."""

    def __init__(self, base: int) -> None:
        self.base, self.inverse_base = base, pow(base, -1, 2**64)
        self.up = self.down = np.zeros(0, dtype=_U64)

    def get(self, count: int) -> tuple[np.ndarray, np.ndarray]:
        if len(self.up) < count:
            size = max(count, 2 * len(self.up), 1024)
            self.up = np.full(size, self.base, dtype=_U64)
            np.cumprod(self.up, out=self.up)  # uint64 products wrap: mod 2**64
            self.down = np.full(size, self.inverse_base, dtype=_U64)
            np.cumprod(self.down, out=self.down)
        return self.up[:count], self.down[:count]


_BYTE_POWERS = _Powers(_BYTE_BASE)
_NGRAM_POWERS = _Powers(_BASE)


def _mix(z: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer, in place: every bit of the word hash reaches every bit of its value."""
    z ^= z >> _U64(30)
    z *= _U64(0xBF58476D1CE4E5B9)
    z ^= z >> _U64(27)
    z *= _U64(0x94D049BB133111EB)
    z ^= z >> _U64(31)
    return z


def _slices(data: bytes) -> Iterator[tuple[int, int]]:
    """``(start, end)`` of the slices ``data`` is hashed in: about :data:`_SLICE_BYTES` each, cut
    after a separator (a slice with none runs to the end)."""
    position = 0
    while True:
        end = min(len(data), position + _SLICE_BYTES)
        if end < len(data):
            cut = max(data.rfind(b" ", position, end), data.rfind(b"\n", position, end))
            end = cut + 1 if cut >= position else len(data)
        yield position, end
        position = end
        if position >= len(data):
            return


def word_hashes(data: bytes) -> tuple[np.ndarray, np.ndarray]:
    """``(hashes, lines)`` of the words of normalised ``data`` (:func:`normalized_bytes`), in order: a
    stable 64-bit hash of each word's bytes (a polynomial of its bytes mod 2**64, length added,
    mixed), and the line it is on (0 for the first). All in numpy: no Python step per word."""
    hashes, starts = word_hashes_and_starts(data)
    newlines = np.flatnonzero(np.frombuffer(data, dtype=np.uint8) == 10)
    return hashes, np.searchsorted(newlines, starts)


def word_hashes_and_starts(data: bytes) -> tuple[np.ndarray, np.ndarray]:
    """``(hashes, starts)``: :func:`word_hashes`' hashes and each word's first byte in ``data`` (the
    training side's fast path: a word's line is only looked for when its n-gram is found)."""
    hashes, starts = [], []
    for first, last in _slices(data):
        h, s = _slice_word_hashes(data[first:last])
        hashes.append(h)
        starts.append(s + first)
    if len(hashes) == 1:
        return hashes[0], starts[0]
    return np.concatenate(hashes), np.concatenate(starts)


def _slice_word_hashes(data: bytes) -> tuple[np.ndarray, np.ndarray]:
    text = np.frombuffer(data, dtype=np.uint8)
    # Normalised text's only separators are the space and the newline; every other byte is above 32.
    word = np.zeros(len(text) + 2, dtype=bool)
    np.greater(text, 32, out=word[1:-1])
    edges = np.flatnonzero(word[1:] != word[:-1])  # alternately a word's start and its end
    starts, ends = edges[0::2], edges[1::2]
    if not len(starts):
        return np.zeros(0, dtype=_U64), starts
    powers, inverse = _BYTE_POWERS.get(len(text))
    prefix = np.zeros(len(text) + 1, dtype=_U64)
    prefix[1:] = text
    prefix[1:] *= powers
    np.cumsum(prefix[1:], out=prefix[1:])  # sum of byte * B**(k+1) up to each place
    hashes = prefix[ends]
    hashes -= prefix[starts]
    hashes *= inverse[starts]  # sum of byte * B**(its place in the word)
    hashes += (ends - starts).astype(_U64) * _WORD_LENGTH_MIX
    return _mix(hashes), starts


def ngram_hashes(word_hashes: np.ndarray, n: int) -> np.ndarray:
    """The hash of every n-gram of ``word_hashes`` (position ``i``: words ``i .. i+n-1``), ``len - n + 1``
    of them (none when there are fewer than ``n`` words): ``sum(word[i + j] * B ** (n - 1 - j))`` mod
    2**64, computed as ``(S[i + n] - S[i]) * B ** (i + n - 1)`` from the prefix sums
    ``S[k] = sum(word[m] * B ** -m, m < k)`` (B is odd, so invertible mod 2**64): four passes over
    the words whatever ``n``."""
    count = len(word_hashes) - n + 1
    if count <= 0:
        return np.zeros(0, dtype=np.uint64)
    up, down = _NGRAM_POWERS.get(len(word_hashes) + 1)
    prefix = np.zeros(len(word_hashes) + 1, dtype=_U64)
    prefix[1] = word_hashes[0]
    np.multiply(word_hashes[1:], down[: len(word_hashes) - 1], out=prefix[2:])  # word[m] * B**-m
    np.cumsum(prefix, out=prefix)
    out = prefix[n:]
    out -= prefix[:count]
    out *= up[n - 2 : n - 2 + count] if n >= 2 else np.concatenate(([_U64(1)], up[: count - 1]))
    return out


def near_ngram_hashes(word_hashes: np.ndarray, ngrams: np.ndarray, n: int) -> np.ndarray:
    """The hash of every n-gram with its middle word (:func:`near_middle`) left out, from the n-gram
    hashes ``ngrams``: two n-grams that differ in that word alone get the same value."""
    middle = near_middle(n)
    factor = _U64(pow(_BASE, n - 1 - middle, 2**64))
    return ngrams - word_hashes[middle : middle + len(ngrams)] * factor


def near_middle(n: int) -> int:
    """The word a near-copy n-gram may change: the middle one (index ``n // 2``)."""
    return n // 2


# --------------------------------------------------------------------------- results
# A document most of whose words are in n-grams that occur in training (exactly) is a copy.
COPIED_SHARE = 0.5
DOCUMENT_CLASSES = ("copied", "partial", "clean")


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


class _WordShares:
    """The covered shares of a document's or a whole evaluation's words (``eval_words``,
    ``overlap_words`` in shared n-grams, ``partial_words`` in near copies only)."""

    eval_words: int
    overlap_words: int
    partial_words: int

    @property
    def overlap_fraction(self) -> float:
        return self.overlap_words / self.eval_words if self.eval_words else 0.0

    @property
    def partial_fraction(self) -> float:
        return self.partial_words / self.eval_words if self.eval_words else 0.0


@dataclass(frozen=True)
class DocumentOverlap(_WordShares):
    """One evaluation document: its words, how many are covered by shared n-grams, its longest spans.

    ``partial_words``: words no shared n-gram covers but a near-copy one does (an n-gram that occurs
    in training with its middle word changed). ``covered``: per word, whether an n-gram that occurs
    in training exactly or as a near copy covers it (what ``nexttoken eval`` splits its score by).
    """

    name: str
    eval_words: int
    overlap_words: int
    spans: list[SharedSpan] = field(default_factory=list)
    partial_words: int = 0
    covered: np.ndarray | None = field(default=None, repr=False, compare=False)

    @property
    def kind(self) -> str:
        """``copied`` (at least :data:`COPIED_SHARE` of its words in shared n-grams), ``partial``
        (some words in shared or near-copy n-grams), or ``clean`` (none)."""
        if self.eval_words and self.overlap_fraction >= COPIED_SHARE:
            return "copied"
        return "partial" if self.overlap_words or self.partial_words else "clean"

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "class": self.kind,
            "overlap_fraction": self.overlap_fraction,
            "partial_fraction": self.partial_fraction,
            "eval_words": self.eval_words,
            "overlap_words": self.overlap_words,
            "partial_words": self.partial_words,
            "longest_spans": [span.to_dict() for span in self.spans],
        }


@dataclass(frozen=True)
class OverlapResult(_WordShares):
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
    def partial_words(self) -> int:
        return sum(d.partial_words for d in self.documents)

    def classes(self) -> dict[str, int]:
        """How many evaluation documents are copied, partial and clean."""
        counts = dict.fromkeys(DOCUMENT_CLASSES, 0)
        for document in self.documents:
            counts[document.kind] += 1
        return counts

    def longest_spans(self, top: int = 5) -> list[SharedSpan]:
        spans = [span for document in self.documents for span in document.spans]
        return sorted(spans, key=lambda s: -s.words)[:top]

    def to_dict(self) -> dict:
        return {
            "n": self.n,
            "overlap_fraction": self.overlap_fraction,
            "partial_fraction": self.partial_fraction,
            "eval_words": self.eval_words,
            "overlap_words": self.overlap_words,
            "partial_words": self.partial_words,
            "eval_documents": len(self.documents),
            "documents_with_overlap": sum(1 for d in self.documents if d.overlap_words),
            "document_classes": self.classes(),
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
    near: np.ndarray  # its n-grams' hashes without their middle word


def has_near_copies(n: int) -> bool:
    """Whether n-grams of ``n`` words are also matched as near copies (one word changed): from 3 on,
    so that what is left of a near copy is still a phrase."""
    return n >= 3


class EvalNgrams:
    """The evaluation documents' n-grams: the one thing held in memory while training is scanned.

    ``hashes``: the distinct n-gram hashes, sorted; ``near_hashes``: the distinct near-copy hashes
    (:func:`near_ngram_hashes`), sorted (empty below n = 3)."""

    def __init__(self, documents: Iterable[Document], n: int = DEFAULT_N) -> None:
        check_n(n)
        self.n = n
        self.documents: list[_EvalDocument] = []
        near = has_near_copies(n)
        for document in documents:
            data = normalized_bytes(document.text)
            hashes, lines = word_hashes(data)
            ngrams = ngram_hashes(hashes, n)
            near_ngrams = near_ngram_hashes(hashes, ngrams, n) if near else ngrams[:0]
            self.documents.append(_EvalDocument(document.name, data.split(), lines + 1, ngrams, near_ngrams))
        if not any(d.words for d in self.documents):
            raise DataError(f"the evaluation text has no words; point {setting('eval_path')} at text")
        if not any(len(d.hashes) for d in self.documents):
            longest = max(len(d.words) for d in self.documents)
            raise DataError(
                f"no evaluation document has {n} words (the longest has {longest}), so there is no "
                f"{n}-gram to look for; pass a smaller {setting('data.overlap_n')}"
            )
        self.hashes = np.unique(np.concatenate([d.hashes for d in self.documents]))
        self.near_hashes = np.unique(np.concatenate([d.near for d in self.documents]))

    def scan(self, documents: Iterable[Document]) -> ScanSummary:
        """Mark the n-grams that occur in ``documents`` (a text's parts, as ``iter_documents(parts=True)``
        gives them, may come in order)."""
        scan = _Scan(self.hashes, self.n, self.near_hashes)
        scan.read(documents)
        return scan.summary()

    def result(self, scans: Iterable[ScanSummary], top: int = 5) -> OverlapResult:
        """The overlap, from the scans of the training corpus (in the corpus's order: the first scan
        that saw an n-gram gives its training location)."""
        found = np.zeros(len(self.hashes), dtype=bool)
        near_found = np.zeros(len(self.near_hashes), dtype=bool)
        where: dict[int, tuple[str, int]] = {}
        train_documents = train_bytes = 0
        for scan in scans:
            found[scan.found] = True
            if scan.near_found is not None:
                near_found[scan.near_found] = True
            for index, location in scan.where.items():
                where.setdefault(index, location)
            train_documents += scan.documents
            train_bytes += scan.bytes
        return OverlapResult(
            self.n,
            [self._document_overlap(d, found, near_found, where, top) for d in self.documents],
            train_documents,
            train_bytes,
        )

    def _document_overlap(
        self,
        document: _EvalDocument,
        found: np.ndarray,
        near_found: np.ndarray,
        where: dict[int, tuple[str, int]],
        top: int,
    ) -> DocumentOverlap:
        n = self.n
        if not len(document.hashes):
            covered = np.zeros(len(document.words), dtype=bool)
            return DocumentOverlap(document.name, len(document.words), 0, covered=covered)
        index = np.searchsorted(self.hashes, document.hashes)
        starts = np.flatnonzero(found[index])
        exact = _covered_by(starts, n, len(document.words))
        covered = exact
        if len(document.near):
            near_starts = np.flatnonzero(near_found[np.searchsorted(self.near_hashes, document.near)])
            covered = exact | _covered_by(near_starts, n, len(document.words))
        overlap_words = int(np.count_nonzero(exact))
        partial_words = int(np.count_nonzero(covered)) - overlap_words
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
        return DocumentOverlap(
            document.name, len(document.words), overlap_words, spans, partial_words, covered
        )


def _covered_by(starts: np.ndarray, n: int, words: int) -> np.ndarray:
    """Per word, whether one of the n-grams beginning at ``starts`` covers it."""
    edges = np.zeros(words + 1, dtype=np.int64)  # +1 at a start, -1 after its end
    np.add.at(edges, starts, 1)
    np.add.at(edges, starts + n, -1)
    return np.cumsum(edges[:-1]) > 0


@dataclass(frozen=True)
class ScanSummary:
    """The evaluation n-grams (indices into :attr:`EvalNgrams.hashes`) that a stretch of the training
    corpus holds, where each was first seen there, how much it read, and the near-copy n-grams it
    holds (indices into :attr:`EvalNgrams.near_hashes`; None when not looked for)."""

    found: np.ndarray
    where: dict[int, tuple[str, int]]
    documents: int
    bytes: int
    near_found: np.ndarray | None = None


class _Scan:
    """Which evaluation n-grams one stretch of the training corpus holds, and where each was first seen."""

    def __init__(self, eval_hashes: np.ndarray, n: int, near_hashes: np.ndarray | None = None) -> None:
        self.eval_hashes = eval_hashes
        self.n = n
        self.near_hashes = near_hashes if near_hashes is not None and len(near_hashes) else None
        self.found = np.zeros(len(eval_hashes), dtype=bool)
        self.near_found = (
            np.zeros(len(self.near_hashes), dtype=bool) if self.near_hashes is not None else None
        )
        self.where: dict[int, tuple[str, int]] = {}
        self.documents = 0
        self.bytes = 0
        self._parts = 0
        # A first look-up: one flag per value of a hash's top bits (4 MB); most n-grams stop here. An
        # n-gram that occurs exactly also matches as a near copy, so with near copies the near hash
        # alone is looked up first.
        first = self.near_hashes if self.near_hashes is not None else eval_hashes
        self._maybe = np.zeros(1 << _FILTER_BITS, dtype=bool)
        self._maybe[first >> _U64(64 - _FILTER_BITS)] = True

    def summary(self) -> ScanSummary:
        """What the scan found, without the evaluation side's array (what a worker sends back)."""
        near = np.flatnonzero(self.near_found) if self.near_found is not None else None
        return ScanSummary(np.flatnonzero(self.found), self.where, self.documents, self.bytes, near)

    def read(self, documents: Iterable[Document]) -> None:
        """Scan ``documents``; a document's parts are joined at line ends, so an n-gram across a part's
        end is seen, and its lines are counted through."""
        buffer, line = "", 1
        for document in documents:
            if document.part == 0:
                buffer, line = "", 1
                self.documents += 1
            buffer = buffer + document.text if buffer else document.text
            if document.more:
                cut = buffer.rfind("\n") + 1
                if cut == 0 and len(buffer) > _LONGEST_LINE:
                    cut = max(buffer.rfind(" "), buffer.rfind("\t")) + 1
                if cut == 0:
                    continue
            else:
                cut = len(buffer)
            head = buffer[:cut] if cut < len(buffer) else buffer
            self._read_text(document.name, head, line)
            self._parts += 1
            if self._parts % _TRIM_EVERY == 0:
                _release_freed_memory()
            if not document.more:
                buffer = ""
                continue
            # The next stretch starts again with the last words read: an n-gram across the cut is seen
            # (those within them are looked up twice, which marks nothing new).
            start = _start_of_last_words(head, self.n - 1)
            line += head.count("\n", 0, start)
            buffer = buffer[start:]

    def _candidates(self, hashes: np.ndarray) -> np.ndarray:
        """The places of ``hashes`` that the first look-up lets through."""
        return np.flatnonzero(np.take(self._maybe, (hashes >> _U64(64 - _FILTER_BITS)).view(np.int64)))

    def _read_text(self, name: str, text: str, first_line: int) -> None:
        data = normalized_bytes(text)
        words_hashes, starts = word_hashes_and_starts(data)
        hashes = ngram_hashes(words_hashes, self.n)
        if self.near_hashes is not None:
            near = near_ngram_hashes(words_hashes, hashes, self.n)
            candidates = self._candidates(near)
            if not len(candidates):
                return
            index = _find(self.near_hashes, near[candidates])
            self.near_found[index[index >= 0]] = True
            candidates = candidates[index >= 0]
        else:
            candidates = self._candidates(hashes)
        if not len(candidates):
            return
        index = _find(self.eval_hashes, hashes[candidates])
        positions, index = candidates[index >= 0], index[index >= 0]
        new = ~self.found[index]
        if new.any():
            # Lines only for n-grams seen for the first time (few): the newlines are found then.
            newlines = np.flatnonzero(np.frombuffer(data, dtype=np.uint8) == 10)
            lines = np.searchsorted(newlines, starts[positions[new]])
            for found, word_line in zip(index[new].tolist(), lines.tolist()):
                self.where.setdefault(found, (name, first_line + word_line))
        self.found[index] = True


def _trimmer():
    """glibc's ``malloc_trim``, or None (another C library)."""
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


_MALLOC_TRIM = _trimmer()
# Parts read between two trims (about 1 MB each).
_TRIM_EVERY = 16


def _release_freed_memory() -> None:
    """Hand the memory of freed arrays back to the system. Each part's arrays (tens of MB) are freed
    when it is done, but once glibc has raised its mmap threshold they come from its heap, which
    small objects allocated in between keep from shrinking: without this, a process's resident size
    grew by ~17 MB per 32 MB file read, without bound."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def _find(sorted_hashes: np.ndarray, hashes: np.ndarray) -> np.ndarray:
    """Each of ``hashes``' index in ``sorted_hashes``, or -1 where it is not there."""
    index = np.searchsorted(sorted_hashes, hashes)
    np.minimum(index, len(sorted_hashes) - 1, out=index)
    index[sorted_hashes[index] != hashes] = -1
    return index


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


# --------------------------------------------------------------------------- words back to characters
_ASCII_WORD = np.zeros(256, dtype=bool)
_ASCII_WORD[[b for b in range(128) if chr(b).isalnum()]] = True


def word_character_spans(text: str) -> np.ndarray | None:
    """``(words, 2)``: the characters ``[start, end)`` of ``text`` each normalised word
    (:func:`words`) comes from, or None where that cannot be told exactly.

    A *raw word* is a run of characters that normalisation does not turn into separators (not
    punctuation, symbols, separators or controls, in the text as given). Each raw word is normalised
    on its own; every word it gives gets the raw word's characters (``½`` gives two words, ``1`` and
    ``2``, both on its one character). That is exact whenever the raw words' own words, in order, are
    the text's words, which is checked: where NFKC turns a separator into a letter or back (``¨`` is a
    space and a combining mark), None.
    """
    if text.isascii():
        word = np.zeros(len(text) + 2, dtype=bool)
        word[1:-1] = _ASCII_WORD[np.frombuffer(text.encode("ascii"), dtype=np.uint8)]
        edges = np.flatnonzero(word[1:] != word[:-1])
        return edges.reshape(-1, 2)
    codes = np.frombuffer(text.encode("utf-32-le", errors="surrogatepass"), dtype=np.uint32)
    distinct, inverse = np.unique(codes, return_inverse=True)
    separator = np.array(
        [
            (chr(c).isascii() and not chr(c).isalnum())
            or unicodedata.category(chr(c))[0] in "PSZ"
            or unicodedata.category(chr(c)) == "Cc"
            for c in distinct.tolist()
        ],
        dtype=bool,
    )
    word = np.zeros(len(codes) + 2, dtype=bool)
    word[1:-1] = ~separator[inverse]
    runs = np.flatnonzero(word[1:] != word[:-1]).reshape(-1, 2)
    spans, pieces = [], []
    for start, end in runs.tolist():
        raw = text[start:end]
        found = [raw.lower().encode("ascii")] if raw.isascii() else words(raw)
        pieces += found
        spans += [(start, end)] * len(found)
    if pieces != words(text):
        return None
    return np.array(spans, dtype=np.int64).reshape(-1, 2)


def covered_character_spans(text: str, covered: np.ndarray) -> list[tuple[int, int]] | None:
    """The characters of ``text`` that runs of covered words span: ``[start of a run's first word,
    end of its last word)``, so the spaces and punctuation between covered words are covered too.
    ``covered``: per normalised word (:attr:`DocumentOverlap.covered`). None where the words cannot
    be placed exactly (:func:`word_character_spans`)."""
    spans = word_character_spans(text)
    if spans is None or len(spans) != len(covered):
        return None
    flags = np.zeros(len(covered) + 2, dtype=bool)
    flags[1:-1] = covered
    runs = np.flatnonzero(flags[1:] != flags[:-1]).reshape(-1, 2)  # [first word, last word + 1)
    return [(int(spans[a, 0]), int(spans[b - 1, 1])) for a, b in runs.tolist()]


def overlapping_tokens(offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]) -> np.ndarray:
    """Per token (``offsets``: its characters ``[start, end)``), whether it shares a character with
    one of ``spans`` (sorted, disjoint, as :func:`covered_character_spans` gives them)."""
    token = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    if not len(spans) or not len(token):
        return np.zeros(len(token), dtype=bool)
    span = np.asarray(spans, dtype=np.int64).reshape(-1, 2)
    first = np.searchsorted(span[:, 1], token[:, 0], side="right")  # the first span ending after it starts
    inside = first < len(span)
    return inside & (span[np.minimum(first, len(span) - 1), 0] < token[:, 1])


# --------------------------------------------------------------------------- files
def check_n(n: int) -> None:
    if not isinstance(n, int) or n < 1:
        raise DataError(f"{setting('data.overlap_n')} must be a whole number of words, 1 or more; got {n}")


_WORKER_EVAL: dict[str, np.ndarray] = {}


def _start_scan_worker(eval_hashes: np.ndarray, near_hashes: np.ndarray | None = None) -> None:
    _WORKER_EVAL["hashes"], _WORKER_EVAL["near"] = eval_hashes, near_hashes


def _scan_source(
    source: Path,
    root: Path,
    n: int,
    text_field: str,
    errors: str,
    eval_hashes: np.ndarray | None = None,
    near_hashes: np.ndarray | None = None,
) -> ScanSummary:
    if eval_hashes is None:
        eval_hashes, near_hashes = _WORKER_EVAL["hashes"], _WORKER_EVAL.get("near")
    scan = _Scan(eval_hashes, n, near_hashes)

    def on_read(size: int) -> None:
        scan.bytes += size

    scan.read(iter_documents([source], errors, root, text_field=text_field, parts=True, on_read=on_read))
    _release_freed_memory()
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
    return scan_training(
        train_sources, evaluation, text_field=text_field, errors=errors, workers=workers, top=top
    )


def measure_overlap_of_documents(
    train_paths: Sequence[str | os.PathLike] | str | os.PathLike,
    documents: Sequence[Document],
    n: int = DEFAULT_N,
    *,
    text_field: str = "text",
    errors: str = "strict",
    workers: int | None = None,
    top: int = 5,
) -> OverlapResult:
    """:func:`measure_overlap` for evaluation documents already read (``nexttoken eval``
    scores the same documents it measures)."""
    evaluation = EvalNgrams(documents, n)
    train_sources = find_documents(train_paths, setting_name="train_data")
    return scan_training(
        train_sources, evaluation, text_field=text_field, errors=errors, workers=workers, top=top
    )


# A text file larger than this is scanned in ranges of about this size, by several workers at once.
_RANGE_BYTES = 64 << 20
# Bytes before a range read back for the words an n-gram across its start begins with.
_LEAD_BYTES = 64 << 10


@dataclass(frozen=True)
class _Job:
    """A training source to scan: whole (``end`` None, as :func:`iter_documents` reads it), or the
    bytes ``[start, end)`` of a large text file, cut just after a newline."""

    source: Path
    start: int = 0
    end: int | None = None


def _jobs(sources: Sequence[Path], workers: int) -> list[_Job]:
    jobs = []
    for source in sources:
        size = source.stat().st_size if workers > 1 and is_text_file(source) else 0
        if size > _RANGE_BYTES:
            jobs += [_Job(source, start, end) for start, end in _line_ranges(source, size)]
        else:
            jobs.append(_Job(source))
    return jobs


def _line_ranges(source: Path, size: int) -> list[tuple[int, int]]:
    """``[start, end)`` byte ranges of about :data:`_RANGE_BYTES` covering the file, each cut just
    after a newline (so each starts a character and a line); a file without newlines is one range."""
    cuts = [0]
    with open(source, "rb") as f:
        while cuts[-1] + _RANGE_BYTES < size:
            f.seek(cuts[-1] + _RANGE_BYTES)
            newline = f.read(_LONGEST_LINE).find(b"\n")
            if newline < 0 or cuts[-1] + _RANGE_BYTES + newline + 1 >= size:
                break
            cuts.append(cuts[-1] + _RANGE_BYTES + newline + 1)
    return list(zip(cuts, [*cuts[1:], size]))


def _scan_job(
    job: _Job, root: Path, n: int, text_field: str, errors: str, eval_hashes=None, near_hashes=None
):
    """``(summary, newlines read before the range, newlines in the range)`` of one job (the lines in
    a range's summary count from the first line it read)."""
    if job.end is None:
        return _scan_source(job.source, root, n, text_field, errors, eval_hashes, near_hashes), 0, 0
    if eval_hashes is None:
        eval_hashes, near_hashes = _WORKER_EVAL["hashes"], _WORKER_EVAL.get("near")
    scan = _Scan(eval_hashes, n, near_hashes)
    name = job.source.relative_to(root).as_posix()
    lead = _lead_in(job.source, job.start, n - 1)
    newlines = [0]
    scan.read(as_parts(name, itertools.chain([lead], _range_texts(job, errors, newlines))))
    _release_freed_memory()
    scan.bytes = job.end - job.start
    scan.documents = 1 if job.start == 0 else 0  # the file is one document, counted by its first range
    return scan.summary(), lead.count("\n"), newlines[0]


def _lead_in(source: Path, start: int, count: int) -> str:
    """The last ``count`` words before byte ``start`` (and what separates them), read back at most
    :data:`_LEAD_BYTES`; after a newline, so they begin a line only where the text does."""
    if start == 0 or count == 0:
        return ""
    with open(source, "rb") as f:
        f.seek(max(0, start - _LEAD_BYTES))
        data = f.read(start - max(0, start - _LEAD_BYTES))
    if start > _LEAD_BYTES:  # the first bytes read may be part of a word (or of a character): not a word
        data = data[min((i for i in (data.find(b" "), data.find(b"\n")) if i >= 0), default=len(data)) :]
    text = data.decode("utf-8", errors="replace")
    return text[_start_of_last_words(text, count) :]


def _range_texts(job: _Job, errors: str, newlines: list[int]) -> Iterator[str]:
    """The text of the job's bytes, in parts of about :data:`READ_BYTES`; ``newlines[0]`` counts them."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors)
    with open(job.source, "rb") as f:
        f.seek(job.start)
        if job.start == 0 and b"\0" in f.read(BINARY_SNIFF_BYTES):
            raise DataError(
                f"{job.source} is a binary file (it has NUL bytes), not text; pass UTF-8 text files"
            )
        f.seek(job.start)
        position = job.start
        while position < job.end:
            block = f.read(min(READ_BYTES, job.end - position))
            if not block:
                break
            try:
                text = decoder.decode(block, final=position + len(block) >= job.end)
            except UnicodeDecodeError as error:
                raise DataError(
                    f"{job.source} is not valid UTF-8 (near byte offset {position + error.start}: {error.reason}); "
                    f"convert it to UTF-8, or pass {setting('data.replace_invalid_utf8')} true to replace bad "
                    "bytes with U+FFFD"
                ) from None
            position += len(block)
            newlines[0] += block.count(b"\n")
            if text:
                yield text


def _file_lines(
    jobs: Sequence[_Job], results: Iterable[tuple[ScanSummary, int, int]]
) -> Iterator[ScanSummary]:
    """The summaries, with a range's training lines counted from its file's first line."""
    before = 0  # newlines of the file in its earlier ranges
    for job, (summary, lead, newlines) in zip(jobs, results):
        if job.end is None:
            yield summary
            continue
        if job.start == 0:
            before = 0
        shift = before - lead
        where = {index: (name, line + shift) for index, (name, line) in summary.where.items()}
        yield dataclasses.replace(summary, where=where)
        before += newlines


def scan_training(
    train_sources: Sequence[Path],
    evaluation: EvalNgrams,
    *,
    text_field: str = "text",
    errors: str = "strict",
    workers: int | None = None,
    top: int = 5,
) -> OverlapResult:
    """Stream the training sources (as :func:`find_documents` gives them) past ``evaluation``'s n-grams:
    in ``workers`` processes (default one per core), over sources, and over ranges of a large text file."""
    root = corpus_root(train_sources)
    n = evaluation.n
    workers = available_cores() if workers is None else workers
    jobs = _jobs(train_sources, workers)
    workers = min(workers, len(jobs))
    if workers <= 1:
        job = partial(
            _scan_job,
            root=root,
            n=n,
            text_field=text_field,
            errors=errors,
            eval_hashes=evaluation.hashes,
            near_hashes=evaluation.near_hashes,
        )
        results = ordered_map(job, jobs, 0)
    else:
        job = partial(_scan_job, root=root, n=n, text_field=text_field, errors=errors)
        results = ordered_map(
            job,
            jobs,
            workers,
            initializer=_start_scan_worker,
            initargs=(evaluation.hashes, evaluation.near_hashes),
        )
    return evaluation.result(_file_lines(jobs, results), top)


def scan_documents(eval_hashes: np.ndarray, n: int, documents: Iterable[Document]) -> ScanSummary:
    """:meth:`EvalNgrams.scan` given only the evaluation side's sorted n-gram hashes
    (:attr:`EvalNgrams.hashes`): what a worker process holds."""
    scan = _Scan(eval_hashes, n)
    scan.read(documents)
    return scan.summary()

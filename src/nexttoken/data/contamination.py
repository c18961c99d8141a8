"""Can the held-out score be trusted? The corpus checks every ``nexttoken fit`` runs before it tokenizes.

**Overlap**: the share of held-out documents, words and tokens covered by word n-grams (13 by default,
``data.overlap_n``) that also occur in the training split, on text normalised as
:mod:`nexttoken.data.overlap` normalises it (case, punctuation, whitespace, line wrapping), with its
hashes. Only the held-out side is held (its n-gram hashes and text); the training side is streamed.
``data.decontaminate`` drops the held-out documents that share an n-gram with training.

**Exact duplicates**: training documents (or records) whose normalised text is that of an earlier
one, by a 64-bit hash of it. ``data.dedup`` keeps the first of each. The hash is ``blake2b`` (8 bytes)
of the normalised words, one call per stretch of text, not per word: at that rate a cryptographic hash
costs nothing, and it has no structured collisions (a polynomial hash mod 2**64, such as the n-grams',
maps some long, different word sequences to one value whatever its base). Two different texts
collide with probability 2**-64; among N documents the chance of any collision is about
N**2 / 2**65 (1e7 documents: 3e-6). A document with no words after normalisation is never a duplicate.

**The units**: a held-out document is a file or a record. A corpus of one text file holds out the
end of its bytes, one document; there, the held-out half's paragraphs (blocks ending at a blank line)
are the units counted and dropped, so that one quoted speech does not make the whole held-out text
"overlapping". Training documents are deduplicated as whole documents (one file: nothing to do).

**Determinism**: both checks are a function of the corpus (its identity) and ``n``; the result is
computed once, under a lock, and kept under the cache folder (``checks/KEY``); every process and every
resumed run reads the same answer. What is dropped is named by ordinals in corpus order, and the token
cache of a deduplicated or decontaminated corpus is keyed by the corpus, ``n`` and what was dropped.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import re
import shutil
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from nexttoken.data.cache import build_once
from nexttoken.data.corpus import Corpus
from nexttoken.data.documents import Document, as_parts, is_text_file
from nexttoken.data.overlap import DEFAULT_N, EvalNgrams, ScanSummary, normalized_bytes, scan_documents
from nexttoken.data.parallel import ordered_map
from nexttoken.errors import DataError, setting

log = logging.getLogger(__name__)

# Bump when what the checks compute (units, normalisation, hashing) changes: cached results then differ.
CHECK_RULES = 1
# Above this share of held-out tokens (words, where tokens are not known) covered by shared n-grams,
# the start summary warns. Memorised tokens can lower the held-out loss by at most their share of it
# (a loss of 0 on them), so below 1% the score moves by less than 1% of itself, about the spread
# between two seeds of a short run; above it, overlap can move a score more than that noise.
OVERLAP_WARNING = 0.01
# A blank line: a newline, then only spaces/tabs/CRs, then a newline (and any newlines after).
_PARAGRAPH_BREAK = re.compile(r"\n(?:[ \t\r]*\n)+")
# A document's text is hashed in stretches cut at whitespace; a stretch without any is cut anyway here.
_LONGEST_WORD = 4 << 20
# Characters of training documents per job handed to a checking worker (and the largest text source
# handed over whole).
_JOB_BYTES = 4 << 20
# Names of overlapping held-out units kept for the summary.
_NAMES_SHOWN = 3


# --------------------------------------------------------------------------- units and hashes
def paragraphs(texts: Iterable[str]) -> Iterator[tuple[int, str]]:
    """``(line, paragraph)`` of consecutive texts (a file's parts): blocks of text, each ending with the
    blank lines after it, so that the paragraphs joined are the text; ``line`` counts from 1."""
    buffer, line = "", 1
    for text in texts:
        buffer += text
        start = 0
        for found in _PARAGRAPH_BREAK.finditer(buffer):
            if found.end() == len(buffer):  # the run of newlines may go on in the next part
                break
            yield line, buffer[start : found.end()]
            line += buffer.count("\n", start, found.end())
            start = found.end()
        buffer = buffer[start:]
    if buffer:
        yield line, buffer


class TextHash:
    """A 64-bit hash of a text's normalised words (:func:`nexttoken.data.overlap.normalized_bytes`),
    fed in consecutive stretches: the same value however the text is cut."""

    def __init__(self) -> None:
        self._digest = hashlib.blake2b(digest_size=8)
        self._carry = ""
        self.words = 0  # more than 0 once a word was read

    def update(self, text: str, last: bool = False) -> None:
        text = self._carry + text
        cut = len(text)
        if not last:  # a word cut by the end of this stretch waits for the rest of it
            cut = max(text.rfind(" "), text.rfind("\n"), text.rfind("\t"), text.rfind("\r")) + 1
            if cut == 0 and len(text) < _LONGEST_WORD:
                self._carry = text
                return
            cut = cut or len(text)
        self._carry = text[cut:]
        canonical = _single_spaced(normalized_bytes(text[:cut]))
        if len(canonical):
            self._digest.update(canonical)
            self.words += 1  # at least one word so far

    def value(self) -> int:
        if self._carry:
            self.update("", last=True)
        return int.from_bytes(self._digest.digest(), "little")


def _single_spaced(data: bytes) -> np.ndarray:
    """Normalised text's words, each followed by one space (``b" ".join(data.split()) + b" "``, in numpy:
    no Python object per word)."""
    text = np.frombuffer(data, dtype=np.uint8)
    separator = (text == 32) | (text == 10)  # the only whitespace normalised text has
    after_word = np.concatenate(([False], ~separator[:-1]))
    kept = text[~separator | after_word]  # a run of separators becomes its first, and none leads
    if len(kept) and kept[-1] not in (32, 10):
        kept = np.append(kept, np.uint8(32))
    kept[kept == 10] = 32
    return kept


def text_hash(text: str) -> int:
    """:class:`TextHash` of a whole text."""
    hashed = TextHash()
    hashed.update(text, last=True)
    return hashed.value()


def word_byte_spans(text: str, count: int) -> tuple[np.ndarray, np.ndarray]:
    """``(starts, ends)``: the UTF-8 byte range in ``text`` of each of its ``count`` normalised words.

    ASCII text normalises byte for byte (the same length), so the ranges are exact. Other text is
    normalised one character at a time to find where its words are; should that give another number
    of words than the whole text's normalisation (a character that NFKC makes into several words), the
    words are spread evenly over the text's bytes instead, an estimate."""
    data = text.encode("utf-8")
    if text.isascii():
        flags = np.frombuffer(normalized_bytes(text), dtype=np.uint8)
        word = (flags != 32) & (flags != 10)
        edges = np.diff(np.concatenate(([False], word, [False])).view(np.int8))
        starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
        if len(starts) == count:
            return starts, ends
    else:
        starts_list, ends_list = [], []
        position, start, has_word = 0, None, False
        for char in text:
            size = len(char.encode("utf-8"))
            normal = normalized_bytes(char)
            if normal and not normal.strip():  # a separator
                if start is not None and has_word:
                    starts_list.append(start)
                    ends_list.append(position)
                start, has_word = None, False
            else:
                if start is None:
                    start = position
                has_word = has_word or bool(normal)
            position += size
        if start is not None and has_word:
            starts_list.append(start)
            ends_list.append(position)
        if len(starts_list) == count:
            return np.asarray(starts_list, dtype=np.int64), np.asarray(ends_list, dtype=np.int64)
    edges = np.linspace(0, len(data), count + 1).astype(np.int64)
    return edges[:-1], edges[1:]


# --------------------------------------------------------------------------- the result
@dataclass
class CorpusChecks:
    """What the checks found in one corpus (see the module's notes); arrays name units by ordinals."""

    n: int
    key: str
    unit: str  # "document", or "paragraph" for the held-out half of a one-file corpus
    measured: str | None  # None when the overlap was measured, else why not
    held_out_units: int
    held_out_words: int
    overlap_units: int
    overlap_words: int
    overlap_names: list[str]
    longest_span: dict[str, Any] | None
    train_documents: int
    duplicate_documents: int  # training documents whose text an earlier one had
    duplicated_texts: int  # distinct texts that occur more than once
    seconds: float
    unit_bytes: np.ndarray  # UTF-8 bytes of each held-out unit, in corpus order
    overlap_ranges: np.ndarray  # (unit, start byte, end byte) covered by shared n-grams, in order
    duplicates: np.ndarray  # ordinals of the training documents that repeat an earlier one
    cached: bool = False

    @property
    def overlapping(self) -> np.ndarray:
        """Ordinals of the held-out units that share an n-gram with training."""
        return np.unique(self.overlap_ranges[:, 0]) if len(self.overlap_ranges) else np.zeros(0, np.int64)

    @property
    def overlap_fraction(self) -> float:
        return self.overlap_words / self.held_out_words if self.held_out_words else 0.0

    def dropped_bytes(self) -> int:
        return int(self.unit_bytes[self.overlapping].sum()) if len(self.overlapping) else 0

    def meta(self) -> dict[str, Any]:
        return {
            "rules": CHECK_RULES,
            "n": self.n,
            "key": self.key,
            "unit": self.unit,
            "measured": self.measured,
            "held_out_units": self.held_out_units,
            "held_out_words": self.held_out_words,
            "overlap_units": self.overlap_units,
            "overlap_words": self.overlap_words,
            "overlap_names": self.overlap_names,
            "longest_span": self.longest_span,
            "train_documents": self.train_documents,
            "duplicate_documents": self.duplicate_documents,
            "duplicated_texts": self.duplicated_texts,
            "seconds": self.seconds,
        }

    def save(self, folder: Path) -> None:
        np.save(folder / "unit_bytes.npy", self.unit_bytes)
        np.save(folder / "overlap_ranges.npy", self.overlap_ranges)
        np.save(folder / "duplicates.npy", self.duplicates)
        (folder / "meta.json").write_text(json.dumps(self.meta(), indent=1))

    @classmethod
    def load(cls, folder: Path) -> CorpusChecks:
        meta = json.loads((folder / "meta.json").read_text())
        meta.pop("rules")
        return cls(
            **meta,
            unit_bytes=np.load(folder / "unit_bytes.npy"),
            overlap_ranges=np.load(folder / "overlap_ranges.npy"),
            duplicates=np.load(folder / "duplicates.npy"),
            cached=True,
        )

    def key_part(self, dedup: bool, decontaminate: bool) -> dict[str, Any] | None:
        """What a token cache of the corpus with these drops is keyed by besides the corpus (None: nothing
        dropped, the corpus's own key)."""
        if not dedup and not decontaminate:
            return None
        # The corpus's identity is in the key already; the duplicates do not depend on n.
        return {"checks": CHECK_RULES, "dedup": dedup, "decontaminate_n": self.n if decontaminate else None}


# --------------------------------------------------------------------------- computing them
def checks_key(identity: str, n: int) -> str:
    """The checks' cache key: the corpus's identity and ``n``."""
    return hashlib.sha256(json.dumps([CHECK_RULES, identity, n]).encode()).hexdigest()[:24]


def _held_out_units(corpus: Corpus) -> tuple[list[Document], str]:
    """The held-out units, whole, in corpus order (reading the training side only to pass it)."""
    units: list[Document] = []
    if corpus.one_file:
        train_lines = 0

        def held_out_parts() -> Iterator[str]:
            nonlocal train_lines
            for is_val, document in corpus.documents(parts=True):
                if is_val:
                    yield document.text
                else:
                    train_lines += document.text.count("\n")

        for line, text in paragraphs(held_out_parts()):
            units.append(Document(f"{corpus.train_paths[0].name} line {train_lines + line}", text))
        return units, "paragraph"
    pending: list[str] = []
    for is_val, document in corpus.documents(parts=True):
        if not is_val:
            continue
        pending.append(document.text)
        if not document.more:
            units.append(Document(document.name, "".join(pending), document.split))
            pending = []
    return units, "document"


def compute_checks(corpus: Corpus, n: int = DEFAULT_N, key: str = "", workers: int = 0) -> CorpusChecks:
    """Overlap of the held-out units with the training documents, and the training documents' exact
    duplicates (``n`` 0: duplicates only). Two passes over the corpus: the held-out side is read and
    held, then the training side streamed, in ``workers`` processes (0: this one; also where a
    training source is too large to hand over whole, see :func:`_one_stream`)."""
    started = time.perf_counter()
    units, unit = _held_out_units(corpus)
    unit_bytes = np.asarray([len(u.text.encode("utf-8")) for u in units], dtype=np.int64)
    evaluation, measured = None, None
    if n == 0:
        measured = f"off ({setting('data.overlap_n')} 0)"
    elif not units:
        measured = "no held-out text"
    else:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                evaluation = EvalNgrams(units, n)
        except DataError:
            measured = f"no held-out {unit} has {n} words"

    eval_hashes = evaluation.hashes if evaluation is not None else None
    if workers and not _one_stream(corpus):
        results = ordered_map(
            _check_in_worker,
            _training_jobs(corpus),
            workers,
            initializer=_start_checker,
            initargs=(eval_hashes, n),
        )
    else:
        training = (document for is_val, document in corpus.documents(parts=True) if not is_val)
        results = iter([_check_training(training, eval_hashes, n)])
    scans, hashes, has_words = [], [], []
    for scan, job_hashes, job_has_words in results:
        scans.append(scan)
        hashes += job_hashes
        has_words += job_has_words
    result = None
    if evaluation is not None:
        result = evaluation.result(scans, top=1)
        found = np.zeros(len(evaluation.hashes), dtype=bool)
        for scan in scans:
            found[scan.found] = True

    ranges: list[tuple[int, int, int]] = []
    held_out_words = overlap_words = 0
    names: list[str] = []
    longest = None
    if evaluation is not None and result is not None:
        for index, (held, text_unit) in enumerate(zip(evaluation.documents, units, strict=True)):
            held_out_words += len(held.words)
            covered = _covered_words(held.hashes, evaluation.hashes, found, len(held.words), n)
            if not covered.any():
                continue
            overlap_words += int(covered.sum())
            if len(names) < _NAMES_SHOWN:
                names.append(text_unit.name)
            starts, ends = word_byte_spans(text_unit.text, len(held.words))
            run = np.diff(np.concatenate(([False], covered, [False])).view(np.int8))
            for first, stop in zip(np.flatnonzero(run == 1), np.flatnonzero(run == -1), strict=True):
                ranges.append((index, int(starts[first]), int(ends[stop - 1])))
        if overlap_words != result.overlap_words:  # two computations of one number
            raise RuntimeError(f"covered words {overlap_words} != overlap's {result.overlap_words}")
        spans = result.longest_spans(1)
        if spans:
            longest = spans[0].to_dict()
    else:
        held_out_words = sum(len(normalized_bytes(u.text).split()) for u in units)

    duplicates, duplicated_texts = _later_copies(
        np.asarray(hashes, dtype=np.uint64), np.asarray(has_words, dtype=bool)
    )
    overlap_ranges = np.asarray(ranges, dtype=np.int64).reshape(-1, 3)
    return CorpusChecks(
        n=n,
        key=key,
        unit=unit,
        measured=measured,
        held_out_units=len(units),
        held_out_words=held_out_words,
        overlap_units=len(np.unique(overlap_ranges[:, 0])),
        overlap_words=overlap_words,
        overlap_names=names,
        longest_span=longest,
        train_documents=len(hashes),
        duplicate_documents=len(duplicates),
        duplicated_texts=duplicated_texts,
        seconds=round(time.perf_counter() - started, 3),
        unit_bytes=unit_bytes,
        overlap_ranges=overlap_ranges,
        duplicates=duplicates,
    )


def _check_training(
    documents: Iterable[Document], eval_hashes: np.ndarray | None, n: int
) -> tuple[ScanSummary | None, list[int], list[bool]]:
    """``(scan, hashes, has_words)`` of training documents (in parts, as read): the evaluation n-grams
    they hold (None: no held-out n-grams to look for), and each document's :class:`TextHash` and
    whether it has words."""
    hashes: list[int] = []
    has_words: list[bool] = []

    def hashed() -> Iterator[Document]:
        text_hash = TextHash()
        for document in documents:
            if document.part == 0:
                text_hash = TextHash()
            text_hash.update(document.text, last=not document.more)
            if not document.more:
                hashes.append(text_hash.value())
                has_words.append(text_hash.words > 0)  # no words: nothing to compare, never a duplicate
            yield document

    if eval_hashes is None:
        for _ in hashed():
            pass
        return None, hashes, has_words
    return scan_documents(eval_hashes, n, hashed()), hashes, has_words


def _one_stream(corpus: Corpus) -> bool:
    """Whether the training side is read in this process: a one-file corpus, or a text source larger
    than a job (whole documents go to a worker; a part of one would miss the n-grams across its ends)."""
    if corpus.one_file:
        return True
    return any(p.is_file() and is_text_file(p) and p.stat().st_size > _JOB_BYTES for p in corpus.train_paths)


def _training_jobs(corpus: Corpus) -> Iterator[list[Document]]:
    """The training documents, whole (all their parts), in jobs of about :data:`_JOB_BYTES` characters."""
    job, size = [], 0
    for is_val, document in corpus.documents(parts=True):
        if is_val:
            continue
        job.append(document)
        size += len(document.text)
        if size >= _JOB_BYTES and not document.more:
            yield job
            job, size = [], 0
    if job:
        yield job


_WORKER: dict[str, Any] = {}


def _start_checker(eval_hashes: np.ndarray | None, n: int) -> None:
    _WORKER.update(eval_hashes=eval_hashes, n=n)


def _check_in_worker(job: list[Document]) -> tuple[ScanSummary | None, list[int], list[bool]]:
    return _check_training(job, _WORKER["eval_hashes"], _WORKER["n"])


def _covered_words(hashes: np.ndarray, eval_hashes: np.ndarray, found: np.ndarray, words: int, n: int):
    """Which of a held-out unit's ``words`` are inside one of its n-grams that training holds."""
    covered = np.zeros(words + 1, dtype=np.int64)
    if len(hashes):
        starts = np.flatnonzero(found[np.searchsorted(eval_hashes, hashes)])
        np.add.at(covered, starts, 1)
        np.add.at(covered, starts + n, -1)
    return np.cumsum(covered)[:-1] > 0


def _later_copies(hashes: np.ndarray, has_words: np.ndarray) -> tuple[np.ndarray, int]:
    """``(ordinals, texts)``: the documents whose hash an earlier one had (a document without words
    never is one), and how many distinct hashes occur more than once."""
    order = np.argsort(hashes, kind="stable")  # equal hashes keep corpus order: the first is kept
    ordered = hashes[order]
    repeat = np.concatenate(([False], ordered[1:] == ordered[:-1])) & has_words[order]
    first_repeats = repeat & ~np.concatenate(([False], repeat[:-1]))
    return np.sort(order[repeat]).astype(np.int64), int(first_repeats.sum())


def checks_folder(cache_root: Path, key: str) -> Path:
    return Path(cache_root) / "checks" / key


def discard_checks(cache_root: Path, key: str, made_root: bool) -> None:
    """Remove the checks this run just built (``made_root``: and the cache folder it made for them),
    when the run fails before it has a token cache: a failed ``fit`` leaves nothing behind."""
    folder = checks_folder(cache_root, key)
    shutil.rmtree(folder, ignore_errors=True)
    Path(str(folder) + ".lock").unlink(missing_ok=True)
    for empty in (folder.parent, *([Path(cache_root)] if made_root else [])):
        with contextlib.suppress(OSError):
            empty.rmdir()


def corpus_checks(
    corpus: Corpus, n: int, cache_root: Path, identity: str | None = None, workers: int = 0
) -> tuple[CorpusChecks, bool]:
    """``(checks, built)``: :func:`compute_checks`, computed once per corpus and ``n`` (under a lock,
    in ``cache_root/checks``) and read back by every later run and process; ``built``: by this call.
    ``identity``: the corpus's, if already at hand."""
    key = checks_key(identity or corpus.identity(), n)
    folder = checks_folder(cache_root, key)

    def write(staging: Path) -> CorpusChecks:
        checks = compute_checks(corpus, n, key, workers)
        checks.save(staging)
        return checks

    return build_once(
        folder, (folder / "meta.json").is_file, lambda: CorpusChecks.load(folder), write, doing="checking"
    )


# --------------------------------------------------------------------------- the corpus, with drops
class CheckedCorpus:
    """A :class:`~nexttoken.data.corpus.Corpus` as the token cache reads it, with the training
    duplicates (``dedup``) and the overlapping held-out units (``decontaminate``) of ``checks`` left out."""

    def __init__(self, corpus: Corpus, checks: CorpusChecks, dedup: bool, decontaminate: bool) -> None:
        self.corpus = corpus
        self.drop_train = set(checks.duplicates.tolist()) if dedup else set()
        self.drop_held_out = set(checks.overlapping.tolist()) if decontaminate else set()

    def size(self) -> int:
        return self.corpus.size()

    def check_split(self, train_documents: int, val_documents: int, unit: str = "document") -> None:
        self.corpus.check_split(train_documents, val_documents, unit)

    def documents(
        self, on_read: Callable[[int], None] | None = None, *, parts: bool = False
    ) -> Iterator[tuple[bool, Document]]:
        documents = self.corpus.documents(on_read, parts=parts)
        if self.corpus.one_file and self.drop_held_out:
            yield from self._one_file(documents)
            return
        ordinal = {False: -1, True: -1}
        drops = {False: self.drop_train, True: self.drop_held_out}
        for is_val, document in documents:
            if document.part == 0:
                ordinal[is_val] += 1
            if ordinal[is_val] not in drops[is_val]:
                yield is_val, document

    def _one_file(self, documents: Iterator[tuple[bool, Document]]) -> Iterator[tuple[bool, Document]]:
        """The training half as it is; the held-out half's paragraphs but the dropped ones, in parts."""
        for is_val, first in documents:
            if is_val:
                break
            yield False, first
        else:
            return

        def held_out_texts() -> Iterator[str]:
            yield first.text
            for _, document in documents:
                yield document.text

        kept = (
            text
            for index, (_, text) in enumerate(paragraphs(held_out_texts()))
            if index not in self.drop_held_out
        )
        for document in as_parts(first.name, _rechunk(kept)):
            yield True, document


def _rechunk(texts: Iterable[str], size: int = 1 << 20) -> Iterator[str]:
    """The texts joined into parts of about ``size`` characters."""
    pending, chars = [], 0
    for text in texts:
        pending.append(text)
        chars += len(text)
        if chars >= size:
            yield "".join(pending)
            pending, chars = [], 0
    if pending:
        yield "".join(pending)


# --------------------------------------------------------------------------- what it says
def held_out_token_share(checks: CorpusChecks, val_byte_counts: np.ndarray) -> tuple[int, int] | None:
    """``(covered, tokens)``: held-out tokens whose text overlaps a shared n-gram's words, of all the
    held-out tokens, from the token cache's per-token byte counts (``val_bytes.npy``: the held-out units
    in corpus order, every token's bytes after the previous one's). None if they do not line up."""
    counts = np.asarray(val_byte_counts, dtype=np.int64)
    ends = np.cumsum(counts)
    starts = ends - counts
    offsets = np.concatenate(([0], np.cumsum(checks.unit_bytes)))
    total = int(ends[-1]) if len(ends) else 0
    if total != int(offsets[-1]):
        return None
    if not len(checks.overlap_ranges):
        return 0, len(counts)
    unit, first_byte, end_byte = checks.overlap_ranges.T
    first_byte, end_byte = offsets[unit] + first_byte, offsets[unit] + end_byte
    first = np.searchsorted(ends, first_byte, side="right")  # the first token ending after the range starts
    last = np.searchsorted(starts, end_byte, side="left") - 1  # the last token starting before it ends
    marks = np.zeros(len(counts) + 1, dtype=np.int64)
    np.add.at(marks, first, 1)
    np.add.at(marks, last + 1, -1)
    covered = (np.cumsum(marks)[:-1] > 0) & (counts > 0)
    return int(covered.sum()), len(counts)


def _percent(share: float) -> str:
    return f"{share:.1%}" if share >= 0.001 or share == 0 else f"{share:.2%}"


def _plural(count: int, noun: str) -> str:
    return f"{count:,} {noun}{'' if count == 1 else 's'}"


def overlap_lines(
    checks: CorpusChecks, tokens: tuple[int, int] | None, decontaminated: bool
) -> tuple[list[str], dict[str, Any]]:
    """The start summary's overlap line (and a warning above :data:`OVERLAP_WARNING`), and its numbers."""
    n, unit = checks.n, checks.unit
    numbers: dict[str, Any] = {
        "n": n,
        "unit": unit,
        "measured": checks.measured is None,
        "held_out_units": checks.held_out_units,
        "overlap_units": checks.overlap_units,
        "held_out_words": checks.held_out_words,
        "overlap_words": checks.overlap_words,
        "overlap_word_fraction": checks.overlap_fraction,
        "seconds": checks.seconds,
        "cached": checks.cached,
    }
    if checks.measured is not None:
        return [f"overlap: not measured: {checks.measured}"], numbers | {"reason": checks.measured}
    units = _plural(checks.held_out_units, f"held-out {unit}")
    cost = (
        "cached"
        if checks.cached
        else f"checked in {checks.seconds:.1f} s"
        if checks.seconds >= 0.1
        else ("checked in under 0.1 s")
    )
    if tokens is not None:
        numbers.update(held_out_tokens=tokens[1], overlap_tokens=tokens[0])
        numbers["overlap_token_fraction"] = tokens[0] / tokens[1] if tokens[1] else 0.0
    share = numbers.get("overlap_token_fraction", checks.overlap_fraction)
    measure = "tokens" if tokens is not None else "words"
    words = f"{_percent(checks.overlap_fraction)} of held-out words; " if tokens is not None else ""
    line = (
        f"overlap: {checks.overlap_units:,} of {units} share{'s' if checks.held_out_units == 1 else ''} "
        f"{n}-grams with training, {_percent(share)} of held-out {measure} ({words}{cost})"
    )
    if checks.longest_span and checks.overlap_units:
        span = checks.longest_span
        line += (
            f"; longest shared run {span['words']:,} words: {span['eval_document']} line {span['eval_line']} = "
            f"{span['train_document']} line {span['train_line']}"
        )
    lines = [line]
    if decontaminated:
        dropped = checks.overlap_units
        numbers["decontaminated"] = {"units": dropped, "bytes": checks.dropped_bytes()}
        lines.append(
            f"decontaminate: dropped {_plural(dropped, f'held-out {unit}')} ({checks.dropped_bytes():,} bytes) "
            f"that share {n}-grams with training; the {checks.held_out_units - dropped:,} left share none"
        )
    elif share > OVERLAP_WARNING:
        shown = ", ".join(checks.overlap_names) + (
            ", ..." if checks.overlap_units > len(checks.overlap_names) else ""
        )
        lines.append(
            f"warning: {_percent(share)} of the held-out {measure} repeat training text (above "
            f"{OVERLAP_WARNING:.0%}; e.g. {shown}): the validation score may be flattered; "
            f"{setting('data.decontaminate')} true drops those {unit}s"
        )
    return lines, numbers


def duplicate_lines(checks: CorpusChecks, dedup: bool) -> tuple[list[str], dict[str, Any]]:
    """The start summary's line on exact duplicates in the training data, and its numbers."""
    numbers = {
        "train_documents": checks.train_documents,
        "duplicate_documents": checks.duplicate_documents,
        "duplicated_texts": checks.duplicated_texts,
        "dedup": dedup,
    }
    count, texts = checks.duplicate_documents, checks.duplicated_texts
    if checks.train_documents <= 1:
        return ["duplicates: none possible (the training split is one document)"], numbers
    if not count:
        return [f"duplicates: none among {_plural(checks.train_documents, 'training document')}"], numbers
    which = f"{count:,} of {_plural(checks.train_documents, 'training document')}"
    often = f"{_plural(texts, 'text')} occur{'s' if texts == 1 else ''} more than once"
    how = f"repeat{'s' if count == 1 else ''} an earlier one exactly (after normalisation; {often})"
    if dedup:
        return [
            f"dedup: dropped {which}, exact copies of an earlier one (after normalisation; {often}); "
            "one of each is kept"
        ], numbers
    return [f"duplicates: {which} {how}; {setting('data.dedup')} true keeps one of each"], numbers

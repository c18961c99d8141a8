"""The one document reader: finding, reading and splitting the text a model trains, validates and
is evaluated on (the ``data.path`` of ``nexttoken fit`` and the files ``nexttoken eval`` scores alike).

A corpus is a set of documents, read as one stream by :func:`iter_documents`: each text file is one
document, and so is each record of a JSON Lines, JSON or Parquet file or of a saved ``datasets``
folder (its text is one named field; :mod:`nexttoken.data.records` reads the formats). Everything
here is deterministic (sorted paths, names relative to the corpus root, hash-based splits), so two
machines with the same files get the same train/validation split and therefore the same cached tokens.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import sysconfig
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from nexttoken.data.records import RecordSource, is_record_file, is_saved_dataset, json_kind
from nexttoken.errors import DataError, DataWarning, setting

# A NUL byte in the first few KB is the classic (git, grep) test for "this is not a text file".
BINARY_SNIFF_BYTES = 8192
# Bytes of a text file read and decoded at a time: a file is never read as one ``bytes`` object, and
# a long one can be handed on in parts of about this size (``iter_documents(parts=True)``).
READ_BYTES = 1 << 20
# Bytes of a UTF-8 sequence by its first byte's top five bits (1 for ASCII, continuation and invalid).
_UTF8_LENGTH = [1] * 24 + [2] * 4 + [3] * 2 + [4] + [1]
# Folders of the standard library that are not representative source (tests, an IDE, a dead tool).
_STDLIB_SKIPPED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3"})


@dataclass(frozen=True)
class Document:
    """One document: ``name`` is stable across machines (a path relative to the corpus root, with
    ``#index`` for a record); ``split`` is the split of a saved ``DatasetDict`` it came from.

    A long document may come in consecutive parts, each a ``Document`` of the same name: ``part``
    numbers them from 0, and ``more`` is True on every part but the last. The defaults describe a
    whole document (its only part)."""

    name: str
    text: str
    split: str | None = None
    part: int = 0
    more: bool = False


# --------------------------------------------------------------------------- finding files
def default_corpus(include: Sequence[str] | None = None, exclude: Sequence[str] | None = None) -> list[Path]:
    """The Python standard library's own ``.py`` source: a built-in corpus that needs no download.

    ``include``/``exclude`` filter it like a folder's contents (paths relative to the stdlib folder).
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for path in root.rglob("*.py"):
        relative = path.relative_to(root)
        # Empty files (package markers) are left out here rather than warned about on every run.
        if _STDLIB_SKIPPED_DIRS.intersection(relative.parts[:-1]) or path.stat().st_size == 0:
            continue
        if (include and not _matches(relative.as_posix(), include)) or (
            exclude and _matches(relative.as_posix(), exclude)
        ):
            continue
        files.append(path)
    if not files:
        raise DataError(
            f"found no .py files in the standard library at {root} (include={include}, exclude={exclude}); "
            f"pass {setting('data.path')}"
        )
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _matches(relative: str, patterns: Sequence[str]) -> bool:
    # Match the relative path ("pkg/mod.py") or the bare name ("mod.py"), so "test_*" works too.
    name = relative.rsplit("/", 1)[-1]
    return any(fnmatch.fnmatch(relative, p) or fnmatch.fnmatch(name, p) for p in patterns)


def _walk_files(folder: Path) -> Iterable[tuple[Path, str]]:
    """Every non-hidden file under ``folder`` with its posix path relative to it, in sorted order;
    a saved ``datasets`` folder comes as itself (one source), not as the files inside it."""
    for dirpath, dirnames, filenames in os.walk(folder):
        # Hidden folders (.git, .venv, ...) hold tooling, not corpus text.
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d != "__pycache__")
        datasets = [d for d in dirnames if is_saved_dataset(Path(dirpath) / d)]
        dirnames[:] = [d for d in dirnames if d not in datasets]
        for entry in sorted([*datasets, *(f for f in filenames if not f.startswith("."))]):
            path = Path(dirpath) / entry
            yield path, path.relative_to(folder).as_posix()


def is_binary(path: Path) -> bool:
    """True when a NUL byte appears in the file's first ``BINARY_SNIFF_BYTES`` bytes."""
    with open(path, "rb") as f:
        return b"\0" in f.read(BINARY_SNIFF_BYTES)


def is_text_file(path: Path) -> bool:
    """True for a source read as one text document (not a record file or a saved dataset)."""
    return not path.is_dir() and not is_record_file(path)


def find_documents(
    paths: Iterable[str | os.PathLike] | str | os.PathLike,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    *,
    setting_name: str = "data.path",
) -> list[Path]:
    """The sources named by ``paths`` (files, or folders searched recursively), sorted and deduplicated:
    text files, record files (``.jsonl``, ``.json``, either maybe ``.gz``/``.zst``; ``.parquet``) and
    saved ``datasets`` folders.

    ``include``/``exclude`` are glob patterns matched against each file's path relative to the folder
    it was found in (or its bare name); they filter folder contents, while a file named explicitly is
    always taken. Hidden files and folders are skipped. Binary files that are not record files are
    skipped with a warning. ``setting_name`` is the setting the paths came from, for error messages.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    flag = setting(setting_name)
    found: set[Path] = set()
    for given in paths:
        path = Path(given).expanduser()
        if not path.exists():
            raise DataError(f"{flag}: path not found: {path}; pass an existing file or folder")
        if path.is_file() or is_saved_dataset(path):
            candidates = [path]
        else:
            candidates = [
                file
                for file, relative in _walk_files(path)
                if (not include or _matches(relative, include))
                and not (exclude and _matches(relative, exclude))
            ]
        binary = [file for file in candidates if is_text_file(file) and is_binary(file)]
        texts = [file.resolve() for file in candidates if file not in binary]
        if not texts:
            if path.is_file():
                raise DataError(f"{path} is a binary file; point {flag} at UTF-8 text or record files")
            filters = f" matching include={list(include or [])} exclude={list(exclude or [])}"
            raise DataError(
                f"{path} holds no text files{filters} (nor .jsonl, .json or .parquet records, nor saved "
                f"datasets); point {flag} at UTF-8 text or records"
            )
        for file in binary:
            warnings.warn(f"skipping binary file {file} (it has NUL bytes)", DataWarning, stacklevel=2)
        found.update(texts)
    if not found:
        raise DataError(f"no paths given; pass {flag} with at least one file or folder")
    return sorted(found)


# --------------------------------------------------------------------------- reading
def read_document(path: str | os.PathLike, errors: str = "strict") -> str:
    """The file's text, decoded as UTF-8 exactly as stored (no newline translation, so bytes add up).

    A binary file (NUL bytes near its start) is an error. Invalid UTF-8 is an error naming the byte
    offset; with ``errors="replace"`` the bad bytes become U+FFFD and a warning says so.
    """
    return "".join(read_text_parts(path, errors))


def read_text_parts(
    path: str | os.PathLike,
    errors: str = "strict",
    on_read: Callable[[int], None] | None = None,
    *,
    warn: bool = True,
) -> Iterator[str]:
    """The text of a file, in consecutive parts of about :data:`READ_BYTES` bytes each, exactly as
    :func:`read_document` decodes it whole (the parts joined are its text, also where bad bytes are
    replaced): a character cut by the end of a block read is decoded with the next block.

    ``on_read`` gets the bytes read as they are read; ``warn=False`` leaves out the warning about
    replaced bytes (for a second reading of the same file). Errors are :func:`read_document`'s.
    """
    if errors not in ("strict", "replace"):
        raise ValueError(f"errors must be 'strict' or 'replace', got {errors!r}")
    path = Path(path)
    offset = 0  # of ``pending`` in the file
    pending = b""
    replaced = False
    with open(path, "rb") as f:
        if b"\0" in f.read(BINARY_SNIFF_BYTES):
            raise _binary_error(path)
        f.seek(0)
        while True:
            block = f.read(READ_BYTES)
            if on_read is not None and block:
                on_read(len(block))
            data = pending + block if pending else block
            end = len(data)
            if block:
                # Hold back the last character if it is incomplete: cut before the last byte (of the
                # last four) that is not a continuation byte, where a UTF-8 decoder starts afresh, so
                # the parts decode exactly as the whole file does, invalid bytes included.
                for i in range(len(data) - 1, max(len(data) - 5, -1), -1):
                    if data[i] & 0xC0 != 0x80:
                        if len(data) - i < _UTF8_LENGTH[data[i] >> 3]:
                            end = i
                        break
            chunk = data[:end]
            pending = data[end:]
            try:
                text = chunk.decode("utf-8")
            except UnicodeDecodeError as e:
                if errors == "strict":
                    raise DataError(
                        f"{path} is not valid UTF-8 (byte offset {offset + e.start}: {e.reason}); convert it to "
                        f"UTF-8, or pass {setting('data.replace_invalid_utf8')} true to replace bad bytes with U+FFFD"
                    ) from None
                if warn and not replaced:
                    warnings.warn(
                        f"{path}: replaced invalid UTF-8 starting at byte offset {offset + e.start} with U+FFFD",
                        DataWarning,
                        stacklevel=3,
                    )
                replaced = True
                text = chunk.decode("utf-8", errors="replace")
            offset += end
            if text:
                yield text
            if not block:
                return


def _binary_error(path: Path) -> DataError:
    return DataError(f"{path} is a binary file (it has NUL bytes), not text; pass UTF-8 text files")


def corpus_root(paths: Sequence[Path]) -> Path:
    """The deepest folder holding every path: names relative to it are the same on every machine."""
    return Path(os.path.commonpath([str(Path(p).resolve().parent) for p in paths]))


def record_text(value: object, where: str, field: str, errors: str = "strict") -> str:
    """A record's text field as a document's text: it must be a string that is valid Unicode.

    JSON can spell a lone surrogate (``"\\ud800"``), which no UTF-8 byte sequence encodes; it is an
    error, or with ``errors="replace"`` it becomes U+FFFD.
    """
    if not isinstance(value, str):
        raise DataError(
            f"{where}: field {field!r} is {json_kind(value)}, not a string; point "
            f"{setting('data.text_field')} at the field that holds the text"
        )
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            if errors == "strict":
                raise DataError(
                    f"{where}: field {field!r} holds a lone surrogate ({value[e.start]!a} at character "
                    f"{e.start}), which is not text; fix the record, or pass "
                    f"{setting('data.replace_invalid_utf8')} true"
                ) from None
            # UTF-16 pairs the surrogates that belong together and replaces the rest.
            value = value.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    return value


def iter_documents(
    paths: Sequence[str | os.PathLike],
    errors: str = "strict",
    root: Path | None = None,
    *,
    text_field: str = "text",
    splits: Sequence[str] | None = None,
    select: Callable[[str], bool] | None = None,
    on_read: Callable[[int], None] | None = None,
    parts: bool = False,
) -> Iterator[Document]:
    """Stream every document of ``paths`` (as :func:`find_documents` returns them), in order.

    A text file is one document; each record of a record file or saved dataset is one document whose
    text is its ``text_field`` (a dotted path for a nested field). Empty documents are skipped with a
    warning (one per source). With ``parts``, a text file comes as it is read, in parts of about
    :data:`READ_BYTES` (see :class:`Document`), so no file is ever held whole.

    Args:
        errors: ``"strict"`` or ``"replace"``, for invalid UTF-8 (see :func:`read_document`).
        root: names are relative to it; default: the deepest folder holding every path.
        splits: for a saved ``DatasetDict``, the splits to read (None: all of them).
        select: ``select(name)`` decides before a document is read or parsed whether it is wanted.
        on_read: called with the number of source bytes (as stored on disk) read since the last call.
    """
    paths = [Path(p).resolve() for p in paths]
    root = root if root is not None else corpus_root(paths)
    for path in paths:
        name = path.relative_to(root).as_posix()
        if is_text_file(path):
            if select is not None and not select(name):
                if on_read is not None:
                    on_read(path.stat().st_size)  # passed over: done with it all the same
                continue
            texts = read_text_parts(path, errors, on_read)
            empty = True
            for document in as_parts(name, texts) if parts else as_parts(name, ["".join(texts)]):
                empty = False
                yield document
            if empty:
                warnings.warn(f"skipping empty file {path}", DataWarning, stacklevel=2)
            continue
        source = RecordSource(path, name)
        wanted = None
        if select is not None:
            wanted = lambda index, split, source=source: select(source.record_name(index, split))  # noqa: E731
        empty = 0
        for record in source.read([text_field], splits=splits, select=wanted, errors=errors, on_read=on_read):
            text = record_text(record.values[text_field], record.where, text_field, errors)
            if text:
                yield Document(source.record_name(record.index, record.split), text, record.split)
            else:
                empty += 1
        if empty:
            warnings.warn(
                f"{path}: skipped {empty} record(s) with an empty {text_field!r}", DataWarning, stacklevel=2
            )


def as_parts(name: str, texts: Iterable[str], split: str | None = None) -> Iterator[Document]:
    """The non-empty ``texts``, in order, as the consecutive parts of one document ``name``."""
    previous, part = None, 0
    for text in texts:
        if not text:
            continue
        if previous is not None:
            yield Document(name, previous, split, part, more=True)
            part += 1
        previous = text
    if previous is not None:
        yield Document(name, previous, split, part)


def load_documents(
    paths: Sequence[str | os.PathLike],
    errors: str = "strict",
    root: Path | None = None,
    *,
    text_field: str = "text",
) -> list[Document]:
    """Every document of ``paths`` in a list (:func:`iter_documents`); an error if there are none."""
    paths = [Path(p).resolve() for p in paths]
    if not paths:
        raise DataError(f"no documents to read; pass {setting('data.path')} with at least one text file")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        documents = list(iter_documents(paths, errors, root, text_field=text_field))
    if not documents:
        raise no_text_error(paths)
    for warning in caught:  # only now: an all-empty corpus is an error, not also warnings
        warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    return documents


def no_text_error(paths: Sequence[Path]) -> DataError:
    """The error for a corpus in which every source was empty."""
    if len(paths) == 1:
        return DataError(f"{paths[0]} is empty: there is no text in it; point {setting('data.path')} at text")
    shown = ", ".join(str(p) for p in paths[:3]) + (", ..." if len(paths) > 3 else "")
    return DataError(f"every file is empty ({shown}); point {setting('data.path')} at text")


def content_digest(texts: Iterable[str]) -> str:
    """A sha256 of a sequence of texts (length-prefixed, so ["ab", "c"] != ["a", "bc"])."""
    digest = hashlib.sha256()
    for text in texts:
        data = text.encode("utf-8", errors="surrogatepass")
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.hexdigest()


# --------------------------------------------------------------------------- splitting
def unit_hash(name: str) -> float:
    """A stable number in [0, 1) for a name (Python's hash() is salted per process; this is not)."""
    return int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "big") / 2**64


def split_text(document: Document, val_fraction: float) -> tuple[Document, Document]:
    """Hold out the last ``val_fraction`` of a document's bytes, cut after a newline where one is near.

    The cut is always at a character boundary, so both halves are valid UTF-8.
    """
    data = document.text.encode("utf-8")
    target, lo = _held_out_window(len(data), val_fraction)
    cut = _held_out_cut(len(data), target, data.rfind(b"\n", lo, target), data[target : target + 4])
    if cut in (0, len(data)):
        raise _too_short(document.name, len(data))
    train, val = data[:cut], data[cut:]
    return Document(f"{document.name}[train]", train.decode()), Document(
        f"{document.name}[val]", val.decode()
    )


def split_text_file(
    path: str | os.PathLike,
    name: str,
    val_fraction: float,
    errors: str = "strict",
    on_read: Callable[[int], None] | None = None,
) -> Iterator[tuple[bool, str]]:
    """:func:`split_text` of the file's text (:func:`read_document`), read in parts: ``(is_val,
    text)`` for every part of the training half, then of the held-out half. The cut is at exactly
    the byte :func:`split_text` chooses; the file is never held whole. ``name``: the document's."""
    path = Path(path)
    if is_binary(path):
        raise _binary_error(path)
    cut = _held_out_cut_of_file(path, name, val_fraction, errors)
    position = 0  # UTF-8 bytes of the file's text before ``text``
    for text in read_text_parts(path, errors, on_read):
        size = _utf8_length(text)
        if position < cut < position + size:
            data = text.encode("utf-8")
            yield False, data[: cut - position].decode("utf-8")
            yield True, data[cut - position :].decode("utf-8")
        else:
            yield position >= cut, text
        position += size


def _held_out_window(size: int, val_fraction: float) -> tuple[int, int]:
    """``(target, lo)``: the byte :func:`split_text` aims to cut ``size`` bytes at, and from where it
    looks for a newline to cut after instead (within a quarter of the requested held-out size)."""
    target = round(size * (1.0 - val_fraction))
    target = min(max(target, 1), size - 1)
    slack = max(1, (size - target) // 4)
    return target, max(0, target - slack)


def _held_out_cut(size: int, target: int, newline: int, following: bytes) -> int:
    """The cut: after the ``newline`` found before ``target`` (-1: none), else at ``target`` moved past
    UTF-8 continuation bytes (``following``: the bytes from ``target``, up to 4)."""
    if newline != -1 and newline + 1 < size:
        return newline + 1
    cut = target
    for byte in following:
        if byte & 0xC0 != 0x80:
            break
        cut += 1
    return cut


def _held_out_cut_of_file(path: Path, name: str, val_fraction: float, errors: str) -> int:
    """:func:`split_text`'s cut of the file's text, in UTF-8 bytes of that text, read in parts. Valid
    UTF-8 is its own text, so only ``errors="replace"`` decodes (the bytes may then differ)."""
    if errors == "strict":
        size = path.stat().st_size
    else:
        size = sum(_utf8_length(text) for text in read_text_parts(path, errors, warn=False))
    if size == 0:
        raise _too_short(name, size)
    target, lo = _held_out_window(size, val_fraction)
    newline, following = -1, b""
    for position, data in _text_bytes(path, errors, lo, min(target + 4, size)):
        found = data.rfind(b"\n", 0, max(0, target - position))
        if found != -1:
            newline = position + found
        if position + len(data) > target:
            following += data[max(0, target - position) :]
    cut = _held_out_cut(size, target, newline, following)
    if cut in (0, size):
        raise _too_short(name, size)
    return cut


def _text_bytes(path: Path, errors: str, start: int, stop: int) -> Iterator[tuple[int, bytes]]:
    """``(position, data)``: the UTF-8 bytes ``start:stop`` of the file's text, in blocks."""
    if errors == "strict":  # the text's bytes are the file's (were they not, reading it fails)
        with open(path, "rb") as f:
            f.seek(start)
            position = start
            while position < stop and (data := f.read(min(READ_BYTES, stop - position))):
                yield position, data
                position += len(data)
        return
    position = 0
    for text in read_text_parts(path, errors, warn=False):
        if position >= stop:
            return
        data = text.encode("utf-8")
        if position + len(data) > start:
            yield max(position, start), data[max(0, start - position) : stop - position]
        position += len(data)


def _utf8_length(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8"))


def _too_short(name: str, size: int) -> DataError:
    return DataError(
        f"{name} is too short ({size} bytes) to hold out a validation part; add text or pass "
        f"{setting('data.val_path')}"
    )


def held_out(name: str, val_fraction: float) -> bool:
    """THE split rule: a document is held out for validation when a stable hash of its name (a path
    relative to the corpus root, ``#index`` for a record) is below ``val_fraction``."""
    return unit_hash(name) < val_fraction

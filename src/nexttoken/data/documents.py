"""The one document reader: finding, reading and splitting the text a model trains, validates and
is evaluated on (``nexttoken fit``'s ``--data.path`` and ``nexttoken eval``'s DATA alike).

A corpus is a set of documents; each text file is one document. Everything here is deterministic
(sorted paths, hash-based splits computed from paths relative to the corpus root), so two machines
with the same files get the same train/validation split and therefore the same cached tokens.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import sysconfig
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from nexttoken.errors import UserError

# A NUL byte in the first few KB is the classic (git, grep) test for "this is not a text file".
BINARY_SNIFF_BYTES = 8192
# Folders of the standard library that are not representative source (tests, an IDE, a dead tool).
_STDLIB_SKIPPED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3"})


class DataError(UserError):
    """The corpus or data settings cannot be used; the message says what is wrong and what to do."""


class DataWarning(UserWarning):
    """A file was skipped or altered while reading the corpus."""


@dataclass(frozen=True)
class Document:
    """One document: ``name`` is stable across machines (a path relative to the corpus root)."""

    name: str
    text: str


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
            "pass --data.path"
        )
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _matches(relative: str, patterns: Sequence[str]) -> bool:
    # Match the relative path ("pkg/mod.py") or the bare name ("mod.py"), so "test_*" works too.
    name = relative.rsplit("/", 1)[-1]
    return any(fnmatch.fnmatch(relative, p) or fnmatch.fnmatch(name, p) for p in patterns)


def _walk_files(folder: Path) -> Iterable[tuple[Path, str]]:
    """Every non-hidden file under ``folder`` with its posix path relative to it, in sorted order."""
    for dirpath, dirnames, filenames in os.walk(folder):
        # Hidden folders (.git, .venv, ...) hold tooling, not corpus text.
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d != "__pycache__")
        for filename in sorted(filenames):
            if not filename.startswith("."):
                path = Path(dirpath) / filename
                yield path, path.relative_to(folder).as_posix()


def is_binary(path: Path) -> bool:
    """True when a NUL byte appears in the file's first ``BINARY_SNIFF_BYTES`` bytes."""
    with open(path, "rb") as f:
        return b"\0" in f.read(BINARY_SNIFF_BYTES)


def find_documents(
    paths: Iterable[str | os.PathLike] | str | os.PathLike,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    *,
    flag: str = "--data.path",
) -> list[Path]:
    """The text files named by ``paths`` (files, or folders searched recursively), sorted and deduplicated.

    ``include``/``exclude`` are glob patterns matched against each file's path relative to the folder
    it was found in (or its bare name); they filter folder contents, while a file named explicitly is
    always taken. Hidden files and folders are skipped. Binary files are skipped with a warning.
    ``flag`` names the option the paths came from, for error messages.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    found: set[Path] = set()
    for given in paths:
        path = Path(given).expanduser()
        if not path.exists():
            raise DataError(f"{flag}: path not found: {path}; pass an existing file or folder")
        if path.is_file():
            candidates = [path]
        else:
            candidates = [
                file
                for file, relative in _walk_files(path)
                if (not include or _matches(relative, include))
                and not (exclude and _matches(relative, exclude))
            ]
        binary = [file for file in candidates if is_binary(file)]
        texts = [file.resolve() for file in candidates if file not in binary]
        if not texts:
            what = "is a binary file" if path.is_file() else "holds no text files"
            filters = f" matching include={list(include or [])} exclude={list(exclude or [])}"
            raise DataError(f"{path} {what}{filters if path.is_dir() else ''}; point {flag} at UTF-8 text")
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
    if errors not in ("strict", "replace"):
        raise ValueError(f"errors must be 'strict' or 'replace', got {errors!r}")
    path = Path(path)
    data = path.read_bytes()
    if b"\0" in data[:BINARY_SNIFF_BYTES]:
        raise DataError(f"{path} is a binary file (it has NUL bytes), not text; pass UTF-8 text files")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        if errors == "strict":
            raise DataError(
                f"{path} is not valid UTF-8 (byte offset {e.start}: {e.reason}); convert it to UTF-8, "
                "or pass --data.replace_invalid_utf8 true to replace bad bytes with U+FFFD"
            ) from None
        warnings.warn(
            f"{path}: replaced invalid UTF-8 starting at byte offset {e.start} with U+FFFD",
            DataWarning,
            stacklevel=2,
        )
        return data.decode("utf-8", errors="replace")


def corpus_root(paths: Sequence[Path]) -> Path:
    """The deepest folder holding every path: names relative to it are the same on every machine."""
    return Path(os.path.commonpath([str(Path(p).resolve().parent) for p in paths]))


def load_documents(
    paths: Sequence[str | os.PathLike],
    errors: str = "strict",
    root: Path | None = None,
    *,
    flag: str = "--data.path",
) -> list[Document]:
    """Read every path into a :class:`Document`; empty files are skipped with a warning."""
    paths = [Path(p).resolve() for p in paths]
    if not paths:
        raise DataError(f"no documents to read; pass {flag} with at least one text file")
    root = root if root is not None else corpus_root(paths)
    documents, empty = [], []
    for path in paths:
        text = read_document(path, errors=errors)
        if text:
            documents.append(Document(path.relative_to(root).as_posix(), text))
        else:
            empty.append(path)
    if not documents:
        if len(paths) == 1:
            raise DataError(f"{paths[0]} is empty: there is no text in it; point {flag} at text")
        shown = ", ".join(str(p) for p in paths[:3]) + (", ..." if len(paths) > 3 else "")
        raise DataError(f"every file is empty ({shown}); point {flag} at text")
    for path in empty:
        warnings.warn(f"skipping empty file {path}", DataWarning, stacklevel=2)
    return documents


def content_digest(texts: Iterable[str]) -> str:
    """A sha256 of a sequence of texts (length-prefixed, so ["ab", "c"] != ["a", "bc"])."""
    digest = hashlib.sha256()
    for text in texts:
        data = text.encode("utf-8", errors="surrogatepass")
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.hexdigest()


def documents_digest(documents: Iterable[Document]) -> str:
    """A sha256 over names and texts: the identity of a split, for cache keys."""
    return content_digest(part for doc in documents for part in (doc.name, doc.text))


# --------------------------------------------------------------------------- splitting
def _unit_hash(name: str) -> float:
    """A stable number in [0, 1) for a name (Python's hash() is salted per process; this is not)."""
    return int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "big") / 2**64


def split_text(document: Document, val_fraction: float) -> tuple[Document, Document]:
    """Hold out the last ``val_fraction`` of a document's bytes, cut after a newline where one is near.

    The cut is always at a character boundary, so both halves are valid UTF-8.
    """
    data = document.text.encode("utf-8")
    target = round(len(data) * (1.0 - val_fraction))
    target = min(max(target, 1), len(data) - 1)
    # Prefer to cut just after a newline, if one lies within a quarter of the requested val size.
    slack = max(1, (len(data) - target) // 4)
    newline = data.rfind(b"\n", max(0, target - slack), target)
    if newline != -1 and newline + 1 < len(data):
        cut = newline + 1
    else:
        cut = target
        while cut < len(data) and (data[cut] & 0xC0) == 0x80:  # step off UTF-8 continuation bytes
            cut += 1
    train, val = data[:cut], data[cut:]
    if not train or not val:
        raise DataError(
            f"{document.name} is too short ({len(data)} bytes) to hold out a validation part; "
            "add text or pass --data.val_path"
        )
    return Document(f"{document.name}[train]", train.decode()), Document(
        f"{document.name}[val]", val.decode()
    )


def split_documents(
    paths: Sequence[str | os.PathLike],
    val_fraction: float,
    val_paths: Sequence[str | os.PathLike] | None = None,
    errors: str = "strict",
) -> tuple[list[Document], list[Document]]:
    """Read and split the corpus into ``(train, val)`` documents.

    - With ``val_paths``, those documents are the validation set (and are removed from training).
    - A corpus of one document holds out the last ``val_fraction`` of its bytes.
    - Otherwise each document goes to validation when a stable hash of its name is below
      ``val_fraction``: adding files never moves the others. At least one document goes each way.
    """
    resolved = [Path(p).resolve() for p in paths]
    if val_paths:
        val_resolved = [Path(p).resolve() for p in val_paths]
        held_out = set(val_resolved)
        train_paths = [p for p in resolved if p not in held_out]
        if not train_paths:
            raise DataError("every training document is also in --data.val_path; give training text too")
        root = corpus_root(train_paths + val_resolved)
        return load_documents(train_paths, errors, root), load_documents(val_resolved, errors, root)

    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    documents = load_documents(resolved, errors)
    if len(documents) == 1:
        train, val = split_text(documents[0], val_fraction)
        return [train], [val]

    by_hash = sorted(documents, key=lambda d: _unit_hash(d.name))
    n_val = sum(_unit_hash(d.name) < val_fraction for d in documents)
    n_val = min(max(n_val, 1), len(documents) - 1)  # both splits non-empty
    val_names = {d.name for d in by_hash[:n_val]}
    train = [d for d in documents if d.name not in val_names]
    val = [d for d in documents if d.name in val_names]
    return train, val

"""Writing files so that no reader ever sees half of one: the one place files are replaced.

Every file nexttoken writes for a later reader (checkpoints, token caches, tokenizers, reports,
the surprisal page, exported model folders) goes through here: it is written under a temporary
name beside its target, flushed and fsync'd, then renamed over the target (``os.replace``, atomic
on POSIX within one filesystem). A kill at any moment leaves either the old file or the new one,
never a truncated one, and a failure removes the temporary file.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO


def default_cache_dir() -> Path:
    """Where nexttoken keeps what it computes once (token caches, the measured peak): ``$NEXTTOKEN_CACHE`` if set, else ``~/.cache/nexttoken``."""
    return Path(os.environ.get("NEXTTOKEN_CACHE") or Path.home() / ".cache" / "nexttoken").expanduser()


def _fsync_folder(folder: Path) -> None:
    # The rename itself lives in the folder's entry table: sync it too, where the OS allows.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_open(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """A binary file handle whose contents appear at ``path`` only if the block completes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)


def write_atomically(path: str | os.PathLike, data: bytes | str | Callable[[BinaryIO], object]) -> Path:
    """Write ``data`` (bytes, text as UTF-8, or a function that writes to a binary file) to ``path``."""
    with atomic_open(path) as f:
        if isinstance(data, str):
            f.write(data.encode("utf-8"))
        elif isinstance(data, (bytes, bytearray, memoryview)):
            f.write(data)
        else:
            data(f)
    return Path(path)


@contextmanager
def atomic_folder(path: str | os.PathLike) -> Iterator[Path]:
    """A staging folder beside ``path``, renamed to ``path`` when the block completes.

    ``path`` must not exist or be an empty folder; on any failure the staging folder is removed and
    ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent))
    try:
        yield staging
        for file in staging.rglob("*"):
            if file.is_file():
                with open(file, "rb") as f:
                    os.fsync(f.fileno())
        if path.exists():
            path.rmdir()  # only an empty folder may be replaced
        staging.rename(path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _fsync_folder(path.parent)

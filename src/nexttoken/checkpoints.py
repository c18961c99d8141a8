"""Checkpoint files: written atomically, read safely (``weights_only=True``: no pickled code
runs), and every failure to read one explained in a line."""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from nexttoken.errors import UserError
from nexttoken.io import write_atomically


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write each checkpoint through :func:`nexttoken.io.write_atomically` (a temporary file beside
    it, fsync'd, renamed over the old one), so a kill while saving leaves the previous checkpoint
    intact. (Lightning's own writer stages the
    file in the system temp folder and moves it, which is a copy, not a rename, when that folder
    is on another filesystem.) Remote paths (``s3://`` ...) keep Lightning's writer."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        if "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        write_atomically(path, lambda f: torch.save(checkpoint, f))


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The checkpoint's contents, memory-mapped; a clear ``UserError`` if it cannot be one."""
    path = Path(path)
    if not path.is_file():
        raise UserError(
            f"checkpoint {path} does not exist; pass the path of a .ckpt file written by nexttoken fit"
        )
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise UserError(
            f"checkpoint {path} is truncated or corrupted ({reason}); use another checkpoint, e.g. the run's best-*.ckpt"
        ) from error
    except Exception as error:  # an unpickler refusal: the file wants to run code
        raise UserError(
            f"checkpoint {path} holds objects that safe loading refuses ({type(error).__name__}); "
            "only load checkpoints from sources you trust"
        ) from error
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise UserError(
            f"{path} is not a Lightning checkpoint (no state_dict); pass a .ckpt written by nexttoken fit"
        )
    return checkpoint

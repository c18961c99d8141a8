"""TextDataModule: a text corpus, tokenized once into cached memmaps, served as next-token blocks.

Life of the data:

1. ``prepare_data``/``setup``: find the documents, split train/val, build the tokenizer (trained on
   the train split only), and tokenize each split once into ``.npy`` token streams under the cache
   folder, keyed by the split's content and the tokenizer. A second run (or another rank) finds the
   files and starts at once.
2. ``train_dataloader``: batches ``(input_ids, targets)`` of blocks read from the memmap in a seeded
   per-epoch order; each rank reads its own blocks. The loader remembers how many batches it has
   handed out, so a run resumed from a mid-epoch checkpoint sees exactly the batches an
   uninterrupted run would have.
3. ``val_dataloader``: batches ``(input_ids, targets, n_bytes)`` that score every held-out token
   exactly once, for any batch size and any number of ranks (no padding samples, no repeats).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader

from nexttoken.data.cache import CACHE_FORMAT, TokenCache, default_cache_dir
from nexttoken.data.documents import (
    DataError,
    default_corpus,
    documents_digest,
    find_documents,
    split_documents,
)
from nexttoken.data.loaders import ResumableDataLoader, TrainBatches, ValBatches
from nexttoken.data.packing import num_train_blocks
from nexttoken.data.tokenizers import Tokenizer, build_tokenizer

log = logging.getLogger(__name__)


class TextDataModule(L.LightningDataModule):
    """Train and validate on a text corpus.

    Args:
        path: text files and/or folders (searched recursively); default: the Python standard
            library's own source, which needs no download.
        tokenizer: ``bytes``, ``bpe`` (trained on the training split) or a local HF tokenizer path.
        vocab_size: BPE vocabulary size (ignored by other tokenizers).
        block_size: tokens of context per training example.
        batch_size: training blocks per batch (per rank); ``val_batch_size`` defaults to it.
        val_fraction: share of documents held out for validation (of bytes, for a one-file corpus).
        val_path: explicit validation files/folders instead of a held-out fraction.
        include, exclude: glob patterns filtering the files found in folders.
        cache_dir: where tokenized corpora and tokenizers are cached; default ``$NEXTTOKEN_CACHE``
            or ``~/.cache/nexttoken``.
        num_workers: DataLoader worker processes.
        seed: seeds the per-epoch shuffle of training blocks.
        replace_invalid_utf8: replace undecodable bytes with U+FFFD (with a warning) instead of failing.
    """

    def __init__(
        self,
        path: str | list[str] | None = None,
        tokenizer: str = "bpe",
        vocab_size: int = 4096,
        block_size: int = 256,
        batch_size: int = 16,
        val_batch_size: int | None = None,
        val_fraction: float = 0.05,
        val_path: str | list[str] | None = None,
        include: list[str] | None = None,
        exclude: list[str] | None = None,
        cache_dir: str | None = None,
        num_workers: int = 0,
        seed: int = 1337,
        replace_invalid_utf8: bool = False,
    ) -> None:
        super().__init__()
        for name, value in (("block_size", block_size), ("batch_size", batch_size)):
            if value < 1:
                raise DataError(f"{name} must be a positive integer, got {value}")
        if val_batch_size is not None and val_batch_size < 1:
            raise DataError(f"val_batch_size must be a positive integer, got {val_batch_size}")
        if num_workers < 0:
            raise DataError(f"num_workers must be 0 or more, got {num_workers}")
        self.save_hyperparameters(logger=False)  # the run config is saved by the CLI; avoids clashing keys
        # With more ranks than validation blocks some rank has no batch; that is correct (each
        # block is scored once, and the metrics are summed over ranks), so let Lightning accept it.
        self.allow_zero_length_dataloader_with_multiple_devices = True
        # Filled in by prepare_data()/setup().
        self.tokenizer: Tokenizer | None = None
        self.vocab_size: int | None = None
        self.train_tokens: int | None = None
        self.val_tokens: int | None = None
        self.val_bytes: int | None = None
        self.cache_hit: bool | None = None
        self.cache: TokenCache | None = None
        self._train_loader: ResumableDataLoader | None = None
        self._pending_train_state: dict[str, Any] | None = None

    # ------------------------------------------------------------------ building
    @property
    def cache_root(self) -> Path:
        return Path(self.hparams.cache_dir).expanduser() if self.hparams.cache_dir else default_cache_dir()

    def prepare_data(self) -> None:
        self._build()

    def setup(self, stage: str | None = None) -> None:
        self._build()

    def _build(self) -> None:
        """Split, build the tokenizer and tokenize, or load all of that from the cache. Idempotent."""
        if self.cache is not None:
            return
        hp = self.hparams
        if hp.path:
            documents = find_documents(hp.path, hp.include, hp.exclude)
        else:
            documents = find_documents(default_corpus(hp.include, hp.exclude))
        val_documents = find_documents(hp.val_path, hp.include, hp.exclude) if hp.val_path else None
        errors = "replace" if hp.replace_invalid_utf8 else "strict"
        train_docs, val_docs = split_documents(documents, hp.val_fraction, val_documents, errors=errors)

        root = self.cache_root
        tokenizer = build_tokenizer(
            hp.tokenizer, (d.text for d in train_docs), hp.vocab_size, cache_dir=root / "tokenizers"
        )
        key = json.dumps(
            [CACHE_FORMAT, tokenizer.fingerprint, documents_digest(train_docs), documents_digest(val_docs)]
        )
        cache = TokenCache(root / "tokens" / hashlib.sha256(key.encode()).hexdigest()[:24])
        self.cache_hit = cache.exists()
        if self.cache_hit:
            meta = cache.read_meta()
        else:
            meta = cache.write(tokenizer, train_docs, val_docs, check=self._check_sizes)
            log.info(
                "tokenized %d + %d documents into %d + %d tokens in %.1f s (cached in %s)",
                meta["train_documents"],
                meta["val_documents"],
                meta["train_tokens"],
                meta["val_tokens"],
                meta["seconds"],
                cache.directory,
            )
        self._check_sizes(meta)
        self.tokenizer = tokenizer
        self.vocab_size = tokenizer.vocab_size
        self.train_tokens = meta["train_tokens"]
        self.val_tokens = meta["val_tokens"]
        self.val_bytes = meta["val_bytes"]
        self.cache = cache

    def _check_sizes(self, meta: dict[str, Any]) -> None:
        needed = self.hparams.block_size + 1
        if meta["train_tokens"] < needed:
            raise DataError(
                f"the training split has {meta['train_tokens']} tokens, but block_size {self.hparams.block_size} "
                f"needs at least {needed}; add text or lower --data.block_size"
            )
        if meta["val_tokens"] < 2:
            raise DataError(
                f"the validation split has {meta['val_tokens']} tokens, at least 2 are needed; "
                "raise --data.val_fraction or pass --data.val_path"
            )

    def _require_setup(self) -> TokenCache:
        if self.cache is None:
            raise RuntimeError("call prepare_data() and setup() before asking for data")
        return self.cache

    @property
    def val_targets(self) -> int:
        """Scored validation targets: every val stream position after the first."""
        return self.val_tokens - 1

    def val_text_bytes(self) -> bytes:
        """The raw held-out text (UTF-8), e.g. to compare with gzip/xz bits per byte."""
        return self._require_setup().val_text.read_bytes()

    # ------------------------------------------------------------------ loaders
    def _rank_and_world_size(self) -> tuple[int, int]:
        if self.trainer is not None:
            return self.trainer.global_rank, self.trainer.world_size
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return 0, 1

    def make_train_loader(self, rank: int = 0, world_size: int = 1) -> ResumableDataLoader:
        cache = self._require_setup()
        hp = self.hparams
        num_blocks = num_train_blocks(self.train_tokens, hp.block_size)
        if num_blocks < world_size:
            raise DataError(
                f"the training split has {num_blocks} blocks of {hp.block_size} tokens, fewer than the "
                f"{world_size} processes; add text or lower --data.block_size"
            )
        dataset = TrainBatches(cache.train, hp.block_size, hp.batch_size, hp.seed, rank, world_size)
        return ResumableDataLoader(dataset, num_workers=hp.num_workers)

    def make_val_loader(self, rank: int = 0, world_size: int = 1) -> DataLoader:
        cache = self._require_setup()
        hp = self.hparams
        dataset = ValBatches(
            cache.val,
            cache.val_bytes,
            hp.block_size,
            hp.val_batch_size or hp.batch_size,
            pad_id=self.tokenizer.eos_id,
            rank=rank,
            world_size=world_size,
        )
        # An IterableDataset: Lightning never injects a (padding) DistributedSampler into it.
        return DataLoader(dataset, batch_size=None, num_workers=hp.num_workers)

    def train_dataloader(self) -> ResumableDataLoader:
        loader = self.make_train_loader(*self._rank_and_world_size())
        # A reloaded loader continues where the previous one (or the checkpoint) left off.
        state = self._pending_train_state
        if state is None and self._train_loader is not None:
            state = self._train_loader.state_dict()
        if state is not None:
            loader.load_state_dict(state)
        self._pending_train_state = None
        self._train_loader = loader
        return loader

    def val_dataloader(self) -> DataLoader:
        return self.make_val_loader(*self._rank_and_world_size())

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        if self._train_loader is not None:
            return {"train_loader": self._train_loader.state_dict()}
        if self._pending_train_state is not None:
            return {"train_loader": self._pending_train_state}
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Lightning restores the loader's own state only when resuming mid-epoch; from an
        # end-of-epoch checkpoint it does not, and the loader would restart at epoch 0. The
        # datamodule's copy covers both cases (loading the same state twice is harmless).
        self._pending_train_state = state_dict.get("train_loader")
        if self._pending_train_state is not None and self._train_loader is not None:
            self._train_loader.load_state_dict(self._pending_train_state)
            self._pending_train_state = None

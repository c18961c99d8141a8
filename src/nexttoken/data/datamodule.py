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
import os
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from nexttoken.data.corpus import (
    DataError,
    DataWarning,
    Document,
    default_corpus,
    documents_digest,
    find_documents,
    split_documents,
)
from nexttoken.data.packing import (
    concat_byte_counts,
    concat_documents,
    num_train_blocks,
    num_val_blocks,
    token_dtype,
    train_batches,
    val_batches,
    val_block,
    val_block_bytes,
)
from nexttoken.data.tokenizers import Tokenizer, build_tokenizer

log = logging.getLogger(__name__)

# Bump when the layout of the cached files changes, so old caches are never misread.
CACHE_FORMAT = 1
# Texts per call to the batch encoder: big enough to keep every core busy, small enough that the
# encoder's per-token offsets (Python objects) stay a few hundred MB at most.
_ENCODE_CHUNK_CHARS = 1 << 23


def default_cache_dir() -> Path:
    """``$NEXTTOKEN_CACHE`` if set, else ``~/.cache/nexttoken``."""
    return Path(os.environ.get("NEXTTOKEN_CACHE") or Path.home() / ".cache" / "nexttoken").expanduser()


# --------------------------------------------------------------------------- the token cache
def _write_atomically(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    # Readers (other ranks, the next run) must never see a half-written file under the final name.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        write(f)
    os.replace(tmp, path)


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
    """The split's token stream (EOS before each document) and, if asked, per-token byte counts."""
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
    stream = concat_documents(token_lists, tokenizer.eos_id, dtype=token_dtype(tokenizer.vocab_size))
    byte_counts = concat_byte_counts(byte_lists, dtype=np.uint32) if with_bytes else None
    return stream, byte_counts


class TokenCache:
    """The files of one tokenized corpus: ``train.npy``, ``val.npy``, ``val_bytes.npy``, ``val.txt``
    and ``meta.json`` (written last: its presence means the rest is complete)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.train = directory / "train.npy"
        self.val = directory / "val.npy"
        self.val_bytes = directory / "val_bytes.npy"
        self.val_text = directory / "val.txt"
        self.meta = directory / "meta.json"

    def exists(self) -> bool:
        return self.meta.is_file() and all(p.is_file() for p in (self.train, self.val, self.val_bytes, self.val_text))

    def write(
        self, tokenizer: Tokenizer, train_docs: Sequence[Document], val_docs: Sequence[Document]
    ) -> dict[str, Any]:
        started = time.perf_counter()
        train_stream, _ = tokenize_documents(tokenizer, train_docs, with_bytes=False)
        val_stream, val_bytes = tokenize_documents(tokenizer, val_docs, with_bytes=True)
        val_text = b"".join(doc.text.encode("utf-8") for doc in val_docs)
        if int(val_bytes.sum()) != len(val_text):
            # Only possible when a tokenizer turns a whole non-empty document into no tokens at all.
            warnings.warn(
                f"the tokenizer covers {int(val_bytes.sum())} of the {len(val_text)} validation bytes",
                DataWarning,
                stacklevel=2,
            )
        self.directory.mkdir(parents=True, exist_ok=True)
        _write_atomically(self.train, lambda f: np.save(f, train_stream))
        _write_atomically(self.val, lambda f: np.save(f, val_stream))
        _write_atomically(self.val_bytes, lambda f: np.save(f, val_bytes))
        _write_atomically(self.val_text, lambda f: f.write(val_text))
        meta = {
            "format": CACHE_FORMAT,
            "tokenizer": tokenizer.to_dict(),
            "train_documents": len(train_docs),
            "val_documents": len(val_docs),
            "train_tokens": len(train_stream),
            "val_tokens": len(val_stream),
            "val_bytes": int(val_bytes.sum()),
            "seconds": round(time.perf_counter() - started, 3),
        }
        _write_atomically(self.meta, lambda f: f.write(json.dumps(meta, indent=1).encode()))
        return meta

    def read_meta(self) -> dict[str, Any]:
        return json.loads(self.meta.read_text())


# --------------------------------------------------------------------------- datasets
def _worker_share() -> tuple[int, int]:
    """(worker id, number of workers) of the DataLoader worker running this, (0, 1) in-process."""
    info = get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


class TrainBatches(IterableDataset):
    """One rank's training batches ``(input_ids, targets)`` for one epoch, from ``start_batch`` on.

    It yields whole batches: DataLoader workers each take every n-th batch, and the DataLoader
    returns them round-robin, so the order is the same for any number of workers.
    """

    def __init__(
        self, stream_file: Path, block_size: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1
    ) -> None:
        self.stream_file = str(stream_file)
        self.block_size = block_size
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.num_blocks = num_train_blocks(len(np.load(self.stream_file, mmap_mode="r")), block_size)
        self.num_batches = len(self.batch_plan(epoch=0))
        # Set by the loader just before each epoch starts.
        self.epoch = 0
        self.start_batch = 0

    def batch_plan(self, epoch: int) -> np.ndarray:
        return train_batches(
            self.num_blocks, self.batch_size, seed=self.seed, epoch=epoch, rank=self.rank, world_size=self.world_size
        )

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        worker, num_workers = _worker_share()
        stream = np.load(self.stream_file, mmap_mode="r")
        plan = self.batch_plan(self.epoch)
        T = self.block_size
        for b in range(self.start_batch + worker, len(plan), num_workers):
            blocks = np.stack([stream[i * T : i * T + T + 1] for i in plan[b]]).astype(np.int64)
            yield torch.from_numpy(blocks[:, :-1].copy()), torch.from_numpy(blocks[:, 1:].copy())


class ValBatches(IterableDataset):
    """One rank's validation batches ``(input_ids, targets, n_bytes)``: this rank's share of the
    blocks that together score every target of the validation stream once."""

    def __init__(
        self,
        stream_file: Path,
        bytes_file: Path,
        block_size: int,
        batch_size: int,
        pad_id: int,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.stream_file = str(stream_file)
        self.bytes_file = str(bytes_file)
        self.block_size = block_size
        self.pad_id = pad_id
        num_blocks = num_val_blocks(len(np.load(self.stream_file, mmap_mode="r")), block_size)
        self.batches = val_batches(num_blocks, batch_size, rank=rank, world_size=world_size)

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        worker, num_workers = _worker_share()
        stream = np.load(self.stream_file, mmap_mode="r")
        block_bytes = val_block_bytes(np.load(self.bytes_file, mmap_mode="r"), self.block_size)
        for blocks in self.batches[worker::num_workers]:
            rows = [val_block(stream, i, self.block_size, self.pad_id) for i in blocks]
            yield (
                torch.from_numpy(np.stack([r[0] for r in rows])),
                torch.from_numpy(np.stack([r[1] for r in rows])),
                torch.from_numpy(block_bytes[blocks.start : blocks.stop].astype(np.int64)),
            )


# --------------------------------------------------------------------------- resumable loader
class _CountingIterator(Iterator):
    """Starts the epoch lazily (on the first ``next``, after Lightning has restored any state) and
    counts the batches actually handed to the caller: worker prefetching does not count."""

    def __init__(self, loader: ResumableDataLoader) -> None:
        self._loader = loader
        self._inner: Iterator | None = None

    def __next__(self):
        if self._inner is None:
            self._inner = self._loader._start_epoch()
        batch = next(self._inner)
        self._loader.batches_consumed += 1
        return batch


class ResumableDataLoader(DataLoader):
    """A DataLoader over :class:`TrainBatches` whose position (epoch, batches handed out) is saved
    in checkpoints: Lightning stores ``state_dict()`` of loaders that have one, and restores it
    before the first batch of a resumed run.

    A new iterator continues where the previous one stopped; once an epoch's batches are all out,
    the next iterator starts the next epoch (with its own permutation).
    """

    def __init__(self, dataset: TrainBatches, num_workers: int = 0) -> None:
        # Workers must not persist across epochs: each epoch hands them a fresh (epoch, start) copy.
        super().__init__(dataset, batch_size=None, num_workers=num_workers, persistent_workers=False)
        self.epoch = 0
        self.batches_consumed = 0

    def __iter__(self) -> Iterator:
        return _CountingIterator(self)

    def _start_epoch(self) -> Iterator:
        if self.batches_consumed >= len(self.dataset):
            self.epoch += 1
            self.batches_consumed = 0
        self.dataset.epoch = self.epoch
        self.dataset.start_batch = self.batches_consumed
        return super().__iter__()

    def _layout(self) -> dict[str, int]:
        d = self.dataset
        return {
            "num_blocks": d.num_blocks,
            "block_size": d.block_size,
            "batch_size": d.batch_size,
            "seed": d.seed,
            "world_size": d.world_size,
        }

    def state_dict(self) -> dict[str, Any]:
        # Plain ints only: checkpoints are loaded with weights_only=True.
        return {"epoch": int(self.epoch), "batches_consumed": int(self.batches_consumed), "layout": self._layout()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = int(state["epoch"])
        self.batches_consumed = int(state["batches_consumed"])
        if state.get("layout") != self._layout():
            warnings.warn(
                f"the training data layout changed since the checkpoint ({state.get('layout')} -> "
                f"{self._layout()}); restarting epoch {self.epoch} from its first batch",
                DataWarning,
                stacklevel=2,
            )
            self.batches_consumed = 0


# --------------------------------------------------------------------------- the datamodule
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
            meta = cache.write(tokenizer, train_docs, val_docs)
            log.info(
                "tokenized %d + %d documents into %d + %d tokens in %.1f s (cached in %s)",
                meta["train_documents"], meta["val_documents"], meta["train_tokens"], meta["val_tokens"],
                meta["seconds"], cache.directory,
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

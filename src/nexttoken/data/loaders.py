"""The data loaders: one rank's training batches (resumable mid-epoch) and validation batches.

Both are ``IterableDataset``s that shard by rank themselves, so Lightning never injects a padding
``DistributedSampler``; blocks come from :mod:`nexttoken.data.packing`, where the one shift lives.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from nexttoken.data.documents import DataWarning
from nexttoken.data.packing import (
    num_train_blocks,
    num_val_blocks,
    train_batch,
    train_batches,
    val_batch,
    val_batches,
    val_block_bytes,
)


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
        self,
        stream_file: Path,
        block_size: int,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
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
            self.num_blocks,
            self.batch_size,
            seed=self.seed,
            epoch=epoch,
            rank=self.rank,
            world_size=self.world_size,
        )

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        worker, num_workers = _worker_share()
        stream = np.load(self.stream_file, mmap_mode="r")
        plan = self.batch_plan(self.epoch)
        for b in range(self.start_batch + worker, len(plan), num_workers):
            input_ids, targets = train_batch(stream, plan[b], self.block_size)
            yield (
                torch.from_numpy(np.ascontiguousarray(input_ids)),
                torch.from_numpy(np.ascontiguousarray(targets)),
            )


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
        byte_counts = np.load(self.bytes_file, mmap_mode="r")
        for blocks in self.batches[worker::num_workers]:
            input_ids, targets = val_batch(stream, blocks, self.block_size, self.pad_id)
            yield (
                torch.from_numpy(np.ascontiguousarray(input_ids)),
                torch.from_numpy(np.ascontiguousarray(targets)),
                torch.from_numpy(val_block_bytes(byte_counts, self.block_size, blocks)),
            )


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
        return {
            "epoch": int(self.epoch),
            "batches_consumed": int(self.batches_consumed),
            "layout": self._layout(),
        }

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

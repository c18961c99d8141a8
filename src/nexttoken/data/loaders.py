"""The data loaders: one rank's training batches (resumable mid-epoch) and validation batches, of
plain-text blocks and of chat/instruction examples.

All are ``IterableDataset``s that shard by rank themselves, so Lightning never injects a padding
``DistributedSampler``; blocks come from :mod:`nexttoken.data.packing`, where the one shift lives,
and example rows from :mod:`nexttoken.data.sft`. One resumable loader serves both kinds of training
data (:class:`EpochBatches`, :class:`ResumableDataLoader`).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from nexttoken.data.chat import Example
from nexttoken.data.packing import (
    block_offset,
    mask_documents,
    num_train_blocks,
    num_val_blocks,
    train_batch,
    train_batches,
    train_rows,
    val_batch,
    val_batches,
    val_block_bytes,
)
from nexttoken.data.sft import collate, train_plan, val_plan
from nexttoken.errors import DataError, DataWarning, setting
from nexttoken.loss import IGNORE_INDEX


def _worker_share() -> tuple[int, int]:
    """(worker id, number of workers) of the DataLoader worker running this, (0, 1) in-process."""
    info = get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


class EpochBatches(IterableDataset):
    """One rank's training batches for one epoch, from ``start_batch`` on: the resumable part that
    every kind of training data shares (plain-text blocks, chat examples).

    A subclass says which batches an epoch has (:meth:`batch_plan`, the same length every epoch),
    how one is made (:meth:`make_batch`, from what :meth:`open` returns once per iteration), what
    fixes the epoch's global order (:meth:`layout`) and how this run splits it (:meth:`split`). It
    yields whole batches: DataLoader workers each take every n-th batch, and the DataLoader returns
    them round-robin, so the order is the same for any number of workers.

    Batch ``b`` of every rank together takes the next :attr:`per_batch` units (blocks, packed rows
    or groups of examples) of the epoch's one global order, whatever the number of ranks: so the
    position in the epoch, ``b x per_batch``, is the same for every way of splitting the same
    global batch (:func:`nexttoken.data.packing.train_batches`), and a checkpoint saves it.
    """

    # Set by the loader just before each epoch starts.
    epoch = 0
    start_batch = 0
    num_batches = 0
    unit = "blocks"  # what the global order is made of, for messages
    fixed_batch_size = False  # True: the global order depends on the batch size itself

    def batch_plan(self, epoch: int) -> Sequence[Any]:
        raise NotImplementedError

    def open(self) -> Any:
        """What :meth:`make_batch` reads from (opened in the process that iterates)."""
        return None

    def make_batch(self, source: Any, entry: Any) -> tuple[torch.Tensor, ...]:
        raise NotImplementedError

    def layout(self) -> dict[str, Any]:
        """Plain values that fix the epoch's global order: a saved position is only valid for the same."""
        raise NotImplementedError

    def split(self) -> dict[str, int]:
        """How this run cuts the global batch: ``world_size x batch_size x accumulate`` of :attr:`unit`."""
        raise NotImplementedError

    def legacy_layout(self) -> dict[str, Any]:
        """The layout as checkpoints saved it before positions were global (per rank and batch size)."""
        raise NotImplementedError

    @property
    def per_batch(self) -> int:
        """Units of the global order that batch ``b`` of all ranks together takes."""
        raise NotImplementedError

    def check_split(self, saved: dict[str, int]) -> None:
        """Raise :class:`DataError` if a position saved with the split ``saved`` (the same global
        batch) cannot be continued with this one."""

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        worker, num_workers = _worker_share()
        source = self.open()
        plan = self.batch_plan(self.epoch)
        for b in range(self.start_batch + worker, len(plan), num_workers):
            yield self.make_batch(source, plan[b])


def _processes(n: int) -> str:
    return f"{n} process" if n == 1 else f"{n} processes"


def global_batch(split: dict[str, int]) -> int:
    return split["world_size"] * split["batch_size"] * split["accumulate"]


def keep_global_batch(
    target: int, world_size: int, batch_size: int, accumulate: int, fixed_batch_size: bool = False
) -> str:
    """What to set so that ``world_size`` processes make a global batch of ``target``
    (``fixed_batch_size``: changing only the accumulation)."""
    if target % world_size or (fixed_batch_size and target % (world_size * batch_size)):
        return f"use a number of processes that divides {target // (batch_size if fixed_batch_size else 1)}"
    per_rank = target // world_size
    if per_rank % accumulate == 0 and not fixed_batch_size:
        keep = f" with {setting('trainer.accumulate_grad_batches')} {accumulate}" if accumulate > 1 else ""
        return f"set {setting('data.batch_size')} {per_rank // accumulate}{keep}"
    if per_rank % batch_size == 0:
        return f"set {setting('trainer.accumulate_grad_batches')} {per_rank // batch_size}"
    return f"set {setting('data.batch_size')} {per_rank} and {setting('trainer.accumulate_grad_batches')} 1"


class TrainBatches(EpochBatches):
    """One rank's training batches ``(input_ids, targets)`` of a token stream's blocks.

    ``document_mask``: ``(start_id, end_id)`` of the stream's document framing
    (:func:`nexttoken.data.packing.mask_documents`): attention stays inside each document, and the
    batches are ``(input_ids, targets, document_ids)``. ``shift_blocks``: every epoch after the
    first cuts its blocks at a new seeded offset (:func:`nexttoken.data.packing.block_offset`).
    """

    def __init__(
        self,
        stream_file: Path,
        block_size: int,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        document_mask: tuple[int | None, int] | None = None,
        accumulate: int = 1,
        shift_blocks: bool = True,
    ) -> None:
        self.shift_blocks = shift_blocks
        self.stream_file = str(stream_file)
        self.block_size = block_size
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.accumulate = accumulate
        self.document_mask = document_mask
        self.num_blocks = num_train_blocks(len(np.load(self.stream_file, mmap_mode="r")), block_size)
        self.rows = train_rows(self.num_blocks, batch_size, world_size, accumulate)
        self.num_batches = len(self.batch_plan(epoch=0))

    def batch_plan(self, epoch: int) -> np.ndarray:
        return train_batches(
            self.num_blocks,
            self.batch_size,
            seed=self.seed,
            epoch=epoch,
            rank=self.rank,
            world_size=self.world_size,
            accumulate=self.accumulate,
        )

    def layout(self) -> dict[str, Any]:
        layout = {"num_blocks": self.num_blocks, "block_size": self.block_size, "seed": self.seed}
        return layout if self.shift_blocks else {**layout, "shift_blocks": False}

    def split(self) -> dict[str, int]:
        return {"world_size": self.world_size, "batch_size": self.rows, "accumulate": self.accumulate}

    def legacy_layout(self) -> dict[str, Any]:
        return {**self.layout(), "batch_size": self.batch_size, "world_size": self.world_size}

    @property
    def per_batch(self) -> int:
        return self.rows * self.world_size

    def open(self) -> np.ndarray:
        return np.load(self.stream_file, mmap_mode="r")

    def make_batch(self, stream: np.ndarray, blocks: np.ndarray) -> tuple[torch.Tensor, ...]:
        offset = block_offset(self.seed, self.epoch, self.block_size) if self.shift_blocks else 0
        arrays = train_batch(stream, blocks, self.block_size, offset)
        if self.document_mask is not None:
            arrays = mask_documents(*arrays, *self.document_mask)
        return tuple(torch.from_numpy(np.ascontiguousarray(a)) for a in arrays)


class ValBatches(IterableDataset):
    """One rank's validation batches ``(input_ids, targets, n_bytes)``: this rank's share of the
    blocks that together score every target of the validation stream once. ``document_mask`` as in
    :class:`TrainBatches`: then ``(input_ids, targets, n_bytes, document_ids)``, and ``n_bytes``
    counts only the targets left scored.

    ``max_targets``: score only the stream's first ``max_targets`` targets (positions
    ``1 .. max_targets``), as if the stream ended there (``data.val_tokens``); None: all of them.
    """

    def __init__(
        self,
        stream_file: Path,
        bytes_file: Path,
        block_size: int,
        batch_size: int,
        pad_id: int,
        rank: int = 0,
        world_size: int = 1,
        document_mask: tuple[int | None, int] | None = None,
        max_targets: int | None = None,
    ) -> None:
        self.stream_file = str(stream_file)
        self.bytes_file = str(bytes_file)
        self.block_size = block_size
        self.pad_id = pad_id
        self.document_mask = document_mask
        length = len(np.load(self.stream_file, mmap_mode="r"))
        # The scored stream: its first max_targets + 1 positions (position 0 is never a target).
        self.length = length if max_targets is None else min(length, max_targets + 1)
        num_blocks = num_val_blocks(self.length, block_size)
        self.batches = val_batches(num_blocks, batch_size, rank=rank, world_size=world_size)

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        worker, num_workers = _worker_share()
        stream = np.load(self.stream_file, mmap_mode="r")[: self.length]
        byte_counts = np.load(self.bytes_file, mmap_mode="r")[: self.length]
        for blocks in self.batches[worker::num_workers]:
            input_ids, targets = val_batch(stream, blocks, self.block_size, self.pad_id)
            document_ids = None
            if self.document_mask is not None:
                input_ids, targets, document_ids = mask_documents(input_ids, targets, *self.document_mask)
            scored = targets != IGNORE_INDEX if document_ids is not None else None
            n_bytes = val_block_bytes(byte_counts, self.block_size, blocks, scored)
            arrays = (input_ids, targets, n_bytes) + (() if document_ids is None else (document_ids,))
            yield tuple(torch.from_numpy(np.ascontiguousarray(a)) for a in arrays)


class ExampleTrainBatches(EpochBatches):
    """One rank's training batches of chat/instruction examples (:mod:`nexttoken.data.sft`):
    ``(input_ids, targets[, document_ids])``, packed into rows of ``block_size`` positions or one
    example per row padded with ``pad_id``, in a seeded order that changes every epoch."""

    def __init__(
        self,
        examples: Sequence[Example],
        block_size: int,
        batch_size: int,
        seed: int,
        *,
        packing: bool,
        pad_id: int,
        rank: int = 0,
        world_size: int = 1,
        accumulate: int = 1,
    ) -> None:
        self.examples = examples
        self.block_size = block_size
        self.batch_size = batch_size
        self.seed = seed
        self.packing = packing
        self.pad_id = pad_id
        self.rank = rank
        self.world_size = world_size
        self.accumulate = accumulate
        plan = self.batch_plan(epoch=0)
        self.num_batches = len(plan)
        # Packed: batches of rows (the global order's units); padded: one group of examples each.
        self.rows = len(plan[0]) if packing else 1
        self.unit = "packed rows" if packing else "examples"
        self.fixed_batch_size = not packing

    def batch_plan(self, epoch: int) -> list[list[list[int]]]:
        return train_plan(
            self.examples,
            self.batch_size,
            block_size=self.block_size,
            packing=self.packing,
            seed=self.seed,
            epoch=epoch,
            rank=self.rank,
            world_size=self.world_size,
            accumulate=self.accumulate,
        )

    def layout(self) -> dict[str, Any]:
        return {
            "examples": len(self.examples),
            "block_size": self.block_size,
            "packing": self.packing,
            "seed": self.seed,
        }

    def split(self) -> dict[str, int]:
        rows = self.rows if self.packing else self.batch_size
        return {"world_size": self.world_size, "batch_size": rows, "accumulate": self.accumulate}

    def legacy_layout(self) -> dict[str, Any]:
        return {
            **self.layout(),
            "batches": self.num_batches,
            "batch_size": self.batch_size,
            "world_size": self.world_size,
        }

    @property
    def per_batch(self) -> int:
        return self.rows * self.world_size

    def check_split(self, saved: dict[str, int]) -> None:
        # Padded batches are groups of batch_size examples of similar length, and the epoch's order
        # is an order of those groups: another batch size makes other groups.
        if self.packing or saved["batch_size"] == self.batch_size:
            return
        per_rank = global_batch(saved) // (saved["batch_size"] * self.world_size)
        how = (
            f"{setting('data.batch_size')} {saved['batch_size']} and "
            f"{setting('trainer.accumulate_grad_batches')} {per_rank}"
            if global_batch(saved) % (saved["batch_size"] * self.world_size) == 0
            else _processes(saved["world_size"])
        )
        raise DataError(
            f"padded examples ({setting('data.packing')} false) are batched in groups of "
            f"{setting('data.batch_size')} examples of similar length, so the checkpoint's order "
            f"({saved['batch_size']} per group) continues only with {how}"
        )

    def make_batch(self, source: None, rows: list[list[int]]) -> tuple[torch.Tensor, ...]:
        width = self.block_size if self.packing else None
        return collate(self.examples, rows, self.pad_id, width).for_training()


class FirstExamples(Sequence[Example]):
    """The first ``count`` of ``examples`` (a memory-mapped set stays one: it pickles as its path)."""

    def __init__(self, examples: Sequence[Example], count: int) -> None:
        self.examples, self.count = examples, min(count, len(examples))

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> Example:  # type: ignore[override]
        if not 0 <= index < self.count:
            raise IndexError(f"example {index} of {self.count}")
        return self.examples[index]


class ExampleValBatches(IterableDataset):
    """One rank's validation batches of examples, ``(input_ids, targets, n_bytes[, document_ids])``:
    every example scored once across ranks, ``n_bytes`` the UTF-8 bytes of its scored response text.

    ``max_examples``: score only the first this many examples (``data.val_tokens``, by whole
    examples: :meth:`~nexttoken.data.datamodule.TextDataModule.scored_val_examples`); None: all."""

    def __init__(
        self,
        examples: Sequence[Example],
        block_size: int,
        batch_size: int,
        *,
        packing: bool,
        pad_id: int,
        rank: int = 0,
        world_size: int = 1,
        max_examples: int | None = None,
    ) -> None:
        if max_examples is not None:
            examples = FirstExamples(examples, max_examples)
        self.examples = examples
        self.width = block_size if packing else None
        self.pad_id = pad_id
        self.batches = val_plan(
            examples, batch_size, block_size=block_size, packing=packing, rank=rank, world_size=world_size
        )

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        worker, num_workers = _worker_share()
        for rows in self.batches[worker::num_workers]:
            yield collate(self.examples, rows, self.pad_id, self.width).for_validation()


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
    """A DataLoader over :class:`EpochBatches` (:class:`TrainBatches`, :class:`ExampleTrainBatches`)
    whose position (the epoch, and how far into its global order) is saved in checkpoints: Lightning
    stores ``state_dict()`` of loaders that have one, and restores it before the first batch of a
    resumed run. A run with another number of processes, batch size and accumulation that makes the
    same global batch continues the same order from there.

    A new iterator continues where the previous one stopped; once an epoch's batches are all out,
    the next iterator starts the next epoch (with its own permutation).
    """

    def __init__(self, dataset: EpochBatches, num_workers: int = 0) -> None:
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

    def state_dict(self) -> dict[str, Any]:
        # Plain ints only: checkpoints are loaded with weights_only=True.
        return {
            "epoch": int(self.epoch),
            "batches_consumed": int(self.batches_consumed),
            # The position in the epoch's global order, whatever the split: what a resume continues.
            "consumed": int(self.batches_consumed * self.dataset.per_batch),
            "layout": self.dataset.layout(),
            "split": self.dataset.split(),
        }

    def check_resumable(self, state: dict[str, Any]) -> None:
        """Raise :class:`DataError` if this loader cannot continue the saved position's global order:
        the same data, split into another global batch (or, for padded examples, other groups)."""
        if "consumed" not in state or state["layout"] != self.dataset.layout():
            return  # saved before positions were global, or other data: see load_state_dict
        saved, mine = state["split"], self.dataset.split()
        self.dataset.check_split(saved)
        if global_batch(saved) != global_batch(mine):
            unit = self.dataset.unit
            raise DataError(
                f"the checkpoint's global batch is {global_batch(saved):,} {unit} ({setting('data.batch_size')} "
                f"{saved['batch_size']} x {setting('trainer.accumulate_grad_batches')} {saved['accumulate']} x "
                f"{_processes(saved['world_size'])}), this run's {global_batch(mine):,} ({mine['batch_size']} x "
                f"{mine['accumulate']} x {mine['world_size']}): to continue its order, "
                + keep_global_batch(
                    global_batch(saved),
                    mine["world_size"],
                    mine["batch_size"],
                    mine["accumulate"],
                    self.dataset.fixed_batch_size,
                )
            )
        if saved != mine and state["consumed"] % self.dataset.per_batch:
            raise DataError(
                f"the checkpoint stopped {state['consumed']:,} {self.dataset.unit} into its epoch, inside an "
                f"optimizer step; continue it with its own split ({_processes(saved['world_size'])}, "
                f"{setting('data.batch_size')} {saved['batch_size']}, "
                f"{setting('trainer.accumulate_grad_batches')} {saved['accumulate']})"
            )

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.check_resumable(state)
        self.epoch = int(state["epoch"])
        if "consumed" not in state:  # a checkpoint of an older nexttoken: a position of its own split
            if state.get("layout") == self.dataset.legacy_layout():
                self.batches_consumed = int(state["batches_consumed"])
                return
            self._restart_epoch(state.get("layout"), self.dataset.legacy_layout())
        elif state["layout"] != self.dataset.layout():
            self._restart_epoch(state["layout"], self.dataset.layout())
        else:
            self.batches_consumed = int(state["consumed"]) // self.dataset.per_batch

    def _restart_epoch(self, saved: Any, mine: dict[str, Any]) -> None:
        warnings.warn(
            f"the training data layout changed since the checkpoint ({saved} -> {mine}); "
            f"restarting epoch {self.epoch} from its first batch",
            DataWarning,
            stacklevel=3,
        )
        self.batches_consumed = 0

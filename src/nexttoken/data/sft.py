"""Supervised fine-tuning batches: chat examples (:class:`nexttoken.data.chat.Example`) fitted to the
block, packed or padded, and collated into next-token batches.

Each example is shifted on its own by :func:`nexttoken.data.packing.shift` (the one shift; the
mask of scored tokens shifts with the targets), so no example ever predicts another's first token.

* **Fitting** (:func:`fit_to_block`): an example of ``n`` tokens has ``n - 1`` targets and fits a
  block when ``n <= block_size + 1``. A longer one is cut from the left (``truncation="left"``:
  the oldest turns go, the end of the conversation stays) or dropped (``"drop"``). Examples left
  with no scored token, and examples whose messages hold special-token text, are dropped, counted
  and reported; a dataset with none left is an error.
* **Packing** (``packing=True``): several examples per row of ``block_size`` positions, best-fit
  decreasing, with ``document_ids`` so that the model restarts positions and stops attention at
  each example (:mod:`nexttoken.models.masking`): each example's logits are those it has alone.
* **Padding** (``packing=False``): one example per row, padded to the longest in its batch;
  batches group examples of similar length so little is padding. Padded positions are never scored.

Batch plans say which examples form each row and each batch, per rank, like
:func:`nexttoken.data.packing.train_batches`/:func:`~nexttoken.data.packing.val_batches` for
plain text (which they reuse): ranks read disjoint rows, every validation example is scored once.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple

import numpy as np
import torch
from torch import Tensor

from nexttoken.data.chat import Example
from nexttoken.data.packing import shift, train_batches, val_batches
from nexttoken.errors import DataError, setting
from nexttoken.loss import IGNORE_INDEX

Truncation = Literal["left", "drop"]
TRUNCATIONS: tuple[str, ...] = Truncation.__args__


# --------------------------------------------------------------------------- fitting to the block
@dataclass
class FitReport:
    """What :func:`fit_to_block` did to a dataset, for the set-up printout."""

    examples: int
    kept: int
    block_size: int
    truncation: str
    truncated: int = 0  # cut from the left to fit
    too_long: int = 0  # dropped for not fitting (truncation "drop")
    no_scored: int = 0  # dropped: no scored token within the block
    marker_text: int = 0  # dropped: a message holds a special token's text
    first_marker_text: str | None = None  # where the first of those came from

    def merged(self, other: FitReport) -> FitReport:
        """The report of both datasets together (the same block and truncation)."""
        counts = ("examples", "kept", "truncated", "too_long", "no_scored", "marker_text")
        return FitReport(
            block_size=self.block_size,
            truncation=self.truncation,
            first_marker_text=self.first_marker_text or other.first_marker_text,
            **{name: getattr(self, name) + getattr(other, name) for name in counts},
        )

    def lines(self) -> list[str]:
        """One line per thing that happened (nothing when every example fitted as it was)."""
        n, T = self.examples, self.block_size
        lines = []
        if self.truncated:
            lines.append(
                f"{self.truncated:,} of {n:,} examples are longer than {T} tokens: cut from the left"
            )
        if self.too_long:
            lines.append(f"{self.too_long:,} of {n:,} examples are longer than {T} tokens: dropped")
        if self.no_scored:
            lines.append(
                f"{self.no_scored:,} of {n:,} examples have no response tokens within {T} tokens: dropped"
            )
        if self.marker_text:
            lines.append(
                f"{self.marker_text:,} of {n:,} examples have a special token's text inside a message "
                f"(first: {self.first_marker_text}), which would be read as chat markup: dropped"
            )
        return lines


def fit_to_block(
    examples: Sequence[Example], block_size: int, truncation: Truncation = "left"
) -> tuple[list[Example], FitReport]:
    """The examples that fit ``block_size`` (inputs per row), cut or dropped by ``truncation``,
    without the ones left with no scored token; and the report of what was done."""
    if truncation not in TRUNCATIONS:
        raise DataError(
            f"{setting('data.truncation')} must be one of {', '.join(TRUNCATIONS)}, got {truncation!r}"
        )
    if block_size < 1:
        raise DataError(f"block_size must be a positive integer, got {block_size}")
    report = FitReport(examples=len(examples), kept=0, block_size=block_size, truncation=truncation)
    kept: list[Example] = []
    for example in examples:
        if example.has_marker_text:
            report.marker_text += 1
            report.first_marker_text = report.first_marker_text or example.where
            continue
        if len(example) > block_size + 1:
            if truncation == "drop":
                report.too_long += 1
                continue
            report.truncated += 1
            keep = slice(len(example) - (block_size + 1), None)
            example = Example(
                example.tokens[keep], example.scored[keep], example.nbytes[keep], example.where, False
            )
        if example.n_scored == 0:
            report.no_scored += 1
            continue
        kept.append(example)
    report.kept = len(kept)
    if not kept:
        reasons = "; ".join(report.lines()) or "no example has a scored token"
        left = f", use {setting('data.truncation')} left" if truncation == "drop" else ""
        raise DataError(
            f"none of the {len(examples):,} examples can be trained on ({reasons}); raise "
            f"{setting('data.block_size')}{left} or check the records and {setting('data.train_on')}"
        )
    return kept, report


@dataclass
class ExampleCounts:
    """The validation set's make-up: examples, scored (response) targets, targets not scored
    (prompt and markup), and the UTF-8 bytes the scored targets cover."""

    examples: int
    response_tokens: int
    prompt_tokens_ignored: int
    response_bytes: int


def count_examples(examples: Sequence[Example]) -> ExampleCounts:
    scored = sum(e.n_scored for e in examples)
    targets = sum(max(len(e) - 1, 0) for e in examples)
    nbytes = sum(int(e.nbytes[1:][e.scored[1:]].sum()) for e in examples)
    return ExampleCounts(len(examples), scored, targets - scored, nbytes)


# --------------------------------------------------------------------------- rows and batches
def pack(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Example indices grouped into rows of at most ``capacity`` positions each (best-fit decreasing:
    longest first, each into the fullest row it still fits). Deterministic."""
    if any(n > capacity for n in lengths):
        raise ValueError(f"an example of {max(lengths)} positions does not fit rows of {capacity}")
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, row), sorted: the fullest row that fits is found by bisect
    for index in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        n = lengths[index]
        at = bisect.bisect_left(free, (n, -1))
        if at == len(free):
            rows.append([index])
            room, row = capacity - n, len(rows) - 1
        else:
            room, row = free.pop(at)
            rows[row].append(index)
            room -= n
        bisect.insort(free, (room, row))
    return rows


def positions(example: Example) -> int:
    """Input positions (= targets) an example fills in a row."""
    return len(example) - 1


def _rows(
    examples: Sequence[Example], block_size: int, packing: bool, order: np.ndarray | None
) -> list[list[int]]:
    lengths = [positions(e) for e in examples]
    if packing:
        return pack(lengths, block_size)
    # One example per row, sorted by length so that neighbouring rows (one batch) pad little;
    # ``order`` breaks ties between equal lengths (a fresh shuffle each epoch).
    order = np.arange(len(examples)) if order is None else order
    return [[int(i)] for i in sorted(order, key=lambda i: lengths[i])]


def train_plan(
    examples: Sequence[Example],
    batch_size: int,
    *,
    block_size: int,
    packing: bool,
    seed: int,
    epoch: int,
    rank: int = 0,
    world_size: int = 1,
    accumulate: int = 1,
) -> list[list[list[int]]]:
    """One rank's training batches for one epoch: each batch a list of rows, each row a list of
    example indices (one example per row without packing).

    Packed rows are dealt out like plain-text blocks (:func:`~nexttoken.data.packing.train_batches`:
    one seeded permutation per epoch whatever the ranks and batch size, disjoint across ranks, the
    same number of batches on every rank, ``accumulate`` batches per optimizer step). Without
    packing, batches of ``batch_size`` examples of similar length are formed first and those
    batches are dealt out, one per rank and batch, so their order depends on ``batch_size`` too.
    """
    if packing:
        rows = _rows(examples, block_size, True, None)
        plan = train_batches(
            len(rows),
            batch_size,
            seed=seed,
            epoch=epoch,
            rank=rank,
            world_size=world_size,
            accumulate=accumulate,
        )
        return [[rows[r] for r in batch] for batch in plan.tolist()]
    order = np.random.default_rng([seed, epoch, 1]).permutation(len(examples))
    rows = _rows(examples, block_size, False, order)
    groups = [rows[i : i + batch_size] for i in range(0, len(rows), batch_size)]
    plan = train_batches(
        len(groups), 1, seed=seed, epoch=epoch, rank=rank, world_size=world_size, accumulate=accumulate
    )
    return [groups[g] for (g,) in plan.tolist()]


def val_plan(
    examples: Sequence[Example],
    batch_size: int,
    *,
    block_size: int,
    packing: bool,
    rank: int = 0,
    world_size: int = 1,
) -> list[list[list[int]]]:
    """One rank's validation batches: every example in exactly one row of one batch on one rank."""
    rows = _rows(examples, block_size, packing, None)
    return [
        rows[r.start : r.stop] for r in val_batches(len(rows), batch_size, rank=rank, world_size=world_size)
    ]


class SFTBatch(NamedTuple):
    """A collated batch. ``document_ids`` is None without packing (right padding needs no mask:
    causal attention keeps it out of every real position). ``n_bytes`` (rows,): UTF-8 bytes the
    scored targets of each row cover."""

    input_ids: Tensor
    targets: Tensor
    document_ids: Tensor | None
    n_bytes: Tensor

    def for_training(self) -> tuple[Tensor, ...]:
        """``(input_ids, targets[, document_ids])``: what ``CausalLMModule.training_step`` takes."""
        extra = () if self.document_ids is None else (self.document_ids,)
        return (self.input_ids, self.targets, *extra)

    def for_validation(self) -> tuple[Tensor, ...]:
        """``(input_ids, targets, n_bytes[, document_ids])``: what ``validation_step`` takes."""
        extra = () if self.document_ids is None else (self.document_ids,)
        return (self.input_ids, self.targets, self.n_bytes, *extra)


def collate(
    examples: Sequence[Example], rows: Sequence[Sequence[int]], pad_id: int, width: int | None = None
) -> SFTBatch:
    """The batch whose row ``r`` holds ``examples[i] for i in rows[r]`` one after another.

    ``width``: positions per row (``block_size`` when packing); default: the longest row (padding).
    A row of several examples gets ``document_ids`` 1, 2, ... per example and 0 for its padding;
    a batch whose rows all hold one example gets none.
    """
    lengths = [sum(positions(examples[i]) for i in row) for row in rows]
    width = max(lengths) if width is None else width
    if max(lengths) > width:
        raise ValueError(f"a row of {max(lengths)} positions does not fit the width {width}")
    input_ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    targets = np.full((len(rows), width), IGNORE_INDEX, dtype=np.int64)
    document_ids = np.zeros((len(rows), width), dtype=np.int64)
    n_bytes = np.zeros(len(rows), dtype=np.int64)
    for r, row in enumerate(rows):
        at = 0
        for number, i in enumerate(row, start=1):
            example = examples[i]
            inputs, next_tokens = shift(example.tokens)
            scored, scored_bytes = shift(example.scored)[1], shift(example.nbytes)[1]
            n = len(inputs)
            input_ids[r, at : at + n] = inputs
            targets[r, at : at + n] = np.where(scored, next_tokens, IGNORE_INDEX)
            document_ids[r, at : at + n] = number
            n_bytes[r] += int(scored_bytes[scored].sum())
            at += n
    packed = any(len(row) > 1 for row in rows)
    return SFTBatch(
        torch.from_numpy(input_ids),
        torch.from_numpy(targets),
        torch.from_numpy(document_ids) if packed else None,
        torch.from_numpy(n_bytes),
    )

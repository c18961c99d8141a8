"""Pure functions from documents to blocks of ``(input_ids, targets)``, and which blocks each rank reads.

The one shift of the whole project happens here, in :func:`shift`: a block of ``T + 1``
consecutive tokens gives ``input_ids = block[:-1]`` and ``targets = block[1:]``. Training batches,
validation batches and evaluation windows are all cut by it; nothing downstream shifts again.

Stream layout: each document's tokens framed by :func:`nexttoken.data.tokenizers.document_frame`,
e.g. ``EOS doc0 EOS doc1 ... EOS docN`` for nexttoken's tokenizers. The token *before* each
document means its first real token is a scored target (predicted from "a document starts here"),
and no document is ever read as the continuation of the previous one without a separator.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import TypeVar

import numpy as np

Block = TypeVar("Block")


def shift(block: Block) -> tuple[Block, Block]:
    """``(inputs, targets)`` of a block of consecutive tokens (last axis): THE next-token shift."""
    return block[..., :-1], block[..., 1:]


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype that holds every id: half the disk and page cache of uint32."""
    return np.dtype(np.uint16 if vocab_size <= 2**16 - 1 else np.uint32)


def concat_documents(
    token_lists: Sequence[Sequence[int]], before: Sequence[int], after: Sequence[int] = (), dtype=np.int64
) -> np.ndarray:
    """One stream: each document's tokens with ``before`` in front and ``after`` behind."""
    frame = len(before) + len(after)
    lengths = np.fromiter((len(t) for t in token_lists), dtype=np.int64, count=len(token_lists))
    stream = np.empty(int(lengths.sum()) + frame * len(token_lists), dtype=dtype)
    starts = np.concatenate([[0], np.cumsum(lengths + frame)[:-1]]).astype(np.int64)
    for start, tokens in zip(starts, token_lists, strict=True):
        end = start + len(before) + len(tokens)
        stream[start : start + len(before)] = before
        stream[start + len(before) : end] = tokens
        stream[end : end + len(after)] = after
    return stream


def concat_byte_counts(
    byte_lists: Sequence[Sequence[int]], before: Sequence[int], after: Sequence[int] = (), dtype=np.int64
) -> np.ndarray:
    """Per-token byte counts aligned with :func:`concat_documents`' stream (frame tokens cover 0 bytes)."""
    return concat_documents(byte_lists, [0] * len(before), [0] * len(after), dtype=dtype)


# --------------------------------------------------------------------------- training blocks
def num_train_blocks(num_tokens: int, block_size: int) -> int:
    """Whole blocks of ``block_size + 1`` tokens, stepping by ``block_size`` (adjacent blocks share
    one token, so every stream position after the first is a target exactly once)."""
    return max(0, (num_tokens - 1) // block_size)


@functools.lru_cache(maxsize=16)  # called for every batch; a seeded generator per batch is waste
def block_offset(seed: int, epoch: int, block_size: int) -> int:
    """Where epoch ``epoch`` starts cutting its training blocks: 0 for the first epoch, then one
    seeded offset in ``[0, block_size)`` per epoch, so a run of many epochs does not see the same
    windows (each token at the same position behind the same context) every time."""
    if epoch == 0:
        return 0
    return int(np.random.default_rng([seed, epoch, 1]).integers(block_size))


def train_batch(
    stream: np.ndarray, blocks: Sequence[int], block_size: int, offset: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """``(input_ids, targets)``, each ``(len(blocks), block_size)`` int64, of the training blocks
    numbered ``blocks``, cut from stream position ``offset`` on; every position is scored. A block
    that runs past the stream's end goes on from its start (one seam an epoch at most: the offset is
    below ``block_size``), so every offset has the same blocks and each target is scored once."""
    blocks = np.asarray(blocks, dtype=np.int64)
    n = num_train_blocks(len(stream), block_size)
    if blocks.size and (blocks.min() < 0 or blocks.max() >= n):
        raise IndexError(f"training blocks {blocks.min()}..{blocks.max()} out of range 0..{n - 1}")
    if not 0 <= offset < block_size:
        raise ValueError(f"block offset {offset} is outside 0..{block_size - 1}")
    positions = (offset + blocks[:, None] * block_size + np.arange(block_size + 1)) % len(stream)
    return shift(np.asarray(stream[positions], dtype=np.int64))


# --------------------------------------------------------------------------- validation blocks
def num_val_blocks(num_tokens: int, block_size: int) -> int:
    """Blocks that cover every target position ``1 .. num_tokens - 1`` once (the last may be partial)."""
    return math.ceil(max(num_tokens - 1, 0) / block_size)


def val_batch(
    stream: np.ndarray, blocks: Sequence[int], block_size: int, pad_id: int
) -> tuple[np.ndarray, np.ndarray]:
    """``(input_ids, targets)``, each ``(len(blocks), block_size)`` int64: block ``i`` scores stream
    positions ``i*T + 1 .. i*T + T``; past the end, inputs hold ``pad_id`` and targets ``IGNORE_INDEX``."""
    # Imported here: tokenizing worker processes use this module and must not pay for torch.
    from nexttoken.loss import IGNORE_INDEX

    blocks = np.asarray(blocks, dtype=np.int64)
    n = num_val_blocks(len(stream), block_size)
    if blocks.size and (blocks.min() < 0 or blocks.max() >= n):
        raise IndexError(f"validation blocks {blocks.min()}..{blocks.max()} out of range 0..{n - 1}")
    positions = blocks[:, None] * block_size + np.arange(block_size + 1)
    tokens = np.asarray(stream[np.minimum(positions, len(stream) - 1)], dtype=np.int64)
    input_ids, targets = shift(tokens)
    scored = shift(positions < len(stream))[1]  # a position counts only if its target exists
    return np.where(scored, input_ids, pad_id), np.where(scored, targets, IGNORE_INDEX)


def val_block_bytes(
    byte_counts: np.ndarray, block_size: int, blocks: range | None = None, scored: np.ndarray | None = None
) -> np.ndarray:
    """Bytes covered by each validation block's scored targets (stream positions ``index*T+1 ..``),
    for the blocks in ``blocks`` (default: all). Only their part of ``byte_counts`` is read, so a
    memory-mapped file stays on disk. ``scored`` ``(len(blocks), T)`` bool: only the targets it marks
    count (those :func:`mask_documents` left scored); default: every target in the stream."""
    n_blocks = num_val_blocks(len(byte_counts), block_size)
    blocks = range(n_blocks) if blocks is None else blocks
    if len(blocks) and (blocks.start < 0 or blocks.stop > n_blocks):
        raise IndexError(
            f"validation blocks {blocks.start}..{blocks.stop - 1} out of range 0..{n_blocks - 1}"
        )
    if len(blocks) == 0:
        return np.zeros(0, dtype=np.int64)
    targets = np.asarray(
        byte_counts[blocks.start * block_size + 1 : blocks.stop * block_size + 1], dtype=np.int64
    )
    if scored is not None:
        targets = targets * np.asarray(scored, dtype=bool).reshape(-1)[: len(targets)]
    return np.add.reduceat(targets, np.arange(len(blocks)) * block_size)


# --------------------------------------------------------------------------- document masking
def mask_documents(
    input_ids: np.ndarray, targets: np.ndarray, start_id: int | None, end_id: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Training or validation blocks with attention kept inside each document (``data.document_mask``):
    ``(input_ids, targets, document_ids)``, the targets that cross a document boundary unscored.

    The documents are found from the stream's framing (:func:`nexttoken.data.tokenizers.document_frame`):
    ``start_id`` is :func:`~nexttoken.data.tokenizers.document_start` (a document begins AT each
    one), or None when documents have no start token (one begins right AFTER each ``end_id``, the
    EOS). Special-token text inside a document is never encoded as these ids, so they are framing.

    A target is scored when its input token is in the same document, or when it is the EOS (ending
    a document is predicted from that document, also when the EOS doubles as the next start, as in
    ``EOS doc0 EOS doc1``). So without a start token a document's first token is not scored (it
    has no context of its own), exactly as ``nexttoken eval`` scores documents.
    """
    from nexttoken.loss import IGNORE_INDEX  # here, not at the top: tokenizing workers never load torch

    # The block's T + 1 tokens; a validation block's unscored tail (IGNORE_INDEX) matches no id.
    block = np.concatenate([input_ids, targets[..., -1:]], axis=-1)
    if start_id is not None:
        documents = np.cumsum(block == start_id, axis=-1)
    else:
        ends = block == end_id
        documents = np.cumsum(ends, axis=-1) - ends  # the EOS still belongs to the document it ends
    input_documents, target_documents = shift(documents)
    keep = (input_documents == target_documents) | (targets == end_id)
    return input_ids, np.where(keep, targets, IGNORE_INDEX), input_documents


# --------------------------------------------------------------------------- who reads what
def train_rows(num_blocks: int, batch_size: int, world_size: int = 1, accumulate: int = 1) -> int:
    """Rows of each training batch: ``batch_size``, fewer only when the blocks cannot fill one
    optimizer step of ``batch_size x world_size x accumulate`` otherwise."""
    rows = min(batch_size, num_blocks // (world_size * accumulate))
    if rows == 0:
        raise ValueError(
            f"{num_blocks} training blocks cannot be shared by {world_size * accumulate} batches"
        )
    return rows


def train_batches(
    num_blocks: int,
    batch_size: int,
    *,
    seed: int,
    epoch: int,
    rank: int = 0,
    world_size: int = 1,
    accumulate: int = 1,
) -> np.ndarray:
    """Block indices of every training batch of one epoch for one rank, shape ``(batches, rows)``.

    The epoch's order is one seeded permutation of all blocks, the same for any number of ranks and
    any batch size. Batch ``b`` of every rank together takes the permutation's next ``rows x
    world_size`` blocks (dealt out round-robin, so ranks read disjoint blocks), and an optimizer step
    ``accumulate`` such batches: after ``b`` batches the ranks have read exactly the permutation's first
    ``b x rows x world_size`` blocks, so a run split another way (other ranks, batch size and
    accumulation, the same global batch) continues from there (:func:`train_rows` for ``rows``).
    An epoch is a whole number of optimizer steps; the leftover blocks are skipped this epoch, and
    the next epoch's permutation differs, so no block is skipped every time.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world_size {world_size}")
    rows = train_rows(num_blocks, batch_size, world_size, accumulate)
    permutation = np.random.default_rng([seed, epoch]).permutation(num_blocks)
    n_batches = num_blocks // (rows * world_size * accumulate) * accumulate
    taken = permutation[: n_batches * rows * world_size].reshape(n_batches, rows, world_size)
    return taken[:, :, rank]


def val_batches(num_blocks: int, batch_size: int, rank: int = 0, world_size: int = 1) -> list[range]:
    """Block indices of each validation batch for one rank: every block on exactly one rank, once.

    A rank reads a contiguous share of the blocks (no padding or repeated samples, unlike
    DistributedSampler). Every rank runs the same number of batches wherever it has enough blocks
    (so per-step collectives cannot hang), with rows spread evenly and never above ``batch_size``.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world_size {world_size}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    start = rank * num_blocks // world_size
    stop = (rank + 1) * num_blocks // world_size
    n_mine = stop - start
    n_batches = min(math.ceil(math.ceil(num_blocks / world_size) / batch_size), n_mine)
    edges = [start + i * n_mine // n_batches for i in range(n_batches + 1)] if n_batches else [start]
    return [range(a, b) for a, b in zip(edges[:-1], edges[1:], strict=True)]

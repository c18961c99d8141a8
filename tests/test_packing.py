import math

import numpy as np
import pytest

from nexttoken.data.packing import (
    block_offset,
    concat_byte_counts,
    concat_documents,
    mask_documents,
    num_train_blocks,
    num_val_blocks,
    shift,
    token_dtype,
    train_batch,
    train_batches,
    val_batch,
    val_batches,
    val_block_bytes,
)
from nexttoken.loss import IGNORE_INDEX

EOS = 99
BOS = 98  # random_documents draws ids below EOS; BOS is never drawn as text (ids < BOS)


def random_documents(rng, max_docs=8, max_len=40):
    return [
        list(rng.integers(0, BOS, size=rng.integers(0, max_len))) for _ in range(rng.integers(1, max_docs))
    ]


def test_shift_is_the_next_token_pairing():
    block = np.arange(10).reshape(2, 5)
    x, y = shift(block)
    assert x.tolist() == [[0, 1, 2, 3], [5, 6, 7, 8]] and y.tolist() == [[1, 2, 3, 4], [6, 7, 8, 9]]


def test_concat_puts_eos_before_every_document():
    stream = concat_documents([[1, 2], [], [3]], before=[EOS])
    assert stream.tolist() == [EOS, 1, 2, EOS, EOS, 3]


def test_concat_frames_documents_on_both_sides():
    # A pretrained tokenizer without a BOS: nothing before, EOS after; with a BOS (7): both.
    assert concat_documents([[1, 2], [3]], before=[], after=[EOS]).tolist() == [1, 2, EOS, 3, EOS]
    assert concat_documents([[1], [], [3]], before=[7], after=[EOS]).tolist() == [
        7,
        1,
        EOS,
        7,
        EOS,
        7,
        3,
        EOS,
    ]


def test_concat_byte_counts_align_with_stream():
    counts = concat_byte_counts([[1, 2], [], [3]], before=[EOS])
    assert counts.tolist() == [0, 1, 2, 0, 0, 3]
    assert concat_byte_counts([[1, 2], [3]], before=[7], after=[EOS]).tolist() == [0, 1, 2, 0, 0, 3, 0]


def test_token_dtype_is_the_smallest_that_fits():
    assert token_dtype(257) == np.uint16
    assert token_dtype(65535) == np.uint16
    assert token_dtype(65536) == np.uint32
    stream = concat_documents([[65534]], before=[0], dtype=token_dtype(65535))
    assert stream.tolist() == [0, 65534]


def test_train_blocks_are_shifted_pairs_that_score_every_position_once():
    rng = np.random.default_rng(0)
    for _ in range(200):
        stream = concat_documents(random_documents(rng), [EOS])
        T = int(rng.integers(1, 12))
        n = num_train_blocks(len(stream), T)
        assert n == max(0, (len(stream) - 1) // T)
        all_targets = []
        if n:  # a whole batch at once, in a shuffled order, equals the blocks one by one
            order = rng.permutation(n)
            xs, ys = train_batch(stream, order, T)
            assert xs.shape == ys.shape == (n, T) and xs.dtype == np.int64
        for i in range(n):
            (x,), (y,) = train_batch(stream, [i], T)
            assert (
                x.tolist() == xs[list(order).index(i)].tolist()
                and y.tolist() == ys[list(order).index(i)].tolist()
            )
            assert x.tolist() == stream[i * T : i * T + T].tolist()
            assert y.tolist() == stream[i * T + 1 : i * T + T + 1].tolist()  # inputs shifted by one
            all_targets.extend(y.tolist())
        # Whole blocks cover a prefix of the targets, leaving fewer than T uncovered.
        assert all_targets == stream[1 : 1 + n * T].tolist()
        assert len(stream) - 1 - n * T < T
        with pytest.raises(IndexError):
            train_batch(stream, [n], T)


def test_shifted_blocks_start_later_wrap_at_the_end_and_score_each_target_once():
    rng = np.random.default_rng(1)
    for _ in range(200):
        stream = concat_documents(random_documents(rng), [EOS])
        T = int(rng.integers(1, 12))
        n = num_train_blocks(len(stream), T)
        if not n:
            continue
        offset = int(rng.integers(T))
        circle = stream.tolist() * 2  # the stream, and again from its start
        xs, ys = train_batch(stream, np.arange(n), T, offset)
        for i in range(n):
            start = offset + i * T
            assert xs[i].tolist() == circle[start : start + T]
            assert ys[i].tolist() == circle[start + 1 : start + T + 1]
        # One epoch's targets: n * T consecutive positions of the circle from offset + 1, each once.
        assert ys.ravel().tolist() == circle[offset + 1 : offset + 1 + n * T]
        assert n * T <= len(stream) - 1
    with pytest.raises(ValueError, match="offset"):
        train_batch(np.arange(10), [0], 4, offset=4)


def test_each_epoch_after_the_first_cuts_its_blocks_at_a_new_seeded_offset():
    T = 64
    offsets = [block_offset(seed=5, epoch=e, block_size=T) for e in range(40)]
    assert offsets[0] == 0  # the first epoch's blocks are the plain ones
    assert all(0 <= o < T for o in offsets)
    assert len(set(offsets[1:])) > 20  # 39 draws from 64 values: most differ
    assert offsets == [block_offset(seed=5, epoch=e, block_size=T) for e in range(40)]  # seeded
    assert offsets != [block_offset(seed=6, epoch=e, block_size=T) for e in range(40)]


def test_val_blocks_cover_every_target_exactly_once_with_bytes():
    rng = np.random.default_rng(1)
    for _ in range(300):
        docs = random_documents(rng)
        doc_bytes = [list(rng.integers(0, 5, size=len(d))) for d in docs]
        stream = concat_documents(docs, [EOS])
        byte_counts = concat_byte_counts(doc_bytes, [EOS])
        T = int(rng.integers(1, 12))
        n = num_val_blocks(len(stream), T)
        targets, block_bytes = [], val_block_bytes(byte_counts, T)
        assert len(block_bytes) == n
        if n:
            xs, ys = val_batch(stream, range(n), T, pad_id=EOS)
            assert xs.shape == ys.shape == (n, T) and ys.dtype == np.int64
        for i in range(n):
            x, y = xs[i], ys[i]
            (x1,), (y1,) = val_batch(stream, [i], T, pad_id=EOS)
            assert x1.tolist() == x.tolist() and y1.tolist() == y.tolist()
            scored = y != IGNORE_INDEX
            # Padding only at the end of the last block, and inputs there are the pad id.
            assert scored.tolist() == sorted(scored.tolist(), reverse=True)
            assert i == n - 1 or scored.all()
            assert (x[~scored] == EOS).all()
            # Where scored, targets are the inputs shifted by one position in the stream.
            k = int(scored.sum())
            assert x[:k].tolist() == stream[i * T : i * T + k].tolist()
            assert y[:k].tolist() == stream[i * T + 1 : i * T + 1 + k].tolist()
            assert block_bytes[i] == byte_counts[i * T + 1 : i * T + 1 + k].sum()
            targets.extend(y[scored].tolist())
        assert targets == stream[1:].tolist()  # nothing dropped, nothing duplicated, in order
        assert block_bytes.sum() == sum(sum(b) for b in doc_bytes)


def test_val_of_a_stream_with_no_targets_is_empty():
    assert num_val_blocks(1, 4) == 0
    assert val_block_bytes(np.zeros(1, dtype=np.int64), 4).tolist() == []


def test_val_batches_shard_blocks_disjointly_without_padding():
    for num_blocks in range(0, 40):
        for batch_size in (1, 2, 3, 7, 50):
            for world_size in (1, 2, 3):
                per_rank = [val_batches(num_blocks, batch_size, r, world_size) for r in range(world_size)]
                seen = [i for batches in per_rank for batch in batches for i in batch]
                assert sorted(seen) == list(range(num_blocks)), (num_blocks, batch_size, world_size)
                assert len(seen) == num_blocks
                for batches in per_rank:
                    assert all(0 < len(b) <= batch_size for b in batches)
                counts = {len(b) for b in per_rank}
                # Same number of batches on every rank whenever each rank has that many blocks.
                batches_needed = math.ceil(math.ceil(num_blocks / world_size) / batch_size)
                if num_blocks // world_size >= batches_needed:
                    assert len(counts) == 1, (num_blocks, batch_size, world_size, per_rank)


def test_val_batches_single_rank_uses_few_full_batches():
    batches = val_batches(10, 7)
    assert [len(b) for b in batches] == [5, 5]
    assert [len(b) for b in val_batches(14, 7)] == [7, 7]
    assert [len(b) for b in val_batches(3, 1)] == [1, 1, 1]


def test_train_batches_are_disjoint_across_ranks_and_deterministic():
    for num_blocks in (3, 10, 37):
        for world_size in (1, 2, 3):
            if num_blocks < world_size:
                continue
            plans = [
                train_batches(num_blocks, 4, seed=5, epoch=2, rank=r, world_size=world_size)
                for r in range(world_size)
            ]
            flat = np.concatenate([p.ravel() for p in plans])
            assert len(set(flat.tolist())) == len(flat)  # no block on two ranks or twice
            assert len({p.shape for p in plans}) == 1  # every rank runs the same number of batches
            assert plans[0].shape[1] == min(4, num_blocks // world_size)
            again = train_batches(num_blocks, 4, seed=5, epoch=2, rank=0, world_size=world_size)
            assert np.array_equal(again, plans[0])


def test_train_batches_change_with_epoch_and_seed():
    a = train_batches(100, 8, seed=1, epoch=0)
    assert not np.array_equal(a, train_batches(100, 8, seed=1, epoch=1))
    assert not np.array_equal(a, train_batches(100, 8, seed=2, epoch=0))
    assert a.shape == (12, 8)
    # Over one epoch a single rank sees every block it reads once.
    assert len(set(a.ravel().tolist())) == a.size


def test_train_batches_refuse_more_ranks_than_blocks():
    with pytest.raises(ValueError, match="cannot be shared"):
        train_batches(2, 4, seed=0, epoch=0, rank=0, world_size=3)


@pytest.mark.parametrize(
    "before, after",
    [([EOS], []), ([BOS], [EOS]), ([], [EOS])],
    ids=["eos-starts (nexttoken)", "bos-and-eos (Llama)", "eos-ends (SmolLM2, GPT-2)"],
)
def test_document_mask_follows_the_framing(before, after):
    """Blocks cut from a framed stream: attention groups and scored targets from mask_documents
    equal those read off the layout concat_documents built (document k = before + doc + after)."""
    rng = np.random.default_rng(3)
    for _ in range(100):
        docs = random_documents(rng)
        stream = concat_documents(docs, before, after)
        layout = np.repeat(np.arange(len(docs)), [len(before) + len(d) + len(after) for d in docs])
        T = int(rng.integers(1, 12))
        n = num_train_blocks(len(stream), T)
        if n == 0:
            continue
        x, y = train_batch(stream, range(n), T)
        start = before[0] if before else None
        x2, y2, document_ids = mask_documents(x, y, start, EOS)
        assert x2 is x and document_ids.shape == x.shape
        for i in range(n):
            p = i * T + np.arange(T)  # stream positions of the inputs
            same_as_next = document_ids[i, 1:] == document_ids[i, :-1]
            assert same_as_next.tolist() == (layout[p[1:]] == layout[p[:-1]]).tolist()
            scored = (layout[p] == layout[p + 1]) | (stream[p + 1] == EOS)
            assert (y2[i] != IGNORE_INDEX).tolist() == scored.tolist()
            assert y2[i][scored].tolist() == y[i][scored].tolist()
    # Validation blocks (a padded tail of IGNORE_INDEX) keep their tail unscored.
    stream = concat_documents([[1, 2, 3], [4, 5]], before, after)
    xs, ys = val_batch(stream, range(num_val_blocks(len(stream), 4)), 4, pad_id=EOS)
    _, masked, _ = mask_documents(xs, ys, before[0] if before else None, EOS)
    assert ((masked != IGNORE_INDEX) <= (ys != IGNORE_INDEX)).all()
    first_of_second = 3 + len(before) + len(after) + len(before)  # stream position of token 4
    scored_positions = [i * 4 + j + 1 for i, j in zip(*np.nonzero(masked != IGNORE_INDEX))]
    assert (first_of_second in scored_positions) == bool(before)  # no start token: first token unscored

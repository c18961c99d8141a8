"""Resume on another world size: a checkpoint's position is a place in the epoch's one global order,
so a run split another way (processes x batch size x accumulation, the same global batch) continues
it: over the epoch every block is read exactly once, in the same optimizer steps."""

import numpy as np
import pytest

from nexttoken.data.chat import Example
from nexttoken.data.loaders import ExampleTrainBatches, ResumableDataLoader, TrainBatches
from nexttoken.data.packing import train_batches
from nexttoken.errors import DataError, DataWarning

# (world_size, batch_size, accumulate) before -> after; every pair makes a global batch of 8.
SPLITS = [
    ((2, 4, 1), (1, 8, 1)),
    ((2, 4, 1), (4, 2, 1)),
    ((1, 8, 1), (2, 4, 1)),
    ((2, 4, 1), (1, 4, 2)),
    ((2, 2, 2), (4, 1, 2)),
    ((4, 2, 1), (1, 2, 4)),
]


def steps_of(num_blocks: int, split: tuple[int, int, int], seed: int = 3, epoch: int = 1) -> list[set[int]]:
    """The blocks of each optimizer step of one epoch, over all ranks and micro-batches."""
    world_size, batch_size, accumulate = split
    plans = [
        train_batches(
            num_blocks,
            batch_size,
            seed=seed,
            epoch=epoch,
            rank=r,
            world_size=world_size,
            accumulate=accumulate,
        )
        for r in range(world_size)
    ]
    n_steps = len(plans[0]) // accumulate
    return [
        {int(b) for plan in plans for batch in plan[s * accumulate : (s + 1) * accumulate] for b in batch}
        for s in range(n_steps)
    ]


@pytest.mark.parametrize(("before", "after"), SPLITS)
def test_every_split_of_a_global_batch_takes_the_same_blocks_each_step(before, after):
    num_blocks = 101
    permutation = np.random.default_rng([3, 1]).permutation(num_blocks)  # the epoch's order, by hand
    expected = [set(permutation[s * 8 : (s + 1) * 8].tolist()) for s in range(num_blocks // 8)]
    assert steps_of(num_blocks, before) == steps_of(num_blocks, after) == expected


def stream_file(tmp_path, num_blocks: int, block_size: int):
    # Token i is i, so a row's first input names its block: block = input_ids[0] // block_size.
    path = tmp_path / "stream.npy"
    np.save(path, np.arange(num_blocks * block_size + 1, dtype=np.uint32))
    return path


def text_loaders(path, split, block_size=4):
    world_size, batch_size, accumulate = split
    return [
        ResumableDataLoader(
            TrainBatches(
                path, block_size, batch_size, seed=5, rank=r, world_size=world_size, accumulate=accumulate
            )
        )
        for r in range(world_size)
    ]


def read(loaders, n_batches: int | None = None) -> list[list[int]]:
    """The blocks each rank's loader hands out, ``n_batches`` of them (default: the rest of the epoch)."""
    seen = []
    for loader in loaders:
        blocks, it = [], iter(loader)
        for _ in range(len(loader.dataset) - loader.batches_consumed if n_batches is None else n_batches):
            input_ids = next(it)[0]
            blocks += (input_ids[:, 0] // loader.dataset.block_size).tolist()
        seen.append(blocks)
    return seen


@pytest.mark.parametrize(("before", "after"), SPLITS)
def test_a_checkpoint_resumed_with_another_split_reads_every_block_once(tmp_path, before, after):
    num_blocks, block_size = 101, 4
    path = stream_file(tmp_path, num_blocks, block_size)
    first = text_loaders(path, before, block_size)
    steps_done = 5
    read_before = read(first, steps_done * before[2])
    state = first[0].state_dict()  # only rank 0's is saved in a checkpoint
    assert state["consumed"] == steps_done * 8
    second = text_loaders(path, after, block_size)
    for loader in second:
        loader.load_state_dict(state)
    read_after = read(second)
    blocks = [b for rank in read_before + read_after for b in rank]
    expected = np.random.default_rng([5, 0]).permutation(num_blocks)[: num_blocks // 8 * 8]
    assert sorted(blocks) == sorted(expected.tolist())  # each once: none twice, none skipped
    assert set(sum(read_before, [])) == set(expected[: steps_done * 8].tolist())
    # The resumed run's loaders end the epoch together, after the steps the epoch has left.
    assert {len(loader.dataset) - loader.batches_consumed for loader in second} == {0}
    assert len(read_after[0]) == (num_blocks // 8 - steps_done) * 8 // after[0]


def test_a_global_batch_that_cannot_be_kept_says_what_to_set(tmp_path):
    path = stream_file(tmp_path, 101, 4)
    (loader,) = text_loaders(path, (1, 8, 1))
    read([loader], 2)
    state = loader.state_dict()
    message = (
        r"the checkpoint's global batch is 8 blocks \(batch_size 8 x accumulate_grad_batches 1 x 1 process\), "
        r"this run's 16 \(8 x 1 x 2\): to continue its order, set batch_size 4$"
    )
    with pytest.raises(DataError, match=message):
        text_loaders(path, (2, 8, 1))[0].load_state_dict(state)
    with pytest.raises(DataError, match="set batch_size 2 with accumulate_grad_batches 2$"):
        text_loaders(path, (2, 1, 2))[0].load_state_dict(state)
    with pytest.raises(DataError, match="set accumulate_grad_batches 8$"):
        text_loaders(path, (1, 1, 3))[0].load_state_dict(state)
    with pytest.raises(DataError, match="use a number of processes that divides 8$"):
        text_loaders(path, (3, 8, 1))[0].load_state_dict(state)


def test_a_position_inside_an_optimizer_step_continues_only_with_its_own_split(tmp_path):
    path = stream_file(tmp_path, 101, 4)
    (loader,) = text_loaders(path, (1, 4, 2))
    read([loader], 3)  # one step and half of the next
    state = loader.state_dict()
    with pytest.raises(DataError, match="12 blocks into its epoch, inside an optimizer step"):
        text_loaders(path, (1, 8, 1))[0].load_state_dict(state)
    (same,) = text_loaders(path, (1, 4, 2))
    same.load_state_dict(state)
    assert same.batches_consumed == 3


def test_a_checkpoint_of_an_older_nexttoken_still_resumes(tmp_path):
    path = stream_file(tmp_path, 101, 4)
    (loader,) = text_loaders(path, (1, 8, 1))
    old = {"epoch": 1, "batches_consumed": 3, "layout": {**loader.dataset.legacy_layout()}}
    assert old["layout"] == {"num_blocks": 101, "block_size": 4, "seed": 5, "batch_size": 8, "world_size": 1}
    loader.load_state_dict(old)
    assert (loader.epoch, loader.batches_consumed) == (1, 3)
    (other,) = text_loaders(path, (1, 4, 1))
    with pytest.warns(DataWarning, match="layout changed"):
        other.load_state_dict(old)
    assert (other.epoch, other.batches_consumed) == (1, 0)


# --------------------------------------------------------------------------- chat examples
def examples(n: int = 40) -> list[Example]:
    """Examples of different lengths; token 0 of example i is i, so a row names its examples."""
    rng = np.random.default_rng(0)
    made = []
    for i in range(n):
        length = int(rng.integers(3, 12))
        tokens = np.array([i] + [200] * (length - 1), dtype=np.int64)
        made.append(Example(tokens, np.ones(length, dtype=bool), np.ones(length, dtype=np.int64), f"#{i}"))
    return made


def example_loaders(data, split, packing: bool):
    world_size, batch_size, accumulate = split
    return [
        ResumableDataLoader(
            ExampleTrainBatches(
                data,
                16,
                batch_size,
                7,
                packing=packing,
                pad_id=999,
                rank=r,
                world_size=world_size,
                accumulate=accumulate,
            )  # fmt: skip
        )
        for r in range(world_size)
    ]


def examples_read(loaders, data, n_batches=None) -> list[int]:
    seen = []
    for loader in loaders:
        it = iter(loader)
        for _ in range(len(loader.dataset) - loader.batches_consumed if n_batches is None else n_batches):
            input_ids = next(it)[0]
            # An example's first token sits where its row or its packed neighbour's scored run starts.
            seen += [int(t) for t in input_ids.flatten().tolist() if t < len(data)]
    return seen


@pytest.mark.parametrize(
    ("before", "after", "packing"),
    [((2, 2, 1), (1, 4, 1), True), ((2, 1, 2), (4, 1, 1), True), ((2, 3, 1), (1, 3, 2), False)],
)
def test_chat_examples_resume_with_another_split(before, after, packing):
    data = examples()
    full = examples_read(example_loaders(data, before, packing), data)
    first = example_loaders(data, before, packing)
    steps_done = 2
    read_before = examples_read(first, data, steps_done * before[2])
    state = first[0].state_dict()
    second = example_loaders(data, after, packing)
    for loader in second:
        loader.load_state_dict(state)
    read_after = examples_read(second, data)
    assert sorted(read_before + read_after) == sorted(full)  # the same examples, each once
    assert len(set(full)) == len(full) > 0


def test_padded_examples_resume_only_with_the_same_groups():
    data = examples()
    (loader,) = example_loaders(data, (1, 4, 2), packing=False)
    examples_read([loader], data, 2)
    state = loader.state_dict()
    with pytest.raises(DataError, match="continues only with batch_size 4 and accumulate_grad_batches 1$"):
        example_loaders(data, (2, 2, 2), packing=False)[0].load_state_dict(state)
    with pytest.raises(DataError, match="global batch is 8 examples .* set accumulate_grad_batches 2$"):
        example_loaders(data, (1, 4, 1), packing=False)[0].load_state_dict(state)

"""Resume on another world size: a checkpoint's position is a place in the epoch's one global order,
so a run split another way (processes x batch size x accumulation, the same global batch) continues
it: over the epoch every block is read exactly once, in the same optimizer steps."""

import json
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from torch import nn

from nexttoken.data.chat import Example
from nexttoken.data.datamodule import TextDataModule
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


# --------------------------------------------------------------------------- real processes
class BlockRecorder(L.LightningModule):
    """Writes, per rank, the training blocks it read and the optimizer step each was read in."""

    def __init__(self, out: str, phase: str) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(()))
        self.out, self.phase = out, phase
        self.read: list[tuple[int, list[list[int]]]] = []

    def training_step(self, batch, batch_idx):
        self.read.append((self.trainer.global_step, batch[0].tolist()))
        return self.weight * batch[0].float().mean()

    def on_train_end(self):
        record = {"read": self.read, "global_step": self.trainer.global_step}
        (Path(self.out) / f"{self.phase}-rank{self.global_rank}.json").write_text(json.dumps(record))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def train(tmp_path, phase, devices, batch_size, accumulate=1, ckpt_path=None, **limits):
    corpus = tmp_path / "corpus"
    trainer = L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy="ddp_spawn" if devices > 1 else "auto",
        accumulate_grad_batches=accumulate,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=[L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3)],
        default_root_dir=tmp_path,
        **limits,
    )
    data = TextDataModule(
        path=[str(corpus)], tokenizer="bytes", block_size=8, batch_size=batch_size, val_fraction=0.1,
        cache_dir=str(tmp_path / "cache"),
    )  # fmt: skip
    trainer.fit(BlockRecorder(str(tmp_path), phase), data, ckpt_path=ckpt_path)
    return [json.loads(p.read_text()) for p in sorted(tmp_path.glob(f"{phase}-rank*.json"))]


@pytest.mark.slow
def test_two_processes_resumed_with_one_and_accumulation_read_every_block_once(tmp_path):
    rng = np.random.default_rng(0)  # random letters: a row of 8 names its block
    (tmp_path / "corpus").mkdir()
    for i in range(4):
        text = "".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), size=300))
        (tmp_path / "corpus" / f"{i}.txt").write_text(text)
    steps = 3
    before = train(tmp_path, "two", devices=2, batch_size=4, max_steps=steps)
    data = TextDataModule(path=[str(tmp_path / "corpus")], tokenizer="bytes", block_size=8, val_fraction=0.1,
                          cache_dir=str(tmp_path / "cache"))  # fmt: skip
    data.setup()
    stream = np.load(data.cache.train).astype(np.int64)
    block_of = {tuple(stream[i * 8 : i * 8 + 8]): i for i in range((len(stream) - 1) // 8)}
    assert len(block_of) == (len(stream) - 1) // 8 >= 100  # every block has its own row
    steps_per_epoch = len(block_of) // 8

    def blocks(ranks) -> list[int]:
        return [block_of[tuple(row)] for rank in ranks for _, batch in rank["read"] for row in batch]

    read_before = blocks(before)
    assert len(read_before) == steps * 8
    expected = np.random.default_rng([1337, 0]).permutation(len(block_of))[: steps_per_epoch * 8]
    ckpt = str(tmp_path / "ckpt" / f"epoch=0-step={steps}.ckpt")
    for phase, devices, batch_size, accumulate in (("one", 1, 4, 2),):
        after = train(tmp_path, phase, devices, batch_size, accumulate, ckpt_path=ckpt, max_epochs=1)
        assert sorted(read_before + blocks(after)) == sorted(expected.tolist()), phase  # each block once
        assert {rank["global_step"] for rank in after} == {steps_per_epoch}  # the step counter carried on
        # The optimizer stepped after every `accumulate` batches, from the checkpoint's step on.
        read_at = [step for step, _ in after[0]["read"]]
        assert read_at == [s for s in range(steps, steps_per_epoch) for _ in range(accumulate)], phase


@pytest.mark.slow
def test_fit_resumed_with_another_split_of_the_global_batch_continues_the_same_curve(tmp_path, capsys):
    """`nexttoken fit` with 4 x 2 accumulated blocks, cut at step 5, resumed with 8 x 1: the same
    optimizer steps on the same blocks, so the loss curve, step counter and schedule go on unchanged
    (to float summation order: the gradients are summed in another order)."""
    from nexttoken.cli import main
    from test_cli import fit_args, metric_rows, write_corpus

    corpus, cache = write_corpus(tmp_path / "corpus"), tmp_path / "cache"
    # With fit_args' --data.batch_size 4. Lightning counts val_check_interval in batches: every 5 steps.
    split = ["--trainer.accumulate_grad_batches", "2", "--trainer.val_check_interval", "10"]
    split += ["--trainer.log_every_n_steps", "1"]
    assert main(fit_args(corpus, tmp_path / "full", cache, 10, *split)) == 0
    stop = ["--trainer.callbacks+=test_cli.StopAtStep", "--trainer.callbacks.step=5"]
    assert main(fit_args(corpus, tmp_path / "cut", cache, 10, *split, *stop)) == 0
    resume = [
        "--ckpt_path",
        "last",
        "--trainer.accumulate_grad_batches",
        "1",
        "--trainer.log_every_n_steps",
        "1",
    ]
    capsys.readouterr()
    # 4 x 1 (the checkpoint's batch size, not given) cannot continue a global batch of 8 blocks.
    without_batch_size = fit_args(corpus, tmp_path / "cut", cache, 10, *resume)
    at = without_batch_size.index("--data.batch_size")
    del without_batch_size[at : at + 2]
    assert main(without_batch_size) == 2
    error = capsys.readouterr().err.strip()
    assert error.endswith("to continue its order, set --data.batch_size 8") and "\n" not in error, error
    resumed = fit_args(corpus, tmp_path / "cut", cache, 10, *resume)
    resumed[resumed.index("--data.batch_size") + 1] = "8"
    assert main(resumed) == 0
    full, cut = tmp_path / "full" / "version_0", tmp_path / "cut" / "version_0"
    for metric in ("train/loss", "train/lr", "val/loss"):
        mine, theirs = metric_rows(cut, metric), metric_rows(full, metric)
        assert sorted(mine) == sorted(theirs) and max(mine) == 9, metric  # every step, up to the last
        assert [mine[s] for s in sorted(mine)] == pytest.approx(
            [theirs[s] for s in sorted(mine)], rel=1e-4
        ), metric

import json
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from torch import nn

from nexttoken.data.datamodule import TextDataModule
from nexttoken.data.loaders import ResumableDataLoader, TrainBatches, ValBatches
from nexttoken.data.packing import block_offset
from nexttoken.errors import DataError, DataWarning
from nexttoken.loss import IGNORE_INDEX
from test_datamodule import CountingDataModule, make_dm, val_targets, write_corpus


# --------------------------------------------------------------------------- the datasets on their own
def test_train_and_val_batches_of_a_stream_written_by_hand(tmp_path):
    # A stream 0..22 (23 tokens) in blocks of T=5: 4 training blocks ((23 - 1) // 5), and 5
    # validation blocks covering the 22 targets, the last with 2 real targets and 3 padded.
    T = 5
    stream = np.arange(23, dtype=np.uint16)
    byte_counts = np.arange(23, dtype=np.uint32) % 3
    np.save(tmp_path / "stream.npy", stream)
    np.save(tmp_path / "bytes.npy", byte_counts)

    train = TrainBatches(tmp_path / "stream.npy", block_size=T, batch_size=2, seed=0)
    assert train.num_blocks == 4 and len(train) == 2
    rows = [(x, y) for input_ids, targets in train for x, y in zip(input_ids.tolist(), targets.tolist())]
    assert sorted(x[0] // T for x, _ in rows) == [0, 1, 2, 3]  # every block once
    for x, y in rows:
        start = x[0]
        assert x == list(range(start, start + T)) and y == list(range(start + 1, start + T + 1))

    val = ValBatches(tmp_path / "stream.npy", tmp_path / "bytes.npy", block_size=T, batch_size=2, pad_id=99)
    batches = list(val)
    assert [x.shape[0] for x, _, _ in batches] == [1, 2, 2]  # 5 blocks in ceil(5 / 2) = 3 even batches
    input_ids = torch.cat([x for x, _, _ in batches])
    targets = torch.cat([y for _, y, _ in batches])
    assert input_ids[-1].tolist() == [20, 21, 99, 99, 99]
    assert targets[-1].tolist() == [21, 22, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]
    assert targets[targets != IGNORE_INDEX].tolist() == list(range(1, 23))
    n_bytes = torch.cat([b for _, _, b in batches])
    # Each block's bytes are those of its scored targets (stream positions 5i+1 .. 5i+5).
    assert n_bytes.tolist() == [int(byte_counts[5 * i + 1 : 5 * i + 6].sum()) for i in range(5)]


@pytest.mark.parametrize("shift_blocks", [False, True])
def test_resumable_loader_continues_and_then_starts_the_next_epoch(tmp_path, shift_blocks):
    np.save(tmp_path / "stream.npy", np.arange(41, dtype=np.uint16))
    dataset = TrainBatches(
        tmp_path / "stream.npy", block_size=4, batch_size=2, seed=3, shift_blocks=shift_blocks
    )
    loader = ResumableDataLoader(dataset)
    epoch0 = [x for x, _ in loader]
    assert len(epoch0) == 5 and loader.epoch == 0
    it = iter(loader)  # the next iterator starts epoch 1, in another order
    first = next(it)[0]
    assert loader.epoch == 1 and loader.batches_consumed == 1
    assert loader.state_dict()["epoch"] == 1 and loader.state_dict()["batches_consumed"] == 1
    rest = [x for x, _ in loader]  # a new iterator continues where the last one stopped
    epoch1 = [first, *rest]
    assert len(epoch1) == 5
    key = lambda batches: sorted(row for x in batches for row in map(tuple, x.tolist()))  # noqa: E731
    # Seed 3 cuts epoch 1 at offset 1: each block starts one position later (the last one's final
    # target wraps to the stream's start).
    offset = 1 if shift_blocks else 0
    assert block_offset(3, 1, 4) == 1
    assert key(epoch1) == sorted(tuple(x + offset for x in row) for row in key(epoch0))  # shifted blocks
    assert [x.tolist() for x in epoch0] != [x.tolist() for x in epoch1]  # ... in another order
    assert dataset.layout() == {"num_blocks": 10, "block_size": 4, "seed": 3} | (
        {} if shift_blocks else {"shift_blocks": False}
    )


# --------------------------------------------------------------------------- from a datamodule
@pytest.mark.parametrize("val_batch_size", [1, 7])
def test_val_batches_score_every_target_once(tmp_path, val_batch_size):
    dm = make_dm(tmp_path, val_batch_size=val_batch_size)
    stream = np.load(dm.cache.val)
    targets, n_bytes, _ = val_targets(dm.val_dataloader())
    assert targets == stream[1:].tolist()
    assert n_bytes == dm.val_bytes == len(dm.val_text_bytes())
    for input_ids, _, _ in dm.val_dataloader():
        assert input_ids.shape[0] <= val_batch_size and input_ids.shape[1] == 8


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_val_shards_are_disjoint_and_complete_across_ranks(tmp_path, world_size):
    dm = make_dm(tmp_path, val_batch_size=3)
    stream = np.load(dm.cache.val)
    rows_per_block, all_targets, total_bytes, total_rows = 8, [], 0, 0
    for rank in range(world_size):
        targets, n_bytes, n_rows = val_targets(dm.make_val_loader(rank, world_size))
        all_targets.extend(targets)  # ranks hold consecutive stretches, in rank order
        total_bytes += n_bytes
        total_rows += n_rows
    assert all_targets == stream[1:].tolist()
    assert total_bytes == dm.val_bytes
    assert total_rows == -(-(len(stream) - 1) // rows_per_block)  # no padding rows, no repeats


def test_train_batches_are_shifted_blocks_of_the_stream(tmp_path):
    dm = make_dm(tmp_path)
    stream = np.load(dm.cache.train).astype(np.int64)
    blocks = {tuple(stream[i * 8 : i * 8 + 9]) for i in range((len(stream) - 1) // 8)}
    loader = dm.train_dataloader()
    batches = list(loader)
    assert len(batches) == len(loader) >= 2
    for input_ids, targets in batches:
        assert input_ids.shape == targets.shape == (4, 8)
        assert input_ids.dtype == targets.dtype == torch.int64
        assert torch.equal(input_ids[:, 1:], targets[:, :-1])
        for x, y in zip(input_ids.tolist(), targets.tolist(), strict=True):
            assert tuple([x[0], *y]) in blocks
    assert dm.train_tokens == len(stream)


def test_train_order_is_seeded_and_changes_each_epoch(tmp_path):
    dm = make_dm(tmp_path)
    loader = dm.train_dataloader()
    epoch0 = [x for x, _ in loader]
    epoch1 = [x for x, _ in loader]
    assert not all(torch.equal(a, b) for a, b in zip(epoch0, epoch1, strict=True))
    again = make_dm(tmp_path).train_dataloader()
    assert all(torch.equal(a, b) for a, b in zip(epoch0, [x for x, _ in again], strict=True))
    other_seed = make_dm(tmp_path, seed=7).train_dataloader()
    assert not all(torch.equal(a, b) for a, b in zip(epoch0, [x for x, _ in other_seed], strict=True))


def test_train_ranks_read_disjoint_blocks(tmp_path):
    # Random letters, so that equal rows can only mean the same block read twice.
    rng = np.random.default_rng(0)
    corpus = tmp_path / "random"
    corpus.mkdir()
    for i in range(8):
        (corpus / f"{i}.txt").write_text("".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz "), size=120)))
    dm = make_dm(tmp_path, corpus=corpus, batch_size=2)
    for world_size in (2, 3):
        rows = []
        lengths = set()
        for rank in range(world_size):
            loader = dm.make_train_loader(rank, world_size)
            lengths.add(len(loader))
            rows += [tuple(r) for x, _ in loader for r in x.tolist()]
        assert len(lengths) == 1  # same number of steps on every rank
        assert len(rows) == len(set(rows))  # no block read by two ranks


def test_workers_do_not_change_the_batches(tmp_path):
    dm0 = make_dm(tmp_path, val_batch_size=3)
    dm2 = make_dm(tmp_path, val_batch_size=3, loader_workers=2)
    train0, train2 = dm0.train_dataloader(), dm2.train_dataloader()
    for _ in range(2):  # two epochs
        a, b = list(train0), list(train2)
        assert len(a) == len(b) and all(torch.equal(x[0], y[0]) for x, y in zip(a, b, strict=True))
    val0, val2 = list(dm0.val_dataloader()), list(dm2.val_dataloader())
    assert len(val0) == len(val2) and all(torch.equal(x[1], y[1]) for x, y in zip(val0, val2, strict=True))


# --------------------------------------------------------------------------- resume
class Recorder(L.LightningModule):
    """Records every training batch it is given."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(()))
        self.seen: list[torch.Tensor] = []

    def training_step(self, batch, batch_idx):
        input_ids = batch[0]  # (input_ids, targets[, document_ids])
        self.seen.append(input_ids.clone())
        return self.weight * input_ids.float().mean()

    def validation_step(self, batch, batch_idx):
        self.log("val_metric", batch[1].float().mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def fit(
    tmp_path, dm_kwargs, ckpt_path=None, callbacks=(), **trainer_kwargs
) -> tuple[list[torch.Tensor], L.Trainer]:
    module = Recorder()
    settings = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=bool(callbacks),
        callbacks=list(callbacks),
        num_sanity_val_steps=0,
        limit_val_batches=0,
        default_root_dir=tmp_path,
    )
    trainer = L.Trainer(**{**settings, **trainer_kwargs})
    dm = TextDataModule(cache_dir=str(tmp_path / "cache"), **dm_kwargs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
    assert not [w for w in caught if "not resumable" in str(w.message)]
    return module.seen, trainer


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize(
    ("where", "loader_workers", "data"),
    [
        ("mid_epoch", 0, "text"),
        ("end_of_epoch", 0, "text"),
        ("mid_epoch", 2, "text"),
        ("mid_epoch", 0, "chat packed"),
        ("end_of_epoch", 0, "chat padded"),
        ("mid_epoch", 2, "chat padded"),
    ],
)
def test_resume_from_a_step_checkpoint_sees_the_same_batches(tmp_path, where, loader_workers, data):
    # With workers, the DataLoader prefetches batches the model has not seen yet: they must not count.
    if data == "text":
        corpus = write_corpus(tmp_path / "corpus", n_docs=6, repeat=1)
        shape = dict(block_size=16, batch_size=4)
    else:  # chat examples, packed rows or padded ones, in the same resumable loader
        from test_sft_cache import write_chats

        corpus = write_chats(tmp_path / "corpus" / "chats.jsonl", 24)
        shape = dict(block_size=96, batch_size=4, packing=data == "chat packed")
    dm_kwargs = dict(
        path=[str(corpus)],
        tokenizer="bytes",
        val_fraction=0.2,
        loader_workers=loader_workers,
        **shape,
    )
    probe = make_dm(tmp_path, corpus=corpus, **{k: v for k, v in dm_kwargs.items() if k != "path"})
    per_epoch = len(probe.train_dataloader())
    assert 2 <= per_epoch <= 8
    n = per_epoch + 1 if where == "mid_epoch" else per_epoch
    checkpoints = tmp_path / "ckpt"
    callback = L.pytorch.callbacks.ModelCheckpoint(dirpath=checkpoints, every_n_train_steps=n, save_top_k=-1)
    full, _ = fit(tmp_path / "a", dm_kwargs, callbacks=[callback], max_steps=2 * n)
    assert len(full) == 2 * n
    (ckpt,) = checkpoints.glob(f"*step={n}.ckpt")
    resumed, _ = fit(tmp_path / "b", dm_kwargs, ckpt_path=str(ckpt), max_steps=2 * n)
    assert same(resumed, full[n:])
    # A mistake would show: epochs really do differ in order.
    assert not same(full[:per_epoch], full[per_epoch : 2 * per_epoch])


def test_resume_from_a_checkpoint_saved_after_mid_epoch_validation(tmp_path):
    # The CLI's set-up: validate every n steps across epochs, keep the best and last checkpoints.
    corpus = write_corpus(tmp_path / "corpus", n_docs=6, repeat=1)
    dm_kwargs = dict(path=[str(corpus)], tokenizer="bytes", block_size=16, batch_size=4, val_fraction=0.2)
    n = 4
    checkpoints = tmp_path / "ckpt"
    callback = L.pytorch.callbacks.ModelCheckpoint(
        dirpath=checkpoints, monitor="val_metric", save_top_k=-1, filename="{step}"
    )
    validating = dict(
        val_check_interval=n, check_val_every_n_epoch=None, limit_val_batches=2, max_steps=3 * n
    )
    full, _ = fit(tmp_path / "a", dm_kwargs, callbacks=[callback], **validating)
    assert len(full) == 3 * n
    resumed, _ = fit(tmp_path / "b", dm_kwargs, ckpt_path=str(checkpoints / f"step={n}.ckpt"), **validating)
    assert same(resumed, full[n:])


def test_resume_from_an_epoch_checkpoint_with_workers(tmp_path):
    corpus = write_corpus(tmp_path / "corpus", n_docs=6, repeat=1)
    dm_kwargs = dict(
        path=[str(corpus)], tokenizer="bytes", block_size=16, batch_size=4, val_fraction=0.2, loader_workers=2
    )
    full, _ = fit(tmp_path / "a", dm_kwargs, max_epochs=3)
    per_epoch = len(full) // 3
    _, trainer = fit(tmp_path / "b", dm_kwargs, max_epochs=1)
    trainer.save_checkpoint(tmp_path / "epoch1.ckpt")
    resumed, _ = fit(tmp_path / "c", dm_kwargs, ckpt_path=str(tmp_path / "epoch1.ckpt"), max_epochs=3)
    assert same(resumed, full[per_epoch:])


def test_state_dict_is_plain_and_survives_reloading_the_loader(tmp_path):
    dm = make_dm(tmp_path, batch_size=2)
    loader = dm.train_dataloader()
    it = iter(loader)
    consumed = [next(it)[0] for _ in range(3)]
    state = dm.state_dict()
    assert state == {"train_loader": {**state["train_loader"], "epoch": 0, "batches_consumed": 3}}
    fresh = make_dm(tmp_path, batch_size=2)
    fresh.load_state_dict(state)
    rest = [x for x, _ in fresh.train_dataloader()]
    assert same(consumed + rest, [x for x, _ in make_dm(tmp_path, batch_size=2).train_dataloader()])
    changed = make_dm(tmp_path, batch_size=3)  # another global batch cannot continue this order
    changed.load_state_dict(state)
    with pytest.raises(DataError, match="global batch is 2 blocks .* set batch_size 2$"):
        changed.train_dataloader()
    with pytest.warns(DataWarning, match="layout changed"):  # other data: its epoch starts again
        reseeded = make_dm(tmp_path, batch_size=2, seed=9)
        reseeded.load_state_dict(state)
        assert reseeded.train_dataloader().batches_consumed == 0


# --------------------------------------------------------------------------- real DDP
class ShardRecorder(L.LightningModule):
    """Writes the training rows and validation targets each rank saw to ``out/rank{i}.json``."""

    def __init__(self, out: str) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(()))
        self.out = out
        self.train_rows: list = []
        self.val_targets: list = []
        self.val_bytes = 0

    def training_step(self, batch, batch_idx):
        self.train_rows += batch[0].tolist()
        return self.weight * batch[0].float().mean()

    def validation_step(self, batch, batch_idx):
        _, targets, n_bytes = batch
        self.val_targets += targets[targets != IGNORE_INDEX].tolist()
        self.val_bytes += int(n_bytes.sum())

    def on_fit_end(self):
        data = self.trainer.datamodule
        record = {
            "train": self.train_rows,
            "val": self.val_targets,
            "bytes": self.val_bytes,
            "val_batches": self.trainer.num_val_batches[0],
            "cache_hit": data.cache_hit,
            "cache": str(data.cache.directory),
            "corpus_reads": data.corpus_reads,
        }
        (Path(self.out) / f"rank{self.global_rank}.json").write_text(json.dumps(record))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


@pytest.mark.slow
def test_ddp_ranks_share_val_exactly_and_train_disjointly(tmp_path):
    """Also: rank 0 tokenizes (prepare_data), rank 1 waits and reads its cache without touching the corpus."""
    corpus = write_corpus(tmp_path / "corpus", n_docs=10, repeat=2)
    kwargs = dict(
        path=[str(corpus)],
        tokenizer="bytes",
        block_size=16,
        batch_size=3,
        val_batch_size=5,
        val_fraction=0.3,
        cache_dir=str(tmp_path / "cache"),
    )
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn",
        max_epochs=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(ShardRecorder(str(tmp_path)), CountingDataModule(**kwargs))
    ranks = [json.loads((tmp_path / f"rank{i}.json").read_text()) for i in range(2)]
    assert [r["cache_hit"] for r in ranks] == [False, True]  # rank 0 built it, rank 1 found it
    assert [r["corpus_reads"] for r in ranks] == [1, 0]
    assert ranks[0]["cache"] == ranks[1]["cache"]
    dm = TextDataModule(**kwargs)
    dm.setup()
    assert ranks[0]["val"] + ranks[1]["val"] == np.load(dm.cache.val)[1:].tolist()  # no padding, no repeats
    assert ranks[0]["bytes"] + ranks[1]["bytes"] == dm.val_bytes
    assert ranks[0]["val_batches"] == ranks[1]["val_batches"]
    train = [{tuple(r) for r in rank["train"]} for rank in ranks]
    assert len(ranks[0]["train"]) == len(ranks[1]["train"]) > 0
    assert not train[0] & train[1]


# --------------------------------------------------------------------------- document masking
def segments_alone(block: torch.Tensor, starts_at: callable) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The documents of a block of T + 1 tokens cut by hand: ``(inputs, targets)`` of each, where a
    document's inputs run from its start to the next start and its targets are the tokens after them."""
    starts = [0] + [i for i in range(1, len(block) - 1) if starts_at(block, i)]
    ends = starts[1:] + [len(block) - 1]
    return [(block[s:e], block[s + 1 : e + 1]) for s, e in zip(starts, ends, strict=True)]


def test_document_mask_gives_each_document_the_loss_it_has_alone(tmp_path):
    from nexttoken.loss import next_token_loss
    from nexttoken.models.gpt import GPT, GPTConfig

    dm = make_dm(tmp_path, block_size=48, batch_size=3, document_mask=True)
    eos = dm.tokenizer.eos_id
    input_ids, targets, document_ids = next(iter(dm.train_dataloader()))
    torch.manual_seed(0)
    model = GPT(
        GPTConfig.from_preset("tiny", dm.vocab_size, n_layer=2, n_head=2, n_embd=32, block_size=48)
    ).eval()
    with torch.no_grad():
        masked = next_token_loss(model(input_ids, document_ids=document_ids), targets, reduction="sum")
        by_hand, n = 0.0, 0
        for row in range(input_ids.shape[0]):
            block = torch.cat([input_ids[row], targets[row, -1:]])
            # The bytes tokenizer's stream is "EOS doc EOS doc ...": a document starts at each EOS.
            for inputs, next_tokens in segments_alone(block, lambda b, i: b[i] == eos):
                by_hand += next_token_loss(model(inputs[None]), next_tokens[None], reduction="sum").item()
                n += len(next_tokens)
        plain = next_token_loss(model(input_ids), targets, reduction="sum").item()
    assert int((targets != IGNORE_INDEX).sum()) == n == targets.numel()  # every target still scored
    assert (document_ids[:, 1:] != document_ids[:, :-1]).any()  # the blocks do hold several documents
    assert masked.item() == pytest.approx(by_hand, rel=1e-5)
    assert abs(plain - by_hand) > 1e-3 * abs(by_hand)  # without the mask, documents see each other


def test_document_mask_without_a_start_token_scores_no_first_token(tmp_path, tiny_gpt2_dir):
    # GPT-2/SmolLM2-style tokenizers start documents with no token ("doc EOS doc EOS"): each
    # document's first token has no context of its own, so it is not scored, and its bytes don't count.
    dm = make_dm(tmp_path, tokenizer=str(tiny_gpt2_dir), block_size=16, batch_size=2, document_mask=True)
    eos = dm.tokenizer.eos_id
    stream = np.load(dm.cache.val)
    byte_counts = np.load(dm.cache.val_bytes)
    scored_positions = [p for p in range(1, len(stream)) if stream[p - 1] != eos]
    n_targets, n_bytes = 0, 0
    for _, targets, batch_bytes, _ in dm.val_dataloader():
        n_targets += int((targets != IGNORE_INDEX).sum())
        n_bytes += int(batch_bytes.sum())
    assert n_targets == len(scored_positions) < len(stream) - 1
    assert n_bytes == int(byte_counts[scored_positions].sum()) < dm.val_bytes
    plain = make_dm(tmp_path, tokenizer=str(tiny_gpt2_dir), block_size=16, batch_size=2)
    assert len(next(iter(plain.train_dataloader()))) == 2 and len(next(iter(dm.train_dataloader()))) == 3

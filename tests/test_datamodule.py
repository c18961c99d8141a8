import json
import sys
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from torch import nn

from nexttoken.data.datamodule import TextDataModule
from nexttoken.data.documents import DataError, DataWarning, find_documents, split_documents
from nexttoken.data.packing import concat_documents
from nexttoken.loss import IGNORE_INDEX

LINES = [
    "def f(x):\n    return x * 2\n",
    "héllo wörld — naïve café\n",
    "中文字符 and 日本語\n",
    "emoji 👍🏽 and e\u0301 combining\n",
    "  leading spaces\n\n\n",
]


def write_corpus(folder: Path, n_docs: int = 12, repeat: int = 3) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n_docs):
        text = "".join(LINES[(i + j) % len(LINES)] for j in range(repeat + i % 4))
        (folder / f"doc{i:02d}.txt").write_text(f"# document {i}\n{text}", encoding="utf-8")
    return folder


def make_dm(tmp_path: Path, corpus: Path | None = None, **kwargs) -> TextDataModule:
    corpus = corpus if corpus is not None else write_corpus(tmp_path / "corpus")
    settings = dict(path=[str(corpus)], tokenizer="bytes", block_size=8, batch_size=4, val_fraction=0.25)
    settings.update(kwargs)
    dm = TextDataModule(cache_dir=str(tmp_path / "cache"), **settings)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def val_targets(loader) -> tuple[list[int], int, int]:
    targets, n_bytes, n_rows = [], 0, 0
    for input_ids, batch_targets, batch_bytes in loader:
        assert input_ids.dtype == batch_targets.dtype == batch_bytes.dtype == torch.int64
        assert batch_bytes.shape == (input_ids.shape[0],)
        targets.extend(batch_targets[batch_targets != IGNORE_INDEX].tolist())
        n_bytes += int(batch_bytes.sum())
        n_rows += input_ids.shape[0]
    return targets, n_bytes, n_rows


# --------------------------------------------------------------------------- contents
def test_val_stream_is_the_val_documents_and_bytes_add_up(tmp_path):
    dm = make_dm(tmp_path)
    _, val_docs = split_documents(find_documents([tmp_path / "corpus"]), 0.25)
    expected = concat_documents([dm.tokenizer.encode(d.text) for d in val_docs], [dm.tokenizer.eos_id])
    stream = np.load(dm.cache.val)
    assert stream.tolist() == expected.tolist()
    assert dm.val_tokens == len(stream) and dm.val_targets == len(stream) - 1
    text = b"".join(d.text.encode() for d in val_docs)
    assert dm.val_text_bytes() == text
    assert dm.val_bytes == len(text)
    assert dm.vocab_size == 257 and dm.tokenizer.eos_id == 256


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


def test_one_file_corpus_holds_out_its_end(tmp_path):
    book = tmp_path / "book.txt"
    book.write_text("".join(f"line {i}: {LINES[i % len(LINES)]}" for i in range(60)), encoding="utf-8")
    dm = make_dm(tmp_path, corpus=book, val_fraction=0.1)
    text = book.read_bytes()
    assert text.endswith(dm.val_text_bytes())
    assert 0.05 * len(text) < dm.val_bytes < 0.15 * len(text)
    targets, n_bytes, _ = val_targets(dm.val_dataloader())
    assert n_bytes == dm.val_bytes


def test_real_one_file_corpus(tmp_path, shared_data):
    book = shared_data / "tinyshakespeare.txt"
    dm = make_dm(tmp_path, corpus=book, block_size=64, val_fraction=0.05, val_batch_size=16)
    text = book.read_bytes()
    assert text.endswith(dm.val_text_bytes())
    assert text[len(text) - dm.val_bytes - 1] == ord("\n")  # cut just after a newline
    assert abs(dm.val_bytes - 0.05 * len(text)) < 0.01 * len(text)
    assert dm.train_tokens + dm.val_tokens == len(text) + 2  # bytes + one EOS per half
    _, n_bytes, _ = val_targets(dm.val_dataloader())
    assert n_bytes == dm.val_bytes


def test_local_tokenizer_folder(tmp_path):
    from nexttoken.data.tokenizers import build_tokenizer

    folder = build_tokenizer("bpe", ["some training text for a local tokenizer\n"] * 5, vocab_size=280).save(
        tmp_path / "tok"
    )
    dm = make_dm(tmp_path, tokenizer=str(folder))
    assert dm.tokenizer.kind == "hf" and dm.vocab_size == 280
    _, n_bytes, _ = val_targets(dm.val_dataloader())
    assert n_bytes == dm.val_bytes == len(dm.val_text_bytes())


def test_bpe_is_trained_on_the_train_split_only(tmp_path):
    corpus = write_corpus(tmp_path / "corpus")
    (tmp_path / "val").mkdir()
    held = tmp_path / "val" / "held.txt"
    held.write_text("zyzzyva quokka " * 20, encoding="utf-8")
    dm = make_dm(tmp_path, corpus=corpus, tokenizer="bpe", vocab_size=300, val_path=[str(held)])
    assert dm.tokenizer.kind == "bpe" and dm.vocab_size <= 300
    assert len(dm.tokenizer.encode("zyzzyva")) >= 4  # unseen in training: no merge for it
    assert dm.val_bytes == len(held.read_bytes())


# --------------------------------------------------------------------------- record formats
RECORDS = [f"record {i}: " + LINES[i % len(LINES)] * (1 + i % 3) for i in range(60)]


def write_record_corpus(folder: Path, kind: str) -> tuple[Path, dict]:
    """A corpus of ``RECORDS`` in one format, and the settings that read it."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    folder.mkdir(parents=True, exist_ok=True)
    rows = [{"id": i, "content": text, "meta": {"body": text}} for i, text in enumerate(RECORDS)]
    if kind == "jsonl.zst":
        data = "".join(json.dumps(r) + "\n" for r in rows).encode()
        (folder / "corpus.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(data))
        return folder / "corpus.jsonl.zst", dict(text_field="content")
    if kind == "parquet shards":
        for shard in range(3):
            pq.write_table(pa.Table.from_pylist(rows[shard::3]), folder / f"part-{shard}.parquet")
        return folder, dict(text_field="meta.body")
    if kind == "dataset":
        datasets.Dataset.from_list(rows).save_to_disk(str(folder / "saved"))
        return folder / "saved", dict(text_field="content")
    if kind == "dataset dict":
        splits = {
            "train": datasets.Dataset.from_list(rows[:50]),
            "validation": datasets.Dataset.from_list(rows[50:]),
        }
        datasets.DatasetDict(splits).save_to_disk(str(folder / "saved"))
        return folder / "saved", dict(text_field="content")
    raise ValueError(kind)


def expected_val_texts(corpus: Path, kind: str, val_fraction: float) -> list[str]:
    """The validation texts, computed here from the split rule rather than by the corpus reader."""
    from nexttoken.data.documents import held_out

    if kind == "dataset dict":
        return RECORDS[50:]
    if kind == "parquet shards":
        names = [(f"part-{i % 3}.parquet#{i // 3}", i) for i in range(len(RECORDS))]
        names.sort(key=lambda item: (item[1] % 3, item[1] // 3))  # shard by shard, row by row
        return [RECORDS[i] for name, i in names if held_out(name, val_fraction)]
    return [text for i, text in enumerate(RECORDS) if held_out(f"{corpus.name}#{i}", val_fraction)]


@pytest.mark.parametrize("kind", ["jsonl.zst", "parquet shards", "dataset", "dataset dict"])
def test_record_formats_give_exact_streams_and_bytes(tmp_path, kind):
    corpus, settings = write_record_corpus(tmp_path / "data", kind)
    dm = make_dm(tmp_path, corpus=corpus, val_fraction=0.2, **settings)
    val = expected_val_texts(corpus, kind, 0.2)
    assert 3 <= len(val) <= 25
    # The bytes tokenizer: token == byte, each document after an EOS (256).
    expected = [t for text in val for t in [256, *text.encode("utf-8")]]
    assert np.load(dm.cache.val).tolist() == expected
    assert dm.val_text_bytes() == "".join(val).encode("utf-8")
    assert dm.val_bytes == len("".join(val).encode("utf-8")) == int(np.load(dm.cache.val_bytes).sum())
    assert dm.train_tokens == sum(len(t.encode()) + 1 for t in RECORDS) - len(expected)
    _, n_bytes, _ = val_targets(dm.val_dataloader())
    assert n_bytes == dm.val_bytes


@pytest.mark.slow
def test_fit_on_compressed_json_lines_reports_bits_per_byte_on_exact_bytes(tmp_path):
    from nexttoken.cli import main
    from test_cli import fit_args

    corpus, _ = write_record_corpus(tmp_path / "data", "jsonl.zst")
    args = fit_args(corpus, tmp_path / "runs", tmp_path / "cache", 2, "--data.text_field", "content")
    assert main(args) == 0
    report = json.loads((tmp_path / "runs" / "version_0" / "report.json").read_text())
    held_out = expected_val_texts(corpus, "jsonl.zst", 0.3)  # fit_args holds out 30%
    assert report["validation"]["bytes"] == len("".join(held_out).encode("utf-8"))
    assert report["validation"]["bits_per_byte"] > 0


def test_tokenizing_workers_give_identical_files(tmp_path):
    """1 and N worker processes (and this process) write byte-identical caches, equal to tokenizing
    the whole corpus at once in memory."""
    from nexttoken.data.cache import TokenCache, tokenize_documents
    from nexttoken.data.corpus import Corpus
    from nexttoken.data.tokenizers import build_tokenizer

    corpus, settings = write_record_corpus(tmp_path / "data", "jsonl.zst")
    split_corpus = Corpus([corpus], 0.2, text_field="content")
    tokenizer = build_tokenizer("bpe", RECORDS, vocab_size=300)
    files = {}
    for workers in (0, 1, 3):
        cache = TokenCache(tmp_path / f"cache{workers}" / "tokens" / "key")
        meta, built = cache.get_or_build(split_corpus, lambda: tokenizer, workers=workers, chunk_chars=200)
        assert built and meta["workers"] == workers
        files[workers] = {
            name: (cache.directory / name).read_bytes()
            for name in ("train.npy", "val.npy", "val_bytes.npy", "val.txt")
        }
    assert files[0] == files[1] == files[3]
    train = [d for is_val, d in split_corpus.documents() if not is_val]
    val = [d for is_val, d in split_corpus.documents() if is_val]
    assert sum(len(d.text) for d in train) > 200 * 5  # many chunks of 200 characters
    reference_train, _ = tokenize_documents(tokenizer, train, with_bytes=False)
    reference_val, reference_bytes = tokenize_documents(tokenizer, val, with_bytes=True)
    cache = TokenCache(tmp_path / "cache3" / "tokens" / "key")
    assert np.array_equal(np.load(cache.train), reference_train)
    assert np.array_equal(np.load(cache.val), reference_val)
    assert np.array_equal(np.load(cache.val_bytes), reference_bytes)


def test_num_workers_setting(tmp_path):
    dm = make_dm(tmp_path, num_workers=2)  # explicit: two worker processes even for a small corpus
    assert dm.cache.read_meta()["workers"] == 2
    small = make_dm(tmp_path / "b")  # default: one per core, except a small corpus stays in this process
    assert small.cache.read_meta()["workers"] == 0
    with pytest.raises(DataError, match="num_workers must be 0 or more"):
        TextDataModule(num_workers=-1)


def test_progress_bar_only_on_a_terminal(tmp_path, monkeypatch, capsys):
    make_dm(tmp_path / "quiet")
    assert capsys.readouterr().err == ""  # not a terminal: nothing
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    make_dm(tmp_path / "shown")
    err = capsys.readouterr().err
    assert "tokenizing" in err and "B/s" in err and "docs=" in err


def test_bpe_trains_on_a_bounded_sample_of_the_training_split(tmp_path, monkeypatch):
    import nexttoken.data.tokenizers as tokenizers

    seen = []
    real = tokenizers.train_bpe
    monkeypatch.setattr(
        tokenizers, "train_bpe", lambda texts, size: seen.append(list(texts)) or real(texts, size)
    )
    corpus, settings = write_record_corpus(tmp_path / "data", "jsonl.zst")
    dm = make_dm(tmp_path, corpus=corpus, tokenizer="bpe", vocab_size=300, bpe_sample_mb=0.0005, **settings)
    (sample,) = seen
    sizes = [len(t.encode()) for t in sample]
    assert sum(sizes) - max(sizes) <= 500 < sum(sizes) + max(sizes)  # 500 bytes, give or take a record
    assert not set(sample) & set(expected_val_texts(corpus, "jsonl.zst", 0.25))
    assert set(sample) < set(RECORDS)
    assert dm.tokenizer.kind == "bpe"


# --------------------------------------------------------------------------- cache
def test_second_setup_reads_the_cache_without_tokenizing(tmp_path, monkeypatch):
    corpus = write_corpus(tmp_path / "corpus")
    first = make_dm(tmp_path, corpus=corpus, tokenizer="bpe", vocab_size=300)
    assert first.cache_hit is False
    files = sorted(first.cache.directory.iterdir())
    assert [f.name for f in files] == ["meta.json", "train.npy", "val.npy", "val.txt", "val_bytes.npy"]
    mtimes = [f.stat().st_mtime_ns for f in files]

    import nexttoken.data.cache as cache
    import nexttoken.data.tokenizers as tokenizers

    def fail(*args, **kwargs):
        raise AssertionError("tokenized or trained again")

    monkeypatch.setattr(cache, "tokenize_documents", fail)
    monkeypatch.setattr(tokenizers, "train_bpe", fail)
    second = make_dm(tmp_path, corpus=corpus, tokenizer="bpe", vocab_size=300)
    assert second.cache_hit is True
    assert [f.stat().st_mtime_ns for f in files] == mtimes
    assert second.tokenizer.fingerprint == first.tokenizer.fingerprint
    assert (second.train_tokens, second.val_tokens, second.val_bytes) == (
        first.train_tokens,
        first.val_tokens,
        first.val_bytes,
    )
    assert np.load(second.cache.train, mmap_mode="r").dtype == np.uint16
    # Changed text is a different corpus: it must be tokenized again.
    (corpus / "doc00.txt").write_text("changed\n" * 20, encoding="utf-8")
    with pytest.raises(AssertionError, match="again"):
        make_dm(tmp_path, corpus=corpus, tokenizer="bpe", vocab_size=300)


def test_other_ranks_read_the_cache_by_rank_zeros_key_without_the_corpus(tmp_path, monkeypatch):
    from types import SimpleNamespace

    rank0 = make_dm(tmp_path)  # prepare_data: tokenized here
    broadcasts = []

    def broadcast(obj, src):
        broadcasts.append((obj, src))
        return rank0._cache_key

    other = TextDataModule(
        path=[str(tmp_path / "corpus")], tokenizer="bytes", block_size=8, cache_dir=str(tmp_path / "cache")
    )
    other.trainer = SimpleNamespace(strategy=SimpleNamespace(broadcast=broadcast))
    monkeypatch.setattr(TextDataModule, "corpus", lambda self: pytest.fail("another rank read the corpus"))
    other.setup("fit")
    assert broadcasts == [(None, 0)] and other.cache_hit is True
    assert other.cache.directory == rank0.cache.directory and other.val_bytes == rank0.val_bytes
    assert other.tokenizer.fingerprint == rank0.tokenizer.fingerprint
    other.setup("validate")  # once set up, no second collective
    assert len(broadcasts) == 1


def test_cache_dir_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("NEXTTOKEN_CACHE", str(tmp_path / "env_cache"))
    dm = TextDataModule(path=[str(write_corpus(tmp_path / "corpus"))], tokenizer="bytes", block_size=8)
    dm.setup()
    assert dm.cache.directory.is_relative_to(tmp_path / "env_cache")
    assert not list(dm.cache.directory.glob(".*.tmp"))  # temp files were renamed into place


# --------------------------------------------------------------------------- resume
class Recorder(L.LightningModule):
    """Records every training batch it is given."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(()))
        self.seen: list[torch.Tensor] = []

    def training_step(self, batch, batch_idx):
        input_ids, _ = batch
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
    ("where", "loader_workers"), [("mid_epoch", 0), ("end_of_epoch", 0), ("mid_epoch", 2)]
)
def test_resume_from_a_step_checkpoint_sees_the_same_batches(tmp_path, where, loader_workers):
    # With workers, the DataLoader prefetches batches the model has not seen yet: they must not count.
    corpus = write_corpus(tmp_path / "corpus", n_docs=6, repeat=1)
    dm_kwargs = dict(
        path=[str(corpus)],
        tokenizer="bytes",
        block_size=16,
        batch_size=4,
        val_fraction=0.2,
        loader_workers=loader_workers,
    )
    probe = make_dm(tmp_path, corpus=corpus, **{k: v for k, v in dm_kwargs.items() if k != "path"})
    per_epoch = len(probe.train_dataloader())
    assert 2 <= per_epoch <= 6
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
    with pytest.warns(DataWarning, match="layout changed"):
        changed = make_dm(tmp_path, batch_size=3)
        changed.load_state_dict(state)
        changed.train_dataloader()


# --------------------------------------------------------------------------- bad input
def test_missing_path(tmp_path):
    with pytest.raises(DataError, match="--data.path: path not found"):
        make_dm(tmp_path, corpus=tmp_path / "nope")


def test_folder_without_text(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no text files"):
        make_dm(tmp_path, corpus=tmp_path / "empty")


def test_empty_files(tmp_path):
    corpus = write_corpus(tmp_path / "corpus")
    (corpus / "zero.txt").write_text("")
    with pytest.warns(DataWarning, match="skipping empty file .*zero.txt"):
        make_dm(tmp_path, corpus=corpus)
    (tmp_path / "blank").mkdir()
    (tmp_path / "blank" / "a.txt").write_text("")
    with pytest.raises(DataError, match="a.txt is empty"):  # an error, not also a warning
        make_dm(tmp_path, corpus=tmp_path / "blank")
    (tmp_path / "blank" / "b.txt").write_text("")
    with pytest.raises(DataError, match="every file is empty"):
        make_dm(tmp_path, corpus=tmp_path / "blank")


def test_binary_file_skipped_with_warning(tmp_path):
    corpus = write_corpus(tmp_path / "corpus")
    (corpus / "image.png").write_bytes(b"\x89PNG\x00\x00\x01")
    with pytest.warns(DataWarning, match="skipping binary file .*image.png"):
        dm = make_dm(tmp_path, corpus=corpus)
    assert b"PNG" not in dm.val_text_bytes()


def test_invalid_utf8(tmp_path):
    corpus = write_corpus(tmp_path / "corpus")
    (corpus / "latin1.txt").write_bytes("café au lait".encode("latin-1"))
    with pytest.raises(
        DataError, match=r"latin1.txt is not valid UTF-8 \(byte offset 3.*replace_invalid_utf8"
    ):
        make_dm(tmp_path, corpus=corpus)
    with pytest.warns(DataWarning, match="byte offset 3"):
        make_dm(tmp_path, corpus=corpus, replace_invalid_utf8=True)


def test_corpus_smaller_than_a_block(tmp_path):
    corpus = tmp_path / "small"
    corpus.mkdir()
    (corpus / "a.txt").write_text("tiny text\n")
    (corpus / "b.txt").write_text("more\n")
    with pytest.raises(
        DataError, match=r"training split has \d+ tokens, but block_size 256 needs at least 257"
    ):
        make_dm(tmp_path, corpus=corpus, block_size=256)


def test_bad_settings(tmp_path):
    with pytest.raises(DataError, match="block_size must be a positive integer"):
        TextDataModule(block_size=0)
    with pytest.raises(DataError, match="val_batch_size"):
        TextDataModule(val_batch_size=0)
    with pytest.raises(DataError, match="val_fraction must be between 0 and 1"):
        make_dm(tmp_path, val_fraction=1.5)


def test_cli_flags_come_from_the_signature(tmp_path):
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(TextDataModule, "data")
    args = parser.parse_args(
        [
            "--data.path",
            '["a.txt", "b"]',
            "--data.tokenizer",
            "bytes",
            "--data.block_size",
            "64",
            "--data.batch_size",
            "2",
            "--data.val_fraction",
            "0.1",
        ]
    )
    assert args.data.path == ["a.txt", "b"] and args.data.block_size == 64 and args.data.val_fraction == 0.1
    dm = TextDataModule(**args.data)
    assert dm.hparams.tokenizer == "bytes" and dm.hparams.batch_size == 2


def write_bad_input(folder: Path, kind: str) -> Path:
    """A corpus with one kind of bad input, written with the libraries themselves."""
    import gzip

    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    folder.mkdir(parents=True, exist_ok=True)
    good = "".join(json.dumps({"text": text}) + "\n" for text in RECORDS).encode()
    if kind == "malformed json line":
        lines = good.splitlines(keepends=True)
        (folder / "bad.jsonl").write_bytes(b"".join(lines[:3]) + b'{"text": "no end\n' + b"".join(lines[3:]))
    elif kind == "record without the field":
        (folder / "bad.jsonl").write_bytes(good + json.dumps({"content": "x", "id": 3}).encode() + b"\n")
    elif kind == "text that is not a string":
        (folder / "bad.jsonl").write_bytes(good + b'{"text": 42}\n')
    elif kind == "empty parquet":
        (folder / "bad.parquet").write_bytes(b"")
    elif kind == "schema-less parquet":
        pq.write_table(pa.table({}), folder / "bad.parquet")
    elif kind == "parquet without the column":
        pq.write_table(
            pa.table({"content": RECORDS, "id": list(range(len(RECORDS)))}), folder / "bad.parquet"
        )
    elif kind == "truncated gz":
        packed = gzip.compress(good * 50)
        (folder / "bad.jsonl.gz").write_bytes(packed[: len(packed) // 2])
    elif kind == "truncated zst":
        packed = zstandard.ZstdCompressor().compress(good * 50)
        (folder / "bad.jsonl.zst").write_bytes(packed[: len(packed) // 2])
    elif kind == "datasets folder from another version":
        datasets.Dataset.from_dict({"text": RECORDS}).save_to_disk(str(folder / "saved"))
        info = json.loads((folder / "saved" / "dataset_info.json").read_text())
        info["features"]["text"]["_type"] = "TextV9"
        (folder / "saved" / "dataset_info.json").write_text(json.dumps(info))
    return folder


BAD_INPUTS = {
    "malformed json line": r"bad.jsonl line 4 is not valid JSON \(",
    "record without the field": r"bad.jsonl line 61 has no field 'text' \(its fields: content, id\)",
    "text that is not a string": r"bad.jsonl line 61: field 'text' is a number, not a string",
    "empty parquet": r"bad.parquet is not a readable Parquet file",
    "schema-less parquet": r"bad.parquet has no columns",
    "parquet without the column": r"bad.parquet has no column 'text' \(its columns: content, id\)",
    "truncated gz": r"bad.jsonl.gz is truncated or corrupt",
    "truncated zst": r"bad.jsonl.zst is truncated or corrupt",
    "datasets folder from another version": r"saved is a saved dataset that datasets .* cannot read",
}


@pytest.mark.parametrize("kind", BAD_INPUTS)
def test_bad_record_input_is_one_line_exit_2_and_leaves_nothing(tmp_path, capsys, kind):
    import re

    from nexttoken.cli import main
    from test_cli import fit_args

    corpus = write_bad_input(tmp_path / "data", kind)
    before = sorted((p, p.stat().st_mtime_ns) for p in corpus.rglob("*"))
    cache, runs = tmp_path / "cache", tmp_path / "runs"
    assert main(fit_args(corpus, runs, cache, 2)) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    assert re.search(BAD_INPUTS[kind], errors[0]), errors[0]
    assert not runs.exists()  # no run folder
    # No cache entry, complete or partial (the lock file beside where it would be is all).
    assert [p.suffix for p in (cache / "tokens").iterdir()] == [".lock"]
    assert sorted((p, p.stat().st_mtime_ns) for p in corpus.rglob("*")) == before  # the data untouched


def random_words_jsonl(path: Path, megabytes: float, seed: int = 0) -> Path:
    """JSON Lines of random lowercase words (slow to tokenize: few repeats for the BPE's word cache)."""
    rng = np.random.default_rng(seed)
    letters = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz     ", dtype=np.uint8)
    with open(path, "w") as f:
        for i in range(int(megabytes * 1e6) // 2000):
            text = bytes(rng.choice(letters, size=2000)).decode()
            f.write(json.dumps({"id": i, "text": text}) + "\n")
    return path


def child_pids(pid: int) -> list[int]:
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            children.append(int(stat.parent.name))
    return children


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs /proc to find the worker processes")
def test_a_killed_tokenization_leaves_no_cache_and_the_next_run_redoes_it(tmp_path):
    import os
    import signal
    import subprocess
    import time

    from test_cli import fit_args

    corpus = random_words_jsonl(tmp_path / "words.jsonl", 6)
    cache = tmp_path / "cache"
    settings = ["--data.tokenizer", "bpe", "--data.vocab_size", "300", "--data.bpe_sample_mb", "0.5"]
    args = fit_args(corpus, tmp_path / "runs", cache, 1, *settings, "--data.num_workers", "1")
    process = subprocess.Popen(
        [sys.executable, "-m", "nexttoken", *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 300
    staged = None
    while staged is None and process.poll() is None and time.monotonic() < deadline:
        # Halfway: tokens already appended to a staging folder's stream (past the 128-byte header).
        staged = next((f for f in cache.glob("tokens/.*.partial/train.npy") if f.stat().st_size > 4096), None)
        time.sleep(0.02)
    assert staged is not None, (
        process.stderr.read().decode()[-2000:] if process.poll() is not None else "timeout"
    )
    workers = child_pids(process.pid)
    assert workers  # the tokenizing worker (and the executor's helpers) were running
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    process.stderr.close()

    key = staged.parent.name.split(".")[1]
    assert not (cache / "tokens" / key).exists()  # nothing a later run could take as complete
    assert staged.parent.is_dir()
    deadline = time.monotonic() + 60
    while any(Path(f"/proc/{pid}").exists() for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(Path(f"/proc/{pid}").exists() for pid in workers)  # no orphans left tokenizing

    def build(cache_dir: Path) -> TextDataModule:
        dm = TextDataModule(
            path=str(corpus),
            tokenizer="bpe",
            vocab_size=300,
            bpe_sample_mb=0.5,
            val_fraction=0.3,
            block_size=32,
            cache_dir=str(cache_dir),
            num_workers=1,
        )
        dm.prepare_data()
        dm.setup()
        return dm

    again = build(cache)
    assert again.cache_hit is False and again.cache.directory.name == key
    assert not list(cache.glob("tokens/.*.partial"))  # the killed run's staging folder is gone
    fresh = build(tmp_path / "fresh")
    for name in ("train.npy", "val.npy", "val_bytes.npy", "val.txt", "meta.json"):
        if name != "meta.json":
            assert (again.cache.directory / name).read_bytes() == (
                fresh.cache.directory / name
            ).read_bytes(), name


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


class CountingDataModule(TextDataModule):
    """Counts how often this process read the corpus (found its files, hashed them, split them)."""

    corpus_reads = 0

    def corpus(self):
        self.corpus_reads += 1
        return super().corpus()


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


@pytest.mark.slow
def test_a_cache_another_machine_is_building_is_waited_for_not_built_again(tmp_path):
    """Two machines with one shared --data.cache_dir: the second waits on the lock, then reads."""
    import shutil
    import subprocess
    import time

    from filelock import FileLock

    corpus = write_corpus(tmp_path / "corpus")
    settings = dict(path=[str(corpus)], tokenizer="bytes", block_size=8, val_fraction=0.25)
    probe = TextDataModule(cache_dir=str(tmp_path / "elsewhere"), **settings)
    probe.prepare_data()
    key = probe.cache.directory.name
    shared = tmp_path / "shared" / "tokens"
    shared.mkdir(parents=True)
    script = (
        "import json, sys; from nexttoken.data.datamodule import TextDataModule; "
        f"dm = TextDataModule(cache_dir={str(tmp_path / 'shared')!r}, **json.loads(sys.argv[1])); dm.prepare_data(); "
        "print(json.dumps([dm.cache_hit, str(dm.cache.directory)]))"
    )
    log = tmp_path / "stderr.txt"
    with FileLock(str(shared / key) + ".lock"):  # the other machine is tokenizing
        with open(log, "w") as stderr:
            child = subprocess.Popen(
                [sys.executable, "-c", script, json.dumps(settings)],
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
            )
        deadline = time.monotonic() + 120
        while "waiting for another process" not in log.read_text() and time.monotonic() < deadline:
            assert child.poll() is None, log.read_text()
            time.sleep(0.05)
        assert "waiting for another process to finish tokenizing" in log.read_text()
        time.sleep(1)
        assert child.poll() is None  # still waiting, not building its own
        shutil.copytree(probe.cache.directory, shared / key)  # the other machine's finished cache
    out, _ = child.communicate(timeout=120)
    assert child.returncode == 0, log.read_text()
    assert json.loads(out.strip().splitlines()[-1]) == [True, str(shared / key)]
    assert not list(shared.glob(".*.partial"))

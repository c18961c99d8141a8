import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from nexttoken.data.datamodule import TextDataModule
from nexttoken.errors import DataError, DataWarning
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


# --------------------------------------------------------------------------- splits and tokenizers
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


# --------------------------------------------------------------------------- bad input
def test_missing_path(tmp_path):
    with pytest.raises(DataError, match="^path: path not found"):
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
    # No cache entry, complete or partial, and no lock file or folder left where it would be.
    assert not (cache / "tokens").exists()
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


class CountingDataModule(TextDataModule):
    """Counts how often this process read the corpus (found its files, hashed them, split them)."""

    corpus_reads = 0

    def corpus(self):
        self.corpus_reads += 1
        return super().corpus()


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


# --------------------------------------------------------------------------- chat and instruction records
def chat_dm(tmp_path: Path, n: int = 60, **kwargs) -> TextDataModule:
    from test_sft_cache import write_chats

    chats = write_chats(tmp_path / "chats" / "chats.jsonl", n)
    settings = dict(tokenizer="bytes", block_size=128, batch_size=4, val_fraction=0.2)
    return make_dm(tmp_path, corpus=chats, **{**settings, **kwargs})


def test_chat_records_are_served_as_response_masked_examples(tmp_path):
    dm = chat_dm(tmp_path)
    assert dm.data_format == "chat" and dm.format_line == "format: chat (auto: the records have 'messages')"
    assert dm.cache is None and dm.examples is not None and dm.tokenizer.vocab_size == 259
    examples = dm.examples.train
    # One epoch of packed training rows holds each example's scored targets once (none left over
    # here: the rows divide into whole batches or the leftover rows are counted).
    loader = dm.train_dataloader()
    scored = sum(int((batch[1] != IGNORE_INDEX).sum()) for batch in loader)
    assert 0 < scored <= dm.examples.counts("train").response_tokens
    batch = next(iter(loader))
    assert len(batch) == 3 and batch[0].shape == (4, 128)  # packed: document_ids travel along
    # Every row is whole examples, each shifted on its own: a row's targets are its examples' next tokens.
    row_ids = batch[2][0]
    for doc in row_ids.unique():
        if doc == 0:
            continue
        inputs = batch[0][0][row_ids == doc].tolist()
        assert any(e.tokens[:-1].tolist() == inputs for e in examples)


@pytest.mark.parametrize("packing", [True, False])
def test_chat_validation_is_the_response_scoreboard_of_the_evaluator(tmp_path, packing):
    from nexttoken.scoring.responses import evaluate_examples
    from nexttoken.training.module import CausalLMModule

    dm = chat_dm(tmp_path, packing=packing, val_batch_size=3)
    torch.manual_seed(0)
    module = CausalLMModule(
        model="tiny", vocab_size=dm.vocab_size, block_size=128, n_layer=2, n_embd=32, n_head=2
    )
    module.configure_model()
    module.eval()
    packed = 0
    with torch.no_grad():
        for i, batch in enumerate(dm.val_dataloader()):
            packed += len(batch) == 4  # document_ids come with rows of several examples
            module.validation_step(batch, i)
    assert bool(packed) == packing
    mine = module.val_metrics.compute()
    # A second path: nexttoken eval's evaluator, each example scored alone through its windows.
    other = evaluate_examples(module.model, list(dm.examples.val), context=128)
    counts = dm.examples.counts("val")
    assert int(mine["tokens"]) == other.response_tokens == counts.response_tokens
    assert int(mine["bytes"]) == other.bytes == counts.response_bytes
    assert mine["loss"].item() == pytest.approx(other.loss, rel=1e-5)
    assert mine["bits_per_byte"].item() == pytest.approx(other.bits_per_byte, rel=1e-5)


def test_chat_cache_is_reused_and_other_ranks_read_it_by_key(tmp_path, monkeypatch):
    from types import SimpleNamespace

    first = chat_dm(tmp_path)
    assert first.cache_hit is False and first._cache_key.startswith("examples/")
    again = chat_dm(tmp_path)
    assert again.cache_hit is True and again.examples.directory == first.examples.directory
    other = TextDataModule(
        path=str(tmp_path / "chats"), tokenizer="bytes", block_size=128, cache_dir=str(tmp_path / "cache")
    )
    other.trainer = SimpleNamespace(strategy=SimpleNamespace(broadcast=lambda key, src: first._cache_key))
    monkeypatch.setattr(TextDataModule, "corpus", lambda self: pytest.fail("another rank read the records"))
    other.setup("fit")
    assert other.examples.directory == first.examples.directory and other.data_format == "chat"
    monkeypatch.undo()
    # Settings the examples depend on make another entry.
    assert chat_dm(tmp_path, train_on="all")._cache_key != first._cache_key
    assert chat_dm(tmp_path, truncation="drop", block_size=96)._cache_key != first._cache_key


def test_chat_flags_are_checked_choices(tmp_path):
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(TextDataModule, "data")
    assert parser.parse_args(["--data.format", "chat"]).data.format == "chat"
    for flag, value in (("format", "xml"), ("train_on", "prompts"), ("truncation", "right")):
        with pytest.raises(Exception, match="Expected a typing.Literal"):
            parser.parse_args([f"--data.{flag}", value])
    defaults = parser.get_defaults().data
    assert (defaults.format, defaults.train_on, defaults.truncation, defaults.packing) == (
        "auto",
        "responses",
        "left",
        True,
    )
    assert defaults.document_mask is False and defaults.chat_template is None


def test_document_mask_is_for_plain_text(tmp_path):
    with pytest.raises(DataError, match="^document_mask applies to plain text"):
        chat_dm(tmp_path, document_mask=True)

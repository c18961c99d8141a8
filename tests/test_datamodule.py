from pathlib import Path

import pytest
import torch

from nexttoken.data.datamodule import TextDataModule
from nexttoken.data.documents import DataError, DataWarning
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

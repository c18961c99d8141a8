from pathlib import Path

import numpy as np
import pytest

import nexttoken.data.cache as cache
from conftest import TINY_TEXT, split_documents, train_tiny_tokenizer
from nexttoken.data.cache import tokenize_documents
from nexttoken.data.datamodule import TextDataModule
from nexttoken.data.documents import Document, find_documents
from nexttoken.data.packing import concat_documents
from nexttoken.data.tokenizers import bytes_tokenizer, from_transformers
from nexttoken.io import default_cache_dir
from test_datamodule import make_dm, write_corpus

CACHE_FILES = ["meta.json", "train.npy", "val.npy", "val.txt", "val_bytes.npy"]
DOCS = [Document(f"d{i}.txt", text) for i, text in enumerate(["héllo\n", TINY_TEXT[:70], "naïve — 日本\n"])]


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
    assert dm.vocab_size == 259 and dm.tokenizer.eos_id == 256


def utf8_counts(text: str) -> list[int]:
    """Bytes per byte token, by hand: a character's bytes all count on its first byte."""
    return [n for ch in text for n in [len(ch.encode("utf-8"))] + [0] * (len(ch.encode("utf-8")) - 1)]


@pytest.mark.parametrize("kind", ["bytes", "hf-no-bos", "hf-adds-bos"])
def test_token_stream_frames_each_document_and_bytes_cover_the_text(kind):
    if kind == "bytes":
        tokenizer = bytes_tokenizer()
        # By hand: each document's UTF-8 bytes after an EOS (id 256), nothing after.
        pieces = [[256, *doc.text.encode("utf-8")] for doc in DOCS]
    else:
        tokenizer = from_transformers(train_tiny_tokenizer(add_bos=kind == "hf-adds-bos"))
        start = [tokenizer.bos_id] if kind == "hf-adds-bos" else []
        pieces = [[*start, *tokenizer.encode(doc.text), tokenizer.eos_id] for doc in DOCS]
    stream, byte_counts = tokenize_documents(tokenizer, DOCS, with_bytes=True)
    assert stream.tolist() == [t for piece in pieces for t in piece]
    if kind == "bytes":
        assert byte_counts.tolist() == [n for doc in DOCS for n in [0, *utf8_counts(doc.text)]]
    # Each document's tokens cover exactly its bytes; frame tokens cover none.
    per_document = np.split(byte_counts, np.cumsum([len(piece) for piece in pieces])[:-1])
    assert [int(part.sum()) for part in per_document] == [len(doc.text.encode("utf-8")) for doc in DOCS]
    frame = np.isin(stream, [tokenizer.eos_id, tokenizer.bos_id if tokenizer.bos_id is not None else -1])
    assert frame.sum() == len(DOCS) * (1 if kind != "hf-adds-bos" else 2)
    assert not byte_counts[frame].any()
    without_bytes, nothing = tokenize_documents(tokenizer, DOCS, with_bytes=False)
    assert nothing is None and without_bytes.tolist() == stream.tolist()


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


def test_cache_dir_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("NEXTTOKEN_CACHE", str(tmp_path / "env_cache"))
    dm = TextDataModule(path=[str(write_corpus(tmp_path / "corpus"))], tokenizer="bytes", block_size=8)
    dm.setup()
    assert dm.cache.directory.is_relative_to(tmp_path / "env_cache")
    assert not list(dm.cache.directory.glob(".*.tmp"))  # temp files were renamed into place


def test_default_cache_dir_is_under_home_without_the_variable(tmp_path, monkeypatch):
    monkeypatch.delenv("NEXTTOKEN_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / ".cache" / "nexttoken"
    monkeypatch.setenv("NEXTTOKEN_CACHE", "~/elsewhere")
    assert default_cache_dir() == tmp_path / "elsewhere"


def test_an_interrupted_build_leaves_nothing_behind(tmp_path, monkeypatch):
    corpus = write_corpus(tmp_path / "corpus")
    real_write = cache.write_atomically

    def crash_on_meta(path, data):
        if Path(path).name == "meta.json":
            raise OSError("disk full")
        return real_write(path, data)

    monkeypatch.setattr(cache, "write_atomically", crash_on_meta)
    with pytest.raises(OSError, match="disk full"):
        make_dm(tmp_path, corpus=corpus)
    # No entry, no staging folder, no lock file, not even the folders the build made.
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("*"))
    monkeypatch.setattr(cache, "write_atomically", real_write)
    dm = make_dm(tmp_path, corpus=corpus)
    assert dm.cache_hit is False and dm.cache.exists()
    meta = dm.cache.read_meta()
    val_text = dm.val_text_bytes()
    assert meta["val_bytes"] == len(val_text) == int(np.load(dm.cache.val_bytes).sum())
    assert meta["val_tokens"] == len(np.load(dm.cache.val)) == len(val_text) + meta["val_documents"]

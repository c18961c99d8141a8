import random
from pathlib import Path

import numpy as np
import pytest

import nexttoken.data.cache as cache
import nexttoken.data.documents as documents
from conftest import TINY_TEXT, split_documents, train_tiny_tokenizer
from nexttoken.data.cache import tokenize_documents
from nexttoken.data.corpus import Corpus
from nexttoken.data.datamodule import TextDataModule
from nexttoken.data.documents import Document, find_documents, split_text
from nexttoken.data.packing import concat_documents
from nexttoken.data.tokenizers import (
    Tokenizer,
    build_tokenizer,
    bytes_tokenizer,
    document_frame,
    from_transformers,
    load_local_tokenizer,
)
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
    # No entry, no staging folder, no lock file, not even the folders the build made; only the corpus
    # checks, complete before tokenizing began, stay (nexttoken.data.contamination).
    root = tmp_path / "cache"
    left = [p for p in root.rglob("*") if p.relative_to(root).parts[0] != "checks"] if root.exists() else []
    assert not left and all(
        (entry / "meta.json").is_file() for entry in root.glob("checks/*") if entry.is_dir()
    )
    monkeypatch.setattr(cache, "write_atomically", real_write)
    dm = make_dm(tmp_path, corpus=corpus)
    assert dm.cache_hit is False and dm.cache.exists()
    meta = dm.cache.read_meta()
    val_text = dm.val_text_bytes()
    assert meta["val_bytes"] == len(val_text) == int(np.load(dm.cache.val_bytes).sum())
    assert meta["val_tokens"] == len(np.load(dm.cache.val)) == len(val_text) + meta["val_documents"]


# --------------------------------------------------------------------------- long documents in pieces
def noisy_text(n: int, seed: int = 0) -> str:
    """Text that tries every boundary a pre-tokenizer may care about: runs of spaces, tabs, newlines
    and CRs, punctuation before newlines, contractions, digit runs, accents, CJK, emoji, no-break
    and ideographic spaces, control characters, the Metaspace marker."""
    rng = random.Random(seed)
    atoms = list("ab  \n\n\t.,'-!?é日本😀 1234567890\r") + [
        "  ",
        "'s",
        "'S",
        ".\n",
        "\u00a0",
        "\u3000",
        "\u2028",
        "\x1c",
        "\u2581",
        " word",
        "Word",
        " 12345",
    ]
    return "".join(rng.choice(atoms) for _ in range(n))


def real_text() -> str:
    return (TINY_TEXT + "\n\n") * 20 + noisy_text(3000)


# Llama 3's (GPT-4's cl100k) and Qwen2's pre-tokenizer patterns, and GPT-2's as a Split.
LLAMA3 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
QWEN2 = LLAMA3.replace(r"\p{N}{1,3}", r"\p{N}")
GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"


def trained_tokenizer(pre_tokenizer, *, model: str = "bpe", normalizer=None) -> Tokenizer:
    """A small tokenizer with this pre-tokenizer (and normalizer), trained on text like the tests'."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers, trainers

    if model == "bpe":
        hf = HFTokenizer(models.BPE())
        trainer = trainers.BpeTrainer(
            vocab_size=600,
            special_tokens=["</s>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
    else:
        hf = HFTokenizer(models.Unigram())
        trainer = trainers.UnigramTrainer(
            vocab_size=300, special_tokens=["</s>"], unk_token="</s>", show_progress=False
        )
    hf.pre_tokenizer = pre_tokenizer
    if normalizer is not None:
        hf.normalizer = normalizer
    hf.train_from_iterator([real_text(), noisy_text(20000, seed=1)], trainer)
    return Tokenizer(hf.to_str(), kind="hf", eos_token="</s>")


def tokenizer_of(kind: str) -> Tokenizer:
    from tokenizers import Regex, normalizers, pre_tokenizers

    def split_then_bytes(pattern: str):
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(pattern), "isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )

    if kind == "bytes":
        return bytes_tokenizer()
    if kind == "bpe":
        return build_tokenizer("bpe", [real_text(), noisy_text(20000, seed=1)], 600)
    if kind == "hf-gpt2":  # a transformers tokenizer (byte-level BPE, as GPT-2's and SmolLM2's)
        return from_transformers(train_tiny_tokenizer(add_bos=False))
    if kind == "llama3":
        return trained_tokenizer(split_then_bytes(LLAMA3))
    if kind == "qwen2":
        return trained_tokenizer(split_then_bytes(QWEN2), normalizer=normalizers.NFC())
    if kind == "gpt2-split-digits":
        pre = split_then_bytes(GPT2)
        return trained_tokenizer(
            pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), pre])
        )
    if kind == "bytelevel-prefix-space":
        return trained_tokenizer(pre_tokenizers.ByteLevel(add_prefix_space=True))
    if kind == "metaspace-unigram":
        return trained_tokenizer(pre_tokenizers.Metaspace(prepend_scheme="first"), model="unigram")
    raise ValueError(kind)


CUTTABLE = [
    "bytes",
    "bpe",
    "hf-gpt2",
    "llama3",
    "qwen2",
    "gpt2-split-digits",
    "bytelevel-prefix-space",
    "metaspace-unigram",
]


def in_parts(name: str, text: str, sizes: list[int]) -> list[tuple[bool, Document]]:
    """``text`` as consecutive parts of the given sizes (cycled), as a reader hands them on."""
    parts, start, i = [], 0, 0
    while start < len(text):
        parts.append(text[start : start + sizes[i % len(sizes)]])
        start += sizes[i % len(sizes)]
        i += 1
    return [(False, Document(name, part, None, n, n < len(parts) - 1)) for n, part in enumerate(parts)]


@pytest.mark.parametrize("kind", CUTTABLE)
def test_pieces_give_exactly_the_tokens_and_bytes_of_the_whole_text(kind):
    tokenizer = tokenizer_of(kind)
    cuts = cache.piece_cuts(tokenizer)
    assert cuts is not None and cuts.anywhere == (kind == "bytes")
    for text in (real_text(), noisy_text(6000, seed=2)):
        whole_stream, whole_bytes = tokenize_documents(tokenizer, [Document("d", text)], with_bytes=True)
        for piece_chars in (1, 7, 60):
            pieces = [
                d for _, d in cache._pieces(iter(in_parts("d", text, [5, 300, 1, 77])), piece_chars, cuts)
            ]
            assert "".join(p.text for p in pieces) == text
            assert [p.part for p in pieces] == list(range(len(pieces))) and not pieces[-1].more
            assert len(pieces) > len(text) // (piece_chars + 400)  # cut often, not once
            stream, byte_counts = tokenize_documents(tokenizer, pieces, with_bytes=True)
            assert stream.tolist() == whole_stream.tolist(), (kind, piece_chars)
            assert byte_counts.tolist() == whole_bytes.tolist(), (kind, piece_chars)


@pytest.mark.parametrize("kind", ["bpe", "hf-gpt2", "llama3", "metaspace-unigram"])
def test_cutting_anywhere_would_change_the_tokens(kind):
    """The texts above are ones on which a cut in the wrong place shows."""
    tokenizer = tokenizer_of(kind)
    text = real_text()
    pieces = [
        d for _, d in cache._pieces(iter([(False, Document("d", text))]), 60, cache.Cuts(anywhere=True))
    ]
    stream, _ = tokenize_documents(tokenizer, pieces, with_bytes=False)
    assert (
        stream.tolist() != tokenize_documents(tokenizer, [Document("d", text)], with_bytes=False)[0].tolist()
    )


def test_tokenizers_that_allow_no_cut_tokenize_each_document_whole():
    from tokenizers import normalizers, pre_tokenizers

    sentencepiece_like = trained_tokenizer(pre_tokenizers.Metaspace(prepend_scheme="always", split=False))
    whitespace = trained_tokenizer(pre_tokenizers.Whitespace())
    prepend = trained_tokenizer(
        pre_tokenizers.ByteLevel(add_prefix_space=False),
        normalizer=normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")]),
    )
    for tokenizer in (sentencepiece_like, whitespace, prepend):
        assert cache.piece_cuts(tokenizer) is None
    text = real_text()
    pieces = list(cache._pieces(iter(in_parts("d", text, [100])), 10, None))
    assert pieces == [(False, Document("d", text))]


@pytest.mark.slow
def test_smollm2_pieces_give_the_tokens_of_the_whole_text(smollm2_gguf):
    tokenizer = load_local_tokenizer(smollm2_gguf)
    cuts = cache.piece_cuts(tokenizer)
    assert cuts is not None and not cuts.anywhere
    for text in (real_text(), noisy_text(6000, seed=3)):
        pieces = [d for _, d in cache._pieces(iter([(False, Document("d", text))]), 30, cuts)]
        assert len(pieces) > 50
        stream, byte_counts = tokenize_documents(tokenizer, pieces, with_bytes=True)
        whole_stream, whole_bytes = tokenize_documents(tokenizer, [Document("d", text)], with_bytes=True)
        assert stream.tolist() == whole_stream.tolist() and byte_counts.tolist() == whole_bytes.tolist()
        assert stream[: len(stream) - 1].tolist() == tokenizer.encode(text)  # GPT-2 style: no BOS, an EOS


def expected_one_file_cache(path: Path, tokenizer: Tokenizer, val_fraction: float) -> dict:
    """The cache of a one-file corpus computed the plain way: the file read whole, split by
    split_text, each half encoded in one go."""
    document = Document(path.name, path.read_bytes().decode("utf-8"))
    train, val = split_text(document, val_fraction)
    before, after = document_frame(tokenizer)
    ids, counts = tokenizer.encode_with_bytes(val.text)
    frame = [0] * len(before), [0] * len(after)
    return {
        "train": [*before, *tokenizer.encode(train.text), *after],
        "val": [*before, *ids, *after],
        "val_bytes": [*frame[0], *counts, *frame[1]],
        "val_text": val.text.encode("utf-8"),
    }


@pytest.mark.parametrize("kind", ["bytes", "bpe", "hf-gpt2"])
def test_one_file_bigger_than_a_piece_gives_the_cache_of_the_whole_file(tmp_path, monkeypatch, kind):
    monkeypatch.setattr(cache, "PIECE_CHARS", 500)
    monkeypatch.setattr(documents, "READ_BYTES", 777)
    path = tmp_path / "corpus" / "one.txt"
    path.parent.mkdir()
    path.write_text(real_text() + noisy_text(5000, seed=4), encoding="utf-8")
    tokenizer = tokenizer_of(kind)
    corpus = Corpus([path], 0.15)
    expected = expected_one_file_cache(path, tokenizer, 0.15)
    pieces_made = []
    real_pieces = cache._pieces
    monkeypatch.setattr(cache, "_pieces", lambda *a: (pieces_made.append(p) or p for p in real_pieces(*a)))
    tokens = cache.TokenCache(tmp_path / "cache" / "one")
    meta, built = tokens.get_or_build(corpus, lambda: tokenizer, workers=0, progress=False)
    assert built and len(pieces_made) > path.stat().st_size // 1000  # in pieces of 500 characters
    assert np.load(tokens.train).tolist() == expected["train"]
    assert np.load(tokens.val).tolist() == expected["val"]
    assert np.load(tokens.val_bytes).tolist() == expected["val_bytes"]
    # The held-out part starts at exactly the byte split_text chooses.
    assert tokens.val_text.read_bytes() == expected["val_text"]
    assert path.read_bytes().endswith(expected["val_text"])
    assert (meta["train_documents"], meta["val_documents"]) == (1, 1)
    assert meta["train_text_bytes"] + meta["val_bytes"] == path.stat().st_size
    assert (meta["train_tokens"], meta["val_tokens"]) == (len(expected["train"]), len(expected["val"]))


def test_pieces_do_not_change_the_cache_of_documents_that_fit_one(tmp_path, monkeypatch):
    """Files that fit a piece, and the same files cut into pieces: the same cache, byte for byte."""
    corpus_folder = write_corpus(tmp_path / "corpus")
    corpus = Corpus(find_documents([corpus_folder]), 0.25)
    tokenizer = tokenizer_of("bpe")
    built = []
    for piece_chars, read_bytes in ((1 << 18, 1 << 20), (50, 97)):
        monkeypatch.setattr(cache, "PIECE_CHARS", piece_chars)
        monkeypatch.setattr(documents, "READ_BYTES", read_bytes)
        tokens = cache.TokenCache(tmp_path / "cache" / str(piece_chars))
        meta, _ = tokens.get_or_build(corpus, lambda: tokenizer, workers=0, progress=False)
        files = {name: (tokens.directory / name).read_bytes() for name in cache.STREAM_FILES}
        built.append((files, {k: v for k, v in meta.items() if k != "seconds"}))
    assert built[0] == built[1]

import json

import pytest
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from nexttoken.data.tokenizers import (
    CHATML_TEMPLATE,
    EOS_TOKEN,
    IM_END,
    IM_START,
    Tokenizer,
    build_tokenizer,
    document_start,
    token_byte_counts,
)
from nexttoken.errors import DataError

TRICKY = [
    "",
    "plain ascii",
    "  leading spaces and trailing   ",
    "héllo wörld, naïve café",
    "中文字符和日本語のテキスト",
    "emoji 👍🏽 family 👨‍👩‍👧 flag 🇫🇷",
    "combining e\u0301 a\u0308\u0301 marks",
    "lines\n\n\r\n\ttabs\n  indented\n",
    "literal <|endoftext|> in text",
    "\u200b zero width \ufeff bom",
    "def f(x):\n    return x ** 2  # comment\n",
]

TRAINING = [
    "def add(a, b):\n    return a + b\n",
    "héllo wörld, the quick brown fox jumps over the lazy dog\n" * 3,
    "中文字符 emoji 👍 combining e\u0301\n",
] * 4


@pytest.fixture(scope="module")
def bpe():
    return build_tokenizer("bpe", TRAINING, vocab_size=300)


@pytest.fixture(scope="module")
def metaspace_tokenizer_dir(tmp_path_factory):
    """A local HF tokenizer unlike ours: NFKC + Metaspace (SentencePiece style), a small word-level
    vocabulary with byte fallback, <s>/</s> special tokens and a BOS-adding post-processor."""
    words = ["▁the", "▁quick", "▁fox", "▁hello", "▁world", "▁", "e", "o", "l", "h", "▁w"]
    vocab = [("<unk>", 0.0), ("<s>", 0.0), ("</s>", 0.0)]
    vocab += [(f"<0x{b:02X}>", 0.0) for b in range(256)] + [(w, -1.0) for w in words]
    tok = HFTokenizer(models.Unigram(vocab, unk_id=0, byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace(Regex(" {2,}"), " ")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Metaspace()])
    tok.add_special_tokens([AddedToken("<s>", special=True), AddedToken("</s>", special=True)])
    from tokenizers import processors

    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    folder = tmp_path_factory.mktemp("hf_tok")
    tok.save(str(folder / "tokenizer.json"))
    return folder


def all_kinds(bpe, metaspace_tokenizer_dir):
    return [build_tokenizer("bytes"), bpe, build_tokenizer(str(metaspace_tokenizer_dir))]


def test_bytes_tokenizer_is_utf8_bytes_plus_eos_and_chat_markers():
    tok = build_tokenizer("bytes")
    assert tok.vocab_size == 259 and tok.eos_id == 256 and tok.bos_id is None
    assert (tok._token_id(IM_START), tok._token_id(IM_END)) == (257, 258)
    assert tok.special_ids == {256, 257, 258}
    for text in TRICKY:
        assert tok.encode(text) == list(text.encode("utf-8"))
        assert tok.decode(tok.encode(text)) == text
    assert tok.decode([tok.eos_id]) == EOS_TOKEN


def test_literal_special_token_text_is_plain_text(bpe):
    for tok in (build_tokenizer("bytes"), bpe):
        for token in (EOS_TOKEN, IM_START, IM_END):
            assert not set(tok.encode(f"a {token} b")) & tok.special_ids
            assert tok.decode(tok.encode(f"a {token} b")) == f"a {token} b"


def test_chat_markup_is_read_as_special_tokens_only_when_asked(bpe):
    text = f"{IM_START}user\nhi {EOS_TOKEN}{IM_END}\n"
    for tok in (build_tokenizer("bytes"), bpe):
        ids, offsets = tok.encode_with_offsets(text, parse_special=True)
        specials = [(i, offsets[k]) for k, i in enumerate(ids) if i in tok.special_ids]
        start, eos, end = (tok._token_id(t) for t in (IM_START, EOS_TOKEN, IM_END))
        assert specials == [(start, (0, 12)), (eos, (20, 33)), (end, (33, 43))]
        assert tok.decode(ids) == text
        assert tok.encode_with_offsets(text)[0] == tok.encode(text)  # documents: plain text


def test_bpe_trains_to_the_requested_size_and_roundtrips(bpe):
    assert bpe.kind == "bpe"
    assert 259 < bpe.vocab_size <= 300
    assert {bpe._token_id(t) for t in (EOS_TOKEN, IM_START, IM_END)} == bpe.special_ids
    assert bpe.eos_id == bpe._hf.token_to_id(EOS_TOKEN)
    text = "the quick brown fox"
    assert len(bpe.encode(text)) < len(text.encode())  # merges learned from the training text
    for text in TRICKY:  # every byte stays representable, even characters never seen in training
        assert bpe.decode(bpe.encode(text)) == text


def test_encode_batch_matches_encode(bpe):
    assert bpe.encode_batch(TRICKY) == [bpe.encode(t) for t in TRICKY]


def test_byte_counts_sum_to_text_bytes_for_every_kind(bpe, metaspace_tokenizer_dir):
    for tok in all_kinds(bpe, metaspace_tokenizer_dir):
        for text in TRICKY:
            ids, nbytes = tok.encode_with_bytes(text)
            assert ids == tok.encode(text)
            assert len(nbytes) == len(ids)
            assert all(n >= 0 for n in nbytes)
            if ids:
                assert sum(nbytes) == len(text.encode("utf-8")), (tok.kind, text)
        batch = tok.encode_batch_with_bytes(TRICKY)
        assert [b[0].tolist() for b in batch] == [tok.encode(t) for t in TRICKY]


def test_byte_counts_follow_tokens_for_byte_level(bpe):
    # Offsets are in characters, so a token holding part of a character is credited the whole
    # character (and the rest of it 0): credited bytes run at most one character ahead of the
    # bytes decoded so far, never behind.
    for tok in (build_tokenizer("bytes"), bpe):
        for text in TRICKY:
            ids, nbytes = tok.encode_with_bytes(text)
            credited = decoded = 0
            for i, n in zip(ids, nbytes, strict=True):
                credited += n
                decoded += len(tok._hf.id_to_token(i))  # one byte-level character per byte
                assert 0 <= credited - decoded <= 3, (text, ids)
            assert credited == decoded == len(text.encode())


def test_token_byte_counts_rules():
    # Gap (chars 1..2 not covered) goes to the following token; specials count 0; tail to last token.
    counts = token_byte_counts("a  bc", [(0, 1), (0, 0), (3, 4), (4, 4)], [0, 1, 0, 0])
    assert counts.tolist() == [1, 0, 3, 1]
    # Two tokens of one 4-byte character (byte fallback): the character is counted once.
    assert token_byte_counts("👍", [(0, 1), (0, 1)], [0, 0]).tolist() == [4, 0]


def test_metaspace_local_tokenizer(metaspace_tokenizer_dir):
    tok = build_tokenizer(str(metaspace_tokenizer_dir))
    assert tok.kind == "hf"
    assert tok.eos_id == 2 and tok.bos_id == 1
    assert tok.bos_id not in tok.encode("hello world")  # no special tokens added to documents
    ids, nbytes = tok.encode_with_bytes("hello  world")
    assert sum(nbytes) == len("hello  world")


def test_local_tokenizer_eos_from_config_and_file_path(tmp_path):
    hf = HFTokenizer(models.WordLevel({"[UNK]": 0, "a": 1, "[END]": 2}, unk_token="[UNK]"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    hf.add_special_tokens([AddedToken("[END]", special=True)])
    hf.enable_truncation(2)  # a model's context limit must not cut documents
    hf.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(DataError, match="no end-of-document token"):
        build_tokenizer(str(tmp_path))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "[END]"}}))
    tok = build_tokenizer(str(tmp_path / "tokenizer.json"))
    assert tok.eos_id == 2
    assert tok.encode("a a a a") == [1, 1, 1, 1]


def test_missing_or_broken_local_tokenizer_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="not 'bytes', 'bpe', or a local tokenizer.json"):
        build_tokenizer(str(tmp_path / "nope"))
    with pytest.raises(DataError, match="not 'bytes', 'bpe'"):
        build_tokenizer(str(tmp_path))  # a folder without tokenizer.json
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(DataError, match="not a readable tokenizer.json"):
        build_tokenizer(str(tmp_path))


def test_bpe_needs_text_and_a_sane_size():
    with pytest.raises(DataError, match="pass training_texts"):
        build_tokenizer("bpe")
    with pytest.raises(DataError, match="at least 259"):
        build_tokenizer("bpe", ["abc"], vocab_size=100)


def test_to_dict_roundtrip_is_json_and_identical(bpe, metaspace_tokenizer_dir):
    for tok in all_kinds(bpe, metaspace_tokenizer_dir):
        state = json.loads(json.dumps(tok.to_dict()))
        again = Tokenizer.from_dict(state)
        assert again.fingerprint == tok.fingerprint
        assert (again.kind, again.eos_id, again.bos_id, again.vocab_size) == (
            tok.kind,
            tok.eos_id,
            tok.bos_id,
            tok.vocab_size,
        )
        assert again.encode_batch(TRICKY) == tok.encode_batch(TRICKY)
        assert again.chat_template == tok.chat_template
    assert build_tokenizer("bytes").chat_template == bpe.chat_template == CHATML_TEMPLATE
    # A tokenizer stored before chat templates existed still loads (with none).
    old = {k: v for k, v in bpe.to_dict().items() if k != "chat_template"}
    assert Tokenizer.from_dict(old).chat_template is None
    with pytest.raises(DataError, match="another version"):
        Tokenizer.from_dict({"kind": "bpe"})


def test_bpe_is_cached_by_content_and_size(tmp_path, monkeypatch):
    first = build_tokenizer("bpe", TRAINING, vocab_size=280, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("bpe-*.json"))) == 1

    import nexttoken.data.tokenizers as module

    def no_training(*args, **kwargs):
        raise AssertionError("trained again despite the cache")

    monkeypatch.setattr(module, "train_bpe", no_training)
    again = build_tokenizer("bpe", iter(TRAINING), vocab_size=280, cache_dir=tmp_path)
    assert again.fingerprint == first.fingerprint
    # Different text or size is a different tokenizer, so it must be trained.
    with pytest.raises(AssertionError, match="trained again"):
        build_tokenizer("bpe", TRAINING + ["more"], vocab_size=280, cache_dir=tmp_path)
    with pytest.raises(AssertionError, match="trained again"):
        build_tokenizer("bpe", TRAINING, vocab_size=290, cache_dir=tmp_path)


def test_saved_tokenizer_loads_in_transformers(bpe, tmp_path):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    bpe.save(tmp_path)
    text = "héllo wörld 👍 def f(x):\n    return x"
    # transformers' default (add_special_tokens=True) starts the document as the model was trained.
    start = [document_start(bpe)]
    assert start == [bpe.eos_id]
    direct = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    assert direct(text)["input_ids"] == start + bpe.encode(text)
    assert direct(text, add_special_tokens=False)["input_ids"] == bpe.encode(text)
    auto = AutoTokenizer.from_pretrained(tmp_path)
    assert auto(text)["input_ids"] == start + bpe.encode(text)
    assert auto.eos_token_id == bpe.eos_id
    assert auto.decode(bpe.encode(text)) == text
    # ... and our own loader reads it back with the same tokens and the same document start.
    loaded = build_tokenizer(str(tmp_path))
    assert loaded.kind == "hf" and loaded.adds_bos
    assert loaded.encode(text) == bpe.encode(text) and document_start(loaded) == document_start(bpe)


def test_chat_template_is_saved_for_transformers_and_read_back(bpe, tmp_path):
    from transformers import AutoTokenizer

    bpe.save(tmp_path)
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["chat_template"] == CHATML_TEMPLATE
    messages = [{"role": "user", "content": "héllo"}, {"role": "assistant", "content": "wörld"}]
    auto = AutoTokenizer.from_pretrained(tmp_path)
    rendered = auto.apply_chat_template(messages, tokenize=False)
    assert rendered == f"{IM_START}user\nhéllo{IM_END}\n{IM_START}assistant\nwörld{IM_END}\n"
    ids = auto.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    assert ids == bpe.encode_with_offsets(rendered, parse_special=True)[0]
    assert build_tokenizer(str(tmp_path)).chat_template == CHATML_TEMPLATE
    # What transformers itself saves (chat_template.jinja) is read too.
    auto.chat_template = "{{ messages[0]['content'] }}"
    auto.save_pretrained(tmp_path / "again")
    assert build_tokenizer(str(tmp_path / "again")).chat_template == "{{ messages[0]['content'] }}"

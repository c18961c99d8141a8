"""Chat and instruction data for fit: the format choice, the record-level split, the example cache."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nexttoken.data.chat import (
    Conversation,
    Message,
    encode_conversations,
    encode_in_parallel,
    resolve_chat_template,
)
from nexttoken.data.corpus import Corpus
from nexttoken.data.documents import find_documents, held_out
from nexttoken.data.formats import choose_data_format
from nexttoken.data.sft import fit_to_block
from nexttoken.data.sft_cache import (
    ExampleSet,
    bpe_training_texts,
    get_or_build_examples,
    read_split_conversations,
)
from nexttoken.data.tokenizers import CHATML_TEMPLATE, IM_END, IM_START, build_tokenizer
from nexttoken.errors import DataError


def chat_record(i: int) -> dict:
    """Record ``i``: a question and its answer, every third one with a second turn."""
    messages = [
        {"role": "user", "content": f"What is {i} plus {i + 1}?"},
        {"role": "assistant", "content": f"{2 * i + 1}, since {i} + {i + 1} = {2 * i + 1}."},
    ]
    if i % 3 == 0:
        messages += [
            {"role": "user", "content": "Sure?"},
            {"role": "assistant", "content": "Yes." * (1 + i % 5)},
        ]
    return {"messages": messages, "id": i}


def write_chats(path: Path, n: int = 60, records=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = records if records is not None else [chat_record(i) for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def corpus_of(path: Path, val_fraction: float = 0.2) -> Corpus:
    return Corpus(find_documents(path), val_fraction)


# --------------------------------------------------------------------------- the format


def test_format_is_chosen_from_the_first_records_fields(tmp_path):
    chats = write_chats(tmp_path / "chats.jsonl", 3)
    assert choose_data_format([chats], "auto") == ("chat", "format: chat (auto: the records have 'messages')")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "a", "response": "b"}) + "\n")
    assert choose_data_format([prompts], "auto")[0] == "instruction"
    # Alpaca in Parquet without an 'input' column: the optional column is simply absent.
    alpaca = tmp_path / "alpaca.parquet"
    pq.write_table(pa.table({"instruction": ["Add 2 and 2."], "output": ["4"]}), alpaca)
    assert choose_data_format([alpaca], "auto") == (
        "instruction",
        "format: instruction (auto: the records have 'instruction' and 'output' (Alpaca))",
    )
    texts = tmp_path / "docs.jsonl"
    texts.write_text(json.dumps({"body": "some text"}) + "\n")
    assert choose_data_format([texts], "auto", text_field="body") == (
        "text",
        "format: text (auto: the records have 'body')",
    )
    plain = tmp_path / "a.txt"
    plain.write_text("plain text\n")
    assert choose_data_format([plain, chats], "auto") == (
        "chat",
        "format: chat (auto: the records have 'messages')",
    )
    assert choose_data_format([plain], "auto") == ("text", None)
    assert choose_data_format([chats], "text") == ("text", "format: text")


# --------------------------------------------------------------------------- the split


def test_records_split_by_the_corpus_rule_and_name_their_line(tmp_path):
    chats = write_chats(tmp_path / "data" / "chats.jsonl", 80)
    split = read_split_conversations(corpus_of(chats.parent), "chat")
    # The rule, computed independently: a hash of "path#index" below the fraction.
    expected_val = [i for i in range(80) if held_out(f"chats.jsonl#{i}", 0.2)]
    assert [int(c.where.rsplit(" ", 1)[1]) - 1 for c in split["val"]] == expected_val
    assert len(split["train"]) + len(split["val"]) == 80 and 5 <= len(split["val"]) <= 30
    first_val = expected_val[0]
    assert split["val"][0].messages[1].content == chat_record(first_val)["messages"][1]["content"]
    assert split["val"][0].where == f"{chats} line {first_val + 1}"


def test_a_saved_dataset_dicts_own_validation_split_is_the_held_out_set(tmp_path):
    import datasets

    rows = [chat_record(i) for i in range(12)]
    folder = tmp_path / "saved"
    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_list(rows[:9]),
            "validation": datasets.Dataset.from_list(rows[9:]),
        }
    ).save_to_disk(str(folder))
    split = read_split_conversations(Corpus(find_documents(folder), 0.5), "chat")
    assert [c.messages[0].content for c in split["val"]] == [r["messages"][0]["content"] for r in rows[9:]]
    assert len(split["train"]) == 9


def test_text_files_are_not_records_and_empty_splits_are_errors(tmp_path):
    chats = write_chats(tmp_path / "data" / "chats.jsonl", 3)
    (tmp_path / "data" / "notes.txt").write_text("hello\n")
    with pytest.raises(DataError, match=r"notes.txt is a text file, but this data is read as records"):
        read_split_conversations(corpus_of(chats.parent), "chat")
    (tmp_path / "data" / "notes.txt").unlink()
    with pytest.raises(DataError, match="no record fell into the validation split"):
        read_split_conversations(corpus_of(chats.parent, 0.01), "chat")


# --------------------------------------------------------------------------- the tokenizer


def test_a_bpe_trained_on_conversations_keeps_the_markers_whole(tmp_path):
    template = resolve_chat_template(build_tokenizer("bytes"))
    conversations = [
        Conversation([Message(**m) for m in chat_record(i)["messages"]], f"r{i}") for i in range(50)
    ]
    texts = bpe_training_texts(template, conversations, max_bytes=10**6)
    assert texts and not any(IM_START in t or IM_END in t for t in texts)
    assert "user\nWhat is 3 plus 4?" in texts  # the rendered text between the markers
    bpe = build_tokenizer("bpe", texts, vocab_size=400)
    vocab = bpe._hf.get_vocab(with_added_tokens=True)
    assert not [t for t in vocab if "im_" in t and t not in (IM_START, IM_END)]  # no merged marker pieces
    ids, _ = bpe.encode_with_offsets(f"{IM_START}user\nhi{IM_END}", parse_special=True)
    assert ids[0] == vocab[IM_START] and ids[-1] == vocab[IM_END]
    # The sample is bounded: a small budget keeps at most one text more than it holds.
    small = bpe_training_texts(template, conversations, max_bytes=200)
    assert 0 < sum(len(t) for t in small) < sum(len(t) for t in texts) / 5


def test_encoding_in_worker_processes_gives_the_same_examples():
    template = resolve_chat_template(build_tokenizer("bytes"))
    conversations = [
        Conversation([Message(**m) for m in chat_record(i)["messages"]], f"r{i}") for i in range(300)
    ]
    alone = encode_conversations(template, conversations)
    parallel = list(encode_in_parallel(template, conversations, "responses", workers=2))
    assert len(parallel) == len(alone)
    for a, b in zip(alone, parallel, strict=True):
        assert np.array_equal(a.tokens, b.tokens) and np.array_equal(a.scored, b.scored)
        assert np.array_equal(a.nbytes, b.nbytes) and a.where == b.where


# --------------------------------------------------------------------------- the example cache


def build(tmp_path: Path, chats: Path, **overrides):
    tokenizer = build_tokenizer("bytes")
    settings = dict(
        fmt="chat",
        template=resolve_chat_template(tokenizer),
        tokenizer=tokenizer,
        train_on="responses",
        block_size=64,
        truncation="left",
        vocab_size=300,
        bpe_sample_bytes=10**6,
        workers=0,
    )
    settings.update(overrides)
    return get_or_build_examples(tmp_path / "cache" / "examples" / "key", corpus_of(chats.parent), **settings)


def test_the_cache_holds_exactly_the_encoded_and_fitted_examples(tmp_path):
    chats = write_chats(tmp_path / "data" / "chats.jsonl", 60)
    data = build(tmp_path, chats)
    assert data.built and data.meta["data_format"] == "chat"
    # A second path: read, encode and fit by hand.
    split = read_split_conversations(corpus_of(chats.parent), "chat")
    template = resolve_chat_template(build_tokenizer("bytes"))
    for name, stored in (("train", data.train), ("val", data.val)):
        expected, report = fit_to_block(encode_conversations(template, split[name]), 64, "left")
        assert len(stored) == len(expected) == len(split[name])
        for a, b in zip(stored, expected, strict=True):
            assert a.tokens.tolist() == b.tokens.tolist() and a.scored.tolist() == b.scored.tolist()
            assert a.nbytes.tolist() == b.nbytes.tolist()
        assert data.counts(name).response_tokens == sum(e.n_scored for e in expected)
    assert data.fit_report().truncated > 0  # some conversations are longer than 64 tokens
    assert data.fit_report().lines()[0].endswith("examples are longer than 64 tokens: cut from the left")
    assert data.tokenizer.chat_template == CHATML_TEMPLATE
    # Found, not rebuilt; and it pickles as its folder (DataLoader workers open it themselves).
    again = build(tmp_path, chats)
    assert not again.built and again.meta == data.meta
    assert len(pickle.dumps(again.train)) < 500 and pickle.loads(pickle.dumps(again.train))[
        3
    ].tokens.tolist() == (data.train[3].tokens.tolist())
    assert np.array_equal(data.train.lengths(), [len(e) for e in data.train])


def test_a_bpe_is_trained_for_the_examples_and_carries_the_template(tmp_path):
    chats = write_chats(tmp_path / "data" / "chats.jsonl", 60)
    template_file = tmp_path / "template.jinja"
    template_file.write_text(CHATML_TEMPLATE.replace("'\\n'", "'\\n\\n'"))
    template = resolve_chat_template(build_tokenizer("bytes"), template_file)
    data = build(tmp_path, chats, tokenizer=None, template=template, vocab_size=320)
    assert data.tokenizer.kind == "bpe" and data.tokenizer.vocab_size <= 320
    assert data.tokenizer.chat_template == template.template  # what a checkpoint will sample with
    first = data.train[0]
    assert data.tokenizer.decode(first.tokens.tolist()).startswith(f"{IM_START}user\n\nWhat is")


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"messages": [{"role": "bot", "content": "hi"}]}, r"chats.jsonl line 7: message 0 has role 'bot'"),
        (
            {"messages": [{"role": "user", "content": 3}]},
            r"chats.jsonl line 7: the content of message 0 is int",
        ),
        ({"messages": [{"role": "user", "content": "hi"}]}, r"chats.jsonl line 7 has no assistant turn"),
    ],
)
def test_a_bad_record_is_named_and_leaves_nothing_behind(tmp_path, record, message):
    rows = [chat_record(i) for i in range(6)] + [record] + [chat_record(i) for i in range(7, 40)]
    chats = write_chats(tmp_path / "data" / "chats.jsonl", records=rows)
    with pytest.raises(DataError, match=message):
        build(tmp_path, chats)
    assert not (tmp_path / "cache").exists()  # no entry, no lock, no staging folder


def test_a_validation_split_with_nothing_to_score_is_an_error(tmp_path):
    chats = write_chats(tmp_path / "data" / "chats.jsonl", 60)
    with pytest.raises(DataError, match=r"(training|validation) split: none of the"):
        build(tmp_path, chats, block_size=4, truncation="drop")
    assert not (tmp_path / "cache").exists()


def test_example_set_reads_what_was_written(tmp_path):
    template = resolve_chat_template(build_tokenizer("bytes"))
    conversations = [
        Conversation([Message(**m) for m in chat_record(i)["messages"]], f"r{i}") for i in range(5)
    ]
    examples = encode_conversations(template, conversations)
    ExampleSet.write(tmp_path / "set", examples, vocab_size=259)
    stored = ExampleSet(tmp_path / "set")
    assert len(stored) == 5 and stored[-1].tokens.tolist() == examples[-1].tokens.tolist()
    assert [e.n_scored for e in stored] == [e.n_scored for e in examples]
    with pytest.raises(IndexError):
        stored[5]

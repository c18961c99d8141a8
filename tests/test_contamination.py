"""The corpus checks at the start of every fit: overlap of the held-out text with training (and
decontamination), exact duplicates in training (and dedup), and what starts a document, against
plain-Python computations on small corpora."""

import json
import random
import re
from pathlib import Path

import numpy as np
import pytest

from conftest import train_tiny_tokenizer
from nexttoken.data.chat import ChatTemplate, describe_document_start, resolve_chat_template
from nexttoken.data.contamination import TextHash, paragraphs, text_hash, word_byte_spans
from nexttoken.data.datamodule import TextDataModule
from nexttoken.data.tokenizers import build_tokenizer, from_transformers

VOCABULARY = [f"w{i}{chr(97 + i % 26)}" for i in range(300)]


def random_words(rng: random.Random, count: int) -> list[str]:
    return [rng.choice(VOCABULARY) for _ in range(count)]


def wrap(words: list[str], width: int = 40) -> str:
    """Words re-wrapped into lines of about ``width`` characters."""
    lines, line = [], ""
    for word in words:
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}" if line else word
    return "\n".join([*lines, line]) + "\n"


def make_dm(tmp_path: Path, path, **settings) -> TextDataModule:
    config = dict(
        tokenizer="bytes", block_size=8, batch_size=2, val_tokens="all", cache_dir=str(tmp_path / "cache")
    )
    dm = TextDataModule(
        path=[str(p) for p in path] if isinstance(path, list) else str(path), **config | settings
    )
    dm.prepare_data()
    dm.setup("fit")
    return dm


# --------------------------------------------------------------------------- a plain-Python reference
WORD = re.compile(r"[A-Za-z0-9]+")  # the test texts' words: ASCII letters and digits between anything else


def plain_overlap(train_texts: list[str], held_out: list[str], n: int):
    """``(units with overlap, covered words, words, covered UTF-8 bytes)`` by sets of word tuples; a run of
    covered words covers its text from its first word's first byte to its last word's last byte."""
    seen = set()
    for text in train_texts:
        words = [w.lower() for w in WORD.findall(text)]
        seen.update(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
    units = covered_words = all_words = covered_bytes = 0
    for text in held_out:
        matches = list(WORD.finditer(text))
        words = [m.group().lower() for m in matches]
        covered = [False] * len(words)
        for i in range(len(words) - n + 1):
            if tuple(words[i : i + n]) in seen:
                covered[i : i + n] = [True] * n
        all_words += len(words)
        covered_words += sum(covered)
        units += any(covered)
        i = 0
        while i < len(words):
            if covered[i]:
                j = i
                while j + 1 < len(words) and covered[j + 1]:
                    j += 1
                covered_bytes += len(text[matches[i].start() : matches[j].end()].encode("utf-8"))
                i = j + 1
            else:
                i += 1
    return units, covered_words, all_words, covered_bytes


@pytest.fixture
def corpus(tmp_path):
    """Training files and held-out files; held-out v1 holds a paragraph of t2 re-wrapped, upper-cased
    and in curly quotes, v3 exactly 13 words of t4, v4 only 12 words of t0 (not a 13-gram)."""
    rng = random.Random(0)
    train, val = tmp_path / "train", tmp_path / "val"
    train.mkdir()
    val.mkdir()
    train_words = [random_words(rng, 120) for _ in range(6)]
    for i, words in enumerate(train_words):
        (train / f"t{i}.txt").write_text(wrap(words, 70))
    held = [random_words(rng, 60) for _ in range(5)]
    copied = [w.upper() for w in train_words[2][30:55]]
    held[1] = held[1][:20] + copied + held[1][20:]
    held[3] = held[3][:10] + train_words[4][70:83] + held[3][10:]
    held[4] = held[4][:5] + train_words[0][10:22] + held[4][5:]
    texts = [wrap(words) for words in held]
    texts[1] = texts[1].replace(copied[0], "\u201c" + copied[0]).replace(copied[-1], copied[-1] + ",\u201d  ")
    for i, text in enumerate(texts):
        (val / f"v{i}.txt").write_text(text, encoding="utf-8")
    train_texts = [(train / f"t{i}.txt").read_text() for i in range(6)]
    return train, val, train_texts, texts


def test_overlap_line_matches_a_plain_set_of_word_tuples(tmp_path, corpus):
    train, val, train_texts, held = corpus
    dm = make_dm(tmp_path, train, val_path=[str(val)])
    units, covered, words, covered_bytes = plain_overlap(train_texts, held, 13)
    assert (units, len(held)) == (2, 5)  # v1 and v3; v4's 12 shared words are no 13-gram
    lines, numbers = dm.trust_report()
    overlap = numbers["overlap"]
    assert overlap["overlap_units"] == units and overlap["held_out_units"] == len(held)
    assert (overlap["overlap_words"], overlap["held_out_words"]) == (covered, words)
    # bytes tokenizer: one token per byte, plus the EOS that starts each held-out document (covers no text)
    held_out_tokens = sum(len(t.encode("utf-8")) for t in held) + len(held)
    assert overlap["held_out_tokens"] == held_out_tokens == dm.val_tokens
    assert overlap["overlap_tokens"] == covered_bytes
    share = covered_bytes / held_out_tokens
    assert lines[0].startswith(
        f"overlap: 2 of 5 held-out documents share 13-grams with training, {share:.1%} of held-out tokens"
    )
    assert any(line.startswith("warning:") and "data.decontaminate" in line for line in lines)
    # A second run reads the checks and the token share from the cache.
    again = make_dm(tmp_path, train, val_path=[str(val)])
    assert again.checks.cached and again.trust_report()[1]["overlap"]["overlap_tokens"] == covered_bytes


def test_decontaminate_drops_exactly_the_overlapping_documents(tmp_path, corpus):
    train, val, _, held = corpus
    plain = make_dm(tmp_path, train, val_path=[str(val)])
    clean = make_dm(tmp_path, train, val_path=[str(val)], decontaminate=True)
    kept = [held[i] for i in (0, 2, 4)]
    assert clean.val_text_bytes() == "".join(kept).encode("utf-8")
    dropped = [held[1], held[3]]
    assert plain.val_tokens - clean.val_tokens == sum(len(t.encode("utf-8")) + 1 for t in dropped)
    assert clean.cache.read_meta()["val_documents"] == 3
    lines, numbers = clean.trust_report()
    assert numbers["overlap"]["decontaminated"] == {
        "units": 2,
        "bytes": sum(len(t.encode()) for t in dropped),
    }
    assert any(line.startswith("decontaminate: dropped 2 held-out documents") for line in lines)
    keys = {
        plain._cache_key,
        clean._cache_key,
        make_dm(tmp_path, train, val_path=[str(val)], dedup=True)._cache_key,
    }
    assert len(keys) == 3
    other_n = make_dm(tmp_path, train, val_path=[str(val)], overlap_n=8)
    assert other_n.checks.key != plain.checks.key and other_n._cache_key == plain._cache_key
    assert (
        make_dm(tmp_path, train, val_path=[str(val)], overlap_n=8, decontaminate=True)._cache_key not in keys
    )


def test_one_file_corpus_counts_and_drops_held_out_paragraphs(tmp_path):
    rng = random.Random(1)
    paragraphs_ = [wrap(random_words(rng, 30)) for _ in range(40)]
    held_out_first = 36  # the last paragraphs are held out (val_fraction 0.1 of the bytes)
    copied = paragraphs_[38].split()[3:20]
    paragraphs_[5] = wrap(paragraphs_[5].split() + [w.upper() for w in copied], 25)
    book = tmp_path / "book.txt"
    book.write_text("\n".join(paragraphs_))
    plain = make_dm(tmp_path, book, val_fraction=0.1)
    val_text = plain.val_text_bytes().decode()
    units = [piece for piece in re.split(r"(?<=\n\n)", val_text) if piece]
    assert units[-2].split() == paragraphs_[38].split() and len(units) <= 40 - held_out_first + 1
    text = book.read_text()
    overlap_units, covered, _, covered_bytes = plain_overlap([text[: len(text) - len(val_text)]], units, 13)
    numbers = plain.trust_report()[1]["overlap"]
    assert (numbers["unit"], numbers["overlap_units"], numbers["overlap_words"]) == ("paragraph", 1, covered)
    assert numbers["held_out_units"] == len(units) and numbers["overlap_tokens"] == covered_bytes
    clean = make_dm(tmp_path, book, val_fraction=0.1, decontaminate=True)
    assert clean.val_text_bytes().decode() == "".join(u for u in units if u is not units[-2])
    assert plain.val_tokens - clean.val_tokens == len(units[-2].encode())


def test_dedup_counts_copies_after_normalisation_and_keeps_the_first(tmp_path):
    rng = random.Random(2)
    a, b, c = (" ".join(random_words(rng, 40)) + "\n" for _ in range(3))
    variant = "  " + wrap(a.upper().split(), 30).replace(" ", " , ", 3)  # case, wrapping, punctuation
    texts = {"d0": a, "d1": b, "d2": variant, "d3": c, "d4": a, "d5": b, "d6": "!!!\n", "d7": "???\n"}
    train, val = tmp_path / "train", tmp_path / "val"
    train.mkdir()
    val.mkdir()
    for name, text in texts.items():
        (train / f"{name}.txt").write_text(text)
    (val / "v.txt").write_text(wrap(random_words(rng, 40)))
    plain = make_dm(tmp_path, train, val_path=[str(val)])
    numbers = plain.trust_report()[1]["duplicates"]
    # d2 and d4 repeat d0, d5 repeats d1; d6 and d7 have no words and are never duplicates
    assert (numbers["duplicate_documents"], numbers["duplicated_texts"], numbers["train_documents"]) == (
        3,
        2,
        8,
    )
    assert plain.checks.duplicates.tolist() == [2, 4, 5]
    deduped = make_dm(tmp_path, train, val_path=[str(val)], dedup=True)
    meta = deduped.cache.read_meta()
    assert meta["train_documents"] == 5
    dropped = [texts["d2"], texts["d4"], texts["d5"]]
    assert plain.train_tokens - deduped.train_tokens == sum(len(t.encode()) + 1 for t in dropped)
    assert any(
        line.startswith("dedup: dropped 3 of 8 training documents, exact copies of an earlier one")
        for line in deduped.trust_report()[0]
    )
    assert deduped._cache_key != plain._cache_key


def test_text_hash_and_word_spans_do_not_depend_on_how_a_text_is_cut():
    text = "The  “Quick” brown\nfox — jumps; 'over' THE lazy dog…" * 50
    whole = text_hash(text)
    for size in (1, 7, 100):
        hashed = TextHash()
        pieces = [text[i : i + size] for i in range(0, len(text), size)]
        for i, piece in enumerate(pieces):
            hashed.update(piece, last=i == len(pieces) - 1)
        assert hashed.value() == whole
    assert text_hash(text.lower().replace("—", " ")) == whole and text_hash(text + " extra") != whole
    words = [m for m in re.finditer(r"[A-Za-z]+", text)]
    starts, ends = word_byte_spans(text, len(words))
    data = text.encode("utf-8")
    assert [data[s:e].decode() for s, e in zip(starts, ends)] == [m.group() for m in words]
    assert list(paragraphs(["a\n", "\nb\n\n\n", "c"])) == [(1, "a\n\n"), (3, "b\n\n\n"), (6, "c")]


# --------------------------------------------------------------------------- what starts a document
def test_document_start_line_for_each_kind_of_tokenizer():
    plain = build_tokenizer("bytes")
    start = describe_document_start(plain, resolve_chat_template(plain))
    assert start.line.startswith(
        "document start: <|endoftext|> (nexttoken's own tokenizers start each document"
    )
    assert (start.token_id, start.warning, start.double_bos) == (256, None, False)

    with_bos = from_transformers(train_tiny_tokenizer(add_bos=True))
    no_bos_template = ChatTemplate(
        with_bos, "{% for m in messages %}{{ m['content'] }}{{ eos_token }}{% endfor %}", "t"
    )
    start = describe_document_start(with_bos, no_bos_template)
    assert start.line == (
        "document start: <s> (the tokenizer's BOS; it adds one to every text; its chat template does not add one)"
    )
    assert start.warning is None and start.token_id == with_bos.bos_id == 0

    bos_template = ChatTemplate(with_bos, "{{ bos_token }}" + no_bos_template.template, "llama.jinja")
    start = describe_document_start(with_bos, bos_template)
    assert start.double_bos and start.template_writes_bos
    assert start.warning.startswith("warning: double BOS: the chat template (llama.jinja) writes <s>")
    # chat examples: their tokens are the rendered text's alone, so the template's own first token starts them
    chat = describe_document_start(with_bos, bos_template, chat_examples=True)
    assert (chat.token, chat.token_id, chat.double_bos) == ("<s>", 0, True)
    chatml = describe_document_start(plain, resolve_chat_template(plain), chat_examples=True)
    assert (
        chatml.token == "<|im_start|>"
        and "each example starts with what its chat template writes" in chatml.line
    )
    # the same template with a tokenizer that does not add its BOS: one BOS, no warning
    without = from_transformers(train_tiny_tokenizer(add_bos=False))
    start = describe_document_start(without, ChatTemplate(without, bos_template.template, "llama.jinja"))
    assert start.token is None and start.template_writes_bos and start.warning is None


def test_fit_report_json_has_the_checks(tmp_path, corpus):
    train, val, _, _ = corpus
    dm = make_dm(tmp_path, train, val_path=[str(val)])
    numbers = dm.trust_report()[1]
    json.dumps(numbers)  # report.json takes them as they are
    assert set(numbers) == {"overlap", "duplicates", "document_start"}
    assert np.isclose(
        numbers["overlap"]["overlap_word_fraction"], dm.checks.overlap_words / dm.checks.held_out_words
    )


def test_worker_processes_find_what_this_process_finds(tmp_path, corpus, monkeypatch):
    from nexttoken.data import contamination
    from nexttoken.data.corpus import Corpus
    from nexttoken.data.documents import find_documents

    train, val, _, _ = corpus
    for i in range(3):  # duplicates across jobs
        (train / f"z{i}.txt").write_text((train / "t1.txt").read_text().upper())
    monkeypatch.setattr(contamination, "_JOB_BYTES", 1000)  # a job per file or two
    source = Corpus(find_documents(train), 0.05, find_documents(val))
    alone, workers = (
        contamination.compute_checks(source, 13),
        contamination.compute_checks(source, 13, workers=2),
    )
    assert alone.meta() | {"seconds": 0} == workers.meta() | {"seconds": 0}
    assert alone.duplicates.tolist() == workers.duplicates.tolist() == [6, 7, 8]
    assert np.array_equal(alone.overlap_ranges, workers.overlap_ranges) and alone.overlap_units == 2


def test_decontaminating_every_held_out_document_is_an_error(tmp_path, corpus):
    from nexttoken.errors import DataError

    train, _, train_texts, _ = corpus
    copy = tmp_path / "copy" / "t0.txt"
    copy.parent.mkdir()
    copy.write_text(train_texts[0])
    with pytest.raises(DataError, match="every one of the 1 held-out documents shares 13-grams"):
        make_dm(tmp_path, train, val_path=[str(copy)], decontaminate=True)

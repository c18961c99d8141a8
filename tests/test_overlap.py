"""N-gram overlap (nexttoken.data.overlap) and `nexttoken overlap`: a copy is found whatever its
formatting, an edited copy is partial, an unrelated text is clean; the normalisation and the hashing
agree with plain, independent implementations."""

import json
import random
import textwrap
import unicodedata
from pathlib import Path

import pytest

from nexttoken.cli import main
from nexttoken.data import overlap
from nexttoken.data.documents import Document
from nexttoken.data.overlap import EvalNgrams, measure_overlap, normalize, words

DATA = Path(__file__).parents[1] / ".." / "shared" / "data"
SHAKESPEARE = DATA / "tinyshakespeare.txt"
WIKITEXT = DATA / "wikitext-2" / "test.txt"


# --------------------------------------------------------------------------- plain implementations
def plain_words(text: str) -> list[str]:
    """The normalisation, one character at a time from the Unicode categories."""
    text = unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", text).casefold())
    out = []
    for char in text:
        category = unicodedata.category(char)
        if category == "Cf":
            continue
        out.append(" " if category[0] in "PSZ" or category == "Cc" else char)
    return "".join(out).split()


def plain_covered(train_texts: list[str], eval_text: str, n: int) -> int:
    """Covered words of ``eval_text``: a set of word tuples, no hashing of ours."""
    train = set()
    for text in train_texts:
        tokens = plain_words(text)
        train.update(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))
    tokens = plain_words(eval_text)
    covered = [False] * len(tokens)
    for i in range(len(tokens) - n + 1):
        if tuple(tokens[i : i + n]) in train:
            covered[i : i + n] = [True] * n
    return sum(covered)


def plain_near_covered(train_texts: list[str], eval_text: str, n: int) -> int:
    """Covered words of ``eval_text`` when an n-gram may also differ from training's in its middle word."""
    middle = n // 2
    train = set()
    for text in train_texts:
        tokens = plain_words(text)
        for i in range(len(tokens) - n + 1):
            train.add(tuple(tokens[i : i + middle] + ["*"] + tokens[i + middle + 1 : i + n]))
    tokens = plain_words(eval_text)
    covered = [False] * len(tokens)
    for i in range(len(tokens) - n + 1):
        if tuple(tokens[i : i + middle] + ["*"] + tokens[i + middle + 1 : i + n]) in train:
            covered[i : i + n] = [True] * n
    return sum(covered)


def overlap_of_texts(train_texts: list[str], eval_texts: list[str], n: int):
    evaluation = EvalNgrams([Document(f"eval{i}", t) for i, t in enumerate(eval_texts)], n)
    return evaluation.result([evaluation.scan(Document(f"train{i}", t) for i, t in enumerate(train_texts))])


# --------------------------------------------------------------------------- normalisation
def test_normalisation_folds_case_typography_and_wrapping():
    assert normalize("“Don’t” — he said,\n  WELL-known\tﬁne\u00adly Café\u00a0!") == (
        "don t he said well known finely café"
    )
    assert words("a\u2028b\u3000c\x85d") == [b"a", b"b", b"c", b"d"]
    assert normalize("Straße") == "strasse"
    assert normalize("«quoted» ‘single’ „low“ – en — em") == "quoted single low en em"
    assert words(" \n\t ") == []


def test_normalisation_matches_a_per_character_implementation_on_random_text():
    alphabet = "abcXYZ019 \n\t.,;'\"-–—“”‘’«»éÉßﬁ\u00ad\u200b\u00a0\u2028ΣσΑ日本!?$€+=_()\u0301\u0915\u094d"
    rng = random.Random(0)
    for _ in range(300):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 80)))
        assert [w.decode() for w in words(text)] == plain_words(text), repr(text)
        ascii_text = "".join(chr(rng.randrange(0, 128)) for _ in range(60))  # the ASCII fast path
        assert [w.decode() for w in words(ascii_text)] == plain_words(ascii_text), repr(ascii_text)


# --------------------------------------------------------------------------- hashing
@pytest.mark.parametrize("n", [1, 3, 5, 13])
def test_hashed_ngrams_agree_with_a_set_of_word_tuples(n):
    rng = random.Random(n)
    vocabulary = ["the", "a", "cat", "Cat,", "sat", "on", "mat", "dog", "ran", "–", "“hi”"]
    for _ in range(20):
        train = [" ".join(rng.choices(vocabulary, k=rng.randrange(0, 400))) for _ in range(3)]
        evals = [" ".join(rng.choices(vocabulary[:6], k=rng.randrange(n, 200))) for _ in range(3)]
        result = overlap_of_texts(train, evals, n)
        for document, text in zip(result.documents, evals):
            assert document.eval_words == len(plain_words(text))
            assert document.overlap_words == plain_covered(train, text, n)
            # Near copies (the middle word changed) from n = 3 on: the words they add to the exact ones.
            near = plain_near_covered(train, text, n) if n >= 3 else document.overlap_words
            assert document.partial_words == near - document.overlap_words


# --------------------------------------------------------------------------- recall
def curly(text: str) -> str:
    """Typography as a word processor sets it: curly quotes, double spaces."""
    text = text.replace("'", "\u2019").replace(" ", "  ")
    return "\u201c" + text + "\u201d"


@pytest.fixture(scope="module")
def contaminated(tmp_path_factory):
    """A training corpus holding a re-wrapped, re-typeset copy of a held-out paragraph, and three
    evaluation documents: the paragraph, the paragraph edited every 10th word, an unrelated text."""
    text = SHAKESPEARE.read_text()
    start = text.index("\n\n", 700_000) + 2
    end = text.index("\n\n", start + 2500)
    paragraph = text[start:end]
    root = tmp_path_factory.mktemp("overlap")
    (root / "train").mkdir()
    (root / "train" / "shakespeare.txt").write_text(text[:start] + text[end:])
    (root / "train" / "copy.txt").write_text(curly(textwrap.fill(" ".join(paragraph.split()), 40)))
    (root / "eval").mkdir()
    (root / "eval" / "exact.txt").write_text(paragraph)
    tokens = paragraph.split()
    edited = [f"changed{i}" if i % 10 == 5 else token for i, token in enumerate(tokens)]
    (root / "eval" / "edited.txt").write_text(" ".join(edited))
    (root / "eval" / "unrelated.txt").write_text(WIKITEXT.read_text()[:20_000])
    return root


def by_name(result):
    return {d.name: d for d in result.documents}


def test_a_reformatted_copy_is_found_an_unrelated_text_is_clean(contaminated):
    result = by_name(measure_overlap(contaminated / "train", contaminated / "eval", workers=0))
    assert result["exact.txt"].overlap_fraction > 0.99
    assert result["exact.txt"].spans[0].train_document == "copy.txt"
    assert result["exact.txt"].spans[0].words == result["exact.txt"].eval_words
    assert result["unrelated.txt"].overlap_fraction == 0.0 and result["unrelated.txt"].eval_words > 2000
    # A word changed every 10 words leaves no 13 words in a row: exact 13-grams cannot see it, but
    # 13-grams with their middle word changed can, so the copy is partial, not clean.
    assert result["edited.txt"].overlap_fraction == 0.0
    assert result["edited.txt"].partial_fraction > 0.9 and result["edited.txt"].kind == "partial"
    assert result["exact.txt"].kind == "copied"
    assert result["unrelated.txt"].partial_fraction == 0.0 and result["unrelated.txt"].kind == "clean"


def test_unrelated_real_texts_share_nothing_not_even_near_copies():
    result = measure_overlap(SHAKESPEARE, DATA / "wikitext-2" / "valid.txt", workers=0)
    assert result.eval_words > 150_000
    assert result.overlap_words == 0 and result.partial_words == 0


def test_an_edited_copy_is_partial_below_the_gap_between_edits(contaminated):
    result = by_name(measure_overlap(contaminated / "train", contaminated / "eval", 8, workers=0))
    exact, edited = result["exact.txt"].overlap_fraction, result["edited.txt"].overlap_fraction
    assert 0.8 < edited < 0.95 < 0.99 < exact
    assert result["unrelated.txt"].overlap_fraction == 0.0


def test_workers_give_the_same_answer(contaminated):
    one = measure_overlap(contaminated / "train", contaminated / "eval", 8, workers=0).to_dict()
    two = measure_overlap(contaminated / "train", contaminated / "eval", 8, workers=2).to_dict()
    assert one == two


COPIED = "the quick brown fox jumps over the lazy dog " * 4


def large_file_with_a_copy(tmp_path) -> tuple[int, int]:
    """A 1.5 MB training file with ``COPIED`` wrapped at 20 characters starting 100 bytes before the
    first 1 MB read's end: ``(byte offset, line index)`` where it starts."""
    filler = [f"line {i} of filler text with number {i * 7919 % 10007}" for i in range(40_000)]
    offset, at = 0, 0
    while offset < (1 << 20) - 100:
        offset += len(filler[at]) + 1
        at += 1
    copy_lines = textwrap.wrap(COPIED, 20)
    assert offset < (1 << 20) < offset + len(COPIED)
    (tmp_path / "train.txt").write_text("\n".join(filler[:at] + copy_lines + filler[at:]))
    (tmp_path / "eval.txt").write_text("Before.\n" + COPIED.upper())
    return offset, at


def test_a_copy_across_the_read_boundary_of_a_large_file_is_found_at_its_line(tmp_path):
    offset, at = large_file_with_a_copy(tmp_path)
    copied = COPIED
    result = measure_overlap(tmp_path / "train.txt", tmp_path / "eval.txt", workers=0)
    span = result.documents[0].spans[0]
    assert result.overlap_words == len(copied.split()) == span.words
    assert (span.eval_line, span.train_document, span.train_line) == (2, "train.txt", at + 1)


def test_a_large_file_scanned_in_ranges_by_workers_gives_the_same_answer_and_lines(tmp_path, monkeypatch):
    offset, at = large_file_with_a_copy(tmp_path)
    one = measure_overlap(tmp_path / "train.txt", tmp_path / "eval.txt", workers=0).to_dict()
    # The first range is cut after the copy's second line: the copy spans two workers' ranges.
    monkeypatch.setattr(overlap, "_RANGE_BYTES", offset + 30)
    size = (tmp_path / "train.txt").stat().st_size
    ranges = overlap._line_ranges(tmp_path / "train.txt", size)
    assert len(ranges) >= 2 and any(offset < end < offset + len(COPIED) for _, end in ranges)
    two = measure_overlap(tmp_path / "train.txt", tmp_path / "eval.txt", workers=2).to_dict()
    assert one == two and one["train_documents"] == 1 and one["train_bytes"] == size
    assert one["longest_spans"][0]["train_line"] == at + 1


# --------------------------------------------------------------------------- the command
def test_the_command_prints_the_share_and_where(contaminated, capsys):
    assert (
        main(["overlap", str(contaminated / "train"), "--json", str(contaminated / "eval"), "--workers", "0"])
        == 0
    )
    report = json.loads(capsys.readouterr().out)
    assert {"overlap_fraction", "eval_words", "overlap_words", "documents"} <= set(report)
    assert len(report["documents"]) == 3 and 0 < report["overlap_fraction"] < 1
    assert main(["overlap", "--n", "8", str(contaminated / "train"), str(contaminated / "eval")]) == 0
    out = capsys.readouterr().out
    assert out.startswith("8-gram overlap: ") and "exact.txt:1 <- copy.txt:1" in out


@pytest.mark.parametrize(
    "args, message",
    [
        (["--n", "0"], "error: --n must be a whole number of words, 1 or more; got 0"),
        (["MISSING"], "error: TRAIN: path not found"),
        (["EMPTY"], "error: the evaluation text has no words; point EVAL at text"),
    ],
)
def test_bad_input_is_one_error_line(tmp_path, capfd, args, message):
    (tmp_path / "train.txt").write_text("some training text " * 10)
    (tmp_path / "empty.txt").write_text(" \n ")
    (tmp_path / "eval.txt").write_text("some evaluation text " * 10)
    train, evaluation = str(tmp_path / "train.txt"), str(tmp_path / "eval.txt")
    if args == ["MISSING"]:
        args, train = [], str(tmp_path / "missing")
    if args == ["EMPTY"]:
        args, evaluation = [], str(tmp_path / "empty.txt")
    capfd.readouterr()
    assert main(["overlap", train, evaluation, *args]) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(message)

import json
import random
import sysconfig
import warnings
from pathlib import Path

import pytest

import nexttoken.data.documents as documents
from conftest import split_documents
from nexttoken.data.documents import (
    Document,
    default_corpus,
    find_documents,
    iter_documents,
    load_documents,
    read_document,
    read_text_parts,
    record_text,
    split_text,
    split_text_file,
)
from nexttoken.errors import DataError, DataWarning


def write(path: Path, content: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_bytes(content.encode("utf-8"))
    return path


def make_corpus(root: Path, n: int = 20) -> list[Path]:
    return [write(root / f"sub{i % 3}" / f"doc{i:02d}.txt", f"document {i}\n" * (i + 1)) for i in range(n)]


def test_default_corpus_is_the_stdlib_source():
    files = default_corpus()
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    assert len(files) > 300
    relative = [f.relative_to(stdlib).as_posix() for f in files]
    assert relative == sorted(relative)  # deterministic order
    assert "os.py" in relative and "json/decoder.py" in relative
    for rel in relative:
        parts = rel.split("/")[:-1]
        assert not {"site-packages", "test", "tests", "idlelib", "lib2to3"} & set(parts), rel
        assert rel.endswith(".py")
    assert all(f.stat().st_size > 0 for f in files)
    json_only = default_corpus(include=["json/*"], exclude=["*/tool.py"])
    assert [f.relative_to(stdlib).as_posix() for f in json_only] == [
        r for r in relative if r.startswith("json/") and r != "json/tool.py"
    ]


def test_find_documents_recurses_sorts_and_dedupes(tmp_path):
    files = make_corpus(tmp_path / "c", 5)
    write(tmp_path / "c" / ".hidden" / "x.txt", "tooling")
    found = find_documents([tmp_path / "c", files[3], str(tmp_path / "c" / "sub0")])
    assert found == sorted(f.resolve() for f in files)
    assert find_documents(str(files[0])) == [files[0].resolve()]


def test_find_documents_include_exclude(tmp_path):
    write(tmp_path / "a.py", "x = 1\n")
    write(tmp_path / "pkg" / "b.py", "y = 2\n")
    write(tmp_path / "pkg" / "test_b.py", "assert y\n")
    write(tmp_path / "notes.md", "# notes\n")
    names = lambda found: sorted(p.relative_to(tmp_path.resolve()).as_posix() for p in found)  # noqa: E731
    assert names(find_documents([tmp_path], include=["*.py"])) == ["a.py", "pkg/b.py", "pkg/test_b.py"]
    assert names(find_documents([tmp_path], include=["*.py"], exclude=["test_*"])) == ["a.py", "pkg/b.py"]
    assert names(find_documents([tmp_path], exclude=["pkg/*"])) == ["a.py", "notes.md"]
    with pytest.raises(DataError, match="holds no text files matching include"):
        find_documents([tmp_path], include=["*.rs"])


def test_find_documents_errors(tmp_path):
    with pytest.raises(DataError, match="^path: path not found: .*missing"):
        find_documents([tmp_path / "missing"])
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(DataError, match="holds no text files"):
        find_documents([tmp_path / "empty_dir"])
    with pytest.raises(DataError, match="no paths given"):
        find_documents([])


def test_binary_file_is_skipped_with_a_warning(tmp_path):
    text = write(tmp_path / "a.txt", "hello\n")
    binary = write(tmp_path / "blob.bin", b"\x00\x01\x02" * 10)
    with pytest.warns(DataWarning, match="skipping binary file .*blob.bin"):
        assert find_documents([tmp_path]) == [text.resolve()]
    with pytest.raises(DataError, match="is a binary file"):
        find_documents([binary])
    with pytest.raises(DataError, match="is a binary file"):
        read_document(binary)


def test_read_document_keeps_exact_bytes(tmp_path):
    content = "a\r\nb\n\ufeffc 👍"
    path = write(tmp_path / "x.txt", content)
    assert read_document(path) == content
    assert read_document(path).encode() == path.read_bytes()


def test_invalid_utf8_names_file_offset_and_flag(tmp_path):
    path = write(tmp_path / "bad.txt", b"good text \xff\xfe more")
    with pytest.raises(DataError, match=r"bad.txt is not valid UTF-8 \(byte offset 10.*replace_invalid_utf8"):
        read_document(path)
    with pytest.warns(DataWarning, match="byte offset 10"):
        assert read_document(path, errors="replace") == "good text \ufffd\ufffd more"


def test_empty_files_are_skipped_but_an_all_empty_corpus_is_an_error(tmp_path):
    full = write(tmp_path / "full.txt", "text\n")
    empty = write(tmp_path / "empty.txt", "")
    with pytest.warns(DataWarning, match="skipping empty file .*empty.txt"):
        docs = load_documents([full, empty])
    assert docs == [Document("full.txt", "text\n")]
    with pytest.raises(DataError, match="empty.txt is empty"):
        load_documents([empty])


def test_split_is_stable_and_by_relative_path(tmp_path):
    train_a, val_a = split_documents(
        find_documents([make_corpus(tmp_path / "one", 40)[0].parent.parent]), 0.2
    )
    # Same files under another root (another machine): the same split.
    train_b, val_b = split_documents(
        find_documents([make_corpus(tmp_path / "two" / "deeper", 40)[0].parent.parent]), 0.2
    )
    assert [d.name for d in val_a] == [d.name for d in val_b]
    assert [d.name for d in train_a] == [d.name for d in train_b]
    assert {d.name for d in train_a}.isdisjoint(d.name for d in val_a)
    assert len(train_a) + len(val_a) == 40
    # Pinned: a salted hash() (or any per-process choice) would give another set in another process.
    assert sorted(d.name for d in val_a) == ["sub1/doc31.txt", "sub2/doc26.txt", "sub2/doc32.txt"]


def test_split_adding_a_file_moves_no_other_file(tmp_path):
    files = make_corpus(tmp_path, 30)
    _, val = split_documents(files, 0.3)
    write(tmp_path / "sub0" / "zz_new.txt", "new\n")
    _, val_more = split_documents(find_documents([tmp_path]), 0.3)
    assert {d.name for d in val} <= {d.name for d in val_more}


def test_split_keeps_at_least_one_document_each_way(tmp_path):
    files = make_corpus(tmp_path, 3)
    train, val = split_documents(files, 0.0001)
    assert len(val) == 1 and len(train) == 2
    train, val = split_documents(files, 0.9999)
    assert len(train) == 1 and len(val) == 2


def test_explicit_val_path_is_the_val_set(tmp_path):
    files = make_corpus(tmp_path / "train", 4)
    held = write(tmp_path / "val" / "held.txt", "held out\n")
    train, val = split_documents(files + [held], 0.5, val_paths=[held])
    assert [d.text for d in val] == ["held out\n"]
    assert len(train) == 4
    with pytest.raises(DataError, match="also in val_path"):
        split_documents([held], 0.5, val_paths=[held])


def test_bad_val_fraction(tmp_path):
    files = make_corpus(tmp_path, 3)
    for bad in (0.0, 1.0, -0.1):
        with pytest.raises(DataError, match="val_fraction must be between 0 and 1"):
            split_documents(files, bad)


def test_one_file_is_split_by_bytes_at_a_newline(tmp_path):
    lines = [f"line {i} ünïcødé 👍\n" for i in range(100)]
    path = write(tmp_path / "book.txt", "".join(lines))
    train, val = split_documents([path], 0.1)
    assert len(train) == len(val) == 1
    assert train[0].text + val[0].text == "".join(lines)
    assert train[0].text.endswith("\n")
    total = len(path.read_bytes())
    assert abs(len(val[0].text.encode()) - 0.1 * total) < 0.05 * total
    assert train[0].name != val[0].name


def test_split_text_without_newlines_cuts_at_a_character_boundary():
    text = "é" * 101  # two bytes per character, no newline anywhere
    for fraction in (0.01, 0.1, 0.333, 0.5, 0.9):
        train, val = split_text(Document("x", text), fraction)
        assert train.text + val.text == text and train.text and val.text


def test_one_tiny_file_cannot_be_split(tmp_path):
    with pytest.raises(DataError, match="too short"):
        split_documents([write(tmp_path / "a.txt", "x")], 0.1)


# --------------------------------------------------------------------------- reading in parts
def random_utf8(rng: random.Random, n: int, invalid: bool) -> bytes:
    """Text of 1- to 4-byte characters and newlines; ``invalid``: with stray, truncated and
    overlong sequences too."""
    atoms = [b"a", b" ", b"\n", "é".encode(), "日".encode(), "😀".encode()]
    if invalid:
        atoms += [b"\xff", b"\x80", b"\xe6\x97", b"\xf0\x9f\x98", b"\xc0\xaf", b"\xed\xa0\x80"]
    return b"".join(rng.choice(atoms) for _ in range(n))


def test_reading_in_parts_decodes_exactly_as_reading_whole(tmp_path, monkeypatch):
    rng = random.Random(0)
    for trial in range(60):
        data = random_utf8(rng, rng.randint(1, 300), invalid=trial % 2 == 1)
        path = write(tmp_path / f"t{trial}.txt", data)
        monkeypatch.setattr(documents, "READ_BYTES", rng.randint(1, 40))
        read = []
        if trial % 2 == 0:
            parts = list(read_text_parts(path, on_read=read.append))
            assert "".join(parts) == data.decode("utf-8")
        else:
            with pytest.raises(DataError) as error:
                list(read_text_parts(path))
            first_bad = next(i for i in range(len(data)) if not _decodes(data[: i + 1], data))
            try:
                data.decode("utf-8")
            except UnicodeDecodeError as e:
                assert f"byte offset {e.start}:" in str(error.value) and e.start <= first_bad
            with pytest.warns(DataWarning, match="replaced invalid UTF-8") as caught:
                parts = list(read_text_parts(path, "replace", on_read=read.append))
            assert len(caught) == 1  # one warning per file, naming the first bad byte
            assert "".join(parts) == data.decode("utf-8", errors="replace")
        assert sum(read) == len(data) and max(read) <= documents.READ_BYTES
        assert all(parts) and max(len(p) for p in parts) <= documents.READ_BYTES + 4


def _decodes(prefix: bytes, data: bytes) -> bool:
    """Whether ``prefix`` can start valid UTF-8 (it is valid up to a possibly incomplete end)."""
    try:
        prefix.decode("utf-8")
        return True
    except UnicodeDecodeError as e:
        return e.reason == "unexpected end of data"


@pytest.mark.parametrize("errors", ["strict", "replace"])
def test_a_file_split_in_parts_is_split_text_of_it_at_the_same_byte(tmp_path, monkeypatch, errors):
    rng = random.Random(1)
    for trial in range(80):
        data = random_utf8(rng, rng.randint(2, 400), invalid=errors == "replace" and trial % 3 == 0)
        if trial % 4 == 0:
            data = data.replace(b"\n", b"")  # no newline: cut at a character boundary
        path = write(tmp_path / f"t{trial}.txt", data)
        fraction = rng.choice([0.01, 0.1, 0.25, 0.5, 0.9])
        monkeypatch.setattr(documents, "READ_BYTES", rng.randint(1, 50))
        text = data.decode("utf-8", errors=errors)
        try:
            train, val = split_text(Document("t", text), fraction)
        except DataError:  # too short to split: so is the file
            with pytest.raises(DataError, match="too short"):
                list(split_text_file(path, "t", fraction, errors))
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DataWarning)
            halves = list(split_text_file(path, "t", fraction, errors))
        assert "".join(t for is_val, t in halves if not is_val) == train.text
        assert "".join(t for is_val, t in halves if is_val) == val.text
        assert [is_val for is_val, _ in halves] == sorted(is_val for is_val, _ in halves)  # train, then val


def test_text_files_come_in_parts_when_asked(tmp_path, monkeypatch):
    monkeypatch.setattr(documents, "READ_BYTES", 10)
    path = write(tmp_path / "a.txt", "0123456789" * 5 + "end")
    parts = list(iter_documents([path], parts=True))
    assert [(d.name, d.part, d.more) for d in parts] == [("a.txt", i, i < 5) for i in range(6)]
    assert "".join(d.text for d in parts) == path.read_text()
    assert list(iter_documents([path])) == [Document("a.txt", path.read_text())]


# --------------------------------------------------------------------------- records
def write_records(path: Path, rows: list[dict]) -> Path:
    return write(path, "".join(json.dumps(row) + "\n" for row in rows))


def test_find_documents_takes_record_files_and_saved_datasets_whole(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    text = write(tmp_path / "notes.txt", "plain text\n")
    jsonl = write_records(tmp_path / "sub" / "a.jsonl", [{"text": "x"}])
    parquet = tmp_path / "sub" / "b.parquet"
    pq.write_table(pa.table({"text": ["y"]}), parquet)  # binary, but a record file: not skipped
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["z"]})}).save_to_disk(
        str(tmp_path / "saved")
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "skipping binary file"
        found = find_documents([tmp_path])
    assert found == sorted(p.resolve() for p in (text, jsonl, parquet, tmp_path / "saved"))
    assert find_documents([tmp_path / "saved" / "train"]) == [(tmp_path / "saved" / "train").resolve()]


def test_iter_documents_is_one_stream_of_files_and_records(tmp_path):
    write(tmp_path / "a.txt", "file text\n")
    write_records(
        tmp_path / "b.jsonl",
        [{"body": {"text": "first"}}, {"body": {"text": ""}}, {"body": {"text": "third"}}],
    )
    paths = find_documents([tmp_path])
    with pytest.warns(DataWarning, match=r"b.jsonl: skipped 1 record\(s\) with an empty 'body.text'"):
        documents = list(iter_documents(paths, text_field="body.text"))
    assert documents == [
        Document("a.txt", "file text\n"),
        Document("b.jsonl#0", "first"),
        Document("b.jsonl#2", "third"),
    ]
    # nexttoken eval reads DATA through load_documents: records come as documents there too.
    with pytest.warns(DataWarning, match="skipped 1 record"):
        loaded = load_documents(find_documents([tmp_path / "b.jsonl"]), text_field="body.text")
    assert [d.text for d in loaded] == ["first", "third"]


def test_record_text_must_be_a_string_of_valid_unicode(tmp_path):
    for value, kind in ((42, "a number"), (None, "null"), (["a"], "a list"), ({"a": 1}, "an object")):
        with pytest.raises(
            DataError, match=rf"x.jsonl line 1: field 'text' is {kind}, not a string; point text_field at"
        ):
            record_text(value, "x.jsonl line 1", "text")
    # JSON can spell a lone surrogate, which no UTF-8 encodes.
    lone = json.loads('"ok \\ud800 and a pair \\ud83d\\udc4d"')
    with pytest.raises(DataError, match=r"lone surrogate \('\\ud800' at character 3\).*replace_invalid_utf8"):
        record_text(lone, "x.jsonl line 1", "text")
    assert record_text(lone, "w", "text", errors="replace") == "ok \ufffd and a pair 👍"

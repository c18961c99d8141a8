"""The record readers, on small real files written by the libraries themselves."""

import gzip
import json
import warnings
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from nexttoken.data.records import RecordSource, field_value, is_record_file, is_saved_dataset
from nexttoken.errors import DataError, DataWarning

ROWS = [
    {"id": 0, "text": "first record\n", "meta": {"title": "A", "body": "nested one"}},
    {"id": 1, "text": "zweiter Datensatz — ü\n", "meta": {"title": "B", "body": "nested two"}},
    {"id": 2, "text": "третий 👍\n", "meta": {"title": "C", "body": "nested three"}},
]


def jsonl_bytes(rows, blank_after_first: bool = False) -> bytes:
    lines = [json.dumps(r, ensure_ascii=False) for r in rows]
    if blank_after_first:
        lines.insert(1, "   ")
    return ("\n".join(lines) + "\n").encode("utf-8")


def write_json_formats(folder: Path, rows=ROWS) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    data = jsonl_bytes(rows)
    files = {
        "jsonl": folder / "a.jsonl",
        "gz": folder / "a.jsonl.gz",
        "zst": folder / "a.jsonl.zst",
        "array": folder / "a.json",
        "json_lines": folder / "lines.json",
    }
    files["jsonl"].write_bytes(data)
    files["gz"].write_bytes(gzip.compress(data))
    files["zst"].write_bytes(zstandard.ZstdCompressor().compress(data))
    files["array"].write_text(json.dumps(rows, indent=2, ensure_ascii=False), encoding="utf-8")
    files["json_lines"].write_bytes(data)
    return files


def read(path: Path, fields=("text",), **kwargs):
    return list(RecordSource(path, path.name).read(list(fields), **kwargs))


def test_formats_are_recognized_by_name(tmp_path):
    for name in ("a.jsonl", "a.JSONL", "a.json", "a.jsonl.gz", "a.json.zst", "a.parquet"):
        assert is_record_file(tmp_path / name), name
    for name in ("a.txt", "a.py", "a.gz", "a.parquet.gz", "jsonl"):
        assert not is_record_file(tmp_path / name), name


@pytest.mark.parametrize("kind", ["jsonl", "gz", "zst", "array", "json_lines"])
def test_every_json_format_gives_the_same_records(tmp_path, kind):
    path = write_json_formats(tmp_path)[kind]
    records = read(path, ["text", "meta.body"])
    assert [r.values["text"] for r in records] == [r["text"] for r in ROWS]
    assert [r.values["meta.body"] for r in records] == [r["meta"]["body"] for r in ROWS]
    assert [r.index for r in records] == [0, 1, 2]
    unit = "record" if kind == "array" else "line"
    assert records[2].where == f"{path} {unit} {3 if unit == 'line' else 2}"


def test_json_lines_count_blank_lines_and_report_bytes_read(tmp_path):
    path = tmp_path / "blank.jsonl.zst"
    path.write_bytes(zstandard.ZstdCompressor().compress(jsonl_bytes(ROWS, blank_after_first=True)))
    read_bytes = []
    records = read(path, on_read=read_bytes.append)
    assert [r.index for r in records] == [0, 2, 3]  # the blank line is line 2: no record, but counted
    assert sum(read_bytes) == path.stat().st_size  # progress is in bytes as stored


def test_select_skips_records_before_parsing(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_bytes(jsonl_bytes(ROWS) + b"{this line is never parsed\n")
    records = read(path, select=lambda index, split: index in (0, 2))
    assert [r.values["text"] for r in records] == [ROWS[0]["text"], ROWS[2]["text"]]


def test_field_paths():
    record = {"a": {"b": {"c": "deep"}}, "a.b": "flat key wins", "list": [1]}
    assert field_value(record, "a.b.c") == "deep"
    assert field_value(record, "a.b") == "flat key wins"
    with pytest.raises(KeyError, match=r"no field 'a.x' \('a' has: b\)"):
        field_value(record, "a.x")
    with pytest.raises(KeyError, match=r"no field 'nope' \(its fields: a, a.b, list\)"):
        field_value(record, "nope")
    with pytest.raises(KeyError, match="'list' is a list, not an object"):
        field_value(record, "list.x")


def test_several_fields_with_optional_ones(tmp_path):
    # The shape instruction data comes in (Alpaca: instruction, input, output; input may be absent).
    rows = [
        {"instruction": "Add.", "input": "2 + 2", "output": "4"},
        {"instruction": "Greet.", "output": "Hello."},
    ]
    path = tmp_path / "alpaca.jsonl"
    path.write_bytes(jsonl_bytes(rows))
    records = read(path, ["instruction", "output"], optional=["input"])
    assert [r.values for r in records] == [
        {"instruction": "Add.", "output": "4", "input": "2 + 2"},
        {"instruction": "Greet.", "output": "Hello.", "input": None},
    ]
    messages = tmp_path / "chat.jsonl"
    messages.write_bytes(jsonl_bytes([{"messages": [{"role": "user", "content": "hi"}]}]))
    assert read(messages, ["messages"])[0].values["messages"] == [{"role": "user", "content": "hi"}]


def test_parquet_shards_nested_columns_and_batches(tmp_path):
    n = 2500  # more than one Arrow batch and several row groups
    table = pa.table(
        {
            "text": [f"row {i}\n" for i in range(n)],
            "meta": [{"lang": "en", "n": i} for i in range(n)],
            "unused": list(range(n)),
        }
    )
    path = tmp_path / "shard.parquet"
    pq.write_table(table, path, row_group_size=700)
    read_bytes = []
    records = read(path, ["text", "meta.n"], on_read=read_bytes.append)
    assert [r.values["text"] for r in records] == table.column("text").to_pylist()
    assert [r.values["meta.n"] for r in records] == list(range(n))
    assert [r.index for r in records] == list(range(n))
    assert records[5].where == f"{path} row 5"
    assert sum(read_bytes) == path.stat().st_size
    picked = read(path, select=lambda index, split: index % 1000 == 999)
    assert [r.values["text"] for r in picked] == ["row 999\n", "row 1999\n"]


def test_saved_dataset_and_dataset_dict(tmp_path):
    import datasets

    rows = {"text": [r["text"] for r in ROWS], "meta": [r["meta"] for r in ROWS]}
    dataset = datasets.Dataset.from_dict(rows)
    dataset.save_to_disk(str(tmp_path / "one"))
    datasets.DatasetDict({"train": dataset, "validation": dataset.select([2])}).save_to_disk(
        str(tmp_path / "dd")
    )
    assert is_saved_dataset(tmp_path / "one") and is_saved_dataset(tmp_path / "dd")
    assert is_saved_dataset(tmp_path / "dd" / "train") and not is_saved_dataset(tmp_path)

    one = RecordSource(tmp_path / "one", "one")
    assert one.splits() is None
    assert [r.values["meta.title"] for r in one.read(["meta.title"])] == ["A", "B", "C"]
    assert one.record_name(2) == "one#2"

    dd = RecordSource(tmp_path / "dd", "dd")
    assert dd.splits() == ["train", "validation"]
    records = list(dd.read(["text"]))
    assert [(r.split, r.index) for r in records] == [
        ("train", 0),
        ("train", 1),
        ("train", 2),
        ("validation", 0),
    ]
    assert records[3].values["text"] == ROWS[2]["text"]
    assert dd.record_name(0, "validation") == "dd/validation#0"
    only = list(dd.read(["text"], splits=["validation"]))
    assert [r.split for r in only] == ["validation"]


# --------------------------------------------------------------------------- bad input
def test_malformed_json_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(jsonl_bytes(ROWS[:2]) + b'{"text": "unterminated\n' + jsonl_bytes(ROWS[2:]))
    with pytest.raises(
        DataError, match=r"bad.jsonl line 3 is not valid JSON \(.*column \d+\); fix or remove"
    ):
        read(path)
    array = tmp_path / "bad.json"
    array.write_text('[{"text": "a"},\n {"text": }]')
    with pytest.raises(DataError, match=r"bad.json is not valid JSON \(line 2 column \d+"):
        read(array)


def test_record_without_the_field_names_the_fields_it_has(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_bytes(jsonl_bytes(ROWS))
    with pytest.raises(
        DataError,
        match=r"a.jsonl line 1 has no field 'content' \(its fields: id, text, meta\); name the field with",
    ):
        read(path, ["content"])
    with pytest.raises(DataError, match=r"line 1 has no field 'meta.author' \('meta' has: title, body\)"):
        read(path, ["meta.author"])


def test_line_that_is_not_an_object(tmp_path):
    path = tmp_path / "strings.jsonl"
    path.write_text('"just a string"\n')
    with pytest.raises(DataError, match="strings.jsonl line 1 is a string, not a JSON object"):
        read(path)


@pytest.mark.parametrize("compression", ["gz", "zst"])
def test_truncated_compressed_file(tmp_path, compression):
    data = jsonl_bytes(ROWS * 2000)
    packed = gzip.compress(data) if compression == "gz" else zstandard.ZstdCompressor().compress(data)
    path = tmp_path / f"cut.jsonl.{compression}"
    path.write_bytes(packed[: len(packed) // 2])
    with pytest.raises(DataError, match=rf"cut.jsonl.{compression} is truncated or corrupt .*re-create"):
        read(path)


def test_invalid_utf8_in_a_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(jsonl_bytes(ROWS[:1]) + '{"text": "café"}\n'.encode("latin-1"))
    with pytest.raises(
        DataError, match=r"latin1.jsonl line 2 is not valid UTF-8 \(byte offset 13: .*replace_invalid_utf8"
    ):
        read(path)
    with pytest.warns(
        DataWarning,
        match=r"latin1.jsonl: replaced invalid UTF-8 with U\+FFFD on 1 line\(s\) \(first: line 2\)",
    ):
        records = read(path, errors="replace")
    assert records[1].values["text"] == "caf\ufffd"


def test_bad_parquet_files(tmp_path):
    empty = tmp_path / "empty.parquet"
    empty.write_bytes(b"")
    with pytest.raises(DataError, match=r"empty.parquet is not a readable Parquet file \(.*0 bytes"):
        read(empty)
    schemaless = tmp_path / "schemaless.parquet"
    pq.write_table(pa.table({}), schemaless)
    with pytest.raises(DataError, match=r"schemaless.parquet has no columns"):
        read(schemaless)
    other = tmp_path / "other.parquet"
    pq.write_table(pa.table({"content": ["x"], "id": [1]}), other)
    with pytest.raises(
        DataError, match=r"other.parquet has no column 'text' \(its columns: content, id\); name it with"
    ):
        read(other)
    not_parquet = tmp_path / "fake.parquet"
    not_parquet.write_text("this is text, not parquet\n" * 10)
    with pytest.raises(DataError, match="fake.parquet is not a readable Parquet file"):
        read(not_parquet)


def test_dataset_folder_from_an_incompatible_version(tmp_path):
    import datasets

    folder = tmp_path / "future"
    datasets.Dataset.from_dict({"text": ["a", "b"]}).save_to_disk(str(folder))
    # A feature type this version of datasets does not know, as a newer version may write.
    info = json.loads((folder / "dataset_info.json").read_text())
    info["features"]["text"]["_type"] = "TextV9"
    (folder / "dataset_info.json").write_text(json.dumps(info))
    with pytest.raises(
        DataError,
        match=rf"future is a saved dataset that datasets {datasets.__version__} cannot read \(Feature type 'TextV9'.*re-save it",
    ):
        read(folder)


def test_no_warnings_on_good_files(tmp_path):
    files = write_json_formats(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for path in files.values():
            read(path)


def test_an_absent_optional_column_is_a_missing_field(tmp_path):
    # Alpaca's 'input' is optional: a Parquet file (or saved dataset) without that column reads as
    # records without the field; a required column that is absent is still an error.
    path = tmp_path / "alpaca.parquet"
    pq.write_table(pa.table({"instruction": ["Add.", "Greet."], "output": ["4", "Hello."]}), path)
    records = list(RecordSource(path, "alpaca.parquet").read(["instruction", "output"], optional=["input"]))
    assert [r.values for r in records] == [
        {"instruction": "Add.", "output": "4", "input": None},
        {"instruction": "Greet.", "output": "Hello.", "input": None},
    ]
    with pytest.raises(DataError, match="has no column 'input'"):
        list(RecordSource(path, "alpaca.parquet").read(["input"]))

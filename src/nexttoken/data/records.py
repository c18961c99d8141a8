"""Records: the rows of JSON Lines, JSON, Parquet files and saved ``datasets`` folders, read as a
stream with the named fields asked for.

Formats (by name): ``.jsonl`` (one JSON object per line), ``.json`` (an array of objects, or JSON
Lines as ``datasets.Dataset.to_json`` writes them), each optionally compressed (``.gz``, ``.zst``);
``.parquet``; and a folder written by ``datasets.Dataset.save_to_disk`` or
``DatasetDict.save_to_disk`` (its splits come with each record). The readers are the libraries'
own: pyarrow for Parquet and for decompression, ``datasets`` for saved folders, ``json`` per line.

A record is asked for by field paths: ``"text"``, or ``"meta.body"`` for a nested field (a key that
itself contains the dots wins). :func:`read_records` streams ``Record``s holding those fields, one
source at a time, never the whole file (a ``.json`` array is the exception: JSON has no record
boundaries to stream by, so prefer JSON Lines for large corpora). Every error names the file and the
line (or row) and says what to do.
"""

from __future__ import annotations

import io
import json
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nexttoken.errors import DataError, DataWarning, setting

# Suffixes (before an optional compression suffix) of the record formats.
JSON_SUFFIXES = (".jsonl", ".json")
COMPRESSION_SUFFIXES = {".gz": "gzip", ".zst": "zstd"}
PARQUET_SUFFIX = ".parquet"
# The files ``save_to_disk`` writes: a DatasetDict lists its splits; a Dataset has a state and info.
DATASET_DICT_FILE = "dataset_dict.json"
DATASET_FILES = ("state.json", "dataset_info.json")
# Rows converted to Python per Arrow batch: big enough to amortize the call, small enough to stream.
ARROW_BATCH_ROWS = 1024
_READ_BUFFER = 1 << 20


def decode_utf8(data: bytes, where: str, errors: str = "strict", warn: bool = True) -> tuple[str, int | None]:
    """``(text, offset)``: ``data`` decoded as UTF-8 exactly, and the byte offset of its first invalid
    UTF-8 (None when there is none). Invalid UTF-8 is an error naming ``where`` and the offset; with
    ``errors="replace"`` the bad bytes become U+FFFD, with a warning unless ``warn`` is False."""
    if errors not in ("strict", "replace"):
        raise ValueError(f"errors must be 'strict' or 'replace', got {errors!r}")
    try:
        return data.decode("utf-8"), None
    except UnicodeDecodeError as e:
        if errors == "strict":
            raise DataError(
                f"{where} is not valid UTF-8 (byte offset {e.start}: {e.reason}); convert it to UTF-8, or "
                f"pass {setting('data.replace_invalid_utf8')} true to replace bad bytes with U+FFFD"
            ) from None
        if warn:
            warnings.warn(
                f"{where}: replaced invalid UTF-8 starting at byte offset {e.start} with U+FFFD",
                DataWarning,
                stacklevel=3,
            )
        return data.decode("utf-8", errors="replace"), e.start


def is_record_file(path: Path) -> bool:
    """True for a file the record readers handle (by its name)."""
    name = path.name.lower()
    for suffix in COMPRESSION_SUFFIXES:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return name.endswith(JSON_SUFFIXES) or (name.endswith(PARQUET_SUFFIX) and name == path.name.lower())


def is_saved_dataset(folder: Path) -> bool:
    """True for a folder written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk``."""
    return (folder / DATASET_DICT_FILE).is_file() or all((folder / f).is_file() for f in DATASET_FILES)


@dataclass(frozen=True)
class Record:
    """One record's requested fields.

    Attributes:
        index: the record's position in its source: the line index (from 0) for JSON Lines, the
            element of a JSON array, the row of a Parquet file or a dataset split.
        where: the record for messages, e.g. ``"corpus/a.jsonl line 18"``.
        values: each requested field path -> its value (None for a missing optional field).
        split: the split of a saved ``DatasetDict`` the record belongs to (None elsewhere).
    """

    index: int
    where: str
    values: dict[str, Any]
    split: str | None = None


def field_value(record: Mapping[str, Any], path: str) -> Any:
    """The value at ``path`` (``"a.b.c"`` for nested fields; an exact key with dots wins).

    Raises ``KeyError`` whose argument is a message naming the fields that were there.
    """
    if path in record:
        return record[path]
    value: Any = record
    walked: list[str] = []
    for part in path.split("."):
        if not isinstance(value, Mapping) or part not in value:
            if isinstance(value, Mapping):
                where = f"'{'.'.join(walked)}' has:" if walked else "its fields:"
                raise KeyError(f"no field {path!r} ({where} {', '.join(map(str, value)) or 'none'})")
            raise KeyError(f"no field {path!r} ('{'.'.join(walked)}' is {json_kind(value)}, not an object)")
        value = value[part]
        walked.append(part)
    return value


def json_kind(value: Any) -> str:
    """A JSON-ish name for a value's type, for messages: "a string", "null", "a list", ..."""
    names = {str: "a string", bool: "a boolean", int: "a number", float: "a number", list: "a list"}
    if value is None:
        return "null"
    if isinstance(value, Mapping):
        return "an object"
    return names.get(type(value), f"a {type(value).__name__}")


# --------------------------------------------------------------------------- sources
class RecordSource:
    """One file of records or one saved dataset folder.

    Args:
        path: the file or folder.
        name: its name relative to the corpus root (records are named ``f"{name}#{index}"``).
    """

    def __init__(self, path: Path, name: str) -> None:
        self.path = path
        self.name = name
        if path.is_dir():
            self.kind = "dataset"
        elif path.name.lower().endswith(PARQUET_SUFFIX):
            self.kind = "parquet"
        else:
            self.kind = "json"

    def splits(self) -> list[str] | None:
        """The splits of a saved ``DatasetDict`` (in its own order), else None."""
        if self.kind != "dataset" or not (self.path / DATASET_DICT_FILE).is_file():
            return None
        return list(_load_dataset(self.path).keys())

    def record_name(self, index: int, split: str | None = None) -> str:
        """The stable name of a record: its source's relative path, split and index."""
        return f"{self.name}/{split}#{index}" if split is not None else f"{self.name}#{index}"

    def read(
        self,
        fields: Sequence[str],
        *,
        optional: Sequence[str] = (),
        splits: Sequence[str] | None = None,
        select: Callable[[int, str | None], bool] | None = None,
        errors: str = "strict",
        on_read: Callable[[int], None] | None = None,
        field_setting: str = "data.text_field",
    ) -> Iterator[Record]:
        """Stream the records, each with ``fields`` (required) and ``optional`` fields.

        Args:
            splits: for a saved ``DatasetDict``, the splits to read, in that order (None: all).
            select: ``select(index, split)`` decides before a record is parsed whether it is wanted.
            errors: ``"strict"`` (invalid UTF-8 is an error) or ``"replace"`` (U+FFFD, one warning).
            on_read: called with the number of source bytes (as stored) read since the last call.
            field_setting: the setting that names the fields, for error messages.
        """
        wanted = list(dict.fromkeys([*fields, *optional]))
        reader = {"json": self._read_json, "parquet": self._read_parquet, "dataset": self._read_dataset}
        for index, split, where, record in reader[self.kind](
            wanted, splits, select, errors, on_read or (lambda n: None), field_setting, optional
        ):
            values = {}
            for path in wanted:
                try:
                    values[path] = field_value(record, path)
                except KeyError as missing:
                    if path in optional:
                        values[path] = None
                        continue
                    raise DataError(
                        f"{where} has {missing.args[0]}; name the field with {setting(field_setting)}"
                    ) from None
            yield Record(index, where, values, split)

    # ------------------------------------------------------------------ JSON
    def _read_json(self, wanted, splits, select, errors, on_read, field_setting, optional):
        import pyarrow as pa

        compression = COMPRESSION_SUFFIXES.get(self.path.suffix.lower())
        with pa.OSFile(str(self.path), "r") as raw:
            # pyarrow's decompressing stream reports a truncated .gz or .zst as an error;
            # zstandard's stream_reader would end quietly at the cut.
            stream = pa.CompressedInputStream(raw, compression) if compression else raw
            reader = io.BufferedReader(stream, _READ_BUFFER)
            position = 0

            def advance() -> None:
                nonlocal position
                now = raw.tell()
                on_read(now - position)
                position = now

            try:
                first = reader.peek(_READ_BUFFER).lstrip()[:1]
                if first == b"[":
                    yield from self._json_array(reader, select, errors)
                else:
                    yield from self._json_lines(reader, select, errors, advance)
            except OSError as e:  # pyarrow: "Truncated compressed stream", bad zstd/gzip data
                raise DataError(
                    f"{self.path} is truncated or corrupt ({e}); re-create or re-download it"
                ) from None
            advance()

    def _json_lines(self, reader, select, errors, advance):
        replaced: list[int] = []
        for index, line in enumerate(reader):
            if index % 1024 == 0:
                advance()
            if not line.strip() or (select is not None and not select(index, None)):
                continue
            where = f"{self.path} line {index + 1}"
            text, bad = decode_utf8(line, where, errors, warn=False)
            if bad is not None:
                replaced.append(index + 1)
            try:
                record = json.loads(text)
            except json.JSONDecodeError as e:
                raise DataError(
                    f"{where} is not valid JSON ({e.msg} at column {e.colno}); fix or remove that line"
                ) from None
            if not isinstance(record, Mapping):
                raise DataError(f"{where} is {json_kind(record)}, not a JSON object with named fields")
            yield index, None, where, record
        if replaced:
            warnings.warn(
                f"{self.path}: replaced invalid UTF-8 with U+FFFD on {len(replaced)} line(s) (first: line "
                f"{replaced[0]})",
                DataWarning,
                stacklevel=4,
            )

    def _json_array(self, reader, select, errors):
        data = reader.read()
        text, _ = decode_utf8(data, str(self.path), errors)
        del data
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(
                f"{self.path} is not valid JSON (line {e.lineno} column {e.colno}: {e.msg}); fix the file"
            ) from None
        del text
        for index, record in enumerate(records):
            if select is not None and not select(index, None):
                continue
            where = f"{self.path} record {index}"
            if not isinstance(record, Mapping):
                raise DataError(f"{where} is {json_kind(record)}, not a JSON object with named fields")
            yield index, None, where, record

    # ------------------------------------------------------------------ Parquet
    def _read_parquet(self, wanted, splits, select, errors, on_read, field_setting, optional):
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            parquet = pq.ParquetFile(self.path)
        except (pa.ArrowException, OSError) as e:
            raise DataError(
                f"{self.path} is not a readable Parquet file ({_first_line(e)}); re-create or re-download it"
            ) from None
        with parquet:
            columns = _top_level_columns(
                wanted, parquet.schema_arrow.names, str(self.path), field_setting, optional
            )
            size = self.path.stat().st_size
            rows = max(parquet.metadata.num_rows, 1)
            done = 0
            try:
                batches = parquet.iter_batches(batch_size=ARROW_BATCH_ROWS, columns=columns)
                for batch in batches:
                    yield from self._arrow_rows(batch, done, None, f"{self.path} row", select)
                    before = size * done // rows
                    done += batch.num_rows
                    on_read(size * done // rows - before)
            except (pa.ArrowException, OSError) as e:
                raise DataError(
                    f"{self.path} is truncated or corrupt ({_first_line(e)}); re-create or re-download it"
                ) from None

    def _arrow_rows(self, batch, start: int, split: str | None, where: str, select):
        """The rows of an Arrow batch as (index, split, where, record) with Python values."""
        names = batch.schema.names
        indices = range(start, start + batch.num_rows)
        keep = [i for i in range(batch.num_rows) if select is None or select(indices[i], split)]
        if not keep:
            return
        if len(keep) < batch.num_rows:
            batch = batch.take(keep)
        columns = [batch.column(name).to_pylist() for name in names]
        for row, i in enumerate(keep):
            record = {name: column[row] for name, column in zip(names, columns)}
            yield indices[i], split, f"{where} {indices[i]}", record

    # ------------------------------------------------------------------ saved datasets
    def _read_dataset(self, wanted, splits, select, errors, on_read, field_setting, optional):
        loaded = _load_dataset(self.path)
        if hasattr(loaded, "keys"):  # a DatasetDict
            parts = [(split, loaded[split]) for split in (splits if splits is not None else loaded.keys())]
        else:
            parts = [(None, loaded)]
        for split, dataset in parts:
            folder = self.path / split if split is not None else self.path
            columns = _top_level_columns(wanted, dataset.column_names, str(folder), field_setting, optional)
            size = sum(f.stat().st_size for f in folder.glob("*.arrow"))
            rows = max(len(dataset), 1)
            done = 0
            label = f"{self.path} {split} row" if split is not None else f"{self.path} row"
            for table in (
                dataset.select_columns(columns).with_format("arrow").iter(batch_size=ARROW_BATCH_ROWS)
            ):
                yield from self._arrow_rows(table, done, split, label, select)
                before = size * done // rows
                done += table.num_rows
                on_read(size * done // rows - before)


def _top_level_columns(
    wanted: Sequence[str], names: Sequence[str], where: str, field_setting: str, optional: Sequence[str] = ()
) -> list[str]:
    """The columns holding ``wanted`` field paths; an error listing the columns if one that is not
    ``optional`` is absent (an absent optional column reads as a missing field in every row)."""
    if not names:
        raise DataError(
            f"{where} has no columns (an empty schema); point {setting('data.path')} at a file with data"
        )
    columns = []
    for path in wanted:
        column = path if path in names else path.split(".", 1)[0]
        if column not in names:
            if path in optional:
                continue
            raise DataError(
                f"{where} has no column {path!r} (its columns: {', '.join(names)}); name it with "
                f"{setting(field_setting)}"
            )
        columns.append(column)
    return list(dict.fromkeys(columns))


def _load_dataset(folder: Path):
    """``datasets.load_from_disk``, with one clear line when the folder cannot be read."""
    import datasets

    try:
        return datasets.load_from_disk(str(folder))
    except Exception as e:  # datasets raises many kinds (ValueError, KeyError, FileNotFoundError, ...)
        raise DataError(
            f"{folder} is a saved dataset that datasets {datasets.__version__} cannot read ({_first_line(e)}); "
            f"re-save it with datasets {datasets.__version__}, or export it to Parquet or JSON Lines"
        ) from None


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__

"""Which format a set of data files is in: plain text, or one of the chat and instruction record
formats (:mod:`nexttoken.data.chat`): the ``data.format`` setting when given; for ``auto``, text files
are ``text``, and records are whatever the first record's fields say (``messages``: chat; ``prompt`` +
``response`` or ``instruction`` + ``output``: instruction; else text)."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from nexttoken.data.chat import CONVERSATION_FIELDS, choose_format, record_fields
from nexttoken.data.documents import is_text_file
from nexttoken.data.records import RecordSource
from nexttoken.errors import DataError


def choose_data_format(sources: Sequence[Path], fmt: str, text_field: str = "text") -> tuple[str, str | None]:
    """``(format, the line that says it)`` of the data in ``sources`` (files and saved datasets, as
    :func:`nexttoken.data.documents.find_documents` gives them): ``fmt`` itself unless it is
    ``auto``; for ``auto``, ``text`` for text files (no line: nothing to choose), else what the
    fields of the first record say (text when they are not a conversation's)."""
    if fmt != "auto":
        return choose_format(fmt, {}, "")
    first = _first_record(sources, text_field)
    if first is None:
        return "text", None
    fields, where = first
    try:
        chosen, line = choose_format("auto", {k: v for k, v in fields.items() if k != text_field}, where)
    except DataError:  # no conversation's fields: documents, which name a missing text field themselves
        chosen = "text"
    if chosen == "text":
        line = f"format: text (auto: the records have {text_field!r})" if text_field in fields else None
    return chosen, line


def _first_record(sources: Sequence[Path], text_field: str) -> tuple[dict[str, Any], str] | None:
    """The fields (of the conversation fields and ``text_field``) and name of the first record."""
    for path in map(Path, sources):
        if is_text_file(path):
            continue
        records = RecordSource(path, path.name).read((), optional=(*CONVERSATION_FIELDS, text_field))
        with contextlib.closing(records):
            for record in records:
                return record_fields(record), record.where
    return None

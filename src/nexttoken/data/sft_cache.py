"""Chat and instruction data for ``nexttoken fit``: its records read as conversations and split, the
tokenizer trained on them, and the example cache. (Which format the data is in:
:func:`nexttoken.data.formats.choose_data_format`.)

**The example cache**: the records of ``data.path`` read through the record readers of
:mod:`nexttoken.data.records` (JSON Lines, JSON, Parquet, saved datasets), split train/validation at
the record level by the corpus's own rule (:meth:`nexttoken.data.corpus.Corpus.records`), rendered
through the chat template, tokenized, masked and fitted to the block
(:func:`nexttoken.data.chat.encode_conversations`, :func:`nexttoken.data.sft.fit_to_block`) once,
and stored as flat ``.npy`` arrays read back memory-mapped (:class:`ExampleSet`). Its key is
everything the examples depend on: the records' content and names (``Corpus.identity``), the
tokenizer (its fingerprint, or for a BPE trained here the settings that determine it), the
template's text, the format, ``train_on``, ``block_size`` and ``truncation``. It is built like the
token cache (:func:`nexttoken.data.cache.build_once`): under a lock, in a staging folder renamed into
place at the end, so a failed or refused build leaves nothing behind.

Conversations are held in memory while the cache is built (instruction datasets are far smaller
than pre-training corpora); the examples are written out split by split.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from nexttoken.data.cache import build_once, progress_bar
from nexttoken.data.chat import (
    CONVERSATION_FIELDS,
    ChatTemplate,
    Conversation,
    Example,
    encode_in_parallel,
    record_fields,
    to_conversation,
)
from nexttoken.data.corpus import Corpus, bounded_sample
from nexttoken.data.packing import token_dtype
from nexttoken.data.sft import ExampleCounts, FitReport, count_examples, fit_to_block
from nexttoken.data.tokenizers import SPECIAL_TOKENS, Tokenizer, build_tokenizer
from nexttoken.errors import DataError
from nexttoken.io import write_atomically

# Bump when the layout of the cached files changes, so old caches are never misread.
EXAMPLE_CACHE_FORMAT = 1
SPLITS = ("train", "val")


# --------------------------------------------------------------------------- conversations
def read_split_conversations(
    corpus: Corpus, fmt: str, on_read: Callable[[int], None] | None = None
) -> dict[str, list[Conversation]]:
    """``{"train": [...], "val": [...]}``: every record of the corpus as a conversation of format
    ``fmt``, split at the record level; errors name the file and the record."""
    split: dict[str, list[Conversation]] = {name: [] for name in SPLITS}
    for is_val, record in corpus.records((), optional=CONVERSATION_FIELDS, on_read=on_read):
        split["val" if is_val else "train"].append(to_conversation(record_fields(record), fmt, record.where))
    corpus.check_split(len(split["train"]), len(split["val"]), unit="record")
    return split


_SPECIAL_TEXT = re.compile("|".join(re.escape(token) for token in SPECIAL_TOKENS))


def bpe_training_texts(
    template: ChatTemplate, conversations: Sequence[Conversation], max_bytes: int
) -> list[str]:
    """The rendered text of a bounded, seeded sample of ``conversations`` to train a BPE on, cut at
    the special tokens' text: the markers are reserved special tokens, never merged into others."""
    sample = bounded_sample(
        ((c.where, template.render(c.messages, where=c.where)) for c in conversations), max_bytes
    )
    return [piece for text in sample for piece in _SPECIAL_TEXT.split(text) if piece]


# --------------------------------------------------------------------------- stored examples
class ExampleSet(Sequence[Example]):
    """One split's examples as flat memory-mapped arrays: ``tokens``, ``scored`` and ``nbytes`` of
    every example one after another, and ``offsets`` (where each begins, then the end).

    It pickles as its folder's path (DataLoader workers open the arrays themselves).
    """

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)

    def __getstate__(self) -> dict[str, Any]:
        return {"folder": self.folder}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.folder = state["folder"]

    FILES = ("tokens", "scored", "nbytes", "offsets")

    @cached_property
    def _arrays(self) -> tuple[np.ndarray, ...]:
        return tuple(np.load(self.folder / f"{name}.npy", mmap_mode="r") for name in self.FILES)

    def __len__(self) -> int:
        return len(self._arrays[3]) - 1

    def __getitem__(self, index: int) -> Example:  # type: ignore[override]
        tokens, scored, nbytes, offsets = self._arrays
        if not -len(self) <= index < len(self):
            raise IndexError(f"example {index} of {len(self)}")
        index %= len(self)
        part = slice(int(offsets[index]), int(offsets[index + 1]))
        return Example(  # copies: the memory-mapped arrays are read-only
            np.array(tokens[part], dtype=np.int64),
            np.array(scored[part], dtype=bool),
            np.array(nbytes[part], dtype=np.int64),
            f"{self.folder.name} example {index}",
        )

    def lengths(self) -> np.ndarray:
        """Tokens of each example."""
        return np.diff(self._arrays[3])

    @staticmethod
    def write(folder: Path, examples: Sequence[Example], vocab_size: int) -> None:
        """Store ``examples`` in ``folder`` (a staging folder: it is renamed into place whole)."""
        folder.mkdir(parents=True)
        lengths = np.fromiter((len(e) for e in examples), dtype=np.int64, count=len(examples))
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        for name, parts, dtype in (
            ("tokens", [e.tokens for e in examples], token_dtype(vocab_size)),
            ("scored", [e.scored for e in examples], np.bool_),
            ("nbytes", [e.nbytes for e in examples], np.uint32),
        ):
            joined = np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype=dtype)
            np.save(folder / f"{name}.npy", joined)
        np.save(folder / "offsets.npy", offsets)


@dataclass
class ExampleData:
    """A built example cache: its folder, meta, and the two splits' examples."""

    directory: Path
    meta: dict[str, Any]
    built: bool

    @cached_property
    def tokenizer(self) -> Tokenizer:
        """The tokenizer the examples were made with (carrying the template they were rendered with)."""
        return Tokenizer.from_dict(self.meta["tokenizer"])

    @cached_property
    def train(self) -> ExampleSet:
        return ExampleSet(self.directory / "train")

    @cached_property
    def val(self) -> ExampleSet:
        return ExampleSet(self.directory / "val")

    def counts(self, split: str) -> ExampleCounts:
        return ExampleCounts(**self.meta["counts"][split])

    def fit_report(self) -> FitReport:
        """What fitting to the block did, over both splits."""
        if self.meta["data_format"] == "preference":
            from nexttoken.data.preferences import PairFitReport

            train, val = (PairFitReport(**self.meta["fit"][split]) for split in SPLITS)
            return train.merged(val)
        train, val = (FitReport(**self.meta["fit"][split]) for split in SPLITS)
        return train.merged(val)

    def sample_messages(self) -> list[dict[str, str]]:
        """The first validation conversation up to its last reply: a prompt for a sample reply."""
        return self.meta["sample_messages"]


def example_cache_key(identity: str, tokenizer_spec: Any, template: str, settings: dict[str, Any]) -> str:
    """The cache key: everything the stored examples depend on (module docstring)."""
    import hashlib

    key = json.dumps([EXAMPLE_CACHE_FORMAT, identity, tokenizer_spec, template, sorted(settings.items())])
    return hashlib.sha256(key.encode()).hexdigest()[:24]


def exists(directory: Path) -> bool:
    return (directory / "meta.json").is_file() and all(
        (directory / split / f"{name}.npy").is_file() for split in SPLITS for name in ExampleSet.FILES
    )


def read_meta(directory: Path) -> dict[str, Any]:
    return json.loads((directory / "meta.json").read_text())


def open_example_cache(directory: Path) -> ExampleData | None:
    """The example cache at ``directory`` if it is complete, else None."""
    return ExampleData(directory, read_meta(directory), False) if exists(directory) else None


def get_or_build_examples(
    directory: Path,
    corpus: Corpus,
    *,
    fmt: str,
    template: ChatTemplate,
    tokenizer: Tokenizer | None,
    train_on: str,
    block_size: int,
    truncation: str,
    vocab_size: int,
    bpe_sample_bytes: int,
    workers: int,
) -> ExampleData:
    """The example cache at ``directory``, built first if it is absent.

    Args:
        template: the chat template (its text and origin; bound to ``tokenizer``, or to any
            tokenizer with nexttoken's special tokens when a BPE is to be trained).
        tokenizer: the tokenizer to encode with; None: a BPE of ``vocab_size`` trained on the
            rendered training conversations (at most ``bpe_sample_bytes`` of them, sampled).
        workers: processes that encode (0: this one).
    """

    def write(staging: Path) -> dict[str, Any]:
        started = time.perf_counter()
        bar = progress_bar(corpus.size(), "reading conversations")
        try:
            if fmt == "preference":  # each pair: its two conversations, chosen then rejected
                from nexttoken.data.preferences import read_split_pairs

                pairs = read_split_pairs(corpus, on_read=bar.update)
                conversations = {s: [c for p in pairs[s] for c in p.conversations()] for s in SPLITS}
            else:
                conversations = read_split_conversations(corpus, fmt, on_read=bar.update)
        finally:
            bar.close()
        encoder = tokenizer
        if encoder is None:
            texts = bpe_training_texts(template, conversations["train"], bpe_sample_bytes)
            encoder = build_tokenizer("bpe", texts, vocab_size)
        # The tokenizer a checkpoint carries renders conversations the way its model was trained.
        encoder = Tokenizer.from_dict({**encoder.to_dict(), "chat_template": template.template})
        bound = ChatTemplate(encoder, template.template, template.origin)
        meta: dict[str, Any] = {
            "format": EXAMPLE_CACHE_FORMAT,
            "data_format": fmt,
            "tokenizer": encoder.to_dict(),
        }
        meta["fit"], meta["counts"] = {}, {}
        for split in SPLITS:
            mask = "last_response" if fmt == "preference" else train_on
            examples = list(encode_in_parallel(bound, conversations[split], mask, workers))
            try:
                kept, report = _fit(examples, fmt, block_size, truncation)
            except DataError as e:  # e.args[0]: its text as raised, the settings it names still marked
                raise DataError(
                    f"{'training' if split == 'train' else 'validation'} split: {e.args[0]}"
                ) from None
            ExampleSet.write(staging / split, kept, encoder.vocab_size)
            meta["fit"][split] = asdict(report)
            meta["counts"][split] = asdict(count_examples(kept))
        meta["sample_messages"] = _sample_messages(conversations["val"][0])
        meta["seconds"] = round(time.perf_counter() - started, 3)
        write_atomically(staging / "meta.json", json.dumps(meta, indent=1))
        return meta

    meta, built = build_once(directory, lambda: exists(directory), lambda: read_meta(directory), write)
    return ExampleData(directory, meta, built)


def _fit(examples: list[Example], fmt: str, block_size: int, truncation: str) -> tuple[list[Example], Any]:
    """The examples fitted to the block; preference pairs (consecutive chosen, rejected) as pairs."""
    if fmt != "preference":
        return fit_to_block(examples, block_size, truncation)
    from nexttoken.data.preferences import PairSet, fit_pairs_to_block

    kept, report = fit_pairs_to_block(list(zip(examples[::2], examples[1::2])), block_size)
    return PairSet.flatten(kept), report


def _sample_messages(conversation: Conversation) -> list[dict[str, str]]:
    messages = conversation.messages
    last = max((i for i, m in enumerate(messages) if m.role == "assistant"), default=len(messages))
    return [{"role": m.role, "content": m.content} for m in messages[:last]]

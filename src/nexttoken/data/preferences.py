"""Preference pairs: records with a preferred reply (``chosen``) and a worse one (``rejected``) to the
same prompt, rendered as two chat examples, fitted to the block and collated into batches whose
per-reply log-probabilities the scoring core sums (:mod:`nexttoken.scoring.preferences`).

Record shapes (``data.format preference``; ``auto`` picks it for any record with ``chosen`` and
``rejected``):

* ``{"prompt": str, "chosen": str, "rejected": str}`` (an optional ``"system"`` string): the prompt
  is the user's turn, each reply the assistant's;
* ``{"prompt": [messages], "chosen": [one assistant message], "rejected": [one assistant message]}``;
* ``{"chosen": [messages], "rejected": [messages]}`` (the HH-RLHF shape): two whole conversations
  that share everything but their last message, an assistant's reply; the shared part is the prompt.

Each reply is rendered with the prompt through the chat template and masked by the rule chat
fine-tuning uses (:meth:`nexttoken.data.chat.ChatTemplate.encode`, ``last_response``: the tokens
overlapping the reply's characters, through the end-of-turn token), so a pair is two
:class:`~nexttoken.data.chat.Example` s. Stored, a pair is two consecutive examples (chosen, then
rejected) of the example cache (:class:`PairSet`).

**Fitting** (:func:`fit_pairs_to_block`): a reply longer than the block is cut from the left (the
oldest prompt tokens go first); a pair left with no scored token in a reply, a pair whose replies
are identical, and a pair with a special token's text in a message are dropped and counted.

**Batches**: ``batch_size`` pairs per micro-batch, each pair whole in its micro-batch. Without
packing each reply is a row, padded to the longest; with packing the micro-batch's replies share
rows of ``block_size`` positions, each reply its own segment (it sees itself only and its positions
start at 0), so its log-probability is the one it has alone.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import IterableDataset

from nexttoken.data.chat import ChatTemplate, Conversation, Example, Message, to_conversation
from nexttoken.data.loaders import EpochBatches, _worker_share
from nexttoken.data.packing import shift, train_batches, train_rows, val_batches
from nexttoken.data.sft import pack, positions
from nexttoken.errors import DataError, setting
from nexttoken.loss import IGNORE_INDEX


@dataclass
class PreferencePair:
    """The shared prompt's messages, each reply's assistant message, and where the record came from."""

    prompt: list[Message]
    chosen: Message
    rejected: Message
    where: str

    def conversations(self) -> tuple[Conversation, Conversation]:
        return (
            Conversation([*self.prompt, self.chosen], self.where),
            Conversation([*self.prompt, self.rejected], self.where),
        )


def is_preference_record(record: Mapping[str, Any]) -> bool:
    return isinstance(record, Mapping) and "chosen" in record and "rejected" in record


def _messages(value: Any, what: str, where: str) -> list[Message]:
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: {what} must be a string or a non-empty list of {{role, content}} messages")
    return to_conversation({"messages": value}, "chat", f"{where} ({what})").messages


def _reply(value: Any, what: str, where: str) -> Message:
    if isinstance(value, str):
        return Message("assistant", value)
    messages = _messages(value, f"'{what}'", where)
    if len(messages) != 1 or messages[0].role != "assistant":
        raise DataError(
            f"{where}: '{what}' must be one assistant message (the reply), got {len(messages)} message(s) "
            f"with roles {', '.join(m.role for m in messages)}"
        )
    return messages[0]


def to_pair(record: Mapping[str, Any], where: str) -> PreferencePair:
    """One record of any of the three shapes (module docstring) as a pair; errors name ``where``."""
    if not isinstance(record, Mapping):
        raise DataError(f"{where} is a {type(record).__name__}, not a record of named fields")
    missing = [name for name in ("chosen", "rejected") if record.get(name) is None]
    if missing:
        raise DataError(
            f"{where} has no {' and no '.join(repr(m) for m in missing)}; every preference pair needs both "
            "'chosen' and 'rejected'"
        )
    prompt = record.get("prompt")
    if prompt is None:  # whole conversations sharing all but their last message
        if isinstance(record["chosen"], str) or isinstance(record["rejected"], str):
            raise DataError(
                f"{where} has no 'prompt', so 'chosen' and 'rejected' must be whole conversations (lists of "
                "messages) that differ only in the last assistant reply; add a 'prompt' field"
            )
        chosen = _messages(record["chosen"], "'chosen'", where)
        rejected = _messages(record["rejected"], "'rejected'", where)
        if len(chosen) < 2 or chosen[:-1] != rejected[:-1] or len(chosen) != len(rejected):
            raise DataError(
                f"{where}: 'chosen' and 'rejected' do not share every message but the last, so the prompt "
                "they answer is not the same; give both the same conversation up to the final reply"
            )
        if chosen[-1].role != "assistant" or rejected[-1].role != "assistant":
            raise DataError(
                f"{where}: the last message of 'chosen' and of 'rejected' must be the assistant's"
            )
        return PreferencePair(chosen[:-1], chosen[-1], rejected[-1], where)
    if isinstance(prompt, str):
        messages = [Message("user", prompt)]
        system = record.get("system")
        if system is not None:
            if not isinstance(system, str):
                raise DataError(f"{where}: 'system' is {type(system).__name__}, not a string")
            messages.insert(0, Message("system", system))
    else:
        messages = _messages(prompt, "'prompt'", where)
    return PreferencePair(
        messages,
        _reply(record["chosen"], "chosen", where),
        _reply(record["rejected"], "rejected", where),
        where,
    )


def read_pairs(records: Sequence[Any], source: str = "the data") -> list[PreferencePair]:
    """Every record (plain mappings, or :class:`~nexttoken.data.records.Record` s) as a pair."""
    from nexttoken.data.chat import record_fields
    from nexttoken.data.records import Record

    pairs = []
    for index, record in enumerate(records, start=1):
        where = f"{source}, record {index}"
        if isinstance(record, Record):
            where, record = record.where, record_fields(record)
        pairs.append(to_pair(record, where))
    if not pairs:
        raise DataError(f"{source} has no records; give it at least one preference pair")
    return pairs


def encode_pair(template: ChatTemplate, pair: PreferencePair) -> tuple[Example, Example]:
    """``(chosen, rejected)``: each reply rendered after the prompt, its own tokens scored."""
    chosen, rejected = pair.conversations()
    return template.encode(chosen, "last_response"), template.encode(rejected, "last_response")


# --------------------------------------------------------------------------- fitting to the block
@dataclass
class PairFitReport:
    """What :func:`fit_pairs_to_block` did, for the start summary."""

    pairs: int
    kept: int
    block_size: int
    truncated: int = 0  # a reply cut from the left to fit
    no_scored: int = 0  # dropped: a reply with no scored token within the block
    identical: int = 0  # dropped: chosen and rejected are the same tokens
    marker_text: int = 0  # dropped: a message holds a special token's text

    def merged(self, other: PairFitReport) -> PairFitReport:
        counts = ("pairs", "kept", "truncated", "no_scored", "identical", "marker_text")
        return PairFitReport(
            block_size=self.block_size, **{k: getattr(self, k) + getattr(other, k) for k in counts}
        )

    def lines(self) -> list[str]:
        n, T = self.pairs, self.block_size
        said = []
        if self.truncated:
            said.append(
                f"{self.truncated:,} of {n:,} pairs have a reply longer than {T} tokens: prompt cut from the left"
            )
        if self.no_scored:
            said.append(
                f"{self.no_scored:,} of {n:,} pairs have a reply with no token within {T} tokens: dropped"
            )
        if self.identical:
            said.append(
                f"{self.identical:,} of {n:,} pairs have identical chosen and rejected replies: dropped"
            )
        if self.marker_text:
            said.append(
                f"{self.marker_text:,} of {n:,} pairs have a special token's text inside a message: dropped"
            )
        return said


def _cut(example: Example, block_size: int) -> Example:
    keep = slice(len(example) - (block_size + 1), None)
    return Example(example.tokens[keep], example.scored[keep], example.nbytes[keep], example.where, False)


def fit_pairs_to_block(
    pairs: Sequence[tuple[Example, Example]], block_size: int
) -> tuple[list[tuple[Example, Example]], PairFitReport]:
    """The pairs that can be trained on at ``block_size`` inputs per sequence, and the report."""
    report = PairFitReport(pairs=len(pairs), kept=0, block_size=block_size)
    kept = []
    for chosen, rejected in pairs:
        if chosen.has_marker_text or rejected.has_marker_text:
            report.marker_text += 1
            continue
        if np.array_equal(chosen.tokens, rejected.tokens):
            report.identical += 1
            continue
        if max(len(chosen), len(rejected)) > block_size + 1:
            report.truncated += 1
            chosen = _cut(chosen, block_size) if len(chosen) > block_size + 1 else chosen
            rejected = _cut(rejected, block_size) if len(rejected) > block_size + 1 else rejected
        if chosen.n_scored == 0 or rejected.n_scored == 0:
            report.no_scored += 1
            continue
        kept.append((chosen, rejected))
    report.kept = len(kept)
    if not kept:
        reasons = "; ".join(report.lines())
        raise DataError(
            f"none of the {len(pairs):,} preference pairs can be trained on ({reasons}); raise "
            f"{setting('data.block_size')} or check the records"
        )
    return kept, report


class PairSet(Sequence[tuple[Example, Example]]):
    """Pairs stored as consecutive examples (chosen, rejected) of a sequence of examples."""

    def __init__(self, examples: Sequence[Example]) -> None:
        if len(examples) % 2:
            raise ValueError(f"{len(examples)} examples cannot be pairs")
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples) // 2

    def __getitem__(self, index: int) -> tuple[Example, Example]:  # type: ignore[override]
        return self.examples[2 * index], self.examples[2 * index + 1]

    @staticmethod
    def flatten(pairs: Sequence[tuple[Example, Example]]) -> list[Example]:
        return [example for pair in pairs for example in pair]


# --------------------------------------------------------------------------- batches
class PairBatch(NamedTuple):
    """A micro-batch of ``n`` pairs. Row ``r`` holds ``lengths[r]`` input positions; ``targets`` is
    ``IGNORE_INDEX`` where nothing is scored; ``owners`` says which reply a scored target belongs to
    (``2j``: pair ``j``'s chosen, ``2j + 1``: its rejected; -1 elsewhere); ``segments`` (packed rows
    only) numbers the replies of a row 1, 2, ... (-1: padding); ``pair_ids`` the pairs' indices in
    their split."""

    input_ids: Tensor
    targets: Tensor
    owners: Tensor
    lengths: Tensor
    segments: Tensor | None
    pair_ids: Tensor

    @property
    def n_pairs(self) -> int:
        return int(self.pair_ids.numel())


def collate_pairs(
    pairs: Sequence[tuple[Example, Example]], indices: Sequence[int], pad_id: int, packed_width: int | None
) -> PairBatch:
    """The micro-batch of ``pairs[i] for i in indices``: one reply per row (``packed_width`` None),
    or the replies packed into rows of ``packed_width`` positions."""
    replies = [pairs[i][side] for i in indices for side in (0, 1)]
    lengths = [positions(e) for e in replies]
    rows = pack(lengths, packed_width) if packed_width is not None else [[k] for k in range(len(replies))]
    width = packed_width if packed_width is not None else max(lengths)
    shape = (len(rows), width)
    input_ids = np.full(shape, pad_id, dtype=np.int64)
    targets = np.full(shape, IGNORE_INDEX, dtype=np.int64)
    owners = np.full(shape, -1, dtype=np.int64)
    segments = np.full(shape, -1, dtype=np.int64)
    row_lengths = np.zeros(len(rows), dtype=np.int64)
    for r, row in enumerate(rows):
        at = 0
        for number, k in enumerate(row, start=1):
            inputs, next_tokens = shift(replies[k].tokens)
            scored = shift(replies[k].scored)[1]
            n = len(inputs)
            input_ids[r, at : at + n] = inputs
            targets[r, at : at + n] = np.where(scored, next_tokens, IGNORE_INDEX)
            owners[r, at : at + n] = np.where(scored, k, -1)
            segments[r, at : at + n] = number
            at += n
        row_lengths[r] = at
    return PairBatch(
        torch.from_numpy(input_ids),
        torch.from_numpy(targets),
        torch.from_numpy(owners),
        torch.from_numpy(row_lengths),
        torch.from_numpy(segments) if packed_width is not None else None,
        torch.tensor(list(indices), dtype=torch.long),
    )


def _groups(n: int, batch_size: int, order: np.ndarray) -> list[list[int]]:
    return [[int(i) for i in order[g : g + batch_size]] for g in range(0, n, batch_size)]


def pair_train_plan(
    n_pairs: int,
    batch_size: int,
    *,
    seed: int,
    epoch: int,
    rank: int = 0,
    world_size: int = 1,
    accumulate: int = 1,
) -> list[list[int]]:
    """One rank's micro-batches of pair indices for one epoch. Pairs are dealt out as plain-text
    blocks are (:func:`~nexttoken.data.packing.train_batches`): one seeded permutation of the pairs
    per epoch whatever the ranks and batch size, disjoint across ranks, ``accumulate`` batches per
    optimizer step, so a run resumed with another split of the same global batch continues it."""
    plan = train_batches(
        n_pairs, batch_size, seed=seed, epoch=epoch, rank=rank, world_size=world_size, accumulate=accumulate
    )
    return plan.tolist()


def pair_val_plan(n_pairs: int, batch_size: int, *, rank: int = 0, world_size: int = 1) -> list[list[int]]:
    """One rank's validation micro-batches: every pair in exactly one, on one rank."""
    groups = _groups(n_pairs, batch_size, np.arange(n_pairs))
    return [
        [i for g in groups[r.start : r.stop] for i in g]
        for r in val_batches(len(groups), 1, rank=rank, world_size=world_size)
    ]


class PairTrainBatches(EpochBatches):
    """One rank's training micro-batches of pairs (:class:`PairBatch`), resumable mid-epoch; the
    epoch's global order is an order of pairs (:func:`pair_train_plan`)."""

    unit = "pairs"

    def __init__(
        self,
        pairs: Sequence[tuple[Example, Example]],
        block_size: int,
        batch_size: int,
        seed: int,
        *,
        packing: bool,
        pad_id: int,
        rank: int = 0,
        world_size: int = 1,
        accumulate: int = 1,
    ) -> None:
        self.pairs, self.block_size, self.batch_size, self.seed = pairs, block_size, batch_size, seed
        self.packing, self.pad_id, self.rank, self.world_size = packing, pad_id, rank, world_size
        self.accumulate = accumulate
        self.rows = train_rows(len(pairs), batch_size, world_size, accumulate)
        self.num_batches = len(self.batch_plan(epoch=0))

    def batch_plan(self, epoch: int) -> list[list[int]]:
        return pair_train_plan(
            len(self.pairs),
            self.batch_size,
            seed=self.seed,
            epoch=epoch,
            rank=self.rank,
            world_size=self.world_size,
            accumulate=self.accumulate,
        )

    def layout(self) -> dict[str, Any]:
        return {"pairs": len(self.pairs), "block_size": self.block_size, "seed": self.seed}

    def split(self) -> dict[str, int]:
        return {"world_size": self.world_size, "batch_size": self.rows, "accumulate": self.accumulate}

    def legacy_layout(self) -> dict[str, Any]:
        return {
            **self.layout(),
            "batches": self.num_batches,
            "batch_size": self.batch_size,
            "packing": self.packing,
            "world_size": self.world_size,
        }

    @property
    def per_batch(self) -> int:
        return self.rows * self.world_size

    def make_batch(self, source: None, indices: list[int]) -> PairBatch:
        return collate_pairs(self.pairs, indices, self.pad_id, self.block_size if self.packing else None)


class PairValBatches(IterableDataset):
    """One rank's validation micro-batches of pairs: every pair scored once across ranks."""

    def __init__(
        self,
        pairs: Sequence[tuple[Example, Example]],
        block_size: int,
        batch_size: int,
        *,
        packing: bool,
        pad_id: int,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.pairs, self.pad_id = pairs, pad_id
        self.width = block_size if packing else None
        self.batches = pair_val_plan(len(pairs), batch_size, rank=rank, world_size=world_size)

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[PairBatch]:
        worker, num_workers = _worker_share()
        for indices in self.batches[worker::num_workers]:
            yield collate_pairs(self.pairs, indices, self.pad_id, self.width)


def read_split_pairs(corpus: Any, on_read: Any = None) -> dict[str, list[PreferencePair]]:
    """``{"train": [...], "val": [...]}``: every record of ``corpus`` (a
    :class:`~nexttoken.data.corpus.Corpus`) as a pair, split at the record level."""
    from nexttoken.data.chat import CONVERSATION_FIELDS, record_fields

    split: dict[str, list[PreferencePair]] = {"train": [], "val": []}
    for is_val, record in corpus.records((), optional=CONVERSATION_FIELDS, on_read=on_read):
        split["val" if is_val else "train"].append(to_pair(record_fields(record), record.where))
    corpus.check_split(len(split["train"]), len(split["val"]), unit="record")
    return split

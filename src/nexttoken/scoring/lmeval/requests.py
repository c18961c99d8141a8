"""Planning lm-eval ``loglikelihood`` requests into the scoring core's rows: prefix reuse (a request
whose input is a prefix of another's is read from that one's pass) and shared contexts (the choices
of a question as branches of one packed row)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from nexttoken.scoring.core import Row


@dataclass(frozen=True)
class Request:
    """One ``loglikelihood`` request as tokens: ``inputs`` are fed to the model, and its last
    ``len(targets)`` positions predict ``targets``; ``inputs[:n_context]`` is the context."""

    index: int
    inputs: tuple[int, ...]
    n_context: int
    targets: tuple[int, ...]

    def scored_positions(self) -> range:
        return range(len(self.inputs) - len(self.targets), len(self.inputs))


def _hosts(requests: Sequence[Request]) -> dict[tuple[int, ...], list[Request]]:
    """Requests grouped by the input whose forward pass serves them: a request whose input is a
    prefix of another's is read from the longer one (a causal model's logits at a position depend
    only on the tokens up to it). In sorted order, a sequence's extensions follow it directly, so
    comparing each sequence with the next finds every prefix."""
    ordered = sorted({r.inputs for r in requests})
    host: dict[tuple[int, ...], tuple[int, ...]] = {}
    following = None
    for seq in reversed(ordered):
        extends = following is not None and following[: len(seq)] == seq
        host[seq] = host[following] if extends else seq
        following = seq
    served: dict[tuple[int, ...], list[Request]] = defaultdict(list)
    for r in requests:
        served[host[r.inputs]].append(r)
    return served


def plan_rows(requests: Sequence[Request], share_context: bool, max_length: int) -> list[Row]:
    """The scoring core's rows that serve ``requests`` (each read is owned by its request's index):
    one row per distinct input (after prefix reuse), or, with ``share_context``, one per context with
    every continuation after it as a branch (a row is split where it would exceed ``max_length``)."""
    served = _hosts(requests)
    if not share_context:
        return [
            _row(list(host), None, [(r, list(r.scored_positions())) for r in reqs])
            for host, reqs in served.items()
        ]
    by_context: dict[tuple[int, ...], list[tuple[int, ...]]] = defaultdict(list)
    for host, reqs in served.items():
        n_context = min(r.n_context for r in reqs if r.inputs == host)
        by_context[host[:n_context]].append(host)
    rows = []
    for context, hosts in by_context.items():
        c = len(context)
        ids: list[int] = []
        segments: list[int] = []
        reads: list[tuple[Request, list[int]]] = []
        for host in hosts:
            branch = host[c:]
            if not ids or len(ids) + len(branch) > max_length:
                if ids:
                    rows.append(_row(ids, segments, reads))
                ids, segments, reads = list(context), [0] * c, []
            offset, segment = len(ids), max(segments, default=0) + 1
            ids += branch
            segments += [segment] * len(branch)
            for r in served[host]:
                reads.append((r, [p if p < c else offset + p - c for p in r.scored_positions()]))
        rows.append(_row(ids, segments, reads))
    return rows


def _row(ids: list[int], segments: list[int] | None, reads: list[tuple[Request, list[int]]]) -> Row:
    as_long = lambda values: torch.tensor(values, dtype=torch.long)  # noqa: E731
    return Row(
        ids=as_long(ids),
        columns=as_long([p for _, where in reads for p in where]),
        targets=as_long([t for r, _ in reads for t in r.targets]),
        owners=as_long([r.index for r, where in reads for _ in where]),
        segments=None if segments is None else as_long(segments),
    )

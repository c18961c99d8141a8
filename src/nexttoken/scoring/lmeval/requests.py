"""Planning lm-eval ``loglikelihood`` requests into forward passes: prefix reuse (a request whose
input is a prefix of another's is read from that one's pass) and shared contexts (the choices of a
question as branches of one packed row)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


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


@dataclass
class Row:
    """One sequence of a forward pass: a context (segment 0) followed by branches (segments 1, 2,
    ...), each branch seeing the context and itself only; ``reads`` are ``(request, positions in
    the row, targets)``."""

    ids: list[int]
    segments: list[int]
    positions: list[int]
    reads: list[tuple[int, list[int], tuple[int, ...]]]


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
    """The rows that serve ``requests``: one per distinct input (after prefix reuse), or, with
    ``share_context``, one per context with every continuation after it as a branch (a row is split
    where it would exceed ``max_length`` tokens)."""
    rows = []
    served = _hosts(requests)
    if not share_context:
        for host, reqs in served.items():
            reads = [(r.index, list(r.scored_positions()), r.targets) for r in reqs]
            rows.append(Row(list(host), [0] * len(host), list(range(len(host))), reads))
        return rows
    by_context: dict[tuple[int, ...], list[tuple[int, ...]]] = defaultdict(list)
    for host, reqs in served.items():
        n_context = min(r.n_context for r in reqs if r.inputs == host)
        by_context[host[:n_context]].append(host)
    for context, hosts in by_context.items():
        c = len(context)
        row = None
        for host in hosts:
            branch = host[c:]
            if row is None or len(row.ids) + len(branch) > max_length:
                row = Row(list(context), [0] * c, list(range(c)), [])
                rows.append(row)
            offset, segment = len(row.ids), max(row.segments, default=0) + 1
            row.ids += branch
            row.segments += [segment] * len(branch)
            row.positions += range(c, c + len(branch))
            for r in served[host]:
                where = [p if p < c else offset + p - c for p in r.scored_positions()]
                row.reads.append((r.index, where, r.targets))
    return rows


def packed_mask(segments: Tensor, dtype: torch.dtype) -> Tensor:
    """Additive 4-D mask (B, 1, T, T): causal, and a branch never sees another branch; padding
    (segment -1) is seen by nobody and sees itself only (no empty softmax)."""
    T = segments.size(1)
    idx = torch.arange(T, device=segments.device)
    causal = idx[None, :] <= idx[:, None]
    seg_q, seg_k = segments[:, :, None], segments[:, None, :]
    allow = causal & (seg_k >= 0) & ((seg_k == 0) | (seg_k == seg_q))
    allow |= torch.eye(T, dtype=torch.bool, device=segments.device) & (seg_q < 0)
    mask = torch.zeros(allow.shape, dtype=dtype, device=segments.device)
    return mask.masked_fill_(~allow, torch.finfo(dtype).min)[:, None]

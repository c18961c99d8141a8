"""Document masking: several documents (or chat examples) packed into one row, kept apart.

A row's ``document_ids`` (B, T) say which document each position belongs to: a new document starts
wherever the id differs from the previous position's (only neighbours must differ, so ids may be
reused along a row, and padding is simply one more document). Every model that takes
``document_ids`` (the :class:`~nexttoken.models.protocol.CausalLM` protocol) does two things with
them, both derived here so the built-in GPT and the Hugging Face adapter cannot disagree:

* positions restart at 0 at each document (:func:`document_positions`), so a packed example sees
  the same positions as when it runs alone;
* attention never crosses a document boundary (:func:`document_causal_mask`): position ``i`` sees
  ``j`` only when ``j <= i`` and both lie in the same document.

Packed this way, each document's logits equal those of the document run on its own.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _check(document_ids: Tensor) -> None:
    if document_ids.dim() != 2:
        raise ValueError(f"document_ids must be (batch, seq_len), got shape {tuple(document_ids.shape)}")


def document_starts(document_ids: Tensor) -> Tensor:
    """(B, T) bool: True where a document begins (position 0 and wherever the id changes)."""
    _check(document_ids)
    starts = torch.ones_like(document_ids, dtype=torch.bool)
    starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    return starts


def document_positions(document_ids: Tensor) -> Tensor:
    """(B, T) int64: each token's position inside its own document (0 at every document start)."""
    starts = document_starts(document_ids)
    index = torch.arange(document_ids.size(1), device=document_ids.device).expand_as(document_ids)
    # Index of the latest start at or before each position: a running maximum of the start indices.
    latest_start = torch.where(starts, index, torch.zeros_like(index)).cummax(dim=1).values
    return index - latest_start


def document_causal_mask(document_ids: Tensor) -> Tensor:
    """(B, 1, T, T) bool for ``scaled_dot_product_attention``: True where query ``i`` may attend to
    key ``j`` (``j <= i``, same document). Every query sees at least itself, so no row is empty."""
    segment = document_starts(document_ids).cumsum(dim=1)
    T = document_ids.size(1)
    causal = torch.ones(T, T, dtype=torch.bool, device=document_ids.device).tril()
    same = segment[:, :, None] == segment[:, None, :]
    return (same & causal).unsqueeze(1)


# --------------------------------------------------------------------------- shared contexts
# A row can also hold one context followed by several branches (the choices of a multiple-choice
# question): ``segments`` (B, T) is 0 on the context, 1, 2, ... on the branches and -1 on padding.
# Each branch sees the context and itself, never another branch, and its positions continue from
# the context's end, so each branch's logits are those of context + branch run alone.


def branch_mask(segments: Tensor) -> Tensor:
    """(B, 1, T, T) bool: query ``i`` may attend to key ``j`` when ``j <= i`` and ``j`` lies in the
    context or in ``i``'s own branch; padding is seen by nobody and sees only itself (no empty row)."""
    _check(segments)
    T = segments.size(1)
    causal = torch.ones(T, T, dtype=torch.bool, device=segments.device).tril()
    query, key = segments[:, :, None], segments[:, None, :]
    allow = causal & (key >= 0) & ((key == 0) | (key == query))
    allow |= torch.eye(T, dtype=torch.bool, device=segments.device) & (query < 0)
    return allow.unsqueeze(1)


def branch_positions(segments: Tensor) -> Tensor:
    """(B, T) int64: each token's position in its own sequence (context + its branch): the number
    of earlier tokens it sees."""
    return branch_mask(segments).squeeze(1).sum(dim=-1) - 1

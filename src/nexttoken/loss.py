"""Next-token cross-entropy: the one place the loss is computed.

The data has already shifted: ``targets[:, t]`` is the token that follows ``input_ids[:, t]``,
and positions that must not be scored hold ``ignore_index``. The loss never shifts again.
Whatever dtype the model ran in, the log-softmax runs in fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE_INDEX = -100
_REDUCTIONS = ("mean", "sum", "none")


def _check(reduction: str, targets: Tensor) -> None:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if targets.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"targets must be an integer tensor of token ids, got {targets.dtype}")


def _reduce(nll: Tensor, scored: Tensor, reduction: str) -> Tensor:
    if reduction == "none":
        return nll
    total = nll.sum()
    if reduction == "sum":
        return total
    # An all-ignored batch gives 0 (with a token count of 0), never 0/0 = NaN; no host sync needed.
    return total / scored.sum().clamp(min=1)


def next_token_loss(
    logits: Tensor, targets: Tensor, *, ignore_index: int = IGNORE_INDEX, reduction: str = "mean"
) -> Tensor:
    """Cross-entropy of ``logits`` (B, T, V) against already-shifted ``targets`` (B, T), in fp32.

    ``reduction``: ``"mean"`` over scored (non-ignored) tokens, ``"sum"``, or ``"none"`` for a
    (B, T) tensor of per-token nats with 0 at ignored positions.
    """
    _check(reduction, targets)
    if logits.shape[:-1] != targets.shape:
        raise ValueError(
            f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} disagree: "
            "expected logits (..., V) over the same positions as targets"
        )
    with torch.autocast(device_type=logits.device.type, enabled=False):
        nll = F.cross_entropy(
            logits.reshape(-1, logits.size(-1)).float(),
            targets.reshape(-1).long(),
            ignore_index=ignore_index,
            reduction="none",
        ).view(targets.shape)
    return _reduce(nll, targets != ignore_index, reduction)


def fused_next_token_loss(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    *,
    bias: Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
    reduction: str = "mean",
) -> Tensor:
    """The same loss as ``next_token_loss(hidden @ weight.T + bias, targets)``, without ever
    materializing the (B·T, V) logits: torch's chunked ``F.linear_cross_entropy``.

    ``hidden`` (B, T, C) are the final hidden states, ``weight`` (V, C) the output projection.
    Inputs are taken to fp32 so the result matches the plain path under mixed precision.
    """
    _check(reduction, targets)
    flat_targets = targets.reshape(-1).long()
    with torch.autocast(device_type=hidden.device.type, enabled=False):
        nll = F.linear_cross_entropy(
            hidden.reshape(-1, hidden.size(-1)).float(),
            weight.float(),
            flat_targets,
            linear_bias=None if bias is None else bias.float(),
            ignore_index=ignore_index,
            reduction="sum" if reduction != "none" else "none",
            options=torch.nn.LinearCrossEntropyOptions(),
        )
    if reduction == "none":
        return nll.view(targets.shape)
    scored = targets != ignore_index
    return nll if reduction == "sum" else nll / scored.sum().clamp(min=1)


def count_scored(targets: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Number of positions the loss scores (the ``tokens`` of the reduction contract)."""
    return (targets != ignore_index).sum()

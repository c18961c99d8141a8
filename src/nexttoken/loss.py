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


# How the fused path chunks on a CPU. torch's automatic choice is tuned for GPUs; on a CPU it takes
# ~64-row chunks for GPT-2's head (8192 x 768 -> 50257), and each chunk then re-reads and re-writes the
# whole (V, C) weight gradient for a thin matmul: 1.45x the CPU time of the plain path. Chunks of
# >= 1024 rows cost ~0.85x the plain path's time at 7% of its peak memory there; for small heads
# (vocab 4096, width 128-192) even 1024-row chunks are slow (up to 1.7x), while one chunk of up to
# 2**25 logits (128 MB in fp32) is faster than plain (benchmarks/loss_memory.py, README there).
# GPUs keep torch's choice.
CPU_CHUNK_MIN_ROWS = 1024
CPU_CHUNK_MAX_LOGITS = 2**25


def _fused_options(rows: int, classes: int, device: torch.device) -> torch.nn.LinearCrossEntropyOptions:
    if device.type != "cpu":
        return torch.nn.LinearCrossEntropyOptions()
    chunk = max(CPU_CHUNK_MIN_ROWS, 1 << max(0, (CPU_CHUNK_MAX_LOGITS // max(classes, 1)).bit_length() - 1))
    return torch.nn.LinearCrossEntropyOptions(batch_chunk_size=max(1, min(rows, chunk)), chunking_method=None)


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
            options=_fused_options(flat_targets.numel(), weight.shape[0], hidden.device),
        )
    if reduction == "none":
        return nll.view(targets.shape)
    scored = targets != ignore_index
    return nll if reduction == "sum" else nll / scored.sum().clamp(min=1)


def fused_loss_available() -> bool:
    """True when this torch has the fused linear + cross-entropy op (``F.linear_cross_entropy``)."""
    return hasattr(F, "linear_cross_entropy") and hasattr(torch.nn, "LinearCrossEntropyOptions")


def count_scored(targets: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Number of positions the loss scores (the ``tokens`` of the reduction contract)."""
    return (targets != ignore_index).sum()

"""Next-token cross-entropy: the one place the loss is computed.

The data has already shifted: ``targets[:, t]`` is the token that follows ``input_ids[:, t]``,
and positions that must not be scored hold ``ignore_index``. The loss never shifts again.
Whatever dtype the model ran in, the log-softmax runs in fp32.
"""

from __future__ import annotations

from typing import Literal

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
# GPUs keep torch's choice. The chunked fallback below uses the same rule on every device.
CPU_CHUNK_MIN_ROWS = 1024
CPU_CHUNK_MAX_LOGITS = 2**25

FusedImplementation = Literal["auto", "torch", "chunked"]


def chunk_rows(rows: int, classes: int) -> int:
    """Rows of logits computed at once: at least 1024, up to 2**25 logits, at most ``rows``."""
    chunk = max(CPU_CHUNK_MIN_ROWS, 1 << max(0, (CPU_CHUNK_MAX_LOGITS // max(classes, 1)).bit_length() - 1))
    return max(1, min(rows, chunk))


def _fused_options(rows: int, classes: int, device: torch.device) -> torch.nn.LinearCrossEntropyOptions:
    if device.type != "cpu":
        return torch.nn.LinearCrossEntropyOptions()
    return torch.nn.LinearCrossEntropyOptions(
        batch_chunk_size=chunk_rows(rows, classes), chunking_method=None
    )


def torch_has_fused_loss() -> bool:
    """True when this torch has its own fused linear + cross-entropy (``F.linear_cross_entropy``,
    torch >= 2.13); without it :func:`fused_next_token_loss` uses the chunked implementation here."""
    return hasattr(F, "linear_cross_entropy") and hasattr(torch.nn, "LinearCrossEntropyOptions")


def fused_loss_backend() -> Literal["torch", "chunked"]:
    """Which implementation ``fused_next_token_loss(..., implementation="auto")`` runs here."""
    return "torch" if torch_has_fused_loss() else "chunked"


def _chunk_logits(hidden: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return hidden @ weight.T if bias is None else torch.addmm(bias, hidden, weight.T)


def _chunk_softmax_and_nll(logits: Tensor, targets: Tensor, scored: Tensor) -> tuple[Tensor, Tensor]:
    """Turn ``logits`` (rows, V) into softmax probabilities in place; return (nll per row, log-sum-exp).

    In place, so a chunk never needs a second (rows, V) buffer. Ignored rows get nll 0 (their target
    is replaced by 0 for the gather, then masked)."""
    target_logit = logits.gather(1, torch.where(scored, targets, 0)[:, None]).squeeze(1)
    row_max = logits.amax(dim=1)
    sums = logits.sub_(row_max[:, None]).exp_().sum(dim=1)
    logits.div_(sums[:, None])
    lse = row_max + sums.log()
    return torch.where(scored, lse - target_logit, 0.0), lse


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Σ or per-row cross-entropy of ``hidden @ weight.T + bias``, one chunk of rows at a time.

    Written here because torch < 2.13 has no ``F.linear_cross_entropy``. At most one (chunk, V)
    block of logits exists at any moment. For a summed loss the gradients are computed in the same
    pass as the loss (the softmax of a chunk is its gradient, less one at the target) and scaled by
    the incoming scalar gradient in ``backward``, so each chunk costs the plain path's three matmuls
    and no recomputation. For per-row losses (``reduction="none"``) the incoming gradient differs per
    row, so ``backward`` recomputes each chunk's logits from the saved log-sum-exp.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, ignore_index: int, rows: int, per_row: bool):
        scored = targets != ignore_index
        n = hidden.shape[0]
        nll = hidden.new_empty(n)
        grads = ctx.needs_input_grad[:3]
        ctx.per_row = per_row
        if per_row:
            lse = hidden.new_empty(n)
            for start in range(0, n, rows):
                chunk = slice(start, start + rows)
                logits = _chunk_logits(hidden[chunk], weight, bias)
                nll[chunk], lse[chunk] = _chunk_softmax_and_nll(logits, targets[chunk], scored[chunk])
            ctx.save_for_backward(hidden, weight, bias, targets, lse)
            ctx.rows, ctx.ignore_index = rows, ignore_index
            return nll
        grad_hidden = torch.zeros_like(hidden) if grads[0] else None
        grad_weight = torch.zeros_like(weight) if grads[1] else None
        grad_bias = torch.zeros_like(bias) if bias is not None and grads[2] else None
        for start in range(0, n, rows):
            chunk = slice(start, start + rows)
            logits = _chunk_logits(hidden[chunk], weight, bias)
            nll[chunk], _ = _chunk_softmax_and_nll(logits, targets[chunk], scored[chunk])
            if not any(grads):
                continue
            # d nll / d logits = softmax - onehot(target), zero on ignored rows.
            probs = logits
            _subtract_target_and_mask(probs, targets[chunk], scored[chunk])
            if grad_hidden is not None:
                torch.mm(probs, weight, out=grad_hidden[chunk])
            if grad_weight is not None:
                grad_weight.addmm_(probs.T, hidden[chunk])
            if grad_bias is not None:
                grad_bias.add_(probs.sum(0))
        ctx.grads = (grad_hidden, grad_weight, grad_bias)
        return nll.sum()

    @staticmethod
    def backward(ctx, grad_output):
        if not ctx.per_row:
            scaled = [None if g is None else g * grad_output for g in ctx.grads]
            return *scaled, None, None, None, None
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        needs = ctx.needs_input_grad
        scored = targets != ctx.ignore_index
        grad_hidden = torch.empty_like(hidden) if needs[0] else None
        grad_weight = torch.zeros_like(weight) if needs[1] else None
        grad_bias = torch.zeros_like(bias) if bias is not None and needs[2] else None
        for start in range(0, hidden.shape[0], ctx.rows):
            chunk = slice(start, start + ctx.rows)
            probs = _chunk_logits(hidden[chunk], weight, bias).sub_(lse[chunk, None]).exp_()
            _subtract_target_and_mask(probs, targets[chunk], scored[chunk])
            probs.mul_(grad_output[chunk, None])
            if grad_hidden is not None:
                torch.mm(probs, weight, out=grad_hidden[chunk])
            if grad_weight is not None:
                grad_weight.addmm_(probs.T, hidden[chunk])
            if grad_bias is not None:
                grad_bias.add_(probs.sum(0))
        return grad_hidden, grad_weight, grad_bias, None, None, None, None


def _subtract_target_and_mask(probs: Tensor, targets: Tensor, scored: Tensor) -> None:
    """softmax -> d nll / d logits in place: minus one at each target, zero rows that are ignored."""
    rows = torch.arange(probs.shape[0], device=probs.device)
    probs[rows, torch.where(scored, targets, 0)] -= scored.to(probs.dtype)
    probs.mul_(scored[:, None])


def chunked_linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    *,
    bias: Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
    reduction: Literal["sum", "none"] = "sum",
    rows: int | None = None,
) -> Tensor:
    """Cross-entropy of ``hidden @ weight.T + bias`` (``hidden`` (N, C), ``targets`` (N,)) without the
    (N, V) logits: ``rows`` of them at a time (default :func:`chunk_rows`). ``reduction``: ``"sum"``
    (a scalar) or ``"none"`` (N per-row nats, 0 where ignored)."""
    if reduction not in ("sum", "none"):
        raise ValueError(f"reduction must be 'sum' or 'none', got {reduction!r}")
    rows = rows or chunk_rows(hidden.shape[0], weight.shape[0])
    return _ChunkedLinearCrossEntropy.apply(
        hidden, weight, bias, targets, ignore_index, rows, reduction == "none"
    )


def fused_next_token_loss(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    *,
    bias: Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
    reduction: str = "mean",
    implementation: FusedImplementation = "auto",
) -> Tensor:
    """The same loss as ``next_token_loss(hidden @ weight.T + bias, targets)``, without ever
    materializing the (B·T, V) logits.

    ``hidden`` (B, T, C) are the final hidden states, ``weight`` (V, C) the output projection.
    Inputs are taken to fp32 so the result matches the plain path under mixed precision.
    ``implementation``: ``"torch"`` is torch's chunked ``F.linear_cross_entropy`` (torch >= 2.13),
    ``"chunked"`` the implementation in this module (any torch), ``"auto"`` torch's where it exists.
    """
    _check(reduction, targets)
    if implementation == "auto":
        implementation = fused_loss_backend()
    if implementation not in ("torch", "chunked"):
        raise ValueError(f"implementation must be auto, torch or chunked, got {implementation!r}")
    flat_targets = targets.reshape(-1).long()
    flat_hidden = hidden.reshape(-1, hidden.size(-1))
    summed = "sum" if reduction != "none" else "none"
    with torch.autocast(device_type=hidden.device.type, enabled=False):
        if implementation == "torch":
            nll = F.linear_cross_entropy(
                flat_hidden.float(),
                weight.float(),
                flat_targets,
                linear_bias=None if bias is None else bias.float(),
                ignore_index=ignore_index,
                reduction=summed,
                options=_fused_options(flat_targets.numel(), weight.shape[0], hidden.device),
            )
        else:
            nll = chunked_linear_cross_entropy(
                flat_hidden.float(),
                weight.float(),
                flat_targets,
                bias=None if bias is None else bias.float(),
                ignore_index=ignore_index,
                reduction=summed,
            )
    if reduction == "none":
        return nll.view(targets.shape)
    scored = targets != ignore_index
    return nll if reduction == "sum" else nll / scored.sum().clamp(min=1)


def count_scored(targets: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Number of positions the loss scores (the ``tokens`` of the reduction contract)."""
    return (targets != ignore_index).sum()

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


LOW_PRECISION = (torch.bfloat16, torch.float16)


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


def fused_loss_backend(matmul_dtype: torch.dtype = torch.float32) -> Literal["torch", "chunked"]:
    """Which implementation ``fused_next_token_loss(..., implementation="auto")`` runs for the head's
    matmul dtype: torch's op for fp32 where torch has it, the chunked one otherwise. (Under a
    bf16/fp16 autocast torch 2.13's op returns its loss in that dtype, a summed loss rounded to 3
    significant digits; the chunked one gives exactly the plain path's fp32 loss.)"""
    return "torch" if torch_has_fused_loss() and matmul_dtype == torch.float32 else "chunked"


class _Head:
    """The output projection in its matmul dtype: logits from ``hidden @ weight.T + bias`` as fp32, and
    the two gradient matmuls. With a low-precision ``dtype`` (bf16/fp16 under autocast) the matmuls
    run in it exactly as autocast runs the plain path's ``nn.Linear`` (logits rounded to it, then
    upcast), while the softmax and every gradient buffer stay fp32."""

    def __init__(self, weight: Tensor, bias: Tensor | None, dtype: torch.dtype) -> None:
        self.dtype = dtype
        self.weight = weight.to(dtype)
        self.bias = None if bias is None else bias.to(dtype)

    def logits(self, hidden: Tensor) -> Tensor:
        hidden = hidden.to(self.dtype)
        out = hidden @ self.weight.T if self.bias is None else torch.addmm(self.bias, hidden, self.weight.T)
        return out.float()

    def backprop(
        self,
        grad_logits: Tensor,
        hidden: Tensor,
        grad_hidden: Tensor | None,
        grad_weight: Tensor | None,
        grad_bias: Tensor | None,
    ) -> None:
        """Add this chunk's share: ``grad_hidden`` (the chunk's rows) = g @ W, ``grad_weight`` += g.T @ h."""
        if grad_bias is not None:
            grad_bias.add_(grad_logits.sum(0))
        if self.dtype == torch.float32:
            if grad_hidden is not None:
                torch.mm(grad_logits, self.weight, out=grad_hidden)
            if grad_weight is not None:
                grad_weight.addmm_(grad_logits.T, hidden)
            return
        g = grad_logits.to(self.dtype)
        if grad_hidden is not None:
            grad_hidden.copy_(g @ self.weight)
        if grad_weight is not None:
            grad_weight.add_(g.T @ hidden.to(self.dtype))


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
    def forward(ctx, hidden, weight, bias, targets, ignore_index: int, rows: int, per_row: bool, dtype):
        scored = targets != ignore_index
        n = hidden.shape[0]
        nll = hidden.new_empty(n, dtype=torch.float32)
        grads = ctx.needs_input_grad[:3]
        head = _Head(weight, bias, dtype)
        ctx.per_row = per_row
        if per_row:
            lse = torch.empty_like(nll)
            for start in range(0, n, rows):
                chunk = slice(start, start + rows)
                logits = head.logits(hidden[chunk])
                nll[chunk], lse[chunk] = _chunk_softmax_and_nll(logits, targets[chunk], scored[chunk])
            ctx.save_for_backward(hidden, weight, bias, targets, lse)
            ctx.rows, ctx.ignore_index, ctx.dtype = rows, ignore_index, dtype
            return nll
        grad_hidden = torch.zeros_like(hidden) if grads[0] else None
        grad_weight = torch.zeros_like(weight) if grads[1] else None
        grad_bias = torch.zeros_like(bias) if bias is not None and grads[2] else None
        for start in range(0, n, rows):
            chunk = slice(start, start + rows)
            logits = head.logits(hidden[chunk])
            nll[chunk], _ = _chunk_softmax_and_nll(logits, targets[chunk], scored[chunk])
            if not any(grads):
                continue
            # d nll / d logits = softmax - onehot(target), zero on ignored rows.
            _subtract_target_and_mask(logits, targets[chunk], scored[chunk])
            rows_grad = None if grad_hidden is None else grad_hidden[chunk]
            head.backprop(logits, hidden[chunk], rows_grad, grad_weight, grad_bias)
        ctx.grads = (grad_hidden, grad_weight, grad_bias)
        return nll.sum()

    @staticmethod
    def backward(ctx, grad_output):
        if not ctx.per_row:
            scaled = [None if g is None else g * grad_output for g in ctx.grads]
            return *scaled, None, None, None, None, None
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        needs = ctx.needs_input_grad
        scored = targets != ctx.ignore_index
        head = _Head(weight, bias, ctx.dtype)
        grad_hidden = torch.empty_like(hidden) if needs[0] else None
        grad_weight = torch.zeros_like(weight) if needs[1] else None
        grad_bias = torch.zeros_like(bias) if bias is not None and needs[2] else None
        for start in range(0, hidden.shape[0], ctx.rows):
            chunk = slice(start, start + ctx.rows)
            probs = head.logits(hidden[chunk]).sub_(lse[chunk, None]).exp_()
            _subtract_target_and_mask(probs, targets[chunk], scored[chunk])
            probs.mul_(grad_output[chunk, None])
            rows_grad = None if grad_hidden is None else grad_hidden[chunk]
            head.backprop(probs, hidden[chunk], rows_grad, grad_weight, grad_bias)
        return grad_hidden, grad_weight, grad_bias, None, None, None, None, None


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
    matmul_dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Cross-entropy of ``hidden @ weight.T + bias`` (``hidden`` (N, C), ``targets`` (N,)) without the
    (N, V) logits: ``rows`` of them at a time (default :func:`chunk_rows`). ``reduction``: ``"sum"``
    (a scalar) or ``"none"`` (N per-row nats, 0 where ignored). ``matmul_dtype``: the head's matmuls
    run in it (bf16/fp16 as under autocast); logits, softmax and gradients are fp32 always."""
    if reduction not in ("sum", "none"):
        raise ValueError(f"reduction must be 'sum' or 'none', got {reduction!r}")
    rows = rows or chunk_rows(hidden.shape[0], weight.shape[0])
    return _ChunkedLinearCrossEntropy.apply(
        hidden, weight, bias, targets, ignore_index, rows, reduction == "none", matmul_dtype
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
    The head's matmuls run as the plain path's would: under a bf16/fp16 autocast in that dtype (its
    logits rounded to it, as autocast's ``nn.Linear`` gives them), otherwise in fp32 (inputs of
    another dtype are upcast); the log-softmax and the loss are fp32 always. ``implementation``:
    ``"torch"`` is torch's chunked ``F.linear_cross_entropy`` (torch >= 2.13; fp32 matmuls),
    ``"chunked"`` the implementation in this module (any torch, any matmul dtype), ``"auto"``
    (:func:`fused_loss_backend`) torch's where it applies.
    """
    _check(reduction, targets)
    device_type = hidden.device.type
    matmul_dtype = torch.float32
    if torch.is_autocast_enabled(device_type) and torch.get_autocast_dtype(device_type) in LOW_PRECISION:
        matmul_dtype = torch.get_autocast_dtype(device_type)
    if implementation == "auto":
        implementation = fused_loss_backend(matmul_dtype)
    if implementation not in ("torch", "chunked"):
        raise ValueError(f"implementation must be auto, torch or chunked, got {implementation!r}")
    flat_targets = targets.reshape(-1).long()
    flat_hidden = hidden.reshape(-1, hidden.size(-1))
    summed = "sum" if reduction != "none" else "none"
    with torch.autocast(device_type=device_type, enabled=False):
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
                matmul_dtype=matmul_dtype,
            )
    if reduction == "none":
        return nll.view(targets.shape)
    scored = targets != ignore_index
    return nll if reduction == "sum" else nll / scored.sum().clamp(min=1)


def count_scored(targets: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Number of positions the loss scores (the ``tokens`` of the reduction contract)."""
    return (targets != ignore_index).sum()

"""Muon with the Newton-Schulz iterations of same-shape matrices run as one batched product.

Written by hand because ``torch.optim.Muon`` has no batched or foreach path (``foreach=True``
raises): it orthogonalizes one matrix at a time, five rounds of small products each, and on a CPU
small products waste much of their time. The 24 hidden matrices of a 6 x 192 GPT come in four
shapes; stacking each shape into one batch took the optimizer step from 66 ms to 45 ms on this
project's 2-core CPU (``benchmarks/muon_batched.py``).

Everything else is ``torch.optim.Muon``'s own: its constructor and checks, its parameter groups, its
state (``momentum_buffer``, so checkpoints are interchangeable), its Nesterov momentum, bf16
iterations with the same quintic coefficients, learning-rate adjustment and decoupled weight decay.
Each matrix gets the update torch's Muon would give it (``tests/test_muon.py`` compares them).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor


def orthogonalize(
    updates: Tensor, coefficients: tuple[float, float, float], steps: int, eps: float
) -> Tensor:
    """The quintic Newton-Schulz iteration of ``torch.optim.Muon`` on a batch ``(n, rows, cols)`` of
    matrices of one shape, in bf16: ``X <- a X + (b A + c A^2) X`` with ``A = X X^T``, from ``X``
    scaled to Frobenius norm 1 (so its spectral norm is at most 1), on the wide orientation."""
    a, b, c = coefficients
    x = updates.bfloat16()
    tall = updates.size(-2) > updates.size(-1)
    if tall:
        x = x.mT
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.mT
        x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.mT if tall else x


def adjusted_lr(lr: float, adjust_lr_fn: str | None, shape: torch.Size) -> float:
    """Muon's per-shape learning rate, as ``torch.optim.Muon`` documents it: ``original`` (Keller
    Jordan's ``sqrt(max(1, rows / cols))``) or ``match_rms_adamw`` (Moonlight's ``0.2 sqrt(max(rows, cols))``)."""
    rows, cols = shape[:2]
    if adjust_lr_fn is None or adjust_lr_fn == "original":
        return lr * math.sqrt(max(1, rows / cols))
    if adjust_lr_fn == "match_rms_adamw":
        return lr * 0.2 * math.sqrt(max(rows, cols))
    return lr


class BatchedMuon(torch.optim.Muon):
    """``torch.optim.Muon`` whose step orthogonalizes all matrices of one shape in one batch."""

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params: list[Tensor] = []
            grads: list[Tensor] = []
            buffers: list[Tensor] = []
            self._init_group(group, params, grads, buffers)
            if not params:
                continue
            lr, momentum = float(group["lr"]), group["momentum"]
            torch._foreach_lerp_(buffers, grads, 1 - momentum)
            updates = torch._foreach_lerp(grads, buffers, momentum) if group["nesterov"] else buffers
            by_shape: dict[torch.Size, list[int]] = defaultdict(list)
            for i, p in enumerate(params):
                by_shape[p.shape].append(i)
            for shape, members in by_shape.items():
                ortho = orthogonalize(
                    torch.stack([updates[i] for i in members]),
                    group["ns_coefficients"],
                    group["ns_steps"],
                    group["eps"],
                )
                step_size = adjusted_lr(lr, group["adjust_lr_fn"], shape)
                for j, i in enumerate(members):
                    params[i].mul_(1 - lr * group["weight_decay"])
                    params[i].add_(ortho[j], alpha=-step_size)
        return loss

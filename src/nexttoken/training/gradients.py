"""The gradient's global L2 norm, computed once per optimizer step on the device (no host sync), and
clipping by it: the norm that ``train/grad_norm`` logs is the one the clip used."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor


def _grads_by_device(
    parameters: Iterable[torch.nn.Parameter],
) -> dict[tuple[torch.device, torch.dtype], list[Tensor]]:
    grads: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    for p in parameters:
        if p.grad is not None:
            grads.setdefault((p.grad.device, p.grad.dtype), []).append(p.grad)
    return grads


def global_grad_norm(parameters: Iterable[torch.nn.Parameter], reduce_squares=None) -> Tensor | None:
    """The L2 norm of every gradient together, as a float32 scalar on the first gradient's device
    (None when no parameter has one). One multi-tensor kernel per (device, dtype), as
    ``torch.nn.utils.clip_grad_norm_`` computes it; nothing waits for the device.

    ``reduce_squares``: sums a tensor over processes, for gradients sharded across them (FSDP), where
    each process holds a part of the gradient; None where every process holds all of it (DDP).
    """
    grads = _grads_by_device(parameters)
    if not grads:
        return None
    first = next(iter(grads))[0]
    norms = [n.to(first, torch.float32) for group in grads.values() for n in torch._foreach_norm(group, 2.0)]
    squares = torch.stack(norms).square().sum()
    if reduce_squares is not None:
        squares = reduce_squares(squares)
    return squares.sqrt()


def clip_by_norm(parameters: Iterable[torch.nn.Parameter], max_norm: float, total_norm: Tensor) -> None:
    """Scale every gradient by ``min(1, max_norm / (total_norm + 1e-6))``: what
    ``torch.nn.utils.clip_grad_norm_`` does, with the norm already computed."""
    coef = (max_norm / (total_norm + 1e-6)).clamp(max=1.0)
    for (device, _), group in _grads_by_device(parameters).items():
        torch._foreach_mul_(group, coef.to(device))

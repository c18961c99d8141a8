"""What several benchmarks share: random token batches and the plain (no Lightning) training step.

Benchmarks run as scripts (``python benchmarks/NAME.py``), so this module is imported from the
script's own folder.
"""

from __future__ import annotations

import torch

from nexttoken.data.packing import shift
from nexttoken.loss import fused_next_token_loss, next_token_loss


def random_batches(
    n: int, batch: int, block: int, vocab: int, seed: int = 0
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``n`` random ``(input_ids, targets)`` batches of ``batch`` blocks, cut by the data's own shift."""
    g = torch.Generator().manual_seed(seed)
    blocks = torch.randint(0, vocab, (n, batch, block + 1), generator=g)
    return [tuple(t.contiguous() for t in shift(b)) for b in blocks]


def plain_step(
    model,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    fused: bool = False,
    clip: float | None = 1.0,
    schedule=None,
    autocast: torch.dtype | None = None,
) -> torch.Tensor:
    """One textbook training step: loss (fused or plain), backward, clip, AdamW, schedule, zero grads."""
    with torch.autocast(x.device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
        if fused:
            loss = fused_next_token_loss(model.hidden(x), model.lm_head.weight, y)
        else:
            loss = next_token_loss(model(x), y)
    loss.backward()
    if clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    optimizer.step()
    if schedule is not None:
        schedule.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()

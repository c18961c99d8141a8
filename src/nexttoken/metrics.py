"""The scoreboard: three sums, divided once at the end.

Every number nexttoken prints about how well a model guesses the next token comes from
``nll_sum`` (nats), ``tokens`` (scored positions) and ``bytes`` (UTF-8 bytes those tokens cover).
They are summed over batches, micro-batches and processes (torchmetrics all-reduces by sum),
so the result is the same for any batch size, any split and any number of ranks.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torchmetrics import Metric

LN2 = math.log(2.0)


def summarize(nll_sum: float, tokens: float, bytes: float | None = None) -> dict[str, float]:
    """Turn the three sums into the printed numbers. The single place they are divided.

    ``nll_sum``: nats summed over the scored positions; ``tokens``: how many positions were scored;
    ``bytes``: the UTF-8 bytes those positions cover (``None`` or 0: no ``bits_per_byte``).
    Returns ``loss`` (nats/token), ``perplexity``, ``bits_per_token`` and maybe ``bits_per_byte``.
    """
    if tokens <= 0:
        raise ValueError("no scored tokens: the text is empty or every position was ignored")
    loss = nll_sum / tokens
    out = {
        "loss": loss,
        "perplexity": math.exp(loss) if loss < 700 else math.inf,
        "bits_per_token": loss / LN2,
    }
    if bytes is not None and bytes > 0:
        out["bits_per_byte"] = nll_sum / (LN2 * bytes)
    return out


class NextTokenMetrics(Metric):
    """torchmetrics ``Metric`` over (nll_sum, tokens, bytes), reduced by sum across processes."""

    full_state_update = False
    higher_is_better = False
    is_differentiable = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        # float64 so that summing millions of tokens loses nothing to rounding.
        self.add_state("nll_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("tokens", default=torch.tensor(0, dtype=torch.int64), dist_reduce_fx="sum")
        self.add_state("bytes", default=torch.tensor(0, dtype=torch.int64), dist_reduce_fx="sum")
        self.add_state("bytes_seen", default=torch.tensor(0, dtype=torch.int64), dist_reduce_fx="sum")

    def update(
        self, nll_sum: Tensor | float, tokens: Tensor | int, bytes: Tensor | int | None = None
    ) -> None:
        """Add one batch: ``nll_sum`` in nats over its scored positions, ``tokens`` scored, and the
        UTF-8 ``bytes`` they cover (leave it out where bytes are unknown)."""
        self.nll_sum += torch.as_tensor(nll_sum, dtype=torch.float64, device=self.nll_sum.device).detach()
        self.tokens += torch.as_tensor(tokens, dtype=torch.int64, device=self.tokens.device)
        if bytes is not None:
            self.bytes += torch.as_tensor(bytes, dtype=torch.int64, device=self.bytes.device)
            self.bytes_seen += 1

    def compute(self) -> dict[str, Tensor]:
        """The printed numbers, plus the summed ``tokens`` and ``bytes`` they came from (over every
        process: outside ``compute`` the states are this process's share again)."""
        has_bytes = int(self.bytes_seen) > 0
        numbers = summarize(float(self.nll_sum), float(self.tokens), float(self.bytes) if has_bytes else None)
        out = {name: torch.tensor(value, dtype=torch.float64) for name, value in numbers.items()}
        out["tokens"] = self.tokens.clone()
        if has_bytes:
            out["bytes"] = self.bytes.clone()
        return out

"""Preference pairs scored by the scoring core: each reply's summed log-probability and scored
tokens (:func:`reply_logps`), and the sums the pair scoreboard divides once (:class:`PairSums`).

A reply's log-probability is the sum, over its scored tokens only (the reply's own tokens and its
end-of-turn token, :mod:`nexttoken.data.preferences`), of fp32 log-softmax values, added in float64
by :func:`nexttoken.scoring.core.score_rows`: never a mean, never over the prompt.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

from nexttoken.data.chat import Example
from nexttoken.data.preferences import (
    PairBatch,
    PairFitReport,
    PreferencePair,
    collate_pairs,
    encode_pair,
    fit_pairs_to_block,
)
from nexttoken.loss import IGNORE_INDEX
from nexttoken.models.protocol import CausalLM
from nexttoken.scoring.core import Row, score_rows


@dataclass
class ReplyLogps:
    """Per pair (n,): the chosen and rejected replies' summed log-probabilities (float64) and their
    scored tokens."""

    chosen: Tensor
    rejected: Tensor
    chosen_tokens: Tensor
    rejected_tokens: Tensor


def pair_rows(batch: PairBatch) -> list[Row]:
    """The scoring core's rows of a micro-batch: each row's scored positions read for their reply."""
    rows = []
    for r in range(batch.input_ids.size(0)):
        n = int(batch.lengths[r])
        columns = torch.nonzero(batch.targets[r, :n] != IGNORE_INDEX).flatten()
        segments = None if batch.segments is None else batch.segments[r, :n].cpu()
        rows.append(
            Row(
                batch.input_ids[r, :n].cpu(),
                columns.cpu(),
                batch.targets[r, columns].cpu(),
                batch.owners[r, columns].cpu(),
                segments,
            )
        )
    return rows


def reply_logps(model: CausalLM, batch: PairBatch, grad: bool = False) -> ReplyLogps:
    """Both replies' summed log-probabilities for every pair of ``batch``, in one forward pass
    (``grad``: with their gradient, the model left in its mode)."""
    rows = pair_rows(batch)
    n = batch.n_pairs
    scores = score_rows(model, rows, 2 * n, batch_size=len(rows), grad=grad)
    logp = -scores.nll.view(n, 2)
    tokens = scores.tokens.view(n, 2).to(logp.device)
    return ReplyLogps(logp[:, 0], logp[:, 1], tokens[:, 0], tokens[:, 1])


@dataclass
class PairSums:
    """The pair scoreboard's sums over any number of micro-batches and processes; every mean is one
    of them divided once by ``pairs`` (or by tokens, for the per-token and response-loss numbers).
    ``correct``: pairs whose chosen reward is above the rejected one (a tie counts as wrong)."""

    pairs: int = 0
    loss: float = 0.0
    correct: int = 0
    margin: float = 0.0
    chosen_reward: float = 0.0
    rejected_reward: float = 0.0
    chosen_logp: float = 0.0
    rejected_logp: float = 0.0
    chosen_tokens: int = 0
    rejected_tokens: int = 0
    correct_per_token: int = 0  # pairs whose chosen reply has the higher log-probability per token

    def add(self, logps: ReplyLogps, loss: Tensor, chosen_reward: Tensor, rejected_reward: Tensor) -> None:
        self.pairs += int(logps.chosen.numel())
        self.loss += float(loss.double().sum())
        self.correct += int((chosen_reward > rejected_reward).sum())
        self.margin += float((chosen_reward - rejected_reward).double().sum())
        self.chosen_reward += float(chosen_reward.double().sum())
        self.rejected_reward += float(rejected_reward.double().sum())
        self.chosen_logp += float(logps.chosen.sum())
        self.rejected_logp += float(logps.rejected.sum())
        self.chosen_tokens += int(logps.chosen_tokens.sum())
        self.rejected_tokens += int(logps.rejected_tokens.sum())
        per_token = logps.chosen / logps.chosen_tokens > logps.rejected / logps.rejected_tokens
        self.correct_per_token += int(per_token.sum())

    def means(self) -> dict[str, float]:
        """Per-pair means (and the chosen replies' response loss, nats per token), each divided once."""
        n = max(self.pairs, 1)
        return {
            "pairs": self.pairs,
            "loss": self.loss / n,
            "accuracy": self.correct / n,
            "margin": self.margin / n,
            "chosen_reward": self.chosen_reward / n,
            "rejected_reward": self.rejected_reward / n,
            "chosen_logp": self.chosen_logp / n,
            "rejected_logp": self.rejected_logp / n,
            "accuracy_per_token": self.correct_per_token / n,
            "chosen_response_loss": -self.chosen_logp / max(self.chosen_tokens, 1),
        }

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def score_pairs(
    model: CausalLM, pairs: Sequence[tuple[Example, Example]], batch_size: int | None = None
) -> ReplyLogps:
    """Every pair's reply log-probabilities (no gradient), ``batch_size`` pairs per forward pass
    (default: 8; each pair's two replies side by side, padded)."""
    size = batch_size or 8
    parts = [
        reply_logps(model, collate_pairs(pairs, range(first, min(first + size, len(pairs))), 0, None))
        for first in range(0, len(pairs), size)
    ]
    return ReplyLogps(
        *(torch.cat([getattr(p, name) for p in parts]).cpu() for name in ReplyLogps.__dataclass_fields__)
    )


def encode_pairs_for(
    tokenizer: Any, pairs: Sequence[PreferencePair], chat_template: str | None, max_context: int | None
) -> tuple[list[tuple[Example, Example]], PairFitReport]:
    """``pairs`` rendered with the tokenizer's chat template (or ``chat_template``),
    cut from the left to the model's context, without those left with nothing scored or identical."""
    from nexttoken.data.chat import resolve_chat_template
    from nexttoken.data.tokenizers import as_tokenizer

    template = resolve_chat_template(as_tokenizer(tokenizer), chat_template)
    encoded = [encode_pair(template, pair) for pair in pairs]
    longest = max(max(len(c), len(r)) for c, r in encoded) - 1
    return fit_pairs_to_block(encoded, min(longest, max_context or longest))

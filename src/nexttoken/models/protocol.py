"""The interface every causal LM in nexttoken has: what training, evaluation and sampling may call.

The built-in :class:`~nexttoken.models.gpt.GPT` and the Hugging Face adapter
:class:`~nexttoken.models.hf.HFCausalLM` both implement it, so no code asks a model what it can
do (no ``hasattr``): a capability is either part of this protocol or not used.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor, nn


@runtime_checkable
class CausalLM(Protocol):
    """A next-token model: ``forward`` gives logits ``(B, T, V)`` where ``logits[:, t]`` scores the
    token after ``input_ids[:, t]``. Targets are never passed in: the model does not shift or score."""

    training: bool

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        *,
        logits_to_keep: int = 0,
        document_ids: Tensor | None = None,
    ) -> Tensor:
        """Logits ``(B, T, V)``; ``logits_to_keep=k > 0`` projects only the last ``k`` positions
        onto the vocabulary and returns ``(B, k, V)``. ``attention_mask`` (B, T) marks real tokens
        (1) and right padding (0). ``document_ids`` (B, T) packs several documents into a row:
        positions restart and attention stops at each document (:mod:`nexttoken.models.masking`),
        so each one's logits are those it has alone; padding is one more document, and
        ``attention_mask`` is then not used."""
        ...

    def hidden(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        *,
        document_ids: Tensor | None = None,
        segments: Tensor | None = None,
    ) -> Tensor:
        """Final hidden states ``(B, T, C)``: ``lm_head(hidden(x)) == forward(x)`` whenever
        :attr:`logits_are_linear` (with the same ``document_ids``). ``segments`` (B, T): a shared
        context (0) and branches after it (1, 2, ...; -1 is padding), each branch seeing the context
        and itself only (:func:`nexttoken.models.masking.branch_mask`); a model whose attention cannot
        take such a mask gives wrong states, which scoring checks once before packing rows
        (:func:`nexttoken.scoring.core.packs_branches`)."""
        ...

    @property
    def lm_head(self) -> nn.Linear:
        """The output projection (hidden -> vocabulary), possibly tied to the input embedding."""
        ...

    @property
    def max_context(self) -> int | None:
        """The longest input in tokens (None when the model does not say)."""
        ...

    @property
    def logits_are_linear(self) -> bool:
        """True when the logits are exactly ``lm_head(hidden)`` (no softcapping or scaling), so the
        fused linear + cross-entropy loss may replace the plain one."""
        ...

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs (forward + backward) per token at context ``seq_len`` (for MFU)."""
        ...

    def generate(
        self,
        input_ids: Tensor,
        max_new_tokens: int,
        *,
        temperature: float = 1.0,
        top_k: int | None = None,
        eos_id: int | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """``input_ids`` (B, T) followed by up to ``max_new_tokens`` sampled tokens; ``temperature``
        0 is greedy; a row that emitted ``eos_id`` keeps emitting it."""
        ...


@contextmanager
def evaluating(module: nn.Module) -> Iterator[nn.Module]:
    """Put ``module`` in eval mode (no dropout) for the block, then restore the mode it had."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)

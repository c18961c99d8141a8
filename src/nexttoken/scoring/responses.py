"""Scoring chat and instruction data: each response given its prompt (the numbers that compare two
fine-tunes).

Every conversation is rendered and masked exactly as for training (:mod:`nexttoken.data.chat`), then
scored through the same sliding windows as plain text, in the scoring core
(:func:`nexttoken.scoring.core.score_rows`), restricted to the scored tokens: so a conversation longer than the model's context is scored whole,
every response token exactly once, never truncated. The three sums are those of the reduction
contract over response tokens only: ``nll_sum``, ``tokens`` (response tokens) and ``bytes`` (UTF-8
bytes of the text those tokens cover), divided once by :func:`nexttoken.metrics.summarize`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nexttoken.data.chat import (
    Example,
    TrainOn,
    encode_conversations,
    read_conversations,
    resolve_chat_template,
)
from nexttoken.data.sft import count_examples
from nexttoken.data.tokenizers import as_tokenizer
from nexttoken.errors import UserError, setting
from nexttoken.metrics import summarize
from nexttoken.models.hf import as_causal_lm
from nexttoken.scoring.core import document_rows, resolve_batch_size, score_rows
from nexttoken.scoring.text import JSONResult, progress_bar, resolve_windows


@dataclass
class ResponseEvalResult(JSONResult):
    """Response-only scores. ``response_tokens``: scored tokens; ``prompt_tokens_ignored``: targets
    not scored (prompts, system messages, markup); ``bytes``: UTF-8 bytes the scored tokens cover."""

    examples: int
    response_tokens: int
    prompt_tokens_ignored: int
    bytes: int
    nll_sum: float
    loss: float
    perplexity: float
    bits_per_token: float
    bits_per_byte: float
    context: int
    stride: int
    batch_size: int
    model: str
    dtype: str
    device: str
    seconds: float
    tokens_per_second: float


def evaluate_examples(
    model: nn.Module,
    examples: Sequence[Example],
    context: int | None = None,
    stride: int | None = None,
    batch_size: int | None = None,
    *,
    progress: bool = False,
    model_name: str | None = None,
) -> ResponseEvalResult:
    """Score the scored tokens of encoded ``examples`` (each exactly once, windows as in
    :func:`nexttoken.scoring.text.evaluate_texts`: ``context``/``stride`` in tokens)."""
    if not examples:
        raise UserError("no examples to evaluate; pass at least one conversation")
    model = as_causal_lm(model)
    context, stride = resolve_windows(model, context, stride)
    counts = count_examples(examples)
    if counts.response_tokens == 0:
        raise UserError(
            f"nothing to score: no example has a response token; check the records and {setting('data.train_on')}"
        )
    docs = [torch.from_numpy(e.tokens) for e in examples]
    masks = [torch.from_numpy(e.scored) for e in examples]
    rows = document_rows(docs, context, stride, score_masks=masks)
    param = model.lm_head.weight
    batch_size = resolve_batch_size(batch_size, context, param.device)
    began = time.perf_counter()
    with progress_bar(counts.response_tokens, progress, "eval") as bar:
        scores = score_rows(model, rows, len(docs), batch_size=batch_size, progress=bar.update)
    seconds = time.perf_counter() - began
    nll_sum, tokens = scores.nll_sum, scores.total_tokens
    if tokens != counts.response_tokens:
        raise RuntimeError(
            f"scored {tokens} tokens, expected {counts.response_tokens}: the windows lost some"
        )
    numbers = summarize(nll_sum, tokens, counts.response_bytes)
    return ResponseEvalResult(
        examples=counts.examples,
        response_tokens=tokens,
        prompt_tokens_ignored=counts.prompt_tokens_ignored,
        bytes=counts.response_bytes,
        nll_sum=nll_sum,
        loss=numbers["loss"],
        perplexity=numbers["perplexity"],
        bits_per_token=numbers["bits_per_token"],
        bits_per_byte=numbers.get("bits_per_byte", math.nan),
        context=context,
        stride=stride,
        batch_size=batch_size,
        model=model_name or type(model).__name__,
        dtype=str(param.dtype).removeprefix("torch."),
        device=str(param.device),
        seconds=seconds,
        tokens_per_second=tokens / seconds if seconds > 0 else math.nan,
    )


def evaluate_records(
    model: nn.Module,
    tokenizer: Any,
    records: Iterable[Mapping[str, Any]],
    *,
    fmt: str = "auto",
    chat_template: str | Path | None = None,
    train_on: TrainOn = "responses",
    source: str = "the data",
    context: int | None = None,
    stride: int | None = None,
    batch_size: int | None = None,
    progress: bool = False,
    model_name: str | None = None,
) -> tuple[ResponseEvalResult, str]:
    """``(result, format line)``: chat or instruction ``records`` rendered with the tokenizer's chat
    template (or ``chat_template``, a Jinja file) and scored on their responses given their prompts."""
    tokenizer = as_tokenizer(tokenizer)
    conversations, format_line = read_conversations(records, fmt, source)
    template = resolve_chat_template(tokenizer, chat_template)
    examples = encode_conversations(template, conversations, train_on)
    result = evaluate_examples(
        model, examples, context, stride, batch_size, progress=progress, model_name=model_name
    )
    return result, format_line

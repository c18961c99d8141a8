"""Scoring texts with any causal LM: every token once, through sliding windows, summed exactly.

Each document is ``[start] + tokens`` where ``start`` is the token that begins a document for this
tokenizer (:func:`nexttoken.data.tokenizers.document_start`: the EOS for nexttoken's tokenizers,
the BOS of a pretrained tokenizer that adds one itself, nothing otherwise), so a model is scored
on text laid out exactly as it was trained. Without a start token a document's first token has
no left context and is not scored. ``bos="yes"``/``"no"`` overrides the rule. ``bytes`` and
``words`` always count the whole documents' text.

Windows come from :mod:`nexttoken.scoring.windows` and the model runs in the scoring core
(:func:`nexttoken.scoring.core.score_rows`). Scores add up through the reduction contract:
``nll_sum``, ``tokens`` and ``bytes`` are summed over windows, batches and documents, and divided
once by :func:`nexttoken.metrics.summarize`.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from nexttoken.data.tokenizers import Tokenizer, as_tokenizer, document_start
from nexttoken.errors import UserError, setting
from nexttoken.metrics import summarize
from nexttoken.models.hf import as_causal_lm
from nexttoken.models.protocol import CausalLM
from nexttoken.scoring.core import document_rows, resolve_batch_size, score_rows, window_rows
from nexttoken.scoring.windows import check_window_settings, make_windows

BosMode = Literal["auto", "yes", "no"]
BOS_MODES: tuple[str, ...] = BosMode.__args__


def start_token(tokenizer: Tokenizer, mode: BosMode = "auto") -> int | None:
    """The token prepended to every document: :func:`document_start` (``auto``), always one
    (``yes``: the document start, else the tokenizer's BOS), or none (``no``)."""
    if mode not in BOS_MODES:
        raise UserError(f"{setting('bos')} must be one of {', '.join(BOS_MODES)}, got {mode!r}")
    if mode == "no":
        return None
    start = document_start(tokenizer)
    if mode == "yes" and start is None:
        if tokenizer.bos_id is None:
            raise UserError(
                f"{setting('bos')} yes: this tokenizer defines no BOS token; use {setting('bos')} auto or "
                f"{setting('bos')} no"
            )
        return tokenizer.bos_id
    return start


def resolve_windows(model: CausalLM, context: int | None, stride: int | None) -> tuple[int, int]:
    """``(context, stride)`` in tokens: the model's maximum and half of it unless given; checked."""
    max_context = model.max_context
    if context is None:
        if max_context is None:
            raise UserError(f"cannot tell this model's maximum context; pass {setting('context')} N")
        context = max_context
    if stride is None:
        stride = max(1, context // 2)
    check_window_settings(context, stride, max_context)
    return context, stride


def progress_bar(total: int, enabled: bool, desc: str):
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        unit="tok",
        unit_scale=True,
        desc=desc,
        file=sys.stderr,
        disable=not enabled,
        dynamic_ncols=True,
        mininterval=0.5,
        smoothing=0.1,
    )


class JSONResult:
    """A dataclass of results that prints as one JSON object (non-finite numbers as null)."""

    def to_dict(self) -> dict:
        return {
            k: (v if not isinstance(v, float) or math.isfinite(v) else None) for k, v in asdict(self).items()
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), allow_nan=False)


@dataclass
class EvalResult(JSONResult):
    """What ``nexttoken eval`` reports. ``tokens``: scored tokens; ``bytes``/``words``: UTF-8 bytes and
    whitespace-separated words of the documents' text; ``loss`` in nats per token."""

    documents: int
    tokens: int
    bytes: int
    words: int
    nll_sum: float
    loss: float
    perplexity: float
    bits_per_token: float
    bits_per_byte: float
    word_perplexity: float
    context: int
    stride: int
    batch_size: int
    bos_prepended: bool
    model: str
    dtype: str
    device: str
    seconds: float
    tokens_per_second: float


def _document(start: int | None, ids: Sequence[int]) -> Tensor:
    return torch.tensor(([start] if start is not None else []) + list(ids), dtype=torch.long)


def evaluate_texts(
    model: nn.Module,
    tokenizer,
    texts: Sequence[str],
    context: int | None = None,
    stride: int | None = None,
    batch_size: int | None = None,
    *,
    bos: BosMode = "auto",
    progress: bool = False,
    model_name: str | None = None,
) -> EvalResult:
    """Score every token of every text once with sliding windows (see the module doc).

    ``context`` (tokens per window) defaults to the model's maximum, ``stride`` to ``context // 2``,
    ``batch_size`` (windows per forward pass) to about 1k tokens' worth on CPU. ``bos``: ``auto`` |
    ``yes`` | ``no``. ``model`` is a :class:`CausalLM` (a bare ``transformers`` model is wrapped) and
    ``tokenizer`` a nexttoken :class:`Tokenizer` (a ``transformers`` one is converted).
    """
    texts = list(texts)
    if not texts:
        raise UserError("no documents to evaluate; pass at least one text file")
    model, tokenizer = as_causal_lm(model), as_tokenizer(tokenizer)
    context, stride = resolve_windows(model, context, stride)
    start = start_token(tokenizer, bos)
    docs = [_document(start, tokenizer.encode(text)) for text in texts]
    rows = document_rows(docs, context, stride)
    total = sum(r.columns.numel() for r in rows)
    if total == 0:
        raise UserError(
            "nothing to score: every document is a single token and the tokenizer adds no BOS; "
            f"pass longer text (or {setting('bos')} yes)"
        )
    param = model.lm_head.weight
    batch_size = resolve_batch_size(batch_size, context, param.device)
    began = time.perf_counter()
    with progress_bar(total, progress, "eval") as bar:
        scores = score_rows(model, rows, len(docs), batch_size=batch_size, progress=bar.update)
    seconds = time.perf_counter() - began
    nll_sum, tokens = scores.nll_sum, scores.total_tokens
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    n_words = sum(len(t.split()) for t in texts)
    numbers = summarize(nll_sum, tokens, n_bytes)
    # Word perplexity is exp(nll_sum / words): the same division, with words as the unit.
    word_ppl = summarize(nll_sum, n_words)["perplexity"] if n_words else math.nan
    return EvalResult(
        documents=len(texts),
        tokens=tokens,
        bytes=n_bytes,
        words=n_words,
        nll_sum=nll_sum,
        loss=numbers["loss"],
        perplexity=numbers["perplexity"],
        bits_per_token=numbers["bits_per_token"],
        bits_per_byte=numbers.get("bits_per_byte", math.nan),
        word_perplexity=word_ppl,
        context=context,
        stride=stride,
        batch_size=batch_size,
        bos_prepended=start is not None,
        model=model_name or type(model).__name__,
        dtype=str(param.dtype).removeprefix("torch."),
        device=str(param.device),
        seconds=seconds,
        tokens_per_second=tokens / seconds if seconds > 0 else math.nan,
    )


@dataclass
class TokenScores:
    """Per-token scores of one text (for ``nexttoken inspect``).

    ``ids`` are the text's tokens (no start token); ``nll[i]`` is the nats of ``ids[i]`` (NaN when the
    token was not scored: the first token without a start token); ``top_ids``/``top_probs`` are the
    model's ``k`` best guesses at that position, ``(n, k)``.
    """

    ids: list[int]
    offsets: list[tuple[int, int]]
    nll: Tensor
    top_ids: Tensor
    top_probs: Tensor
    bos_prepended: bool
    context: int
    stride: int


def score_text(
    model: nn.Module,
    tokenizer,
    text: str,
    context: int | None = None,
    stride: int | None = None,
    batch_size: int | None = None,
    *,
    bos: BosMode = "auto",
    topk: int = 5,
    progress: bool = False,
) -> TokenScores:
    """Every token's surprisal and the model's top-``k`` guesses, windowed exactly as :func:`evaluate_texts`."""
    model, tokenizer = as_causal_lm(model), as_tokenizer(tokenizer)
    ids, offsets = tokenizer.encode_with_offsets(text)
    if not ids:
        raise UserError("the text is empty: nothing to inspect")
    context, stride = resolve_windows(model, context, stride)
    start = start_token(tokenizer, bos)
    doc = _document(start, ids)
    shift_by = 1 if start is not None else 0  # doc position p is text token p - shift_by
    windows = make_windows(len(doc), context, stride)
    rows = window_rows([doc], windows)
    batch_size = resolve_batch_size(batch_size, context, model.lm_head.weight.device)
    with progress_bar(len(doc) - 1, progress, "inspect") as bar:
        scores = score_rows(
            model, rows, 1, batch_size=batch_size, per_token=True, topk=topk, progress=bar.update
        )
    n = len(ids)
    nll = torch.full((n,), math.nan, dtype=torch.float64)
    top_ids = torch.zeros((n, topk), dtype=torch.long)
    top_probs = torch.zeros((n, topk), dtype=torch.float32)
    for w, row, token_nll, (k, p) in zip(windows, rows, scores.token_nll, scores.token_top):
        positions = w.begin + row.columns + 1 - shift_by  # the read's target, as a text token index
        nll[positions], top_ids[positions], top_probs[positions] = token_nll, k, p
    return TokenScores(ids, offsets, nll, top_ids, top_probs, start is not None, context, stride)

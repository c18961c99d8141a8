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

from nexttoken.data.overlap import overlapping_tokens
from nexttoken.data.tokenizers import Tokenizer, as_tokenizer, document_start, token_byte_counts
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
    # With ``overlap_spans``: the score split into the overlapping and the clean tokens.
    split: ScoreSplit | None = None

    def to_dict(self) -> dict:
        out = super().to_dict()
        if self.split is None:
            del out["split"]
        else:
            out["split"] = self.split.to_dict()
        return out


@dataclass
class ScorePart:
    """One part of a score as the reduction contract's three sums: ``nll_sum`` (nats), ``tokens``
    (scored tokens), ``bytes`` (UTF-8 bytes of the text its tokens cover, scored or not)."""

    nll_sum: float
    tokens: int
    bytes: int

    def to_dict(self) -> dict:
        out: dict = {"nll_sum": self.nll_sum, "tokens": self.tokens, "bytes": self.bytes}
        numbers = summarize(self.nll_sum, self.tokens, self.bytes) if self.tokens else {}
        for key in ("loss", "perplexity", "bits_per_byte"):
            value = numbers.get(key)
            out[key] = value if value is not None and math.isfinite(value) else None
        return out


@dataclass
class ScoreSplit:
    """A score split by token: ``overlapping`` (tokens that share a character with text that occurs
    in training) and ``clean`` (the rest), in all and per document. The parts' sums add up to the
    whole score's exactly: every scored token is in one part (the per-owner sums of one pass)."""

    overlapping: ScorePart
    clean: ScorePart
    documents: list[tuple[ScorePart, ScorePart]]

    def to_dict(self) -> dict:
        return {
            "overlapping": self.overlapping.to_dict(),
            "clean": self.clean.to_dict(),
            "documents": [{"overlapping": o.to_dict(), "clean": c.to_dict()} for o, c in self.documents],
        }


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
    overlap_spans: Sequence[Sequence[tuple[int, int]]] | None = None,
) -> EvalResult:
    """Score every token of every text once with sliding windows (see the module doc).

    ``overlap_spans``: per text, the characters ``[start, end)`` that occur in training
    (:func:`nexttoken.data.overlap.covered_character_spans`); the result's ``split`` then holds the
    score of the tokens that share a character with them and of the rest (:class:`ScoreSplit`).

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
    if overlap_spans is None:
        docs = [_document(start, tokenizer.encode(text)) for text in texts]
        rows = document_rows(docs, context, stride)
    else:
        docs, rows, token_bytes, overlapping = _split_rows(
            tokenizer, texts, start, context, stride, overlap_spans
        )
    total = sum(r.columns.numel() for r in rows)
    if total == 0:
        raise UserError(
            "nothing to score: every document is a single token and the tokenizer adds no BOS; "
            f"pass longer text (or {setting('bos')} yes)"
        )
    param = model.lm_head.weight
    batch_size = resolve_batch_size(batch_size, context, param.device)
    began = time.perf_counter()
    owners = len(docs) if overlap_spans is None else 2 * len(docs)
    with progress_bar(total, progress, "eval") as bar:
        scores = score_rows(model, rows, owners, batch_size=batch_size, progress=bar.update)
    seconds = time.perf_counter() - began
    nll_sum, tokens = scores.nll_sum, scores.total_tokens
    split = None
    if overlap_spans is not None:
        split = _split(scores, token_bytes, overlapping)
        nll_sum = split.overlapping.nll_sum + split.clean.nll_sum  # the whole is its two parts
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
        split=split,
    )


def _split_rows(tokenizer: Tokenizer, texts, start, context, stride, overlap_spans):
    """The documents and their rows with each read owned by ``2 * document + overlapping``, where
    ``overlapping`` says whether the token it scores shares a character with ``overlap_spans``; and
    per document, the bytes each token covers and which tokens overlap."""
    if len(overlap_spans) != len(texts):
        raise ValueError(f"{len(overlap_spans)} lists of overlap spans for {len(texts)} texts")
    docs, token_bytes, overlapping = [], [], []
    for text, spans in zip(texts, overlap_spans):
        ids, offsets = tokenizer.encode_with_offsets(text)
        docs.append(_document(start, ids))
        token_bytes.append(token_byte_counts(text, offsets, [False] * len(ids)))
        overlapping.append(torch.from_numpy(overlapping_tokens(offsets, spans)))
    shift_by = 1 if start is not None else 0  # document position p is text token p - shift_by
    windows = [w for d, ids in enumerate(docs) for w in make_windows(len(ids), context, stride, doc=d)]
    rows = window_rows(docs, windows)
    for w, row in zip(windows, rows):
        row.owners = 2 * row.owners + overlapping[w.doc][w.begin + row.columns + 1 - shift_by].long()
    return docs, rows, token_bytes, overlapping


def _split(scores, token_bytes, overlapping) -> ScoreSplit:
    nll, tokens = scores.nll.view(-1, 2), scores.tokens.view(-1, 2)  # per document: (clean, overlapping)
    documents = []
    for d, (counts, mask) in enumerate(zip(token_bytes, overlapping)):
        mask = mask.numpy()
        overlap_bytes = int(counts[mask].sum())
        documents.append(
            (
                ScorePart(float(nll[d, 1]), int(tokens[d, 1]), overlap_bytes),
                ScorePart(float(nll[d, 0]), int(tokens[d, 0]), int(counts.sum()) - overlap_bytes),
            )
        )
    return ScoreSplit(
        ScorePart(float(nll[:, 1].sum()), int(tokens[:, 1].sum()), sum(o.bytes for o, _ in documents)),
        ScorePart(float(nll[:, 0].sum()), int(tokens[:, 0].sum()), sum(c.bytes for _, c in documents)),
        documents,
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

"""The scoring core: the one place a model is run to score text.

Every scoring path turns its work into :class:`Row` s and calls :func:`score_rows`: ``nexttoken eval``
on text (:mod:`nexttoken.scoring.text`) and on chat records (:mod:`nexttoken.scoring.responses`), the
surprisal view, and lm-eval's rolling and ``loglikelihood`` requests (:mod:`nexttoken.scoring.lmeval`).
A row is one sequence of a forward pass; each of its positions may score one target token for one
*owner* (a document, an example, a request), so per-owner sums come out of one pass over many rows:

* a long document becomes windows (:mod:`nexttoken.scoring.windows`), one row each, all owned by the
  document (:func:`window_rows`), so every target is scored exactly once;
* a score mask keeps only some targets (a chat example's response tokens);
* a row may pack a shared context and several branches after it (``segments``), each branch seeing
  the context and itself only, for the choices of a multiple-choice question
  (:func:`packs_branches` checks once per model that it honours that).

Only the scored positions are projected onto the vocabulary (in chunks of bounded size), in the
model's dtype, and every log-probability is taken in fp32 (:func:`nexttoken.loss.next_token_loss`).
The sums are those of the reduction contract: ``nll`` and ``tokens`` per owner, added up in float64
and divided once by the caller (:func:`nexttoken.metrics.summarize`).
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from nexttoken.data.packing import shift
from nexttoken.errors import UserError, setting
from nexttoken.loss import next_token_loss
from nexttoken.models.protocol import CausalLM, evaluating
from nexttoken.scoring.windows import Window, make_windows

# Logits projected at once for the gathered scored positions (fp32: 2**25 logits = 128 MB).
HEAD_CHUNK_LOGITS = 2**25


@dataclass
class Row:
    """One sequence of a forward pass and what is read from it.

    ``ids`` (L,) are fed to the model. Each *read* ``k`` scores ``targets[k]`` (the token that
    follows ``ids[columns[k]]``) for ``owners[k]``; a position may be read more than once (two
    requests that share a prefix, the context's last token for every branch). ``segments`` (L,),
    when given, packs a shared context (0) and branches after it (1, 2, ...) into the row.
    """

    ids: Tensor
    columns: Tensor
    targets: Tensor
    owners: Tensor
    segments: Tensor | None = None

    def __len__(self) -> int:
        return self.ids.numel()


@dataclass
class Scores:
    """Per owner: ``nll`` (float64, nats summed over its scored tokens), ``tokens`` (scored tokens),
    ``misses`` (scored tokens that were not the model's top guess). With ``per_token``, ``token_nll``
    holds, per row, the nats of each read, and with ``topk``, ``token_top`` the model's ``topk``
    guesses there ``(ids, probabilities)``."""

    nll: Tensor
    tokens: Tensor
    misses: Tensor
    token_nll: list[Tensor | None] = field(default_factory=list)
    token_top: list[tuple[Tensor, Tensor] | None] = field(default_factory=list)

    @property
    def nll_sum(self) -> float:
        return float(self.nll.sum())

    @property
    def total_tokens(self) -> int:
        return int(self.tokens.sum())


def default_batch_size(context: int, device: torch.device) -> int:
    """About 1k row tokens per batch on CPU (bigger batches do not run faster there), 8k on GPUs."""
    budget = 8192 if device.type == "cuda" else 1024
    return max(1, budget // context)


def resolve_batch_size(batch_size: int | None, context: int, device: torch.device) -> int:
    """Rows per forward pass: ``batch_size`` checked, or :func:`default_batch_size`."""
    if batch_size is None:
        return default_batch_size(context, device)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise UserError(f"{setting('batch_size')} must be a positive number of windows, got {batch_size!r}")
    return batch_size


def window_rows(
    docs: Sequence[Tensor],
    windows: Sequence[Window],
    score_masks: Sequence[Tensor] | None = None,
) -> list[Row]:
    """One row per window, owned by its document: the window's last ``n_scored`` targets are read
    (and of those, with ``score_masks[d]`` (bool, one per token of ``docs[d]``), only the tokens
    marked True; the mask shifts with the targets). Every target of every document is scored by
    exactly one window (checked)."""
    rows = []
    for w in windows:
        ids, targets = shift(docs[w.doc][w.begin : w.end + 1])
        columns = torch.arange(w.length - w.n_scored, w.length)
        if score_masks is not None:
            keep = shift(score_masks[w.doc][w.begin : w.end + 1])[1]
            columns = columns[keep[columns]]
        rows.append(Row(ids, columns, targets[columns], torch.full_like(columns, w.doc)))
    expected = sum(
        int(score_masks[d][1:].sum()) if score_masks is not None else max(0, len(doc) - 1)
        for d, doc in enumerate(docs)
    )
    scored = sum(r.columns.numel() for r in rows)
    if scored != expected:
        raise RuntimeError(f"the windows score {scored} tokens, expected {expected}")
    return rows


def document_rows(
    docs: Sequence[Tensor], context: int, stride: int, score_masks: Sequence[Tensor] | None = None
) -> list[Row]:
    """:func:`window_rows` over the sliding windows of every document (``context``/``stride`` in tokens)."""
    windows = [w for d, ids in enumerate(docs) for w in make_windows(len(ids), context, stride, doc=d)]
    return window_rows(docs, windows, score_masks)


def score_rows(
    model: CausalLM,
    rows: Sequence[Row],
    n_owners: int,
    *,
    batch_size: int | None = None,
    per_token: bool = False,
    topk: int = 0,
    progress: Callable[[int], None] | None = None,
    grad: bool = False,
) -> Scores:
    """Score ``rows`` with ``model`` (in eval mode, without gradients) into per-owner sums.

    Rows run longest first (similar lengths share a batch; the sums do not care), ``batch_size`` rows
    per forward pass, or by default about 1k tokens' worth on CPU and 8k on GPU. ``progress`` is
    called with the number of tokens each batch scored.

    ``grad=True`` is for training objectives built on sequence log-probabilities (preference
    tuning): the model keeps its mode, autograd records the pass, and ``nll`` stays on the model's
    device with its gradient.
    """
    device = model.lm_head.weight.device
    # MPS has no float64: its sums are kept on the CPU.
    home = device if device.type != "mps" else torch.device("cpu")
    nll = torch.zeros(n_owners, dtype=torch.float64, device=home)
    tokens = torch.zeros(n_owners, dtype=torch.long, device=home)
    misses = torch.zeros(n_owners, dtype=torch.long, device=home)
    # Longest first; a row with nothing to read (a window without response tokens) is not run.
    order = sorted((i for i in range(len(rows)) if rows[i].columns.numel()), key=lambda i: -len(rows[i]))
    token_nll: list[Tensor | None] = [None] * len(rows)
    token_top: list[tuple[Tensor, Tensor] | None] = [None] * len(rows)
    with contextlib.ExitStack() as scoring:
        if not grad:
            scoring.enter_context(evaluating(model))
            scoring.enter_context(torch.inference_mode())
        for batch in _batches([len(rows[i]) for i in order], batch_size, device):
            chunk = [rows[order[i]] for i in batch]
            targets, owners, logits = _forward(model, chunk, device)
            token = torch.cat([next_token_loss(lg, t, reduction="none") for lg, t in zip(logits, targets)])
            wrong = torch.cat([lg.argmax(dim=-1) != t for lg, t in zip(logits, targets)])
            owners = torch.cat(owners).to(home)
            nll.index_add_(0, owners, token.double().to(home))
            tokens.index_add_(0, owners, torch.ones_like(owners))
            misses.index_add_(0, owners, wrong.long().to(home))
            if per_token:
                _keep_per_token(chunk, [order[i] for i in batch], token, logits, topk, token_nll, token_top)
            if progress is not None:
                progress(int(owners.numel()))
    return Scores(nll if grad else nll.cpu(), tokens.cpu(), misses.cpu(), token_nll, token_top)


def _batches(lengths: Sequence[int], batch_size: int | None, device: torch.device) -> Iterator[range]:
    """Consecutive index ranges over rows sorted longest first."""
    first = 0
    while first < len(lengths):
        size = batch_size or default_batch_size(max(1, lengths[first]), device)
        yield range(first, min(first + size, len(lengths)))
        first += size


def _forward(
    model: CausalLM, rows: Sequence[Row], device: torch.device
) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
    """One forward pass over ``rows`` (right-padded): per chunk of the reads, their targets, owners
    and logits (only the read positions are projected onto the vocabulary)."""
    width = max(len(r) for r in rows)
    inputs = torch.zeros((len(rows), width), dtype=torch.long)
    packed = any(r.segments is not None for r in rows)
    segments = torch.full((len(rows), width), -1, dtype=torch.long) if packed else None
    for b, row in enumerate(rows):
        inputs[b, : len(row)] = row.ids
        if packed:
            segments[b, : len(row)] = row.segments if row.segments is not None else 0
    row_of = torch.cat([torch.full_like(r.columns, b) for b, r in enumerate(rows)]).to(device)
    col_of = torch.cat([r.columns for r in rows]).to(device)
    targets = torch.cat([r.targets for r in rows]).to(device)
    owners = torch.cat([r.owners for r in rows])
    inputs = inputs.to(device)
    if packed:
        hidden = model.hidden(inputs, segments=segments.to(device))
        logits = list(_project(model, hidden[row_of, col_of]))
    else:
        lengths = torch.tensor([len(r) for r in rows])
        mask = None
        if bool((lengths < width).any()):
            mask = (torch.arange(width)[None, :] < lengths[:, None]).long().to(device)
        if model.logits_are_linear:
            logits = list(_project(model, model.hidden(inputs, mask)[row_of, col_of]))
        else:  # softcapped or scaled logits: the model's own head, on the band of read positions
            first = int(col_of.min())
            band = model(inputs, mask, logits_to_keep=width - first)
            logits = [band[row_of, col_of - first]]
    sizes = [lg.size(0) for lg in logits]
    return list(targets.split(sizes)), list(owners.split(sizes)), logits


def _project(model: CausalLM, hidden: Tensor) -> Iterator[Tensor]:
    """``lm_head`` over gathered hidden states (N, C), in chunks of bounded size."""
    step = max(1, HEAD_CHUNK_LOGITS // model.lm_head.weight.shape[0])
    for first in range(0, hidden.size(0), step):
        yield model.lm_head(hidden[first : first + step])


def _keep_per_token(rows, indices, token, logits, topk, token_nll, token_top) -> None:
    """Per row of the batch, in its reads' order: their nats and, with ``topk``, the top guesses."""
    token = token.double().cpu()
    if topk:
        probs = torch.cat([torch.softmax(lg.float(), dim=-1) for lg in logits])
        top_p, top_i = (t.cpu() for t in probs.topk(topk, dim=-1))
    first = 0
    for row, index in zip(rows, indices):
        n = row.columns.numel()
        token_nll[index] = token[first : first + n]
        if topk:
            token_top[index] = (top_i[first : first + n], top_p[first : first + n])
        first += n


def packs_branches(model: CausalLM) -> bool:
    """Whether ``model`` honours a packed row's shared context (``segments``): a context with two
    branches, packed, must give the log-probabilities of the two separate sequences. Checked once
    per model; a model whose logits are not ``lm_head(hidden)`` is never packed."""
    answer = _PACKS_BRANCHES.get(model)
    if answer is None:
        answer = model.logits_are_linear and _branches_agree(model)
        _PACKS_BRANCHES[model] = answer
    return answer


# Per model, held weakly: checking keeps no model alive.
_PACKS_BRANCHES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _branches_agree(model: CausalLM) -> bool:
    vocab = model.lm_head.weight.shape[0]
    ids = [(7919 * k + 11) % vocab for k in range(1, 10)]
    context, branches = ids[:5], [ids[5:8], ids[2:4]]
    separate = [_plain_row(context + b, len(context), owner) for owner, b in enumerate(branches)]
    packed = [branch_row(context, [(b, owner) for owner, b in enumerate(branches)])]
    try:
        alone = score_rows(model, separate, 2).nll
        together = score_rows(model, packed, 2).nll
    except Exception:  # noqa: BLE001 - any failure means: not this model
        return False
    tolerance = 1e-4 if model.lm_head.weight.dtype == torch.float32 else 5e-2
    return bool(torch.allclose(alone, together, rtol=0, atol=tolerance * len(ids)))


def _plain_row(sequence: Sequence[int], n_context: int, owner: int) -> Row:
    """``sequence`` with every token after its first ``n_context`` read for ``owner``."""
    ids = torch.tensor(list(sequence[:-1]), dtype=torch.long)
    columns = torch.arange(n_context - 1, len(sequence) - 1)
    return Row(ids, columns, torch.tensor(list(sequence))[columns + 1], torch.full_like(columns, owner))


def branch_row(context: Sequence[int], branches: Sequence[tuple[Sequence[int], int]]) -> Row:
    """One packed row: ``context``, then each ``(continuation, owner)`` as a branch that sees the
    context and itself only; every token of a continuation is read for its owner (the first one
    from the context's last position)."""
    c = len(context)
    ids, segments = list(context), [0] * c
    columns, targets, owners = [], [], []
    for k, (continuation, owner) in enumerate(branches, start=1):
        start = len(ids)
        columns += [c - 1] + list(range(start, start + len(continuation) - 1))
        targets += list(continuation)
        owners += [owner] * len(continuation)
        ids += list(continuation[:-1])
        segments += [k] * (len(continuation) - 1)
    as_long = lambda values: torch.tensor(values, dtype=torch.long)  # noqa: E731
    return Row(as_long(ids), as_long(columns), as_long(targets), as_long(owners), as_long(segments))

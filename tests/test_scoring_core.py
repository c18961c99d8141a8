"""The scoring core (``nexttoken.scoring.core``) against sums computed by hand from full forward passes."""

import math

import pytest
import torch

from nexttoken.models.gpt import GPT, GPTConfig
from nexttoken.scoring.core import (
    Row,
    branch_row,
    document_rows,
    packs_branches,
    score_rows,
    window_rows,
)
from nexttoken.scoring.windows import Window, make_windows

VOCAB = 61


@pytest.fixture(scope="module")
def model() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=VOCAB, block_size=24, n_layer=2, n_head=2, n_embd=32)).eval()


def logprobs(model: GPT, ids: list[int]) -> torch.Tensor:
    """(len(ids) - 1,) float64: log Q(ids[t + 1] | ids[: t + 1]) from one full forward pass."""
    with torch.no_grad():
        logits = model(torch.tensor([ids[:-1]])).double()[0]
    return torch.log_softmax(logits, dim=-1)[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]


def test_document_rows_sum_every_target_once(model):
    """Documents that fit one window: the core's per-document nats equal the full forward pass's,
    for any batch size."""
    g = torch.Generator().manual_seed(1)
    docs = [torch.randint(0, VOCAB, (n,), generator=g) for n in (24, 7, 2, 19)]
    want = torch.tensor([-float(logprobs(model, d.tolist()).sum()) for d in docs], dtype=torch.float64)
    for batch_size in (1, 3, None):
        scores = score_rows(model, document_rows(docs, 24, 12), len(docs), batch_size=batch_size)
        torch.testing.assert_close(scores.nll, want, rtol=1e-5, atol=1e-5)
        assert scores.tokens.tolist() == [len(d) - 1 for d in docs]


def test_windows_with_a_score_mask_score_only_the_masked_targets(model):
    """A document longer than the context: each window scores with its own left context, and only
    the masked targets count (the mask shifts with the targets)."""
    g = torch.Generator().manual_seed(2)
    doc = torch.randint(0, VOCAB, (50,), generator=g)
    mask = torch.rand(50, generator=g) < 0.5
    context, stride = 16, 5
    windows = make_windows(len(doc), context, stride)
    scores = score_rows(model, window_rows([doc], windows, [mask]), 1, batch_size=2, per_token=True)
    want, n = 0.0, 0
    for w in windows:
        logp = logprobs(model, doc[w.begin : w.end + 1].tolist())
        for t in range(w.length - w.n_scored, w.length):
            if mask[w.begin + t + 1]:
                want -= float(logp[t])
                n += 1
    assert int(scores.tokens[0]) == n == int(mask[1:].sum())
    assert float(scores.nll[0]) == pytest.approx(want, rel=1e-5)
    assert sum(len(t) for t in scores.token_nll) == n


def test_windows_that_miss_a_target_are_refused():
    doc = torch.arange(10)
    gap = [Window(0, 0, 4, 4), Window(0, 5, 9, 4)]  # target 5 is scored by neither
    with pytest.raises(RuntimeError, match="the windows score 8 tokens, expected 9"):
        window_rows([doc], gap)


def test_reads_of_several_owners_share_a_row(model):
    """One row read by three owners, one position twice: each owner gets its own reads' nats, and
    ``misses`` counts targets that were not the top guess."""
    ids = [3, 14, 15, 9, 26, 5, 35]
    logp = logprobs(model, ids)
    with torch.no_grad():
        top = model(torch.tensor([ids[:-1]]))[0].argmax(-1)
    row = Row(
        torch.tensor(ids[:-1]),
        columns=torch.tensor([1, 2, 2, 5]),
        targets=torch.tensor([ids[2], ids[3], ids[3], ids[6]]),
        owners=torch.tensor([0, 0, 1, 2]),
    )
    scores = score_rows(model, [row], 3)
    want = [-(logp[1] + logp[2]), -logp[2], -logp[5]]
    torch.testing.assert_close(scores.nll, torch.stack(want).double(), rtol=1e-5, atol=1e-6)
    assert scores.tokens.tolist() == [2, 1, 1]
    misses = [int(top[1] != ids[2]) + int(top[2] != ids[3]), int(top[2] != ids[3]), int(top[5] != ids[6])]
    assert scores.misses.tolist() == misses


def test_a_packed_row_of_branches_scores_each_as_if_alone(model):
    context = [7, 1, 8, 2, 8]
    branches = [[1, 8, 2], [5, 9], [4]]
    packed = branch_row(context, [(b, owner) for owner, b in enumerate(branches)])
    assert packed.segments.tolist() == [0] * 5 + [1, 1, 2]
    scores = score_rows(model, [packed], 3)
    for owner, branch in enumerate(branches):
        alone = logprobs(model, context + branch)[len(context) - 1 :]
        assert float(scores.nll[owner]) == pytest.approx(-float(alone.sum()), rel=1e-5, abs=1e-6)
    assert packs_branches(model)


def test_an_empty_row_is_not_run_and_nothing_is_lost(model):
    empty = Row(torch.tensor([1, 2, 3]), torch.tensor([], dtype=torch.long), torch.tensor([], dtype=torch.long),
                torch.tensor([], dtype=torch.long))  # fmt: skip
    doc = torch.tensor([4, 5, 6, 7])
    scores = score_rows(model, [empty, *document_rows([doc], 8, 8)], 1)
    assert int(scores.tokens[0]) == 3 and math.isfinite(float(scores.nll[0]))


def test_with_grad_the_sums_carry_the_gradient_of_the_summed_log_probabilities(model):
    """``grad=True`` (what a preference objective needs): the per-owner sums' gradient equals the
    gradient of the log-probabilities summed by hand from a full forward pass, and the model keeps
    its mode."""
    g = torch.Generator().manual_seed(3)
    docs = [torch.randint(0, VOCAB, (n,), generator=g) for n in (12, 9)]
    weights = torch.tensor([0.7, -1.3], dtype=torch.float64)
    model.train()
    try:
        scores = score_rows(model, document_rows(docs, 24, 24), 2, grad=True)
        assert model.training and scores.nll.requires_grad
        (scores.nll * weights).sum().backward()
        ours = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        by_hand = sum(-w * logprobs_with_grad(model, d.tolist()).sum() for w, d in zip(weights, docs))
        by_hand.backward()
        for mine, theirs in zip(ours, (p.grad for p in model.parameters())):
            torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-6)
    finally:
        model.zero_grad()
        model.eval()


def logprobs_with_grad(model: GPT, ids: list[int]) -> torch.Tensor:
    logits = model(torch.tensor([ids[:-1]])).double()[0]
    return torch.log_softmax(logits, dim=-1)[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]

import math

import pytest
import torch
import torch.nn.functional as F

from nexttoken.loss import (
    chunk_rows,
    chunked_linear_cross_entropy,
    count_scored,
    fused_loss_backend,
    fused_next_token_loss,
    next_token_loss,
)


def random_batch(B=3, T=11, V=17, ignore_fraction=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g) * 3
    targets = torch.randint(0, V, (B, T), generator=g)
    targets[torch.rand(B, T, generator=g) < ignore_fraction] = -100
    return logits, targets


@pytest.mark.parametrize("seed", range(5))
def test_parity_with_torch_cross_entropy_under_random_ignore_masks(seed):
    logits, targets = random_batch(seed=seed)
    flat_logits, flat_targets = logits.view(-1, logits.size(-1)), targets.view(-1)
    expected_mean = F.cross_entropy(flat_logits, flat_targets, ignore_index=-100)
    expected_sum = F.cross_entropy(flat_logits, flat_targets, ignore_index=-100, reduction="sum")
    torch.testing.assert_close(next_token_loss(logits, targets), expected_mean)
    torch.testing.assert_close(next_token_loss(logits, targets, reduction="sum"), expected_sum)
    per_token = next_token_loss(logits, targets, reduction="none")
    assert per_token.shape == targets.shape
    assert torch.all(per_token[targets == -100] == 0)
    torch.testing.assert_close(per_token.sum(), expected_sum)


def test_loss_does_not_shift():
    # Position t is scored against targets[t] and nothing else: a one-position logit
    # distribution that is certain of targets[t] gives zero loss at t.
    V = 5
    targets = torch.tensor([[3, 1, 4]])
    logits = torch.full((1, 3, V), -1e4)
    logits[0, torch.arange(3), targets[0]] = 1e4
    assert next_token_loss(logits, targets).item() == 0.0


def test_custom_ignore_index():
    logits, targets = random_batch(seed=7, ignore_fraction=0.0)
    targets[0, :4] = 0
    expected = F.cross_entropy(logits.view(-1, 17), targets.view(-1), ignore_index=0)
    torch.testing.assert_close(next_token_loss(logits, targets, ignore_index=0), expected)


@pytest.mark.parametrize("p_correct, expected", [(0.9, 0.105), (0.01, 4.605)])
def test_two_students(p_correct, expected):
    # A student who gives the right token probability p pays -ln p nats, whatever the vocabulary.
    V = 10
    probs = torch.full((1, 1, V), (1 - p_correct) / (V - 1))
    probs[0, 0, 2] = p_correct
    loss = next_token_loss(probs.log(), torch.tensor([[2]]))
    assert loss.item() == pytest.approx(-math.log(p_correct), rel=1e-6)
    assert loss.item() == pytest.approx(expected, abs=5e-4)


@pytest.mark.parametrize("V", [2, 257, 50257])
def test_uniform_logits_give_ln_vocab(V):
    targets = torch.randint(0, V, (2, 8))
    loss = next_token_loss(torch.zeros(2, 8, V), targets)
    assert loss.item() == pytest.approx(math.log(V), rel=1e-6)
    assert math.exp(loss.item()) == pytest.approx(V, rel=1e-5)


def test_bf16_logits_are_scored_in_fp32():
    logits, targets = random_batch(V=1000, T=64, seed=3)
    low = logits.to(torch.bfloat16)
    loss = next_token_loss(low, targets)
    assert loss.dtype == torch.float32
    # The fp32 answer for exactly the logits the bf16 model produced.
    expected = F.cross_entropy(low.float().view(-1, 1000), targets.view(-1), ignore_index=-100)
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)
    # Doing the log-softmax in bf16 instead would be visibly off.
    sloppy = F.cross_entropy(low.view(-1, 1000), targets.view(-1), ignore_index=-100).float()
    assert (sloppy - expected).abs() > (loss - expected).abs()


def test_bf16_autocast_region_still_gives_fp32():
    logits, targets = random_batch(seed=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = next_token_loss(logits, targets)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, next_token_loss(logits, targets))


def test_all_ignored_gives_zero_not_nan():
    logits = torch.randn(2, 4, 9, requires_grad=True)
    targets = torch.full((2, 4), -100)
    assert next_token_loss(logits, targets, reduction="sum").item() == 0.0
    mean = next_token_loss(logits, targets)
    assert mean.item() == 0.0 and not torch.isnan(mean)
    assert count_scored(targets).item() == 0
    mean.backward()
    assert torch.all(logits.grad == 0)


def test_bad_arguments():
    logits, targets = random_batch()
    with pytest.raises(ValueError, match="reduction"):
        next_token_loss(logits, targets, reduction="avg")
    with pytest.raises(ValueError, match="disagree"):
        next_token_loss(logits[:, :-1], targets)
    with pytest.raises(TypeError, match="integer"):
        next_token_loss(logits, targets.float())


# Every fused-path test runs against both implementations: torch's F.linear_cross_entropy (torch >= 2.13)
# and the chunked one in nexttoken.loss that runs where torch has no such op.
IMPLEMENTATIONS = ["torch", "chunked"]


def fused_case(B=2, T=48, C=16, V=300, seed=0, bias=False, ignore_index=-100):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, C, generator=g, requires_grad=True)
    weight = (torch.randn(V, C, generator=g) * 0.3).requires_grad_()
    b = torch.randn(V, generator=g).requires_grad_() if bias else None
    targets = torch.randint(0, V, (B, T), generator=g)
    targets[0, :10] = ignore_index
    return hidden, weight, b, targets


def loss_and_grads(loss_fn, hidden, weight, bias, upstream=None):
    """The loss and the gradients of (loss * upstream).sum() w.r.t. hidden, weight (and bias)."""
    for t in (hidden, weight, bias):
        if t is not None:
            t.grad = None
    loss = loss_fn()
    (loss * (1 if upstream is None else upstream)).sum().backward()
    grads = [t.grad.clone() for t in (hidden, weight, bias) if t is not None]
    return loss.detach(), grads


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("bias", [False, True])
def test_fused_path_matches_plain_path_loss_and_gradients(implementation, reduction, bias):
    hidden, weight, b, targets = fused_case(bias=bias)
    # Per-token losses get a different upstream gradient for every position, as a weighted sum would.
    upstream = (
        torch.rand(targets.shape, generator=torch.Generator().manual_seed(5)) if reduction == "none" else None
    )
    fused, grads_fused = loss_and_grads(
        lambda: fused_next_token_loss(
            hidden, weight, targets, bias=b, reduction=reduction, implementation=implementation
        ),
        hidden,
        weight,
        b,
        upstream,
    )
    logits = lambda: hidden @ weight.T + (0 if b is None else b)  # noqa: E731
    plain, grads_plain = loss_and_grads(
        lambda: next_token_loss(logits(), targets, reduction=reduction), hidden, weight, b, upstream
    )
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)
    for got, expected in zip(grads_fused, grads_plain):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    if reduction == "none":
        assert torch.all(fused[targets == -100] == 0)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_fused_path_custom_ignore_index(implementation):
    hidden, weight, _, targets = fused_case(ignore_index=7, seed=2)
    fused = fused_next_token_loss(hidden, weight, targets, ignore_index=7, implementation=implementation)
    expected = F.cross_entropy((hidden @ weight.T).view(-1, 300), targets.view(-1), ignore_index=7)
    torch.testing.assert_close(fused, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_fused_path_with_bias_and_bf16_inputs(implementation):
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(1, 40, 8, generator=g).to(torch.bfloat16)
    weight = torch.randn(50, 8, generator=g)
    bias = torch.randn(50, generator=g)
    targets = torch.randint(0, 50, (1, 40), generator=g)
    fused = fused_next_token_loss(hidden, weight, targets, bias=bias, implementation=implementation)
    plain = next_token_loss(hidden.float() @ weight.T + bias, targets)
    assert fused.dtype == torch.float32
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_fused_path_all_ignored_gives_zero_and_zero_gradients(implementation):
    hidden, weight, _, targets = fused_case()
    targets.fill_(-100)
    loss, (grad_hidden, grad_weight) = loss_and_grads(
        lambda: fused_next_token_loss(hidden, weight, targets, implementation=implementation),
        hidden,
        weight,
        None,
    )
    assert loss.item() == 0.0
    assert torch.all(grad_hidden == 0) and torch.all(grad_weight == 0)


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_chunked_loss_is_the_same_for_any_chunk_size(reduction):
    # 96 rows in chunks of 7 (the last one short), 32 and all at once: same loss, same gradients.
    hidden, weight, b, targets = fused_case(bias=True, seed=3)
    flat_h, flat_t = hidden.detach().view(-1, 16), targets.view(-1)
    upstream = torch.rand(96, generator=torch.Generator().manual_seed(1)) if reduction == "none" else None
    results = []
    for rows in (7, 32, 96):
        h = flat_h.clone().requires_grad_()
        results.append(
            loss_and_grads(
                lambda h=h, rows=rows: chunked_linear_cross_entropy(
                    h, weight, flat_t, bias=b, reduction=reduction, rows=rows
                ),
                h,
                weight,
                b,
                upstream,
            )
        )
    for loss, grads in results[:2]:
        torch.testing.assert_close(loss, results[2][0], rtol=1e-6, atol=1e-5)
        for got, expected in zip(grads, results[2][1]):
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_chunk_rows_rule():
    assert chunk_rows(8192, 50257) == 1024  # GPT-2's head: the 1024-row floor
    assert chunk_rows(8192, 4096) == 8192  # 2**25 / 4096 = 8192 rows: one chunk
    assert chunk_rows(100, 4096) == 100  # never more rows than there are
    assert chunk_rows(1_000_000, 256) == 2**17  # 2**25 logits at most


def test_auto_uses_the_chunked_loss_where_torch_has_none(monkeypatch):
    import nexttoken.loss as loss_module

    hidden, weight, _, targets = fused_case()
    expected = next_token_loss(hidden @ weight.T, targets)

    def missing(*args, **kwargs):
        raise AssertionError("torch's op must not be called")

    monkeypatch.setattr(loss_module, "torch_has_fused_loss", lambda: False)
    monkeypatch.setattr(loss_module.F, "linear_cross_entropy", missing, raising=False)
    assert loss_module.fused_loss_backend() == "chunked"
    torch.testing.assert_close(fused_next_token_loss(hidden, weight, targets), expected, rtol=1e-5, atol=1e-5)


def test_chunked_loss_under_no_grad_keeps_no_gradients():
    hidden, weight, _, targets = fused_case()
    with torch.no_grad():
        loss = fused_next_token_loss(hidden, weight, targets, implementation="chunked")
    assert not loss.requires_grad
    torch.testing.assert_close(
        loss, next_token_loss(hidden @ weight.T, targets).detach(), rtol=1e-5, atol=1e-5
    )


def test_bad_fused_implementation():
    hidden, weight, _, targets = fused_case()
    with pytest.raises(ValueError, match="implementation"):
        fused_next_token_loss(hidden, weight, targets, implementation="magic")


def test_fused_path_under_bf16_autocast_is_the_plain_path_under_autocast():
    # Under autocast the head's matmuls run in bf16 exactly as the plain path's nn.Linear does
    # (logits rounded to bf16); the log-softmax and the loss are fp32. "auto" takes the chunked
    # implementation there: torch 2.13's op returns a bf16 loss (a sum rounded to 3 digits).
    hidden, weight, b, targets = fused_case(bias=True, V=500, seed=6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert fused_loss_backend(torch.get_autocast_dtype("cpu")) == "chunked"
        fused, grads = loss_and_grads(
            lambda: fused_next_token_loss(hidden, weight, targets, bias=b, reduction="sum"), hidden, weight, b
        )
        plain, plain_grads = loss_and_grads(
            lambda: next_token_loss(F.linear(hidden, weight, b), targets, reduction="sum"), hidden, weight, b
        )
    assert fused.dtype == torch.float32
    torch.testing.assert_close(fused, plain, rtol=1e-6, atol=1e-4)
    for got, want in zip(grads, plain_grads):
        torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-3)  # both from bf16 matmuls
    # ...which is not the fp32 loss: the head really ran in bf16.
    full = next_token_loss(hidden @ weight.T + b, targets, reduction="sum")
    assert (fused - full).abs() > 100 * (fused - plain).abs() + 1e-3

import math

import pytest
import torch
import torch.nn.functional as F

from nexttoken.loss import count_scored, fused_next_token_loss, next_token_loss


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


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_fused_path_matches_plain_path_loss_and_gradients(reduction):
    g = torch.Generator().manual_seed(0)
    B, T, C, V = 2, 48, 16, 300
    hidden = torch.randn(B, T, C, generator=g, requires_grad=True)
    weight = (torch.randn(V, C, generator=g) * 0.3).requires_grad_()
    targets = torch.randint(0, V, (B, T), generator=g)
    targets[0, :10] = -100

    fused = fused_next_token_loss(hidden, weight, targets, reduction=reduction)
    fused.sum().backward()
    grads_fused = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None

    plain = next_token_loss(hidden @ weight.T, targets, reduction=reduction)
    plain.sum().backward()
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grads_fused[0], hidden.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads_fused[1], weight.grad, rtol=1e-5, atol=1e-6)


def test_fused_path_with_bias_and_bf16_inputs():
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(1, 40, 8, generator=g).to(torch.bfloat16)
    weight = torch.randn(50, 8, generator=g)
    bias = torch.randn(50, generator=g)
    targets = torch.randint(0, 50, (1, 40), generator=g)
    fused = fused_next_token_loss(hidden, weight, targets, bias=bias)
    plain = next_token_loss(hidden.float() @ weight.T + bias, targets)
    assert fused.dtype == torch.float32
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)

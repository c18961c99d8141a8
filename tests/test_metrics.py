import math
import random

import pytest
import torch

from nexttoken.loss import count_scored, next_token_loss
from nexttoken.metrics import NextTokenMetrics, summarize


def batches_of_different_sizes(seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for B, T in [(1, 5), (4, 9), (2, 3), (7, 12)]:
        logits = torch.randn(B, T, 13, generator=g) * 2
        targets = torch.randint(0, 13, (B, T), generator=g)
        targets[torch.rand(B, T, generator=g) < 0.25] = -100
        out.append((logits, targets))
    return out


def test_token_weighted_not_mean_of_batch_means():
    metric = NextTokenMetrics()
    nll_total, token_total, batch_means = 0.0, 0, []
    for logits, targets in batches_of_different_sizes():
        nll = next_token_loss(logits, targets, reduction="sum")
        n = count_scored(targets)
        metric.update(nll, n)
        nll_total += nll.item()
        token_total += n.item()
        batch_means.append(nll.item() / n.item())
    result = metric.compute()
    assert result["perplexity"].item() == pytest.approx(math.exp(nll_total / token_total), rel=1e-12)
    assert result["loss"].item() == pytest.approx(nll_total / token_total, rel=1e-12)
    wrong = math.exp(sum(batch_means) / len(batch_means))
    assert abs(result["perplexity"].item() - wrong) > 1e-3


def test_any_split_into_updates_gives_identical_results():
    g = torch.Generator().manual_seed(1)
    per_token = torch.rand(1000, generator=g, dtype=torch.float64) * 5
    per_token_bytes = torch.randint(1, 5, (1000,), generator=g)
    reference = NextTokenMetrics()
    reference.update(per_token.sum(), 1000, per_token_bytes.sum())
    expected = reference.compute()
    rng = random.Random(0)
    for pieces in [2, 3, 17, 1000]:
        cuts = sorted(rng.sample(range(1, 1000), pieces - 1))
        metric = NextTokenMetrics()
        for lo, hi in zip([0, *cuts], [*cuts, 1000]):
            metric.update(per_token[lo:hi].sum(), hi - lo, per_token_bytes[lo:hi].sum())
        got = metric.compute()
        for key in expected:
            assert got[key].item() == pytest.approx(expected[key].item(), rel=1e-12), key


def test_bits_per_byte_and_bits_per_token():
    metric = NextTokenMetrics()
    metric.update(torch.tensor(300.0), 100, 250)
    metric.update(torch.tensor(100.0), 50, 150)
    result = metric.compute()
    assert result["bits_per_byte"].item() == pytest.approx(400.0 / (math.log(2) * 400), rel=1e-12)
    assert result["bits_per_token"].item() == pytest.approx(400.0 / 150 / math.log(2), rel=1e-12)


def test_no_bytes_means_no_bits_per_byte():
    metric = NextTokenMetrics()
    metric.update(2.0, 4)
    metric.update(1.0, 3)
    result = metric.compute()
    assert set(result) == {"loss", "perplexity", "bits_per_token", "tokens"}
    assert int(result["tokens"]) == 7  # the summed count the numbers came from


def test_states_reduce_by_sum_across_processes():
    metric = NextTokenMetrics()
    for state in ("nll_sum", "tokens", "bytes"):
        assert metric._reductions[state].__name__ in ("dim_zero_sum", "sum"), state


def test_merged_states_are_the_sums_of_every_process():
    # Three "ranks" merged the way torchmetrics merges synced states. The sums themselves are
    # checked: a mean-merge would keep every ratio (loss, bits per byte) and only the sums show it.
    ranks = [NextTokenMetrics() for _ in range(3)]
    for metric, (nll, tokens, n_bytes) in zip(ranks, [(10.0, 7, 20), (4.0, 3, 9), (2.5, 1, 4)], strict=True):
        metric.update(nll, tokens, n_bytes)
    merged = ranks[0]
    merged.merge_state(ranks[1])
    merged.merge_state(ranks[2])
    assert merged.nll_sum.item() == 16.5
    assert merged.tokens.item() == 11
    assert merged.bytes.item() == 33
    result = merged.compute()
    assert result["loss"].item() == pytest.approx(16.5 / 11, rel=1e-12)
    assert result["bits_per_byte"].item() == pytest.approx(16.5 / (math.log(2) * 33), rel=1e-12)


def test_empty_metric_is_a_clear_error():
    with pytest.raises(ValueError, match="no scored tokens"):
        summarize(0.0, 0)
    with pytest.raises(ValueError, match="no scored tokens"):
        NextTokenMetrics().compute()


def test_random_guessing_reference_point():
    # Uniform guessing over V tokens: perplexity V, log2(V) bits per token.
    numbers = summarize(1000 * math.log(257), 1000)
    assert numbers["perplexity"] == pytest.approx(257)
    assert numbers["bits_per_token"] == pytest.approx(math.log2(257))

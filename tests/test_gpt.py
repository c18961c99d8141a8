"""The built-in GPT: causality, init, tying, counting, generation, and that it can learn at all."""

from __future__ import annotations

import math

import pytest
import torch

from nexttoken.loss import next_token_loss
from nexttoken.models import GPT, PRESETS, GPTConfig


def small_config(**overrides) -> GPTConfig:
    cfg = dict(vocab_size=101, block_size=16, n_layer=2, n_head=4, n_embd=32)
    return GPTConfig(**{**cfg, **overrides})


def make_model(seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    return GPT(small_config(**overrides)).eval()


def hand_param_count(V: int, T: int, L: int, C: int) -> int:
    """bias=False: per block qkv 3C^2 + proj C^2 + MLP 8C^2 + two LayerNorm weights; tied head."""
    return L * (12 * C * C + 2 * C) + C + V * C + T * C


# ---------------------------------------------------------------------------------------------- config


def test_config_validation_messages():
    with pytest.raises(ValueError, match="n_embd .* divisible by n_head"):
        GPTConfig(vocab_size=10, n_embd=30, n_head=4)
    for field in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
        kwargs = dict(vocab_size=10)
        kwargs[field] = 0
        with pytest.raises(ValueError, match=f"{field} must be a positive integer"):
            GPTConfig(**kwargs)
    with pytest.raises(ValueError, match="dropout"):
        GPTConfig(vocab_size=10, dropout=1.0)
    with pytest.raises(ValueError, match="attn_dropout must be in"):
        GPTConfig(vocab_size=10, attn_dropout=-0.1)


def test_from_preset_and_unknown_name():
    cfg = GPTConfig.from_preset("tiny", vocab_size=4096, block_size=64, dropout=0.1)
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd) == (4, 4, 128)
    assert (cfg.vocab_size, cfg.block_size, cfg.dropout) == (4096, 64, 0.1)
    with pytest.raises(ValueError, match="unknown GPT preset 'huge'.*tiny.*gpt2"):
        GPTConfig.from_preset("huge", vocab_size=10)
    assert list(PRESETS)[0] == "tiny" and list(PRESETS)[-1] == "gpt2"


# ------------------------------------------------------------------------------------------- behaviour


def test_causality_future_tokens_do_not_change_past_logits():
    model = make_model()
    x = torch.randint(0, 101, (2, 16), generator=torch.Generator().manual_seed(1))
    base = model(x)
    for t in (0, 5, 15):
        y = x.clone()
        y[:, t] = (y[:, t] + 1) % 101
        changed = model(y)
        torch.testing.assert_close(changed[:, :t], base[:, :t], atol=1e-6, rtol=0)
        assert (changed[:, t] - base[:, t]).abs().max() > 1e-4, f"position {t} ignored its own token"


def test_initial_loss_is_about_ln_vocab():
    V = 2048
    model = make_model(vocab_size=V, n_layer=4, n_embd=64, block_size=64)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, V, (8, 64), generator=g)
    targets = torch.randint(0, V, (8, 64), generator=g)
    with torch.no_grad():
        loss = next_token_loss(model(x), targets).item()
    assert abs(loss - math.log(V)) < 0.15, (loss, math.log(V))


def test_residual_projections_are_scaled_by_depth():
    n_layer = 8
    model = make_model(n_layer=n_layer, n_embd=64)
    expected = 0.02 / math.sqrt(2 * n_layer)
    for block in model.blocks:
        for w in (block.attn.c_proj.weight, block.mlp.c_proj.weight):
            assert abs(w.std().item() - expected) / expected < 0.1
    assert abs(model.blocks[0].attn.c_attn.weight.std().item() - 0.02) < 0.002


def test_forward_is_lm_head_of_hidden_and_long_input_raises():
    model = make_model()
    x = torch.randint(0, 101, (3, 16))
    h = model.hidden(x)
    assert h.shape == (3, 16, 32)
    assert torch.equal(model(x), model.lm_head(h))
    assert torch.equal(model(x), h @ model.lm_head.weight.T)
    with pytest.raises(ValueError, match="sequence length 17 exceeds the model's block_size 16"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_hidden_is_layer_normed_and_positions_matter():
    model = make_model()
    h = model.hidden(torch.randint(0, 101, (2, 16)))
    torch.testing.assert_close(h.mean(-1), torch.zeros(2, 16), atol=1e-5, rtol=0)  # ln_f, weight 1 at init
    torch.testing.assert_close(h.var(-1, unbiased=False), torch.ones(2, 16), atol=0.05, rtol=0)  # eps
    # The same token everywhere: only the position embedding can tell the positions apart.
    logits = model(torch.full((1, 16), 7))
    assert (logits[0, 0] - logits[0, 5]).abs().max() > 1e-3


def test_dropout_only_in_training():
    model = make_model(dropout=0.5)
    x = torch.randint(0, 101, (2, 16))
    torch.testing.assert_close(model(x), model(x), atol=0, rtol=0)
    model.train()
    assert not torch.equal(model(x), model(x))


def test_attn_dropout_drops_only_the_attention_weights():
    for dropout, attn_dropout, attention_drops in ((0.0, 0.5, True), (0.5, 0.0, False), (0.5, None, True)):
        model = make_model(dropout=dropout, attn_dropout=attn_dropout).train()
        attention = model.blocks[0].attn
        attention.resid_dropout.eval()  # only the attention weights' own dropout left in this module
        h = torch.randn(2, 16, attention.c_attn.in_features)
        assert torch.equal(attention(h), attention(h)) != attention_drops


# ---------------------------------------------------------------------------------- tying and counting


def test_lm_head_is_tied_to_token_embedding_and_counted_once():
    model = make_model()
    assert model.lm_head.weight is model.wte.weight
    assert model.lm_head.weight.data_ptr() == model.wte.weight.data_ptr()
    assert model.lm_head.bias is None
    expected = hand_param_count(V=101, T=16, L=2, C=32)
    assert model.num_parameters() == expected
    assert model.num_parameters(exclude_embeddings=True) == expected - 101 * 32 - 16 * 32
    # A gradient through the head lands on the embedding: it is one tensor.
    model(torch.randint(0, 101, (1, 4))).sum().backward()
    assert model.wte.weight.grad is not None


def test_gpt2_preset_is_124m():
    with torch.device("meta"):  # no memory, no init cost
        model = GPT(GPTConfig.from_preset("gpt2", vocab_size=50257))
    n = model.num_parameters()
    assert n == hand_param_count(V=50257, T=1024, L=12, C=768) == 124_337_664
    assert abs(n - 124_000_000) < 1_000_000


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_builds(name):
    with torch.device("meta"):
        model = GPT(GPTConfig.from_preset(name, vocab_size=4096))
    c = model.config
    assert model.num_parameters() == hand_param_count(4096, c.block_size, c.n_layer, c.n_embd)
    if name == "tiny":
        assert 0.7e6 < model.num_parameters() < 2e6


def test_flops_per_token_matches_hand_formula():
    model = make_model()
    V, L, C, T = 101, 2, 32, 16
    n = L * (12 * C * C + 2 * C) + C + V * C  # non-embedding + the head matmul, once
    assert model.flops_per_token() == 6 * n + 12 * L * C * T
    assert model.flops_per_token(seq_len=8) == 6 * n + 12 * L * C * 8
    with torch.device("meta"):
        gpt2 = GPT(GPTConfig.from_preset("gpt2", vocab_size=50257))
    assert gpt2.flops_per_token() == 6 * (84_953_856 + 50257 * 768) + 12 * 12 * 768 * 1024


# ------------------------------------------------------------------------------------------ generation


def test_generate_shape_greedy_and_top_k_one():
    model = make_model()
    prompt = torch.randint(0, 101, (2, 5))
    out = model.generate(prompt, max_new_tokens=20, temperature=0.0)
    assert out.shape == (2, 25) and out.dtype == prompt.dtype
    assert torch.equal(out[:, :5], prompt)
    assert torch.equal(out, model.generate(prompt, max_new_tokens=20, temperature=0.0))
    # Greedy really is argmax, including past block_size (the context is cropped to the last 16).
    for t in range(5, 25):
        expected = model(out[:, max(0, t - 16) : t])[:, -1].argmax(-1)
        assert torch.equal(out[:, t], expected)
    top1 = model.generate(prompt, 20, temperature=1.0, top_k=1, generator=torch.Generator().manual_seed(0))
    assert torch.equal(top1, out)


def test_generate_sampling_is_reproducible_and_respects_top_k():
    model = make_model()
    prompt = torch.randint(0, 101, (1, 4)).repeat(256, 1)
    a = model.generate(prompt, 1, temperature=2.0, top_k=3, generator=torch.Generator().manual_seed(7))
    b = model.generate(prompt, 1, temperature=2.0, top_k=3, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    allowed = set(model(prompt[:1])[0, -1].topk(3).indices.tolist())
    sampled = set(a[:, -1].tolist())
    assert sampled <= allowed and len(sampled) > 1
    model.train()
    model.generate(prompt[:1], 2)
    assert model.training, "generate must restore training mode"


def test_generate_stops_once_every_row_produced_eos():
    # Sampling, not greedy: a random-init model with tied embeddings greedily repeats its last token.
    # Every step draws for every row, so a seeded run with eos_id matches the free run token for token.
    model = make_model(vocab_size=16)
    prompt = torch.tensor([[1, 2, 3], [9, 4, 7]])

    def sample(**kw):
        return model.generate(prompt, 30, generator=torch.Generator().manual_seed(0), **kw)[:, 3:]

    free = sample()
    candidates = []  # tokens both rows produce, first at steps far apart, well before the end
    for tok in range(16):
        hits = [(row == tok).nonzero().flatten().tolist() for row in free]
        if all(hits) and max(hits[0][0], hits[1][0]) < 25:
            candidates.append((abs(hits[0][0] - hits[1][0]), tok, hits[0][0], hits[1][0]))
    assert candidates, "fixture: expected a token that both sampled rows produce"
    gap, eos, i0, i1 = max(candidates)
    early_row, early_i, late_i = (0, i0, i1) if i0 < i1 else (1, i1, i0)
    assert gap >= 2 and not (free[early_row, early_i : late_i + 1] == eos).all(), "fixture: weak case"
    out = sample(eos_id=eos)
    assert out.shape[1] == max(i0, i1) + 1  # stopped early, right after the last row's eos
    for row, i in enumerate((i0, i1)):
        assert torch.equal(out[row, : i + 1], free[row, : i + 1])  # unchanged up to its eos
        assert (out[row, i:] == eos).all()  # then padded with eos while the other row finishes


# ------------------------------------------------------------------------------------------- learning


def test_tiny_model_overfits_a_repeated_sequence():
    # ~1 s on a laptop CPU (at most 300 steps; usually it stops early).
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=32, block_size=32, n_layer=2, n_head=2, n_embd=64)).train()
    block = torch.randint(0, 32, (33,), generator=torch.Generator().manual_seed(3))
    x, y = block[:-1].repeat(4, 1), block[1:].repeat(4, 1)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    for _ in range(300):
        loss = next_token_loss(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if loss.item() < 0.05:
            break
    assert loss.item() < 0.1, loss.item()


def hand_flops(L_, C, V, T, bias):
    # Per block: c_attn 3C^2, attn c_proj C^2, c_fc 4C^2, mlp c_proj 4C^2 = 12 C^2 weights, and the
    # two LayerNorm gains (2C); with biases also 3C + C + 4C + C (linears) + 2C (LayerNorm).
    per_block = 12 * C * C + (2 * C if not bias else 13 * C)
    n = L_ * per_block + (C if not bias else 2 * C) + V * C  # + ln_f + the (tied) head as a matmul
    return 6 * n + 12 * L_ * C * T


@pytest.mark.parametrize("bias", [False, True])
def test_gpt_flops_per_token_matches_hand_formula(bias):
    config = GPTConfig(vocab_size=97, block_size=32, n_layer=3, n_head=2, n_embd=16, bias=bias)
    model = GPT(config)
    assert model.flops_per_token(32) == hand_flops(3, 16, 97, 32, bias)
    assert model.flops_per_token(8) == hand_flops(3, 16, 97, 8, bias)  # attention term follows T


# ------------------------------------------------------------------------------------ packed documents


def packed_row(lengths, vocab=101, seed=0):
    """One row of documents of ``lengths`` tokens, their ids (1, 2, ...) and each document alone."""
    g = torch.Generator().manual_seed(seed)
    docs = [torch.randint(0, vocab, (n,), generator=g) for n in lengths]
    ids = torch.cat([torch.full((n,), i + 1) for i, n in enumerate(lengths)])
    return torch.cat(docs)[None], ids[None], docs


def test_packed_documents_have_the_logits_they_have_alone():
    model = make_model()
    lengths = (5, 1, 7, 3)
    row, document_ids, docs = packed_row(lengths)
    with torch.no_grad():
        packed = model(row, document_ids=document_ids)[0]
        hidden = model.hidden(row, document_ids=document_ids)
        starts = [0, *torch.tensor(lengths).cumsum(0).tolist()]
        for doc, a, b in zip(docs, starts, starts[1:]):
            torch.testing.assert_close(packed[a:b], model(doc[None])[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model.lm_head(hidden)[0], packed)
        # Without document_ids the same row is one long document: the later ones see the earlier.
        assert not torch.allclose(model(row)[0, 5:6], packed[5:6], atol=1e-3)


def test_changing_one_packed_document_leaves_the_next_bit_identical():
    model = make_model()
    row, document_ids, _ = packed_row((6, 9))
    other = row.clone()
    other[0, :6] = torch.randint(0, 101, (6,), generator=torch.Generator().manual_seed(5))
    assert not torch.equal(other, row)
    with torch.no_grad():
        first, second = model(row, document_ids=document_ids), model(other, document_ids=document_ids)
    assert torch.equal(first[0, 6:], second[0, 6:])
    assert not torch.equal(first[0, :6], second[0, :6])


def test_packed_documents_train_with_dropout_and_check_shapes():
    model = make_model(dropout=0.1).train()
    row, document_ids, _ = packed_row((4, 4))
    model(row, document_ids=document_ids).sum().backward()
    assert model.wpe.weight.grad[:4].abs().sum() > 0 and model.wpe.weight.grad[4:].abs().sum() == 0
    with pytest.raises(ValueError, match="document_ids .* must have the shape of input_ids"):
        model(row, document_ids=document_ids[:, :5])


def test_cpu_attention_runs_in_fp32_under_bf16_autocast():
    # torch's CPU bf16 attention kernel is the slow one at small heads: nexttoken attends in fp32 there.
    import torch.nn.functional as F

    from nexttoken.models.gpt import attend

    q, k, v = (torch.randn(2, 3, 16, 8, generator=torch.Generator().manual_seed(i)) for i in range(3))
    q, k, v = q.bfloat16(), k.bfloat16(), v.bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = attend(q, k, v, None, 0.0)
    in_fp32 = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, in_fp32.bfloat16())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        in_bf16 = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert not torch.equal(got, in_bf16)  # the two kernels round differently: this checks which one ran


def test_a_bf16_model_runs_without_autocast():
    model = GPT(GPTConfig(vocab_size=50, block_size=16, n_layer=1, n_head=2, n_embd=16)).to(torch.bfloat16)
    logits = model(torch.randint(0, 50, (2, 16)))
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import TINY_TEXT
from nexttoken.data.tokenizers import document_start
from nexttoken.errors import UserError
from nexttoken.models.hf import load_hf_causal_lm
from nexttoken.scoring.text import evaluate_texts, score_text, start_token

LONG = TINY_TEXT * 2  # ~100 tokens with the tiny tokenizer


# --------------------------------------------------------------------------- references
@pytest.fixture(scope="module")
def gpt2(tiny_gpt2_dir):
    return load_hf_causal_lm(tiny_gpt2_dir)


@pytest.fixture(scope="module")
def llama(tiny_llama_dir):
    return load_hf_causal_lm(tiny_llama_dir)


def ce_sum(hf_model, inputs: list[int], targets: list[int]) -> float:
    """Plain reference: the HF model's logits for ``inputs``, summed cross-entropy against ``targets``
    (``targets[j]`` is the token after ``inputs[j]``)."""
    with torch.no_grad():
        logits = hf_model(torch.tensor([inputs])).logits[0, : len(targets)]
    return F.cross_entropy(logits.double(), torch.tensor(targets), reduction="sum").item()


def next_nll(hf_model, context: list[int], token: int) -> float:
    """-log p(token | context) from the HF model's last position."""
    with torch.no_grad():
        logits = hf_model(torch.tensor([context])).logits[0, -1]
    return F.cross_entropy(logits.double()[None], torch.tensor([token])).item()


def test_start_token_follows_the_document_start_rule(gpt2, llama):
    assert start_token(gpt2[1]) is None == document_start(gpt2[1])  # defines <s> but does not add it
    assert start_token(llama[1]) == llama[1].bos_id == 0 == document_start(llama[1])  # adds <s> itself
    assert start_token(gpt2[1], "yes") == 0 and start_token(llama[1], "no") is None
    with pytest.raises(UserError, match="^bos must be"):
        start_token(gpt2[1], "maybe")


def test_stride_equals_context_is_disjoint_windows(gpt2):
    model, tok = gpt2
    N = 16
    ids = tok.encode(LONG)
    ids = ids[: 1 + (len(ids) - 1) // N * N]  # whole blocks (a shorter tail window keeps a full context)
    text = tok.decode(ids)
    assert tok.encode(text) == ids
    expected, count = 0.0, 0
    for i in range(0, len(ids) - 1, N):  # blocks of N+1 tokens overlapping by one: x[i:i+N] -> x[i+1:i+N+1]
        targets = ids[i + 1 : i + N + 1]
        expected += ce_sum(model.model, ids[i : i + len(targets)], targets)
        count += len(targets)
    result = evaluate_texts(model, tok, [text], context=N, stride=N, batch_size=4)
    assert result.tokens == count == len(ids) - 1
    assert result.nll_sum == pytest.approx(expected, rel=1e-6)


def test_stride_one_equals_full_context_when_the_document_fits(gpt2):
    model, tok = gpt2
    ids = tok.encode(TINY_TEXT)[:40]
    text = tok.decode(ids)
    assert tok.encode(text) == ids
    with torch.no_grad():
        x = torch.tensor([ids])
        full = model.model(input_ids=x, labels=x).loss.item() * (len(ids) - 1)  # one pass, HF's own loss
    got = evaluate_texts(model, tok, [text], context=64, stride=1, batch_size=1)
    assert got.tokens == len(ids) - 1
    assert got.nll_sum == pytest.approx(full, rel=1e-5)
    # a document longer than the context: stride 1 == one window per token, each with the last N tokens
    got_small = evaluate_texts(model, tok, [text], context=8, stride=1, batch_size=3)
    ref = sum(next_nll(model.model, ids[max(0, t - 8) : t], ids[t]) for t in range(1, len(ids)))
    assert got_small.nll_sum == pytest.approx(ref, rel=1e-6)
    assert got_small.nll_sum != pytest.approx(got.nll_sum, rel=1e-4)  # less context, different score


@pytest.mark.parametrize("which", ["gpt2", "llama"])
def test_batch_size_invariance_and_token_count(which, request):
    model, tok = request.getfixturevalue(which)
    texts = [LONG, "short one", TINY_TEXT, "a b", TINY_TEXT[:70]]
    results = [evaluate_texts(model, tok, texts, context=16, stride=5, batch_size=b) for b in (1, 5)]
    r1, r5 = results
    bos = 1 if which == "llama" else 0  # llama's tokenizer adds <s>: the first real token is scored too
    expected_tokens = sum(len(tok.encode(t)) - 1 + bos for t in texts)
    assert r1.tokens == r5.tokens == expected_tokens
    assert r1.bos_prepended == bool(bos)
    assert r5.nll_sum == pytest.approx(r1.nll_sum, rel=1e-6)
    assert r5.perplexity == pytest.approx(r1.perplexity, rel=1e-6)
    # each document scored on its own: the sum over documents is the sum of per-document sums
    per_doc = sum(evaluate_texts(model, tok, [t], context=16, stride=5).nll_sum for t in texts)
    assert r1.nll_sum == pytest.approx(per_doc, rel=1e-6)


def test_result_fields(gpt2):
    model, tok = gpt2
    texts = ['héllo wörld <&> "x"', LONG]
    r = evaluate_texts(model, tok, texts, context=32, stride=16)
    assert r.documents == 2
    assert r.bytes == sum(len(t.encode("utf-8")) for t in texts)
    assert r.words == sum(len(t.split()) for t in texts)
    assert r.loss == pytest.approx(r.nll_sum / r.tokens)
    assert r.perplexity == pytest.approx(math.exp(r.nll_sum / r.tokens))
    assert r.bits_per_byte == pytest.approx(r.nll_sum / (math.log(2) * r.bytes))
    assert r.word_perplexity == pytest.approx(math.exp(r.nll_sum / r.words))
    assert (r.context, r.stride, r.dtype) == (32, 16, "float32")
    # defaults: the model's maximum context, half of it as stride
    d = evaluate_texts(model, tok, texts)
    assert (d.context, d.stride) == (64, 32)


def test_score_text_matches_evaluate(llama):
    model, tok = llama
    scores = score_text(model, tok, LONG, context=16, stride=6, topk=5)
    r = evaluate_texts(model, tok, [LONG], context=16, stride=6)
    assert scores.bos_prepended and not torch.isnan(scores.nll).any()  # BOS: every token scored
    assert scores.nll.sum().item() == pytest.approx(r.nll_sum, rel=1e-6)
    p_actual = torch.exp(-scores.nll)
    assert (scores.top_probs[:, 0] >= p_actual.float() - 1e-6).all()
    assert torch.all(scores.top_probs[:, :-1] >= scores.top_probs[:, 1:])


# --------------------------------------------------------------------------- real model
def hf_doc_loop_corrected(hf_model, ids: torch.Tensor, max_length: int, stride: int) -> tuple[float, int]:
    """The sliding-window loop of the transformers docs ("Perplexity of fixed-length models"), each
    window's labels-loss weighted by the number of labels it really scored (after HF's shift)."""
    nll_sum, n_tokens, prev_end = 0.0, 0, 0
    seq_len = ids.size(1)
    for begin in range(0, seq_len, stride):
        end = min(begin + max_length, seq_len)
        trg_len = end - prev_end
        input_ids = ids[:, begin:end]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            loss = hf_model(input_ids, labels=target_ids).loss
        n = int((target_ids[:, 1:] != -100).sum())
        nll_sum += loss.double().item() * n
        n_tokens += n
        prev_end = end
        if end == seq_len:
            break
    return nll_sum, n_tokens


@pytest.mark.slow
def test_smollm2_wikitext_matches_reference(smollm2_gguf, shared_data):
    test_file = shared_data / "wikitext-2" / "test.txt"
    if not test_file.is_file():
        pytest.skip(f"{test_file} is absent")
    model, tok = load_hf_causal_lm(smollm2_gguf)
    assert document_start(tok) is None  # SmolLM2's tokenizer defines <|im_start|> as BOS but never adds it
    N, S = 256, 128
    ids = tok.encode(test_file.read_text(encoding="utf-8")[:8000])
    # A length where the docs' last window is full too: (N + 1) + k * S tokens (their max_length is
    # N + 1 input tokens, of which the last one's prediction is unused: N tokens of context at most).
    k = (len(ids) - (N + 1)) // S
    ids = ids[: N + 1 + k * S]
    text = tok.decode(ids)
    assert tok.encode(text) == ids
    ref_sum, ref_tokens = hf_doc_loop_corrected(model.model, torch.tensor([ids]), N + 1, S)
    got = evaluate_texts(model, tok, [text], context=N, stride=S, batch_size=2)
    assert got.tokens == ref_tokens == len(ids) - 1
    assert got.loss == pytest.approx(ref_sum / ref_tokens, rel=1e-5)
    assert 5 < got.perplexity < 60, got.perplexity  # a 135M model on Wikipedia text

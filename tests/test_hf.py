import math
import shutil

import pytest
import torch

from nexttoken.errors import UserError
from nexttoken.loss import IGNORE_INDEX, next_token_loss
from nexttoken.models.hf import HFCausalLM, load_hf_causal_lm
from test_gpt import hand_flops


def shifted(input_ids: torch.Tensor) -> torch.Tensor:
    """targets[:, t] = input_ids[:, t + 1]; the last position has no next token."""
    targets = torch.full_like(input_ids, IGNORE_INDEX)
    targets[:, :-1] = input_ids[:, 1:]
    return targets


def window(vocab: int, T: int = 24, B: int = 3) -> torch.Tensor:
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("fixture", ["tiny_gpt2_dir", "tiny_llama_dir"])
def test_our_loss_on_adapter_logits_equals_hf_labels_loss(fixture, request):
    model, tokenizer = load_hf_causal_lm(request.getfixturevalue(fixture))
    assert isinstance(model, HFCausalLM)
    x = window(tokenizer.vocab_size)
    with torch.no_grad():
        ours = next_token_loss(model(x), shifted(x))
        theirs = model.model(input_ids=x, labels=x).loss
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
    # Random weights: the loss is near ln(V); a double shift would still be finite, so also check
    # that feeding the adapter's logits UNshifted targets gives a different number.
    assert abs(ours.item() - math.log(tokenizer.vocab_size)) < 0.5
    assert not torch.allclose(next_token_loss(model(x), x), ours)


@pytest.mark.parametrize("fixture", ["tiny_gpt2_dir", "tiny_llama_dir"])
def test_adapter_interface(fixture, request):
    model, _ = load_hf_causal_lm(request.getfixturevalue(fixture))
    x = window(model.config.vocab_size, T=10, B=2)
    with torch.no_grad():
        logits = model(x)
        assert logits.shape == (2, 10, model.config.vocab_size)
        # hidden + lm_head reproduce the logits (the fused loss path)
        assert model.logits_are_linear
        torch.testing.assert_close(model.lm_head(model.hidden(x)), logits, rtol=1e-5, atol=1e-5)
        # only the last k positions projected
        torch.testing.assert_close(model(x, logits_to_keep=3), logits[:, -3:], rtol=1e-5, atol=1e-5)
        # right padding + attention mask leaves the real positions alone
        mask = torch.ones_like(x)
        mask[1, 6:] = 0
        torch.testing.assert_close(model(x, attention_mask=mask)[1, :6], logits[1, :6], rtol=1e-5, atol=1e-5)
    assert model.max_context == 64
    assert isinstance(model.lm_head, torch.nn.Linear)
    # the optimizer sees the inner model's real modules
    names = {type(m).__name__ for m in model.modules()}
    assert ("Conv1D" in names) if fixture == "tiny_gpt2_dir" else ("LlamaRMSNorm" in names)
    assert model.model is not None and model.model.config.vocab_size == model.config.vocab_size


def test_adapter_trains(tiny_llama_dir):
    model, _ = load_hf_causal_lm(tiny_llama_dir)
    model.train()
    x = window(model.config.vocab_size, T=12, B=2)
    loss = next_token_loss(model(x), shifted(x))
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads)


def test_dtype(tiny_gpt2_dir):
    model, _ = load_hf_causal_lm(tiny_gpt2_dir, dtype="bfloat16")
    assert next(model.parameters()).dtype == torch.bfloat16
    with pytest.raises(UserError, match="unknown dtype"):
        load_hf_causal_lm(tiny_gpt2_dir, dtype="float8")


def test_missing_path(tmp_path):
    with pytest.raises(UserError, match="model path not found"):
        load_hf_causal_lm(tmp_path / "nope")


@pytest.mark.parametrize(
    "remove, expected",
    [
        ("config.json", "missing config.json"),
        ("model.safetensors", "missing weights"),
        ("tokenizer.json", "missing tokenizer"),
    ],
)
def test_incomplete_folder_names_what_is_missing(tiny_gpt2_dir, tmp_path, remove, expected):
    folder = tmp_path / "model"
    shutil.copytree(tiny_gpt2_dir, folder)
    (folder / remove).unlink()
    with pytest.raises(UserError, match=expected) as info:
        load_hf_causal_lm(folder)
    assert "\n" not in str(info.value)


def test_not_a_model(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(UserError, match="neither a Hugging Face model folder nor a .gguf"):
        load_hf_causal_lm(text)
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"PK\x03\x04 definitely not gguf")
    with pytest.raises(UserError, match="not a GGUF file"):
        load_hf_causal_lm(fake)
    with pytest.raises(UserError, match="missing config.json, weights"):
        load_hf_causal_lm(tmp_path)


def test_bad_config(tiny_gpt2_dir, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(tiny_gpt2_dir, folder)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        load_hf_causal_lm(folder)
    (folder / "config.json").write_text('{"model_type": "no-such-architecture"}')
    with pytest.raises(UserError, match="could not load a causal language model"):
        load_hf_causal_lm(folder)


@pytest.mark.slow
def test_smollm2_parity(smollm2_gguf):
    model, tokenizer = load_hf_causal_lm(smollm2_gguf)
    assert type(model.model).__name__ == "LlamaForCausalLM"
    assert model.max_context == 8192
    text = "The tower is 324 metres tall, about the same height as an 81-storey building."
    x = torch.tensor([tokenizer.encode(text)])
    with torch.no_grad():
        ours = next_token_loss(model(x), shifted(x))
        theirs = model.model(input_ids=x, labels=x).loss
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    assert 0.5 < ours.item() < 6.0  # a real model, real English: far below ln(49152) = 10.8


def test_loaded_in_eval_mode_and_deterministic(tiny_gpt2_dir):
    # GPT2Config has dropout 0.1: a wrapper left in training mode would give a different loss each call
    model, _ = load_hf_causal_lm(tiny_gpt2_dir)
    assert not model.training and not any(m.training for m in model.modules())
    x = window(model.config.vocab_size)
    with torch.no_grad():
        assert torch.equal(model(x), model(x))
    model.train()
    assert model.model.training


def test_hf_estimate_agrees_with_gpt():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(vocab_size=97, n_positions=32, n_embd=16, n_layer=3, n_head=2)
    hf = transformers.GPT2LMHeadModel(config)
    # GPT-2 has biases everywhere and a tied head: the same count as our GPT with bias=True.
    assert HFCausalLM(hf).flops_per_token(32) == hand_flops(3, 16, 97, 32, bias=True)


# ------------------------------------------------------------------------------------ packed documents


def packed_row(vocab: int, lengths=(6, 1, 9, 4)):
    g = torch.Generator().manual_seed(1)
    docs = [torch.randint(0, vocab, (n,), generator=g) for n in lengths]
    ids = torch.cat([torch.full((n,), i + 1) for i, n in enumerate(lengths)])
    return torch.cat(docs)[None], ids[None], docs, [0, *torch.tensor(lengths).cumsum(0).tolist()]


@pytest.mark.parametrize("fixture", ["tiny_llama_dir", "tiny_gpt2_dir"])
@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_packed_documents_have_the_logits_they_have_alone(fixture, implementation, request):
    model, _ = load_hf_causal_lm(request.getfixturevalue(fixture))
    model.model.set_attn_implementation(implementation)
    row, document_ids, docs, starts = packed_row(model.config.vocab_size)
    with torch.no_grad():
        packed = model(row, document_ids=document_ids)[0]
        for doc, a, b in zip(docs, starts, starts[1:]):
            torch.testing.assert_close(packed[a:b], model(doc[None])[0], atol=1e-5, rtol=1e-5)
        hidden = model.hidden(row, document_ids=document_ids)
        torch.testing.assert_close(model.lm_head(hidden)[0], packed, atol=1e-5, rtol=1e-5)
        # Changing the first document leaves the others bit-identical.
        other = row.clone()
        other[0, :6] = (other[0, :6] + 1) % model.config.vocab_size
        assert torch.equal(model(other, document_ids=document_ids)[0, 6:], packed[6:])
        assert not torch.allclose(model(row)[0, 7:], packed[7:], atol=1e-4)  # unmasked, they would differ


def test_a_model_that_lets_packed_documents_meet_is_refused(tiny_llama_dir, monkeypatch):
    """transformers finds packed documents from restarting position_ids; where that does not happen
    (older versions, models with their own mask code), the adapter refuses to pack."""
    import transformers.masking_utils as masking_utils

    monkeypatch.setattr(masking_utils, "find_packed_sequence_indices", lambda position_ids: None)
    model, _ = load_hf_causal_lm(tiny_llama_dir)
    row, document_ids, _, _ = packed_row(model.config.vocab_size)
    with pytest.raises(
        UserError, match=r"cannot keep packed examples apart: with attn_implementation 'sdpa'"
    ):
        model(row, document_ids=document_ids)
    model(row)  # unpacked batches are not affected


@pytest.mark.parametrize("crosses", [False, True])
def test_packing_check_runs_on_a_base_held_in_bf16(tiny_llama_dir, monkeypatch, crosses):
    """A LoRA base is held in bf16 under bf16-mixed: the packing check runs under autocast to it
    (in fp32 its matmuls would fail), and still refuses a model whose packed documents meet."""
    import transformers.masking_utils as masking_utils

    if crosses:
        monkeypatch.setattr(masking_utils, "find_packed_sequence_indices", lambda position_ids: None)
    model, _ = load_hf_causal_lm(tiny_llama_dir)
    for layer in model.model.model.layers:
        layer.to(torch.bfloat16)
    row, document_ids, docs, starts = packed_row(model.config.vocab_size)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        if crosses:
            with pytest.raises(UserError, match="cannot keep packed examples apart"):
                model(row, document_ids=document_ids)
            return
        packed = model(row, document_ids=document_ids)[0].float()
        for doc, a, b in zip(docs, starts, starts[1:]):
            torch.testing.assert_close(packed[a:b], model(doc[None])[0].float(), atol=2e-2, rtol=2e-2)

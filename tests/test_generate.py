import pytest
import torch
from torch import nn

from conftest import train_tiny_tokenizer
from nexttoken.data.chat import Message, resolve_chat_template
from nexttoken.data.tokenizers import IM_END, build_tokenizer, bytes_tokenizer, from_transformers, train_bpe
from nexttoken.errors import UserError
from nexttoken.models.generation import generate_reply, generate_text, prompt_ids
from nexttoken.models.gpt import GPT, GPTConfig
from nexttoken.models.hf import load_hf_causal_lm

BLOCK = 8


def spread_gpt(vocab_size: int = 257) -> GPT:
    """A tiny GPT with large random weights: its next-token choices depend on the whole context
    (a freshly initialized one mostly repeats its last token) and its logits are far from ties."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=vocab_size, block_size=BLOCK, n_layer=1, n_head=2, n_embd=16))
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                module.weight.normal_(0.0, 1.0)
    return model.eval()


@pytest.mark.parametrize("kind", ["bytes", "bpe", "hf-no-bos", "hf-adds-bos"])
def test_prompt_ids_start_where_a_document_starts(kind):
    if kind == "bytes":
        tokenizer = bytes_tokenizer()
    elif kind == "bpe":
        tokenizer = train_bpe(["def f(x):\n    return x\n"] * 5, vocab_size=280)
    else:
        tokenizer = from_transformers(train_tiny_tokenizer(add_bos=kind == "hf-adds-bos"))
    prompt = "The quick"
    # By hand, from the rule: our tokenizers put EOS before a document, a tokenizer that adds a BOS
    # puts it there, any other tokenizer nothing (an empty prompt then continues an EOS).
    start = {"bytes": [256], "bpe": [tokenizer.eos_id], "hf-no-bos": [], "hf-adds-bos": [tokenizer.bos_id]}[
        kind
    ]
    assert prompt_ids(tokenizer, prompt) == start + tokenizer.encode(prompt)
    assert prompt_ids(tokenizer, "") == (start or [tokenizer.eos_id])
    if kind == "bytes":
        assert prompt_ids(tokenizer, "hé") == [256, 104, 0xC3, 0xA9]


def argmax_loop(model, ids: list[int], steps: int, eos_id: int) -> list[int]:
    """Greedy decoding by hand: the likeliest next token given the last ``BLOCK`` tokens."""
    new = []
    for _ in range(steps):
        with torch.no_grad():
            next_id = int(model(torch.tensor([(ids + new)[-BLOCK:]]))[0, -1].argmax())
        if next_id == eos_id:
            break
        new.append(next_id)
    return new


def test_greedy_text_is_the_argmax_loop():
    model, tokenizer = spread_gpt(), bytes_tokenizer()
    prompt = "abc"
    steps = 12  # the context outgrows the block: the model sees only its last 8 tokens
    new = argmax_loop(model, prompt_ids(tokenizer, prompt), steps, tokenizer.eos_id)
    assert len(set(new)) > 2  # the data is not trivial: more than one token repeated
    text = generate_text(model, tokenizer, prompt, max_new_tokens=steps, temperature=0)
    assert text == prompt + tokenizer.decode(new)


def test_greedy_text_is_the_argmax_loop_for_a_hugging_face_model(tiny_gpt2_dir):
    model, tokenizer = load_hf_causal_lm(tiny_gpt2_dir)
    prompt = "The quick brown"
    new = argmax_loop(model, prompt_ids(tokenizer, prompt), 6, tokenizer.eos_id)
    BLOCK_HF = model.max_context
    assert BLOCK_HF > len(prompt_ids(tokenizer, prompt)) + 6  # the loop above never crops
    assert generate_text(
        model, tokenizer, prompt, max_new_tokens=6, temperature=0
    ) == prompt + tokenizer.decode(new)


def test_sampling_is_the_seeded_draw_by_hand_and_reproducible():
    model, tokenizer = spread_gpt(), bytes_tokenizer()
    temperature, top_k, steps, seed = 0.8, 5, 10, 123
    generator = torch.Generator().manual_seed(seed)
    ids = prompt_ids(tokenizer, "x")
    new = []
    for _ in range(steps):
        with torch.no_grad():
            logits = model(torch.tensor([(ids + new)[-BLOCK:]]))[:, -1].float() / temperature
        kth = torch.topk(logits, top_k).values[:, [-1]]
        probs = torch.softmax(logits.masked_fill(logits < kth, float("-inf")), dim=-1)
        next_id = int(torch.multinomial(probs, 1, generator=generator))
        if next_id == tokenizer.eos_id:
            break
        new.append(next_id)
    sample = generate_text(model, tokenizer, "x", steps, temperature=temperature, top_k=top_k, seed=seed)
    assert sample == "x" + tokenizer.decode(new)
    assert (
        generate_text(model, tokenizer, "x", steps, temperature=temperature, top_k=top_k, seed=seed) == sample
    )
    other = generate_text(model, tokenizer, "x", steps, temperature=temperature, top_k=top_k, seed=seed + 1)
    assert other != sample


def test_zero_new_tokens_gives_the_prompt_and_bad_settings_are_errors():
    model, tokenizer = spread_gpt(), bytes_tokenizer()
    assert generate_text(model, tokenizer, "naïve", max_new_tokens=0) == "naïve"
    assert generate_text(model, tokenizer, "", max_new_tokens=0) == ""
    with pytest.raises(UserError, match="^max_new_tokens must be >= 0, got -1"):
        generate_text(model, tokenizer, "a", max_new_tokens=-1)
    with pytest.raises(UserError, match=r"^temperature must be >= 0 \(0 is greedy\), got -0.5"):
        generate_text(model, tokenizer, "a", temperature=-0.5)


class ScriptedModel(nn.Module):
    """Emits a fixed continuation: what generate_text makes of the ids a model returns."""

    def __init__(self, continuation: list[int]) -> None:
        super().__init__()
        self.lm_head = nn.Linear(1, 1)
        self.continuation = continuation

    def generate(self, input_ids, max_new_tokens, **kwargs):
        return torch.cat([input_ids, torch.tensor([self.continuation[:max_new_tokens]])], dim=1)


def test_the_text_ends_at_the_end_of_the_document():
    tokenizer = bytes_tokenizer()
    model = ScriptedModel([ord("h"), ord("i"), 256, 256, 256])  # a row keeps emitting EOS once done
    assert generate_text(model, tokenizer, "say ", max_new_tokens=5) == "say hi"


# --------------------------------------------------------------------------- chat replies
MESSAGES = [Message("system", "Be brief."), Message("user", "Hi!")]


class ScriptedGPT(GPT):
    """A GPT whose sampler returns a fixed continuation (and records how it was called)."""

    continuation: list[int] = []

    def generate(self, input_ids, max_new_tokens, **kwargs):
        self.called_with = (input_ids.tolist(), max_new_tokens, kwargs)
        return torch.cat([input_ids, torch.tensor([self.continuation])], dim=1)


def test_reply_is_sampled_after_the_generation_prompt_and_stops_at_the_end_of_turn():
    tokenizer = build_tokenizer("bytes")
    template = resolve_chat_template(tokenizer)
    end = tokenizer._token_id(IM_END)
    model = ScriptedGPT(
        GPTConfig(vocab_size=tokenizer.vocab_size, block_size=64, n_layer=1, n_head=1, n_embd=8)
    )
    model.continuation = [*b"Hello!", end, *b"ignored"]
    reply = generate_reply(model, template, MESSAGES, max_new_tokens=20, temperature=0)
    assert reply == "Hello!"
    (prompt,), max_new, kwargs = model.called_with
    rendered = (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n"
    )
    assert prompt == tokenizer.encode_with_offsets(rendered, parse_special=True)[0]
    assert prompt[-len("assistant\n") - 1] == tokenizer._token_id(
        "<|im_start|>"
    )  # markers are special tokens
    assert max_new == 20 and kwargs["eos_id"] == end and kwargs["temperature"] == 0


def test_reply_from_a_real_model_is_text_without_markers():
    tokenizer = build_tokenizer("bytes")
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, block_size=128, n_layer=1, n_head=1, n_embd=16))
    reply = generate_reply(model, resolve_chat_template(tokenizer), MESSAGES, max_new_tokens=12, seed=3)
    assert isinstance(reply, str) and IM_END not in reply and len(reply.encode(errors="replace")) <= 12 * 3

"""Sampling a chat reply: the prompt is the rendered conversation, the reply stops at the end of turn."""

import torch

from nexttoken.data.chat import Message, resolve_chat_template
from nexttoken.data.tokenizers import IM_END, build_tokenizer
from nexttoken.generate import generate_reply
from nexttoken.models import GPT, GPTConfig

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

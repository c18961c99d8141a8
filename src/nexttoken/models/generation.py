"""Sampling from any :class:`~nexttoken.models.protocol.CausalLM`: text that starts where a document
starts (:func:`nexttoken.data.tokenizers.document_start`), so a model sees the same beginning it was
trained on (for a tokenizer that starts documents with no token, an empty prompt begins after an
end-of-document token, as in its training stream); and a chat reply, sampled after the conversation
rendered by the chat template with its generation prompt, exactly as conversations were rendered for
fine-tuning (:mod:`nexttoken.data.chat`), stopping at the template's end-of-turn token.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from nexttoken.data.chat import ChatTemplate, Message
from nexttoken.data.tokenizers import Tokenizer, document_start
from nexttoken.errors import UserError, setting
from nexttoken.models.protocol import CausalLM


def prompt_ids(tokenizer: Tokenizer, prompt: str) -> list[int]:
    """The token ids a sample continues: the document start (if any), then the prompt's tokens."""
    start = document_start(tokenizer)
    ids = ([] if start is None else [start]) + (tokenizer.encode(prompt) if prompt else [])
    return ids or [tokenizer.eos_id]


def generate_text(
    model: CausalLM,
    tokenizer: Tokenizer,
    prompt: str = "",
    max_new_tokens: int = 200,
    temperature: float = 0.8,
    top_k: int | None = 50,
    seed: int | None = 0,
) -> str:
    """``prompt`` followed by up to ``max_new_tokens`` sampled tokens, stopping at the end of the
    document; ``temperature`` 0 is greedy; the same ``seed`` gives the same text."""
    if max_new_tokens < 0:
        raise UserError(f"{setting('max_new_tokens')} must be >= 0, got {max_new_tokens}")
    if temperature < 0:
        raise UserError(f"{setting('temperature')} must be >= 0 (0 is greedy), got {temperature}")
    device = model.lm_head.weight.device
    ids = prompt_ids(tokenizer, prompt)
    context = torch.tensor([ids], dtype=torch.long, device=device)
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    out = model.generate(
        context,
        max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        eos_id=tokenizer.eos_id,
        generator=generator,
    )
    new = [t for t in out[0, len(ids) :].tolist() if t != tokenizer.eos_id]
    return prompt + tokenizer.decode(new)


def generate_reply(
    model: CausalLM,
    template: ChatTemplate,
    messages: Sequence[Message],
    max_new_tokens: int = 200,
    temperature: float = 0.8,
    top_k: int | None = 50,
    seed: int | None = 0,
) -> str:
    """The assistant's next reply to ``messages``: sampled after the rendered conversation and its
    generation prompt, up to (not including) the end-of-turn token or ``max_new_tokens`` tokens."""
    if max_new_tokens < 0:
        raise UserError(f"{setting('max_new_tokens')} must be >= 0, got {max_new_tokens}")
    if temperature < 0:
        raise UserError(f"{setting('temperature')} must be >= 0 (0 is greedy), got {temperature}")
    device = model.lm_head.weight.device
    ids = template.prompt_ids(messages)
    end_of_turn = template.end_of_turn_id
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    out = model.generate(
        torch.tensor([ids], dtype=torch.long, device=device),
        max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        eos_id=end_of_turn,
        generator=generator,
    )
    reply = out[0, len(ids) :].tolist()
    if end_of_turn in reply:
        reply = reply[: reply.index(end_of_turn)]
    return template.tokenizer.decode(reply)


def fit_history(template: ChatTemplate, messages: list[Message], room: int | None) -> int:
    """Drop the oldest turns (after any system message) until the prompt of ``messages`` takes at
    most ``room`` tokens (None: no limit), keeping the last message; returns how many were dropped."""
    dropped = 0
    first = 1 if messages and messages[0].role == "system" else 0
    while room is not None and len(messages) > first + 1 and len(template.prompt_ids(messages)) > room:
        del messages[first]
        dropped += 1
        # A conversation goes on with a user's turn (some templates insist on it).
        while len(messages) > first + 1 and messages[first].role == "assistant":
            del messages[first]
            dropped += 1
    return dropped

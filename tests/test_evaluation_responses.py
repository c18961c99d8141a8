"""Scoring responses given prompts: the same masks as training, every response token once."""

import math

import pytest
import torch

from nexttoken.data.chat import Conversation, Message, resolve_chat_template
from nexttoken.data.tokenizers import build_tokenizer
from nexttoken.errors import UserError
from nexttoken.loss import IGNORE_INDEX, next_token_loss
from nexttoken.models import GPT, GPTConfig
from nexttoken.scoring.responses import evaluate_examples, evaluate_records

RECORDS = [
    {"messages": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}]},
    {"prompt": "Reverse 'abc'.", "response": "cba"},
    {
        "messages": [
            {"role": "system", "content": "Answer in French."},
            {"role": "user", "content": "Hello"},
            {"role": "assistant", "content": "Bonjour"},
            {"role": "user", "content": "Thanks"},
            {"role": "assistant", "content": "De rien, à bientôt !"},
        ]
    },
]


@pytest.fixture(scope="module")
def setup():
    tokenizer = build_tokenizer("bytes")
    torch.manual_seed(0)
    model = GPT(
        GPTConfig(vocab_size=tokenizer.vocab_size, block_size=160, n_layer=2, n_head=2, n_embd=32)
    ).eval()
    return model, tokenizer, resolve_chat_template(tokenizer)


def test_full_context_equals_each_example_scored_alone(setup):
    model, tokenizer, template = setup
    chats = [RECORDS[0], RECORDS[2]]
    result, line = evaluate_records(model, tokenizer, chats, source="chats.jsonl", context=160, stride=80)
    assert line == "format: chat (auto: the records have 'messages')"
    examples = [template.encode(Conversation([Message(**m) for m in r["messages"]], "x")) for r in chats]
    nll, scored, ignored = 0.0, 0, 0
    with torch.no_grad():
        for e in examples:
            tokens = torch.from_numpy(e.tokens)
            targets = torch.where(torch.from_numpy(e.scored[1:]), tokens[1:], IGNORE_INDEX)
            nll += next_token_loss(model(tokens[None, :-1]), targets[None], reduction="sum").item()
            scored += int((targets != IGNORE_INDEX).sum())
            ignored += int((targets == IGNORE_INDEX).sum())
    response_bytes = len(b"4Bonjour") + len("De rien, à bientôt !".encode())
    assert (result.examples, result.response_tokens, result.prompt_tokens_ignored) == (2, scored, ignored)
    assert scored == len("4") + len(b"Bonjour") + len("De rien, à bientôt !".encode()) + 3
    assert result.bytes == response_bytes
    assert result.loss == pytest.approx(nll / scored, rel=1e-6)
    assert result.bits_per_byte == pytest.approx(nll / (math.log(2) * response_bytes), rel=1e-6)


def test_long_conversations_use_windows_and_score_each_response_token_once(setup):
    model, tokenizer, template = setup
    examples = [template.encode(Conversation([Message(**m) for m in RECORDS[2]["messages"]], "x"))]
    assert len(examples[0]) > 64
    whole = evaluate_examples(model, examples, context=160, stride=80)
    windowed = evaluate_examples(model, examples, context=32, stride=8, batch_size=3)
    assert windowed.response_tokens == whole.response_tokens and windowed.bytes == whole.bytes
    assert windowed.loss != pytest.approx(whole.loss, rel=1e-9)  # less context, a different number


def test_instruction_records_and_errors(setup):
    model, tokenizer, _ = setup
    result, line = evaluate_records(model, tokenizer, [RECORDS[1]], source="alpaca.jsonl", context=64)
    assert line.startswith("format: instruction") and result.response_tokens == len("cba") + 1
    with pytest.raises(UserError, match="no examples"):
        evaluate_examples(model, [], context=64)
    with pytest.raises(UserError, match=r"alpaca.jsonl, record 1: 'response' is int"):
        evaluate_records(
            model, tokenizer, [{"prompt": "a", "response": 3}], source="alpaca.jsonl", context=64
        )

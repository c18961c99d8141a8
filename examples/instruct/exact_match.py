"""Exact-match accuracy of a model's greedy replies on held-out chat records.

    python examples/instruct/exact_match.py MODEL test.jsonl [--limit N] [--show 5]

MODEL is a nexttoken checkpoint, a Hugging Face folder or a GGUF file. Each record's conversation
up to its last assistant turn is the prompt; the reply is decoded greedily exactly as
``nexttoken generate MODEL --chat ... --temperature 0`` does (:func:`nexttoken.commands.generate.generate_reply`:
the chat template's generation prompt, stopping at its end-of-turn token), and it counts when it
equals the record's last assistant message (surrounding whitespace aside).
"""

from __future__ import annotations

import argparse
import json
import time

from nexttoken.data.chat import read_conversations, resolve_chat_template
from nexttoken.models.generation import generate_reply
from nexttoken.models.load import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("data", help="a JSON Lines file of chat or instruction records")
    parser.add_argument("--limit", type=int, default=None, help="only the first N records")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--show", type=int, default=5, help="print this many replies")
    parser.add_argument("--adapter", default=None, help="a LoRA run's checkpoint to apply to MODEL")
    args = parser.parse_args()

    with open(args.data, encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()][: args.limit]
    conversations, _ = read_conversations(records, source=args.data)
    model, tokenizer = load_model(args.model, adapter=args.adapter)
    template = resolve_chat_template(tokenizer)
    started, correct = time.perf_counter(), 0
    for i, conversation in enumerate(conversations):
        messages = conversation.messages
        last = max(k for k, m in enumerate(messages) if m.role == "assistant")
        expected = messages[last].content.strip()
        reply = generate_reply(
            model, template, messages[:last], max_new_tokens=args.max_new_tokens, temperature=0, top_k=None
        ).strip()
        correct += reply == expected
        if i < args.show:
            print(f"{messages[last - 1].content!r} -> {reply!r} (expected {expected!r})")
    n = len(conversations)
    seconds = time.perf_counter() - started
    print(f"exact match: {correct}/{n} = {correct / n:.1%} ({seconds:.0f} s, {args.model})")


if __name__ == "__main__":
    main()

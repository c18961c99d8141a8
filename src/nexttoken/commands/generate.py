"""``nexttoken generate MODEL`` and ``nexttoken chat MODEL``: sample text, or a chat reply, from any
model nexttoken can load (:mod:`nexttoken.models.generation`)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import TextIO

from nexttoken.commands.eval import add_model_argument
from nexttoken.commands.spelling import tool_flag
from nexttoken.data.chat import ChatTemplate, Message, resolve_chat_template
from nexttoken.errors import UserError
from nexttoken.models.generation import fit_history, generate_reply, generate_text
from nexttoken.models.load import ADAPTER_HELP
from nexttoken.models.protocol import CausalLM


def spell(setting: str) -> str:
    """How ``nexttoken generate`` and ``nexttoken chat`` write a setting an error names:
    ``data.chat_template`` is ``--chat-template``, ``max_new_tokens`` is ``--max-new-tokens``."""
    return tool_flag(setting, {"data.chat_template": "--chat-template"})


def _sampling_arguments(parser: argparse.ArgumentParser, max_new_tokens: int = 200) -> None:
    parser.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    parser.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=50, help="sample among the k likeliest tokens (0 = all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, ...")
    parser.add_argument("--adapter", default=None, metavar="DIR_OR_CKPT", help=ADAPTER_HELP)


def _chat_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--system", default=None, metavar="TEXT", help="a system message before the conversation"
    )
    parser.add_argument(
        "--chat-template",
        default=None,
        metavar="FILE",
        help="a Jinja chat template (default: the model's own; a checkpoint carries the one it was trained with)",
    )


def add_generate_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_argument(parser, optional=True)
    parser.add_argument("--checkpoint", default=None, help="the same as MODEL (kept for older scripts)")
    parser.add_argument("--prompt", default="", help="text to continue (default: start a new document)")
    parser.add_argument(
        "--chat",
        default=None,
        metavar="MESSAGE",
        help="reply to this user message through the chat template, stopping at the end of the turn",
    )
    _chat_arguments(parser)
    _sampling_arguments(parser)


def _load_for_sampling(args: argparse.Namespace):
    from nexttoken.models.load import load_model

    path = args.model or getattr(args, "checkpoint", None)
    if path is None:
        raise UserError(
            "no MODEL given; pass a checkpoint (.ckpt), a Hugging Face model folder or a .gguf file"
        )
    if args.max_new_tokens < 0:
        raise UserError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    return load_model(path, device=args.device, adapter=args.adapter)


def _reply(model: CausalLM, template: ChatTemplate, messages: Sequence[Message], args, *, seed: int) -> str:
    """:func:`generate_reply` with the command line's sampling flags."""
    return generate_reply(
        model,
        template,
        messages,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k or None,
        seed=seed,
    )


def run_generate(args: argparse.Namespace) -> int:
    if args.chat is None and (args.system is not None or args.chat_template is not None):
        raise UserError("--system and --chat-template go with --chat MESSAGE; add --chat or drop them")
    if args.chat is not None and args.prompt:
        raise UserError("--prompt continues a text and --chat replies to a message; pass one of them")
    model, tokenizer = _load_for_sampling(args)
    if args.chat is not None:
        template = resolve_chat_template(tokenizer, args.chat_template)
        messages = ([Message("system", args.system)] if args.system is not None else []) + [
            Message("user", args.chat)
        ]
        print(_reply(model, template, messages, args, seed=args.seed))
        return 0
    text = generate_text(
        model,
        tokenizer,
        args.prompt,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k or None,
        seed=args.seed,
    )
    print(text)
    return 0


# --------------------------------------------------------------------------- nexttoken chat
def add_chat_arguments(parser: argparse.ArgumentParser) -> None:
    """``nexttoken chat MODEL [--system TEXT] [--chat-template FILE] ...``"""
    add_model_argument(parser, optional=True)
    _chat_arguments(parser)
    _sampling_arguments(parser, max_new_tokens=300)


def run_chat(args: argparse.Namespace, stdin: TextIO | None = None, stdout: TextIO | None = None) -> int:
    """An interactive conversation: each line read is a user message; the reply is printed and the
    whole history is the next reply's prompt (the oldest turns are dropped, with a note, once it no
    longer fits the model's context). ``/reset`` starts over; ``/exit`` or end of input ends it."""
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    model, tokenizer = _load_for_sampling(args)
    template = resolve_chat_template(tokenizer, args.chat_template)
    system = [Message("system", args.system)] if args.system is not None else []
    messages = list(system)
    interactive = stdin.isatty()
    if interactive:
        print(f"chatting with {args.model} (/reset starts over, /exit or Ctrl-D ends)", file=stdout)
    # The history keeps at least half the context; the reply gets the rest (up to --max-new-tokens).
    context = model.max_context
    room = None if context is None else context - min(args.max_new_tokens, context // 2)
    replies = 0
    while True:
        if interactive:
            print("you> ", end="", file=stdout, flush=True)
        line = stdin.readline()
        if not line or line.strip() == "/exit":
            break
        text = line.rstrip("\n")
        if text.strip() == "/reset":
            messages = list(system)
            continue
        if not text.strip():
            continue
        messages.append(Message("user", text))
        if fit_history(template, messages, room):
            print(
                f"(earlier turns no longer fit the context of {model.max_context} tokens: dropped)",
                file=sys.stderr,
            )
        reply = _reply(model, template, messages, args, seed=args.seed + replies)  # a new seed per reply
        replies += 1
        messages.append(Message("assistant", reply))
        print(f"{'assistant> ' if interactive else ''}{reply}", file=stdout, flush=True)
    return 0

"""``nexttoken overlap TRAIN EVAL``: how much of an evaluation text occurs in a training corpus, as
shared word n-grams on normalised text (:mod:`nexttoken.data.overlap`), and the longest shared spans
with where they are on both sides."""

from __future__ import annotations

import argparse
import json

from nexttoken.commands.spelling import tool_flag
from nexttoken.data.overlap import DEFAULT_N, OverlapResult, measure_overlap

# The settings overlap takes, as its own arguments.
OVERLAP_ARGUMENTS = {
    "data.path": "TRAIN",
    "eval_path": "EVAL",
    "data.overlap_n": "--n",
    "data.text_field": "--text-field",
}


def spell(setting: str) -> str:
    """How ``nexttoken overlap`` writes a setting an error names: ``data.overlap_n`` is ``--n``."""
    return tool_flag(setting, OVERLAP_ARGUMENTS)


def add_overlap_arguments(parser: argparse.ArgumentParser) -> None:
    """``nexttoken overlap TRAIN... EVAL [--n N] [--json] [--top K] [--text-field FIELD] [--workers W]``"""
    parser.add_argument(
        "paths",
        metavar="TRAIN... EVAL",
        nargs="*",
        default=[],
        help="the training corpus (files or folders: text, JSON Lines, JSON, Parquet, saved datasets), "
        "then the evaluation text (the last path)",
    )
    parser.add_argument(
        "--n", type=int, default=DEFAULT_N, metavar="N", help="words per n-gram (default: 13)"
    )
    parser.add_argument(
        "--top", type=int, default=5, metavar="K", help="longest shared spans shown (default: 5)"
    )
    parser.add_argument(
        "--text-field",
        default="text",
        metavar="FIELD",
        help="the field that holds a record's text (a dotted path for a nested field; default: text)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        metavar="W",
        help="processes scanning the training sources (default: one per core; 0: this process)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout")


def run_overlap(args: argparse.Namespace) -> int:
    from nexttoken.errors import UserError

    if len(args.paths) < 2:
        raise UserError("name the training corpus and then the evaluation text: nexttoken overlap TRAIN EVAL")
    if args.top < 0:
        raise UserError(f"--top must be 0 or more; got {args.top}")
    *train, evaluation = args.paths
    result = measure_overlap(
        train, evaluation, args.n, text_field=args.text_field, workers=args.workers, top=args.top
    )
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        print(overlap_table(result, args.top))
    return 0


def overlap_table(result: OverlapResult, top: int = 5) -> str:
    """What ``nexttoken overlap`` prints: the overlapping share, then the longest shared spans."""
    with_overlap = sum(1 for d in result.documents if d.overlap_words)
    lines = [
        f"{result.n}-gram overlap: {result.overlap_fraction:.2%} of the evaluation words "
        f"({result.overlap_words:,} of {result.eval_words:,}) are in {result.n}-grams that occur in training",
        f"near copies: {result.partial_fraction:.2%} more ({result.partial_words:,} words) are in {result.n}-grams "
        "that occur in training with their middle word changed",
        f"evaluation documents  {len(result.documents):,} ({with_overlap:,} share {result.n}-grams with training; "
        + ", ".join(f"{count:,} {kind}" for kind, count in result.classes().items())
        + ")",
        f"training corpus       {result.train_documents:,} document{'s' if result.train_documents != 1 else ''}, "
        f"{result.train_bytes / 1e6:,.1f} MB",
    ]
    spans = result.longest_spans(top)
    if spans:
        lines += ["", "longest shared spans (words; evaluation document:line <- training document:line):"]
        for span in spans:
            lines.append(
                f"  {span.words:>6}  {span.eval_document}:{span.eval_line} <- {span.train_document}:"
                f"{span.train_line}  {span.text[:80]!r}"
            )
    elif result.overlap_words == 0:
        lines += ["", f"no {result.n}-gram of the evaluation text occurs in training"]
    return "\n".join(lines)

"""``nexttoken eval MODEL DATA...``: perplexity and bits per byte of any causal LM on any text;
``nexttoken eval MODEL --tasks NAME,...``: lm-evaluation-harness tasks (:mod:`nexttoken.scoring.lmeval.adapter`).

The arguments shared with ``nexttoken inspect`` (windows, dtype, device, BOS) are defined here once.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path

from nexttoken.commands.spelling import tool_flag
from nexttoken.data.chat import CONVERSATION_FIELDS, DATA_FORMATS, TRAIN_ON, read_conversations
from nexttoken.data.documents import find_documents, is_text_file, load_documents
from nexttoken.data.formats import choose_data_format
from nexttoken.data.overlap import (
    DEFAULT_N,
    OverlapResult,
    covered_character_spans,
    measure_overlap_of_documents,
)
from nexttoken.data.records import Record, RecordSource
from nexttoken.data.tokenizers import as_tokenizer, describe_scored_start, document_start
from nexttoken.errors import UserError, spelled
from nexttoken.io import write_atomically
from nexttoken.models.hf import chat_tokenizer_of
from nexttoken.models.load import ADAPTER_HELP, DTYPE_CHOICES, is_checkpoint, load_model
from nexttoken.scoring.lmeval.results import results_json, results_path, results_table
from nexttoken.scoring.responses import ResponseEvalResult, evaluate_records
from nexttoken.scoring.text import BOS_MODES, EvalResult, evaluate_texts, start_token
from nexttoken.scoring.windows import check_window_settings

# The data settings eval takes, as its own arguments (the rest: nexttoken.commands.spelling).
DATA_ARGUMENTS = {
    "data.path": "DATA",
    "data.val_path": "DATA",
    "data.text_field": "--text-field",
    "data.format": "--format",
    "data.chat_template": "--chat-template",
    "data.train_on": "--train-on",
    "eval_path": "DATA",
    "data.overlap_n": "--overlap-n",
}


def spell(setting: str) -> str:
    """How ``nexttoken eval`` writes a setting an error names: ``data.path`` is ``DATA``."""
    return tool_flag(setting, DATA_ARGUMENTS)


def load_model_of(args: argparse.Namespace):
    """``(model, tokenizer)``: MODEL loaded as :func:`add_model_arguments`' flags say (dtype, device,
    remote code, a LoRA adapter on top)."""
    return load_model(
        args.model,
        dtype=args.dtype,
        device=args.device,
        trust_remote_code=args.trust_remote_code,
        adapter=args.adapter,
    )


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments shared by ``eval`` and ``inspect``."""
    parser.add_argument("--adapter", default=None, metavar="DIR_OR_CKPT", help=ADAPTER_HELP)
    parser.add_argument(
        "--context",
        type=int,
        default=None,
        metavar="N",
        help="tokens per window (default: the model's maximum context)",
    )
    parser.add_argument(
        "--stride",
        type=int,
        default=None,
        metavar="S",
        help="new tokens scored per window after the first; each token sees >= N-S tokens of context "
        "(default: context // 2)",
    )
    parser.add_argument("--batch-size", type=int, default=None, metavar="B", help="windows per forward pass")
    parser.add_argument(
        "--dtype", choices=DTYPE_CHOICES, default="auto", help="auto: float32 on CPU, bfloat16 on GPU"
    )
    parser.add_argument(
        "--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:1, ..."
    )
    parser.add_argument(
        "--bos",
        choices=("lm-eval", *BOS_MODES),
        default=None,
        help="what starts each document: auto = as the model was trained (the default on text), yes = "
        "always a BOS so the first token is scored, no = nothing; lm-eval = lm-eval's own convention, "
        "as its HFLM (the default with --tasks, so numbers compare with published ones)",
    )
    parser.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="let a Hugging Face model folder run its own Python code",
    )
    parser.add_argument(
        "--no-progress", dest="progress", action="store_false", help="no progress bar on stderr"
    )


def add_model_argument(parser: argparse.ArgumentParser, optional: bool = False) -> None:
    """The MODEL argument every command that loads a model takes (optional where a command may go
    without, as ``generate`` does for its own reasons)."""
    more = {"nargs": "?", "default": None} if optional else {}
    parser.add_argument(
        "model",
        metavar="MODEL",
        help="nexttoken checkpoint (.ckpt), Hugging Face model folder, or .gguf file",
        **more,
    )


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    """``nexttoken eval MODEL DATA... [--context N] [--stride S] [--batch-size B] [--json] ...``"""
    add_model_argument(parser)
    parser.add_argument(
        "data",
        metavar="DATA",
        nargs="*",
        default=[],  # without it, argparse's intermixed parsing reports a missing DATA as required
        help="text files, or folders searched recursively for them; or chat/instruction records "
        "(JSON Lines, JSON, Parquet, a saved dataset), whose responses are scored given their prompts",
    )
    parser.add_argument(
        "--text-field",
        default="text",
        metavar="FIELD",
        help="the field that holds a document's text in records scored as text (a dotted path for a "
        "nested field; default: text)",
    )
    add_model_arguments(parser)
    parser.add_argument(
        "--json", action="store_true", help="print one JSON object on stdout instead of a table"
    )
    add_response_arguments(parser)
    add_overlap_arguments(parser)
    add_task_arguments(parser)


def check_arguments_early(args: argparse.Namespace) -> None:
    """What can be checked before a model is loaded (the model's maximum context is checked after)."""
    context = args.context
    check_window_settings(
        context if context is not None else max(args.stride or 1, 1),
        args.stride if args.stride is not None else 1,
    )
    if args.batch_size is not None and args.batch_size < 1:
        raise UserError(f"--batch-size must be a positive number of windows, got {args.batch_size!r}")


def start_line(settings: dict) -> str:
    """What starts each document under ``--tasks``, in words."""
    prefix = repr(settings["rolling_prefix"]) if settings["rolling_prefix"] else "nothing"
    if settings["bos"] == "lm-eval":
        return (
            f"document start: {prefix} (lm-eval's convention, as its HFLM; --bos auto for nexttoken's rule)"
        )
    return f"document start: {prefix} (--bos {settings['bos']}; lm-eval's own convention is --bos lm-eval)"


def settings_note(context: int | None, stride: int | None, max_context: int | None) -> str:
    c = context if context is not None else max_context
    parts = [f"context {c}" + (" (the model's maximum)" if context is None else "")]
    if stride is None and c is not None:
        parts.append(f"stride {max(1, c // 2)} (context // 2)")
    elif stride is not None:
        parts.append(f"stride {stride}")
    return ", ".join(parts)


def format_rows(rows: Sequence[tuple[str, str]]) -> str:
    """``(label, value)`` rows as a two-column table, the labels padded to the longest."""
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def format_table(result: EvalResult, extra_rows: Sequence[tuple[str, str]] = ()) -> str:
    first = (
        "scored (a start token is prepended to each document)"
        if result.bos_prepended
        else "not scored (the tokenizer starts documents with no token; see --bos)"
    )
    rows = [
        ("model", f"{result.model} ({result.dtype}, {result.device})"),
        ("documents", f"{result.documents:,} ({result.bytes:,} bytes, {result.words:,} words)"),
        (
            "windows",
            f"context {result.context}, stride {result.stride}: every token sees "
            f">= {result.context - result.stride + 1} tokens of context where the text has them",
        ),
        ("first token", first),
        ("tokens scored", f"{result.tokens:,}"),
        ("loss", f"{result.loss:.4f} nats/token ({result.bits_per_token:.4f} bits/token)"),
        ("perplexity", f"{result.perplexity:.4f}"),
        ("bits per byte", f"{result.bits_per_byte:.4f}"),
        ("word perplexity", f"{result.word_perplexity:.4f}"),
        ("speed", f"{result.tokens_per_second:,.1f} tokens/s ({result.seconds:.1f} s)"),
        *extra_rows,
    ]
    return format_rows(rows)


def run_eval(args: argparse.Namespace) -> int:
    if args.tasks is not None:
        return run_tasks(args)
    check_task_flags_unused(args)
    if not args.data:
        raise UserError(
            "DATA: pass at least one text file or folder to score (or --tasks NAME for lm-evaluation-harness tasks)"
        )
    check_arguments_early(args)
    if args.bos == "lm-eval":
        raise UserError(
            "--bos lm-eval is lm-eval's convention for --tasks; on text use --bos auto, yes or no"
        )
    sources = find_documents(args.data)
    data_format, format_line = choose_data_format(sources, args.format, args.text_field)
    if data_format == "preference":
        return run_preference_eval(args, sources, format_line)
    if data_format != "text":
        if args.train_data:
            raise UserError("--train-data applies to text DATA; score chat/instruction records without it")
        return run_response_eval(args, sources, data_format, format_line)
    documents = load_documents(sources, text_field=args.text_field)
    overlap = spans = None
    if args.train_data:  # measured before the model loads: a bad training path stops us first
        overlap = measure_overlap_of_documents(
            args.train_data, documents, args.overlap_n, text_field=args.text_field
        )
        spans = overlap_spans(documents, overlap)
    model, tokenizer = load_model_of(args)
    start_line_text, warning = document_start_lines(args, tokenizer)
    print(
        f"nexttoken eval: {len(documents)} document(s); "
        f"{settings_note(args.context, args.stride, model.max_context)}; {start_line_text}",
        file=sys.stderr,
        flush=True,
    )
    if warning:
        print(warning, file=sys.stderr, flush=True)
    result = evaluate_texts(
        model,
        tokenizer,
        [d.text for d in documents],
        args.context,
        args.stride,
        args.batch_size,
        bos=args.bos or "auto",
        progress=args.progress,
        model_name=str(args.model) + (f" + {args.adapter}" if args.adapter else ""),
        overlap_spans=spans,
    )
    if args.json:
        report = result.to_dict()
        report.pop("split", None)
        report["document_start"] = start_line_text
        if overlap is not None:
            report["overlap"] = overlap_report(overlap, result)
        print(json.dumps(report, allow_nan=False), flush=True)
    else:
        rows = [("document start", start_line_text.removeprefix("document start: "))]
        if overlap is not None:
            rows += overlap_rows(overlap, result)
        print(format_table(result, rows), flush=True)
    return 0


# --------------------------------------------------------------------------- what starts a document
def document_start_lines(args: argparse.Namespace, tokenizer) -> tuple[str, str | None]:
    """The ``document start: ...`` line, and a warning when the model learned documents that start
    with a token and ``--bos no`` scores them without it."""
    tokenizer = as_tokenizer(tokenizer)
    mode = args.bos or "auto"
    line = spelled(describe_scored_start(tokenizer, start_token(tokenizer, mode), mode), spell)
    trained_start = document_start(tokenizer)
    if mode != "no" or trained_start is None:
        return line, None
    token = tokenizer.eos_token if trained_start == tokenizer.eos_id else tokenizer.bos_token
    if is_checkpoint(str(args.model)):
        learned = f"this checkpoint was trained with {token} before every document"
    else:
        learned = f"this model's tokenizer puts {token} before every text (as its training documents began)"
    return line, (
        f"warning: {learned}, and --bos no scores without it: each document's start is scored out of "
        "the layout the model learned (drop --bos no to score it as trained)"
    )


# --------------------------------------------------------------------------- --train-data
def add_overlap_arguments(parser: argparse.ArgumentParser) -> None:
    """``[--train-data TRAIN]... [--overlap-n N]``: the score split into overlapping and clean tokens."""
    group = parser.add_argument_group("overlap with a training corpus (text DATA)")
    group.add_argument(
        "--train-data",
        action="append",
        default=None,
        metavar="TRAIN",
        help="a training corpus (files or folders, any data format; repeatable): split the score into "
        "the tokens of text that occurs in it (shared or near-copy n-grams) and the clean rest",
    )
    group.add_argument(
        "--overlap-n", type=int, default=DEFAULT_N, metavar="N", help="words per n-gram (default: 13)"
    )


def overlap_spans(documents, overlap: OverlapResult) -> list[list[tuple[int, int]]]:
    """Per document, the characters that occur in training: the runs of covered words. A document
    whose words cannot be placed on its characters exactly is overlapping as a whole when any of
    its words is covered (so its clean part is never one it shares with training)."""
    spans = []
    for document, measured in zip(documents, overlap.documents, strict=True):
        covered = measured.covered
        placed = covered_character_spans(document.text, covered) if covered is not None else None
        if placed is None:
            placed = [(0, len(document.text))] if covered is not None and covered.any() else []
        spans.append(placed)
    return spans


def overlap_report(overlap: OverlapResult, result: EvalResult) -> dict:
    """``--json``'s ``overlap``: the measure, the score's overlapping and clean parts, per document too."""
    measure = overlap.to_dict()
    split = result.split.to_dict()
    for document, parts in zip(measure["documents"], split["documents"], strict=True):
        document.update(parts)
    measure["overlapping"], measure["clean"] = split["overlapping"], split["clean"]
    return measure


def overlap_rows(overlap: OverlapResult, result: EvalResult) -> list[tuple[str, str]]:
    classes = overlap.classes()
    rows = [
        (
            "train overlap",
            f"{overlap.n}-grams: {overlap.overlap_fraction:.2%} of the words shared with training, "
            f"{overlap.partial_fraction:.2%} more in near copies; documents: {classes['copied']:,} copied, "
            f"{classes['partial']:,} partial, {classes['clean']:,} clean",
        )
    ]
    for label, part in (("overlapping", result.split.overlapping), ("clean", result.split.clean)):
        numbers = part.to_dict()
        if part.tokens:
            rows.append(
                (
                    label,
                    f"{part.tokens:,} tokens ({part.bytes:,} bytes): perplexity {numbers['perplexity']:.4f}, "
                    f"{numbers['bits_per_byte']:.4f} bits per byte",
                )
            )
        else:
            rows.append((label, f"no tokens ({part.bytes:,} bytes)"))
    return rows


# --------------------------------------------------------------------------- chat and instruction records
def add_response_arguments(parser: argparse.ArgumentParser) -> None:
    """``[--format F] [--chat-template FILE] [--train-on T]``: how chat/instruction DATA is scored."""
    group = parser.add_argument_group("chat and instruction records (responses scored given their prompts)")
    group.add_argument(
        "--format",
        choices=DATA_FORMATS,
        default="auto",
        help="auto: records with 'messages' are chat, with 'prompt'/'response' or 'instruction'/'output' "
        "instruction; text files and records with 'text' are text",
    )
    group.add_argument(
        "--chat-template",
        default=None,
        metavar="FILE",
        help="a Jinja chat template (default: the model's own)",
    )
    group.add_argument(
        "--train-on",
        choices=TRAIN_ON,
        default="responses",
        help="the tokens scored: every reply (responses), the last one, or all",
    )
    pairs = parser.add_argument_group("preference pairs (records with 'chosen' and 'rejected')")
    pairs.add_argument(
        "--reference",
        default=None,
        metavar="MODEL",
        help="the reference model of DPO's rewards (beta times the policy's minus its summed log-prob)",
    )
    pairs.add_argument("--beta", type=float, default=0.1, metavar="B", help="DPO's beta (default 0.1)")


def read_records(sources: Sequence[Path]) -> list[Record]:
    """Every record of ``sources`` with the fields conversations are read from."""
    for path in sources:
        if is_text_file(path):
            raise UserError(
                f"{path} is a text file among chat/instruction records; score text files in a separate run"
            )
    return [
        record
        for path in sources
        for record in RecordSource(path, path.name).read((), optional=CONVERSATION_FIELDS)
    ]


def run_response_eval(args: argparse.Namespace, sources: Sequence[Path], data_format: str, line: str) -> int:
    """``nexttoken eval MODEL chats.jsonl``: loss, perplexity and bits per byte of the responses."""
    records = read_records(sources)
    conversations, _ = read_conversations(records, data_format)  # bad records stop us before the model loads
    model, tokenizer = load_model_of(args)
    print(
        f"nexttoken eval: {line}; {len(conversations):,} conversation(s); "
        f"{settings_note(args.context, args.stride, model.max_context)}",
        file=sys.stderr,
        flush=True,
    )
    result, _ = evaluate_records(
        model,
        tokenizer,
        records,
        fmt=data_format,
        chat_template=args.chat_template,
        train_on=args.train_on,
        context=args.context,
        stride=args.stride,
        batch_size=args.batch_size,
        progress=args.progress,
        model_name=str(args.model),
    )
    print(result.to_json() if args.json else format_response_table(result), flush=True)
    return 0


def run_preference_eval(args: argparse.Namespace, sources: Sequence[Path], line: str) -> int:
    """``nexttoken eval MODEL pairs.jsonl [--reference MODEL] [--beta B]``: the preference scoreboard."""
    import torch

    from nexttoken.data.preferences import read_pairs
    from nexttoken.scoring.preferences import PairSums, encode_pairs_for, score_pairs
    from nexttoken.training.objectives import dpo

    if not args.beta > 0:
        raise UserError(f"--beta must be above 0, got {args.beta}")
    pairs = read_pairs(read_records(sources))  # bad records stop us before the model loads
    model, tokenizer = load_model_of(args)
    pairs, report = encode_pairs_for(tokenizer, pairs, args.chat_template, model.max_context)
    for note in [line, *report.lines(), f"{len(pairs):,} pair(s) scored"]:
        print(f"nexttoken eval: {note}", file=sys.stderr, flush=True)
    policy = score_pairs(model, pairs, args.batch_size)
    sums = PairSums()
    if args.reference is not None:
        reference_model, _ = load_model(
            args.reference, dtype=args.dtype, device=args.device, trust_remote_code=args.trust_remote_code
        )
        reference = score_pairs(reference_model, pairs, args.batch_size)
        sums.add(policy, *dpo(policy, reference, args.beta))
    else:  # no reference: no reward, no loss; accuracy compares the replies' own log-probabilities
        sums.add(policy, torch.full_like(policy.chosen, math.nan), policy.chosen, policy.rejected)
    means = sums.means()
    result = {
        "model": str(args.model) + (f" + {args.adapter}" if args.adapter else ""),
        "reference": args.reference,
        "beta": args.beta if args.reference is not None else None,
        **means,
        "sums": sums.to_dict(),
        "dropped": {
            "no_scored": report.no_scored,
            "identical": report.identical,
            "marker_text": report.marker_text,
        },
        "truncated": report.truncated,
    }
    if args.reference is None:
        for name in ("loss", "margin", "chosen_reward", "rejected_reward"):
            result[name] = None
    if args.json:
        print(json.dumps(result, indent=2), flush=True)
    else:
        print(format_preference_table(result), flush=True)
    return 0


def format_preference_table(result: dict) -> str:
    rows = [("model", result["model"]), ("pairs", f"{result['pairs']:,}")]
    if result["reference"] is not None:
        rows += [
            ("reference", f"{result['reference']} (beta {result['beta']:g})"),
            ("DPO loss", f"{result['loss']:.4f} (per pair)"),
            ("reward accuracy", f"{result['accuracy']:.4f} (chosen reward above rejected; a tie is wrong)"),
            ("margin", f"{result['margin']:.4f}"),
            ("chosen reward", f"{result['chosen_reward']:.4f}"),
            ("rejected reward", f"{result['rejected_reward']:.4f}"),
        ]
    else:
        rows += [
            ("accuracy", f"{result['accuracy']:.4f} (chosen reply's summed log-prob higher; a tie is wrong)"),
            ("per token", f"{result['accuracy_per_token']:.4f} (the same, per scored token)"),
        ]
    rows += [
        ("chosen log-prob", f"{result['chosen_logp']:.4f} (summed over the reply, per pair)"),
        ("rejected log-prob", f"{result['rejected_logp']:.4f}"),
        ("chosen loss", f"{result['chosen_response_loss']:.4f} nats/token"),
    ]
    return format_rows(rows)


def format_response_table(result: ResponseEvalResult) -> str:
    rows = [
        ("model", f"{result.model} ({result.dtype}, {result.device})"),
        ("examples", f"{result.examples:,}"),
        (
            "scored",
            f"{result.response_tokens:,} response tokens ({result.bytes:,} bytes); "
            f"{result.prompt_tokens_ignored:,} prompt tokens ignored",
        ),
        ("windows", f"context {result.context}, stride {result.stride}"),
        ("loss", f"{result.loss:.4f} nats/token ({result.bits_per_token:.4f} bits/token)"),
        ("perplexity", f"{result.perplexity:.4f}"),
        ("bits per byte", f"{result.bits_per_byte:.4f}"),
        ("speed", f"{result.tokens_per_second:,.1f} tokens/s ({result.seconds:.1f} s)"),
    ]
    return format_rows(rows)


# --------------------------------------------------------------------------- --tasks
TASK_FLAGS = {
    "include_path": "--include-path",
    "num_fewshot": "--num-fewshot",
    "limit": "--limit",
    "apply_chat_template": "--apply-chat-template",
}


def add_task_arguments(parser: argparse.ArgumentParser) -> None:
    """``--tasks NAME[,NAME...] [--include-path DIR] [--num-fewshot K] [--limit N] ...``"""
    group = parser.add_argument_group(
        "downstream tasks (lm-evaluation-harness, offline; pip install 'nexttoken[tasks]')"
    )
    group.add_argument(
        "--tasks",
        default=None,
        metavar="NAME[,NAME...]",
        help="run these lm-eval tasks (or groups, or glob patterns) instead of scoring DATA; "
        "--stride then defaults to --context (lm-eval's disjoint rolling windows)",
    )
    group.add_argument(
        "--include-path",
        action="append",
        default=None,
        metavar="DIR",
        help="a folder of task YAML files (repeatable); their data must be on disk",
    )
    group.add_argument(
        "--num-fewshot", type=int, default=None, metavar="K", help="few-shot examples per prompt"
    )
    group.add_argument(
        "--limit",
        type=float,
        default=None,
        metavar="N",
        help="only the first N documents per task (< 1: a fraction)",
    )
    group.add_argument(
        "--apply-chat-template", action="store_true", help="format prompts with the model's chat template"
    )


def check_task_flags_unused(args: argparse.Namespace) -> None:
    for key, flag in TASK_FLAGS.items():
        if getattr(args, key) not in (None, False):
            raise UserError(f"{flag} only applies with --tasks NAME; add --tasks or drop {flag}")


def run_tasks(args: argparse.Namespace) -> int:
    """``nexttoken eval MODEL --tasks ...``: lm-eval's table on stdout (or its results as one JSON
    object with ``--json``), also written beside the run when MODEL is a checkpoint of one."""
    if args.data:
        raise UserError(
            "--tasks runs lm-eval tasks on their own data; score text files in a separate "
            f"`nexttoken eval MODEL {' '.join(args.data[:2])}` run without --tasks"
        )
    if args.train_data:
        raise UserError("--train-data applies to text DATA, not to --tasks; drop one of them")
    names = [name.strip() for name in args.tasks.split(",") if name.strip()]
    if not names:
        raise UserError("--tasks: name at least one task, e.g. --tasks hellaswag or --tasks mytask")
    check_arguments_early(args)
    limit = args.limit
    if limit is not None and (limit <= 0 or (limit >= 1 and not limit.is_integer())):
        raise UserError(f"--limit must be a whole number of documents or a fraction below 1, got {limit:g}")
    limit = int(limit) if limit is not None and limit >= 1 else limit
    if args.num_fewshot is not None and args.num_fewshot < 0:
        raise UserError(f"--num-fewshot must be >= 0, got {args.num_fewshot}")
    try:
        from nexttoken.scoring.lmeval import tasks
        from nexttoken.scoring.lmeval.adapter import NextTokenLM
    except ImportError as error:
        if (error.name or "").split(".")[0] != "lm_eval":
            raise
        raise UserError('--tasks needs lm-evaluation-harness: pip install "nexttoken[tasks]"') from None

    include = args.include_path or []
    manager = tasks.task_manager(names, include)
    names = tasks.check_task_names(manager, names, include)
    chat = None
    if args.apply_chat_template:
        chat = chat_tokenizer_of(args.model, args.trust_remote_code)
        if chat is None:
            raise UserError(
                f"{args.model} has no chat template, but --apply-chat-template asks for one; drop the flag "
                "(a base model reads plain prompts) or use an instruction model's folder or GGUF file"
            )
    loaded = tasks.load_tasks(manager, names)
    lm = NextTokenLM(
        str(args.model),
        context=args.context,
        stride=args.stride,
        batch_size=args.batch_size,
        device=args.device,
        dtype=args.dtype,
        bos=args.bos or "lm-eval",
        trust_remote_code=args.trust_remote_code,
        chat_tokenizer=chat,
        progress=args.progress,
    )
    settings = lm.settings()
    print(
        f"nexttoken eval: tasks {', '.join(names)}; context {lm.context}, stride {lm.stride}; "
        f"{start_line(settings)}; {settings['dtype']} on {settings['device']}; "
        f"shared contexts {'on' if lm.share_context else 'off (the model takes no packed rows)'}",
        file=sys.stderr,
        flush=True,
    )
    results = tasks.evaluate_tasks(
        lm,
        loaded,
        manager,
        num_fewshot=args.num_fewshot,
        limit=limit,
        apply_chat_template=args.apply_chat_template,
    )
    if lm.truncated:
        print(
            f"note: {lm.truncated} request(s) were longer than the context of {lm.context} tokens; "
            "their contexts were cut from the left",
            file=sys.stderr,
        )
    text = results_json(results)
    beside_run = results_path(args.model, names)
    if beside_run is not None:
        write_atomically(beside_run, text + "\n")
        print(f"results: {beside_run}", file=sys.stderr)
    print(text if args.json else results_table(results), flush=True)
    return 0

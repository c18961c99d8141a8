"""Sliding-window evaluation of a causal LM on text: every token scored exactly once.

A document of ``L`` token ids ``x[0] .. x[L-1]`` has ``L - 1`` targets: ``x[t]`` predicted from the
tokens before it. With a context of ``N`` tokens and a stride ``S`` (``1 <= S <= N``):

* the first window feeds ``x[0:N]`` and scores all of its targets ``x[1] .. x[N]``;
* every later window moves ``S`` tokens on, feeds the ``N`` tokens that end just before its last
  target, and scores only its last ``S`` targets (the ones no window scored yet); the last window
  scores what is left (``<= S``) and still gets a full ``N`` tokens of input.

So each target is scored once, with at least ``N - S + 1`` tokens of left context (all of them near
the start of a document). ``S = N`` gives disjoint windows; ``S = 1`` gives every token a full window.

The first token of a document has no left context. nexttoken follows the model's tokenizer (the
*BOS rule*, ``bos="auto"``): if a Hugging Face tokenizer itself puts a BOS token in front of the
text it encodes (Llama, Gemma, Mistral, ...), that BOS is prepended, so the first real token is
scored too; if it does not (GPT-2, SmolLM2, Qwen: they define a BOS but never add it), nothing is
prepended and the first token of each document is not scored. A nexttoken tokenizer gets its EOS
prepended, exactly as nexttoken's training stream puts an EOS before every document. ``bos="yes"``
or ``"no"`` overrides the rule. ``bytes`` and ``words`` always count the whole documents' text.

Scores add up through the reduction contract: ``nll_sum``, ``tokens`` and ``bytes`` are summed over
windows, batches and documents, and divided once by :func:`nexttoken.metrics.summarize`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from nexttoken.errors import UserError
from nexttoken.loss import IGNORE_INDEX, next_token_loss
from nexttoken.metrics import NextTokenMetrics, summarize

BOS_MODES = ("auto", "yes", "no")
DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")


# --------------------------------------------------------------------------- windows (pure)
@dataclass(frozen=True)
class Window:
    """One forward pass over ``ids[begin:end]`` (inputs) against ``ids[begin + 1 : end + 1]``
    (targets), of which only the last ``n_scored`` count."""

    doc: int
    begin: int
    end: int
    n_scored: int

    @property
    def length(self) -> int:
        return self.end - self.begin


def check_window_settings(context: int, stride: int, max_context: int | None = None) -> None:
    """UserError unless ``1 <= stride <= context <= max_context``."""
    if isinstance(context, bool) or not isinstance(context, int) or context < 1:
        raise UserError(f"--context must be a positive number of tokens, got {context!r}")
    if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
        raise UserError(f"--stride must be a positive number of tokens, got {stride!r}")
    if stride > context:
        raise UserError(
            f"--stride {stride} is larger than --context {context}: tokens between windows would never be "
            f"scored; use a stride of at most {context} (default: context // 2)"
        )
    if max_context is not None and context > max_context:
        raise UserError(
            f"--context {context} is above the model's maximum context of {max_context} tokens; "
            f"pass --context {max_context} or less"
        )


def make_windows(n_tokens: int, context: int, stride: int, doc: int = 0) -> list[Window]:
    """The windows that score targets ``1 .. n_tokens - 1`` of a document exactly once (see module doc)."""
    check_window_settings(context, stride)
    n_targets = n_tokens - 1
    windows: list[Window] = []
    done = 0  # targets 1..done are scored
    while done < n_targets:
        end = min(done + (context if done == 0 else stride), n_targets)
        windows.append(Window(doc, max(0, end - context), end, end - done))
        done = end
    return windows


# --------------------------------------------------------------------------- tokenizers
def _is_hf_tokenizer(tokenizer) -> bool:
    return hasattr(tokenizer, "convert_ids_to_tokens")


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` without any special tokens (the BOS rule adds those)."""
    if _is_hf_tokenizer(tokenizer):
        return list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
    return list(tokenizer.encode(text))


def encode_with_offsets(tokenizer, text: str) -> tuple[list[int], list[tuple[int, int]] | None]:
    """``(ids, character offsets)``; offsets are ``None`` where the tokenizer cannot give them."""
    if _is_hf_tokenizer(tokenizer):
        try:
            enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
            return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
        except (NotImplementedError, ValueError, KeyError):
            pass
    return encode(tokenizer, text), None


def decode(tokenizer, ids: Sequence[int]) -> str:
    return tokenizer.decode([int(i) for i in ids])


def bos_to_prepend(tokenizer, mode: str = "auto") -> int | None:
    """The token id put before every document (so its first token is scored), or None. See module doc."""
    if mode not in BOS_MODES:
        raise UserError(f"--bos must be one of {', '.join(BOS_MODES)}, got {mode!r}")
    if mode == "no":
        return None
    if not _is_hf_tokenizer(tokenizer):
        # nexttoken's own tokenizers: training streams are "EOS doc0 EOS doc1 ..." (data/packing.py)
        return tokenizer.eos_id
    bos = tokenizer.bos_token_id
    if mode == "yes":
        if bos is None:
            raise UserError("--bos yes: this tokenizer defines no BOS token; use --bos auto or --bos no")
        return bos
    if bos is None:
        return None
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    without = tokenizer("a", add_special_tokens=False)["input_ids"]
    adds = list(with_special[:1]) == [bos] and list(without[:1]) != [bos]
    return bos if adds else None


# --------------------------------------------------------------------------- models
def as_scorer(model: nn.Module) -> nn.Module:
    """A bare ``transformers`` model gets wrapped in :class:`HFCausalLM`; others pass through."""
    from nexttoken.models.hf import HFCausalLM

    if (
        not isinstance(model, HFCausalLM)
        and hasattr(model, "get_output_embeddings")
        and hasattr(model, "config")
    ):
        return HFCausalLM(model)
    return model


def model_max_context(model: nn.Module) -> int | None:
    """``max_context`` (HFCausalLM and friends), else ``config.block_size`` (nexttoken's GPT)."""
    value = getattr(model, "max_context", None)
    if isinstance(value, int) and value > 0:
        return value
    config = getattr(model, "config", None)
    for key in ("block_size", "max_position_embeddings", "n_positions"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def default_batch_size(context: int, device: torch.device) -> int:
    """About 1k window tokens per batch on CPU (bigger batches do not run faster there), 8k on GPUs."""
    budget = 8192 if device.type == "cuda" else 1024
    return max(1, budget // context)


def _logits_for_last(model: nn.Module, inputs: Tensor, mask: Tensor | None, keep: int) -> Tensor:
    """Logits of the last ``keep`` positions; HF models never project the others onto the vocabulary."""
    from nexttoken.models.hf import HFCausalLM

    if isinstance(model, HFCausalLM):
        return model(inputs, mask, logits_to_keep=keep)
    # nexttoken's GPT (and other causal models): right padding cannot reach earlier positions.
    return model(inputs)[:, -keep:]


@dataclass
class ScoredBatch:
    windows: list[Window]
    targets: Tensor  # (B, keep): target ids, IGNORE_INDEX where not scored
    nll: Tensor  # (B, keep): nats, 0 where not scored
    logits: Tensor  # (B, keep, V)
    offset: int  # column j of targets/nll/logits is input position offset + j


def score_windows(
    model: nn.Module, docs: Sequence[Tensor], windows: Sequence[Window], batch_size: int, pad_id: int = 0
) -> Iterator[ScoredBatch]:
    """Run the windows in batches (right-padded, targets masked with IGNORE_INDEX); call under
    ``torch.inference_mode()``."""
    device = next(model.parameters()).device
    for start in range(0, len(windows), batch_size):
        batch = list(windows[start : start + batch_size])
        width = max(w.length for w in batch)
        inputs = torch.full((len(batch), width), pad_id, dtype=torch.long)
        targets = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
        for i, w in enumerate(batch):
            ids = docs[w.doc]
            inputs[i, : w.length] = ids[w.begin : w.end]
            targets[i, w.length - w.n_scored : w.length] = ids[w.end - w.n_scored + 1 : w.end + 1]
        offset = min(w.length - w.n_scored for w in batch)
        mask = None
        if any(w.length < width for w in batch):
            lengths = torch.tensor([w.length for w in batch])
            mask = (torch.arange(width)[None, :] < lengths[:, None]).long().to(device)
        logits = _logits_for_last(model, inputs.to(device), mask, width - offset)
        kept = targets[:, offset:].to(device)
        nll = next_token_loss(logits, kept, reduction="none")
        yield ScoredBatch(batch, kept, nll, logits, offset)


def _progress(total: int, enabled: bool, desc: str):
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        unit="tok",
        unit_scale=True,
        desc=desc,
        file=sys.stderr,
        disable=not enabled,
        dynamic_ncols=True,
        mininterval=0.5,
        smoothing=0.1,
    )


# --------------------------------------------------------------------------- evaluation
@dataclass
class EvalResult:
    """What ``nexttoken eval`` reports. ``tokens``: scored tokens; ``bytes``/``words``: UTF-8 bytes and
    whitespace-separated words of the documents' text; ``loss`` in nats per token."""

    documents: int
    tokens: int
    bytes: int
    words: int
    nll_sum: float
    loss: float
    perplexity: float
    bits_per_token: float
    bits_per_byte: float
    word_perplexity: float
    context: int
    stride: int
    batch_size: int
    bos_prepended: bool
    model: str
    dtype: str
    device: str
    seconds: float
    tokens_per_second: float

    def to_dict(self) -> dict:
        return {
            k: (v if not isinstance(v, float) or math.isfinite(v) else None) for k, v in asdict(self).items()
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), allow_nan=False)


def _settings(model, tokenizer, context, stride, bos):
    """The model as a scorer, the resolved context and stride, and the token to prepend (or None)."""
    model = as_scorer(model)
    max_context = model_max_context(model)
    if context is None:
        if max_context is None:
            raise UserError("cannot tell this model's maximum context; pass --context N")
        context = max_context
    if stride is None:
        stride = max(1, context // 2)
    check_window_settings(context, stride, max_context)
    return model, context, stride, bos_to_prepend(tokenizer, bos)


def _document(start: int | None, ids: list[int]) -> Tensor:
    return torch.tensor(([start] if start is not None else []) + ids, dtype=torch.long)


def evaluate_texts(
    model: nn.Module,
    tokenizer,
    texts: Sequence[str],
    context: int | None = None,
    stride: int | None = None,
    batch_size: int | None = None,
    *,
    bos: str = "auto",
    progress: bool = False,
    model_name: str | None = None,
) -> EvalResult:
    """Score every token of every text once with sliding windows (see the module doc).

    ``context`` defaults to the model's maximum, ``stride`` to ``context // 2``, ``batch_size`` (windows
    per forward pass) to about 1k tokens' worth on CPU. ``bos``: ``auto`` | ``yes`` | ``no``.
    """
    texts = list(texts)
    if not texts:
        raise UserError("no documents to evaluate; pass at least one text file")
    model, context, stride, start = _settings(model, tokenizer, context, stride, bos)
    docs = [_document(start, encode(tokenizer, text)) for text in texts]
    windows = [w for d, ids in enumerate(docs) for w in make_windows(len(ids), context, stride, doc=d)]
    # Longest first: windows of similar length share a batch (less padding); sums do not care.
    windows.sort(key=lambda w: -w.length)
    total = sum(w.n_scored for w in windows)
    if total == 0:
        raise UserError(
            "nothing to score: every document is a single token and the tokenizer adds no BOS; "
            "pass longer text (or --bos yes)"
        )
    param = next(model.parameters())
    if batch_size is None:
        batch_size = default_batch_size(context, param.device)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise UserError(f"--batch-size must be a positive number of windows, got {batch_size!r}")

    metrics = NextTokenMetrics().to(param.device) if param.device.type != "mps" else NextTokenMetrics()
    was_training = model.training
    model.eval()
    began = time.perf_counter()
    try:
        with torch.inference_mode(), _progress(total, progress, "eval") as bar:
            for scored in score_windows(model, docs, windows, batch_size):
                metrics.update(scored.nll.double().sum(), (scored.targets != IGNORE_INDEX).sum())
                bar.update(sum(w.n_scored for w in scored.windows))
    finally:
        model.train(was_training)
    seconds = time.perf_counter() - began

    nll_sum, tokens = float(metrics.nll_sum), int(metrics.tokens)
    assert tokens == total, f"scored {tokens} tokens, expected {total}"
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    n_words = sum(len(t.split()) for t in texts)
    numbers = summarize(nll_sum, tokens, n_bytes)
    # Word perplexity is exp(nll_sum / words): the same division, with words as the unit.
    word_ppl = summarize(nll_sum, n_words)["perplexity"] if n_words else math.nan
    return EvalResult(
        documents=len(texts),
        tokens=tokens,
        bytes=n_bytes,
        words=n_words,
        nll_sum=nll_sum,
        loss=numbers["loss"],
        perplexity=numbers["perplexity"],
        bits_per_token=numbers["bits_per_token"],
        bits_per_byte=numbers.get("bits_per_byte", math.nan),
        word_perplexity=word_ppl,
        context=context,
        stride=stride,
        batch_size=batch_size,
        bos_prepended=start is not None,
        model=model_name or getattr(model, "name", type(model).__name__),
        dtype=str(param.dtype).removeprefix("torch."),
        device=str(param.device),
        seconds=seconds,
        tokens_per_second=tokens / seconds if seconds > 0 else math.nan,
    )


@dataclass
class TokenScores:
    """Per-token scores of one text (for ``nexttoken inspect``).

    ``ids`` are the text's tokens (no BOS); ``nll[i]`` is the nats of ``ids[i]`` (NaN when the token
    was not scored: the first token without a BOS); ``top_ids``/``top_probs`` are the model's
    ``k`` best guesses at that position, ``(n, k)``.
    """

    ids: list[int]
    offsets: list[tuple[int, int]] | None
    nll: Tensor
    top_ids: Tensor
    top_probs: Tensor
    bos_prepended: bool
    context: int
    stride: int


def score_text(
    model: nn.Module,
    tokenizer,
    text: str,
    context: int | None = None,
    stride: int | None = None,
    batch_size: int | None = None,
    *,
    bos: str = "auto",
    topk: int = 5,
    progress: bool = False,
) -> TokenScores:
    """Every token's surprisal and the model's top-``k`` guesses, windowed exactly as :func:`evaluate_texts`."""
    ids, offsets = encode_with_offsets(tokenizer, text)
    if not ids:
        raise UserError("the text is empty: nothing to inspect")
    model, context, stride, start = _settings(model, tokenizer, context, stride, bos)
    doc = _document(start, ids)
    shift = 1 if start is not None else 0  # doc position p is text token p - shift
    windows = make_windows(len(doc), context, stride)
    n = len(ids)
    nll = torch.full((n,), math.nan, dtype=torch.float64)
    top_ids = torch.zeros((n, topk), dtype=torch.long)
    top_probs = torch.zeros((n, topk), dtype=torch.float32)
    device = next(model.parameters()).device
    batch_size = batch_size or default_batch_size(context, device)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), _progress(sum(w.n_scored for w in windows), progress, "inspect") as bar:
            for scored in score_windows(model, [doc], windows, batch_size):
                for i, w in enumerate(scored.windows):
                    a = w.length - w.n_scored - scored.offset
                    positions = torch.arange(w.end - w.n_scored + 1, w.end + 1) - shift
                    nll[positions] = scored.nll[i, a : a + w.n_scored].double().cpu()
                    probs = torch.softmax(scored.logits[i, a : a + w.n_scored].float(), dim=-1)
                    p, k = probs.topk(topk, dim=-1)
                    top_ids[positions], top_probs[positions] = k.cpu(), p.cpu()
                    bar.update(w.n_scored)
    finally:
        model.train(was_training)
    return TokenScores(ids, offsets, nll, top_ids, top_probs, start is not None, context, stride)


# --------------------------------------------------------------------------- files and models
def read_texts(paths: Sequence[str | os.PathLike]) -> list[tuple[str, str]]:
    """``(name, text)`` for each file named, and each text file under each folder named (recursive,
    sorted; hidden and binary files skipped). Missing paths, empty files, binary or non-UTF-8 files
    named explicitly are a :class:`UserError`."""
    if not paths:
        raise UserError("no DATA given; pass one or more text files or a folder")
    found: list[tuple[str, str]] = []
    for given in paths:
        path = Path(given).expanduser()
        if not path.exists():
            raise UserError(f"DATA path not found: {path}; pass existing text files or a folder of them")
        if path.is_file():
            found.append((str(path), read_text_file(path, explicit=True)))
            continue
        before = len(found)
        for dirpath, dirnames, filenames in os.walk(path):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d != "__pycache__")
            for name in sorted(f for f in filenames if not f.startswith(".")):
                text = read_text_file(Path(dirpath) / name, explicit=False)
                if text is not None:
                    found.append((str(Path(dirpath) / name), text))
        if len(found) == before:
            raise UserError(f"DATA folder {path} holds no non-empty text files; point at text files")
    return found


def read_text_file(path: Path, explicit: bool = True) -> str | None:
    """The UTF-8 text of ``path``. Binary or empty files: a UserError when ``explicit`` (named by the
    user), else ``None`` (skipped inside a folder). Invalid UTF-8 is always a UserError."""
    data = path.read_bytes()
    if b"\0" in data[:8192]:
        if explicit:
            raise UserError(f"{path} is a binary file, not text; pass UTF-8 text files")
        return None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not valid UTF-8 (byte offset {e.start}); convert it to UTF-8") from None
    if not text.strip():
        if explicit:
            raise UserError(f"{path} is empty: there is no text to score; remove it from DATA")
        warnings.warn(f"skipping empty file {path}", stacklevel=3)
        return None
    return text


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise UserError(f"unknown --device {device!r}; use auto, cpu or cuda") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available here; use --device cpu")
    return resolved


def resolve_eval_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto``: float32 on CPU (exact, and fast enough), bfloat16 on GPUs that have it."""
    from nexttoken.models.hf import resolve_dtype

    if dtype == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return resolve_dtype(dtype)


def load_model(
    path: str, *, dtype: str = "auto", device: str = "auto", trust_remote_code: bool = False
) -> tuple[nn.Module, object]:
    """``(model, tokenizer)`` from a nexttoken checkpoint (``.ckpt``), a local HF folder or a ``.gguf``."""
    target = Path(path).expanduser()
    if not target.exists():
        raise UserError(
            f"MODEL not found: {target}; pass a nexttoken checkpoint (.ckpt), a Hugging Face model folder "
            "or a .gguf file"
        )
    dev = resolve_device(device)
    torch_dtype = resolve_eval_dtype(dtype, dev)
    if target.is_file() and target.suffix == ".ckpt":
        from nexttoken.module import load_checkpoint

        model, tokenizer = load_checkpoint(target)
        model = model.to(device=dev, dtype=torch_dtype)
    else:
        from nexttoken.models.hf import load_hf_causal_lm

        model, tokenizer = load_hf_causal_lm(target, dtype=torch_dtype, trust_remote_code=trust_remote_code)
        model = model.to(dev)
    model.eval()
    return model, tokenizer


# --------------------------------------------------------------------------- CLI
def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments shared by ``eval`` and ``inspect``."""
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
        choices=BOS_MODES,
        default="auto",
        help="prepend a BOS so each document's first token is scored: auto = when the tokenizer adds one",
    )
    parser.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="let a Hugging Face model folder run its own Python code",
    )
    parser.add_argument(
        "--no-progress", dest="progress", action="store_false", help="no progress bar on stderr"
    )


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    """``nexttoken eval MODEL DATA... [--context N] [--stride S] [--batch-size B] [--json] ...``"""
    parser.add_argument(
        "model",
        metavar="MODEL",
        help="nexttoken checkpoint (.ckpt), Hugging Face model folder, or .gguf file",
    )
    parser.add_argument(
        "data", metavar="DATA", nargs="+", help="text files, or folders searched recursively for them"
    )
    add_model_arguments(parser)
    parser.add_argument(
        "--json", action="store_true", help="print one JSON object on stdout instead of a table"
    )


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def settings_note(context: int | None, stride: int | None, model: nn.Module) -> str:
    max_context = model_max_context(model)
    c = context if context is not None else max_context
    parts = [f"context {c}" + (" (the model's maximum)" if context is None else "")]
    if stride is None and c is not None:
        parts.append(f"stride {max(1, c // 2)} (context // 2)")
    elif stride is not None:
        parts.append(f"stride {stride}")
    return ", ".join(parts)


def format_table(result: EvalResult) -> str:
    first = (
        "scored (a BOS is prepended to each document)"
        if result.bos_prepended
        else "not scored (the tokenizer adds no BOS; see --bos)"
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
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def check_arguments_early(args: argparse.Namespace) -> None:
    """What can be checked before a model is loaded (the model's maximum context is checked after)."""
    context = args.context
    check_window_settings(
        context if context is not None else max(args.stride or 1, 1),
        args.stride if args.stride is not None else 1,
    )
    if args.batch_size is not None and args.batch_size < 1:
        raise UserError(f"--batch-size must be a positive number of windows, got {args.batch_size!r}")


def run_eval(args: argparse.Namespace) -> int:
    check_arguments_early(args)
    texts = read_texts(args.data)
    model, tokenizer = load_model(
        args.model, dtype=args.dtype, device=args.device, trust_remote_code=args.trust_remote_code
    )
    _say(
        f"nexttoken eval: {len(texts)} document(s); {settings_note(args.context, args.stride, as_scorer(model))}"
    )
    result = evaluate_texts(
        model,
        tokenizer,
        [text for _, text in texts],
        args.context,
        args.stride,
        args.batch_size,
        bos=args.bos,
        progress=args.progress,
        model_name=str(args.model),
    )
    print(result.to_json() if args.json else format_table(result), flush=True)
    return 0


__all__ = [
    "EvalResult",
    "TokenScores",
    "Window",
    "add_eval_arguments",
    "add_model_arguments",
    "bos_to_prepend",
    "check_window_settings",
    "evaluate_texts",
    "load_model",
    "make_windows",
    "read_text_file",
    "read_texts",
    "run_eval",
    "score_text",
    "score_windows",
]

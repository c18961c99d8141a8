"""lm-evaluation-harness tasks on any model nexttoken loads, natively and offline.

:class:`NextTokenLM` is an lm-eval language model (a ``TemplateLM``, registered as ``nexttoken``)
built on nexttoken's own pieces: :func:`~nexttoken.models.load.load_model` (a ``.ckpt``, a Hugging
Face folder or a GGUF file), the document-start rule (:func:`~nexttoken.scoring.text.start_token`),
fp32 log-softmax scoring (:func:`~nexttoken.loss.next_token_loss`) and the sliding windows of
``nexttoken eval`` (:func:`~nexttoken.scoring.windows.make_windows`,
:func:`~nexttoken.scoring.text.score_windows`). lm-eval itself builds the prompts, few-shot
contexts and metrics; :func:`evaluate_tasks` runs ``lm_eval.simple_evaluate`` with it.

Work it saves, compared with lm-eval's ``HFLM`` on the same model:

* **shared contexts**: the choices of a multiple-choice question run as one packed row (the context
  once, then every continuation, each attending to the context and to itself only, through a 4-D
  attention mask and position ids), where the model honours such a mask: checked once per model by
  comparing a packed row against separate ones (Hugging Face models; the built-in GPT has no such
  mask and runs every request in its own row);
* **prefix reuse**: a request whose input is a prefix of another's (identical inputs included) is read
  from that one's forward pass (``HFLM`` shares one only between identical inputs, such as one-token
  continuations of one context);
* **scored positions only**: hidden states are gathered at the scored positions and only those are
  projected onto the vocabulary (in chunks of at most ~128 MB of logits), never the whole padded batch.

Where its numbers and ``HFLM``'s differ by construction (everything else agrees to float rounding,
tested on exported nexttoken checkpoints and SmolLM2):

* **rolling log-likelihood** (perplexity tasks): nexttoken puts :func:`document_start` before the
  document, exactly as ``nexttoken eval``; ``HFLM`` puts its prefix token (BOS, else EOS) before the
  tokenizer's own encoding. For a tokenizer that adds a start token itself (Llama's BOS, the EOS of
  an exported nexttoken model) ``HFLM`` therefore starts with two of them and scores one extra token
  per document (the start token given the start token); ``HFLM(..., add_bos_token=False)`` gives
  nexttoken's number. For a tokenizer that starts documents with no token (GPT-2, SmolLM2) nexttoken
  leaves the first token unscored (``--bos auto``), while ``HFLM`` scores it after its prefix token;
  ``--bos yes`` conditions on the tokenizer's BOS as ``HFLM`` does.
* **empty contexts** (``loglikelihood`` with context ``""``): ``HFLM`` conditions on the BOS (else the
  EOS); nexttoken on the document start, else the EOS (a document follows an EOS in a training
  stream). For SmolLM2, whose BOS is the chat marker ``<|im_start|>``, the two differ.
* **rolling windows**: ``HFLM`` uses disjoint windows of the model's maximum length; so does nexttoken
  by default (``stride = context``), and ``--stride`` gives every token more context.
* **precision**: nexttoken's log-softmax is always fp32; ``HFLM``'s runs in the model's dtype.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from torch import Tensor
from tqdm.auto import tqdm

from nexttoken.data.tokenizers import Tokenizer, as_tokenizer
from nexttoken.errors import UserError
from nexttoken.loss import next_token_loss
from nexttoken.models.hf import HFCausalLM, as_causal_lm
from nexttoken.models.protocol import CausalLM, evaluating
from nexttoken.scoring.lmeval.requests import Request, Row, packed_mask, plan_rows
from nexttoken.scoring.text import (
    BosMode,
    default_batch_size,
    resolve_windows,
    score_windows,
    start_token,
)
from nexttoken.scoring.windows import make_windows

# Logits projected at once when scoring gathered positions (fp32: 2**25 logits = 128 MB).
HEAD_CHUNK_LOGITS = 2**25
# New tokens per generation call: stop strings are looked for between calls.
GENERATION_CHUNK = 32


@register_model("nexttoken")
class NextTokenLM(TemplateLM):
    """An lm-eval ``LM`` over any model nexttoken loads.

    Args:
        pretrained: a nexttoken checkpoint (``.ckpt``), a local Hugging Face folder or a ``.gguf``
            file; or pass ``model`` and ``tokenizer`` (a :class:`CausalLM` or ``transformers``
            model, and a nexttoken or ``transformers`` tokenizer) instead.
        context: tokens per window / longest input (default: the model's maximum).
        stride: new tokens scored per rolling window after the first (default: ``context``, lm-eval's
            disjoint windows); see :mod:`nexttoken.scoring.windows`.
        batch_size: sequences per forward pass (default: about 1k tokens' worth on CPU, 8k on GPU).
        device, dtype, trust_remote_code: how ``pretrained`` is loaded (a given ``model`` stays as it is).
        bos: the document-start policy, as ``nexttoken eval --bos`` (``auto`` | ``yes`` | ``no``).
        share_context: run the choices of a question in one packed row where the model allows.
        chat_tokenizer: a ``transformers`` tokenizer with a chat template, for tasks run with
            ``apply_chat_template`` (prompts are then encoded by it, special tokens parsed).
    """

    def __init__(
        self,
        pretrained: str | None = None,
        *,
        model: Any = None,
        tokenizer: Any = None,
        context: int | None = None,
        stride: int | None = None,
        batch_size: int | str | None = None,
        device: str = "auto",
        dtype: str = "auto",
        bos: BosMode = "auto",
        trust_remote_code: bool = False,
        share_context: bool = True,
        chat_tokenizer: Any = None,
        max_gen_toks: int = 256,
        progress: bool = True,
        name: str | None = None,
        **_lm_eval_extras: Any,  # max_batch_size etc., which lm-eval passes to every model class
    ) -> None:
        super().__init__()
        if pretrained is not None:
            from nexttoken.models.load import load_model

            model, tokenizer = load_model(
                str(pretrained), dtype=dtype, device=device or "auto", trust_remote_code=trust_remote_code
            )
        if model is None or tokenizer is None:
            raise UserError("NextTokenLM needs pretrained=PATH, or a model and its tokenizer")
        self.model: CausalLM = as_causal_lm(model)
        self.tokenizer: Tokenizer = as_tokenizer(tokenizer)
        self.name = name or (str(pretrained) if pretrained is not None else type(self.model).__name__)
        context = int(context) if context is not None else None
        stride = int(stride) if stride is not None else None
        if stride is None:
            context, _ = resolve_windows(self.model, context, None)
            stride = context
        self.context, self.stride = resolve_windows(self.model, context, stride)
        self.batch_size = _batch_size(batch_size)
        self.bos = bos
        self.start = start_token(self.tokenizer, bos)
        self.chat_tokenizer = chat_tokenizer
        self.max_gen_toks = int(max_gen_toks)
        self.progress = progress
        self._device = self.model.lm_head.weight.device
        self.share_context = bool(share_context) and self._packing_is_exact()
        self.truncated = 0  # loglikelihood requests whose context was cut from the left

    # ------------------------------------------------------------------ what lm-eval asks
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        """What an empty context is: the document start, else the EOS that ends the document before."""
        return self.start if self.start is not None else self.tokenizer.eos_id

    @property
    def max_length(self) -> int:
        return self.context

    @property
    def tokenizer_name(self) -> str:
        return self.name.replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return getattr(self.chat_tokenizer, "chat_template", None) if chat_template else None

    def apply_chat_template(
        self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> str:
        if self.chat_tokenizer is None or not getattr(self.chat_tokenizer, "chat_template", None):
            raise UserError(f"{self.name} has no chat template; run the task without --apply-chat-template")
        return self.chat_tokenizer.apply_chat_template(
            chat_history,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=not add_generation_prompt,
        )

    def settings(self) -> dict[str, Any]:
        """nexttoken's settings for this run (recorded in the results)."""
        param = self.model.lm_head.weight
        return {
            "model": self.name,
            "context": self.context,
            "stride": self.stride,
            "bos": self.bos,
            "start_token": None if self.start is None else self.tokenizer.decode([self.start]),
            "dtype": str(param.dtype).removeprefix("torch."),
            "device": str(param.device),
            "batch_size": self.batch_size or "auto",
            "share_context": self.share_context,
            "chat_template": self.chat_tokenizer is not None,
        }

    def get_model_info(self) -> dict[str, Any]:
        param = self.model.lm_head.weight
        n_params = sum(p.numel() for p in {id(p): p for p in self.model.parameters()}.values())
        return {
            "model_num_parameters": n_params,
            "model_dtype": str(param.dtype),
            "nexttoken": self.settings(),
        }

    # ------------------------------------------------------------------ tokens
    def _encode(self, text: str) -> list[int]:
        if self.chat_tokenizer is not None:  # a chat prompt holds its special tokens as text
            return self.chat_tokenizer.encode(text, add_special_tokens=False)
        return self.tokenizer.encode(text)

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        """The text's tokens, after the document start unless ``add_special_tokens`` is False."""
        ids = self._encode(string)
        if add_special_tokens is False or self.start is None or ids[:1] == [self.start]:
            return ids
        return [self.start, *ids]

    def tok_decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _batches(self, lengths: Sequence[int]) -> Iterator[range]:
        """Consecutive index ranges of items sorted longest first: ``batch_size`` items, or about a
        default budget of tokens (:func:`default_batch_size`) when none is set."""
        first = 0
        while first < len(lengths):
            size = self.batch_size or default_batch_size(max(1, lengths[first]), self._device)
            yield range(first, min(first + size, len(lengths)))
            first += size

    def _bar(self, total: int, desc: str, disable: bool):
        return tqdm(
            total=total, desc=desc, file=sys.stderr, disable=disable or not self.progress, mininterval=0.5
        )

    # ------------------------------------------------------------------ loglikelihood
    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        return super().loglikelihood(requests, disable_tqdm=disable_tqdm or not self.progress)

    def _loglikelihood_tokens(
        self, requests, disable_tqdm: bool = False, **kwargs
    ) -> list[tuple[float, bool]]:
        """``(log P(continuation | context), greedy)`` for ``((context, continuation), context ids,
        continuation ids)`` requests (lm-eval's ``TemplateLM`` tokenizes)."""
        planned = []
        answers: list[tuple[float, bool] | None] = [None] * len(requests)
        for i, (_, context, continuation) in enumerate(requests):
            if not continuation:
                answers[i] = (0.0, True)
                continue
            if len(continuation) > self.context:
                raise UserError(
                    f"a continuation of {len(continuation)} tokens does not fit a context of {self.context} "
                    "tokens; pass a larger --context"
                )
            whole = (list(context) + list(continuation))[-(self.context + 1) :]
            self.truncated += len(context) + len(continuation) > len(whole)
            planned.append(Request(i, tuple(whole[:-1]), len(whole) - len(continuation), tuple(continuation)))
        if planned:
            nll, misses = self._score_requests(planned, len(requests), disable_tqdm)
            for r in planned:
                answers[r.index] = (-float(nll[r.index]), int(misses[r.index]) == 0)
        for (key, _, _), answer in zip(requests, answers):
            self.cache_hook.add_partial("loglikelihood", key, answer)
        return answers

    def _packing_is_exact(self) -> bool:
        """Whether this model honours a packed row's 4-D mask and position ids: a context with two
        branches, packed, must give the log-probabilities of the two separate sequences."""
        if not isinstance(self.model, HFCausalLM) or not self.model.logits_are_linear:
            return False
        vocab = self.model.lm_head.weight.shape[0]
        ids = [(7919 * k + 11) % vocab for k in range(1, 10)]
        context, continuations = ids[:5], [ids[5:8], ids[2:4]]
        requests = [Request(k, tuple(context + c[:-1]), 5, tuple(c)) for k, c in enumerate(continuations)]
        try:
            separate = self._score_rows(plan_rows(requests, False, 64), 2, packed=False)[0]
            packed = self._score_rows(plan_rows(requests, True, 64), 2, packed=True)[0]
        except Exception:  # noqa: BLE001 - any failure means: not this model
            return False
        tolerance = 1e-4 if self.model.lm_head.weight.dtype == torch.float32 else 5e-2
        return bool(torch.allclose(separate, packed, rtol=0, atol=tolerance * len(ids)))

    def _score_requests(self, requests: list[Request], n: int, disable_tqdm: bool) -> tuple[Tensor, Tensor]:
        rows = plan_rows(requests, self.share_context, self.context)
        with self._bar(len(requests), "loglikelihood", disable_tqdm) as bar:
            return self._score_rows(rows, n, packed=self.share_context, bar=bar)

    def _score_rows(self, rows: list[Row], n: int, *, packed: bool, bar=None) -> tuple[Tensor, Tensor]:
        """Per request: summed nats of its targets, and how many targets were not the argmax."""
        rows = sorted(rows, key=lambda r: -len(r.ids))
        nll = torch.zeros(n, dtype=torch.float64)
        misses = torch.zeros(n, dtype=torch.long)
        counted = torch.zeros(n, dtype=torch.long)
        with evaluating(self.model), torch.inference_mode():
            for batch in self._batches([len(r.ids) for r in rows]):
                chunk = [rows[i] for i in batch]
                token_nll, token_miss, owners = self._forward(chunk, packed)
                nll.index_add_(0, owners, token_nll.double().cpu())
                misses.index_add_(0, owners, token_miss.long().cpu())
                counted.index_add_(0, owners, torch.ones_like(owners))
                if bar is not None:
                    bar.update(len({i for row in chunk for i, _, _ in row.reads}))
        expected = torch.zeros(n, dtype=torch.long)
        for row in rows:
            for i, _, targets in row.reads:
                expected[i] = len(targets)
        if not torch.equal(counted, expected):
            raise RuntimeError(
                "scored a different number of tokens than the requests hold: the row plan lost some"
            )
        return nll, misses

    def _forward(self, rows: list[Row], packed: bool) -> tuple[Tensor, Tensor, Tensor]:
        """One forward pass over ``rows``: per read token, its nats, whether it was not the argmax,
        and the request it belongs to. Only the read positions are projected onto the vocabulary."""
        device, width = self._device, max(len(r.ids) for r in rows)
        inputs = torch.full((len(rows), width), self.tokenizer.eos_id, dtype=torch.long)
        segments = torch.full((len(rows), width), -1, dtype=torch.long)
        positions = torch.zeros((len(rows), width), dtype=torch.long)
        row_of, col_of, targets, owners = [], [], [], []
        for b, row in enumerate(rows):
            inputs[b, : len(row.ids)] = torch.tensor(row.ids)
            segments[b, : len(row.ids)] = torch.tensor(row.segments)
            positions[b, : len(row.ids)] = torch.tensor(row.positions)
            for request, where, wanted in row.reads:
                row_of += [b] * len(where)
                col_of += where
                targets += wanted
                owners += [request] * len(where)
        rows_t, cols_t = torch.tensor(row_of, device=device), torch.tensor(col_of, device=device)
        targets_t = torch.tensor(targets, device=device)
        inputs = inputs.to(device)
        if packed:
            mask = packed_mask(segments.to(device), self.model.lm_head.weight.dtype)
            out = self.model.model.base_model(
                input_ids=inputs, attention_mask=mask, position_ids=positions.to(device), use_cache=False
            )
            logits_at = self._project(out[0][rows_t, cols_t])
        else:
            lengths = (segments >= 0).sum(dim=1)
            mask = None
            if bool((lengths < width).any()):
                mask = (torch.arange(width)[None, :] < lengths[:, None]).long().to(device)
            if self.model.logits_are_linear:
                logits_at = self._project(self.model.hidden(inputs, mask)[rows_t, cols_t])
            else:  # softcapped or scaled logits: the model's own head, on the band of read positions
                first = int(cols_t.min())
                band = self.model(inputs, mask, logits_to_keep=width - first)
                logits_at = [band[rows_t, cols_t - first]]
        token_nll, token_miss, start = [], [], 0
        for logits in logits_at:
            wanted = targets_t[start : start + logits.size(0)]
            token_nll.append(next_token_loss(logits, wanted, reduction="none"))
            token_miss.append(logits.argmax(dim=-1) != wanted)
            start += logits.size(0)
        return torch.cat(token_nll), torch.cat(token_miss), torch.tensor(owners)

    def _project(self, hidden: Tensor) -> Iterator[Tensor]:
        """``lm_head`` over gathered hidden states (N, C), in chunks of bounded size."""
        step = max(1, HEAD_CHUNK_LOGITS // self.model.lm_head.weight.shape[0])
        for first in range(0, hidden.size(0), step):
            yield self.model.lm_head(hidden[first : first + step])

    # ------------------------------------------------------------------ rolling (perplexity)
    def _document(self, text: str) -> Tensor:
        ids = self.tokenizer.encode(text)
        return torch.tensor(([] if self.start is None else [self.start]) + ids, dtype=torch.long)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Each document's log-likelihood through ``nexttoken eval``'s sliding windows: every token
        scored once, after the document start (``-nll_sum`` of ``nexttoken eval`` on that text)."""
        texts = [req.args[0] for req in requests]
        docs = [self._document(t) for t in texts]
        windows = [
            w for d, ids in enumerate(docs) for w in make_windows(len(ids), self.context, self.stride, d)
        ]
        windows.sort(key=lambda w: -w.length)
        nll = torch.zeros(len(docs), dtype=torch.float64)
        batch_size = self.batch_size or default_batch_size(self.context, self._device)
        total = sum(w.n_scored for w in windows)
        with (
            evaluating(self.model),
            torch.inference_mode(),
            self._bar(total, "loglikelihood_rolling (tokens)", disable_tqdm) as bar,
        ):
            for scored in score_windows(self.model, docs, windows, batch_size):
                per_window = scored.nll.double().sum(dim=1).cpu()
                for w, value in zip(scored.windows, per_window):
                    nll[w.doc] += value
                bar.update(sum(w.n_scored for w in scored.windows))
        results = [-float(v) for v in nll]
        for text, value in zip(texts, results):
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), value)
        return results

    # ------------------------------------------------------------------ generation
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled, with ``do_sample``) continuations, cut at the first ``until`` string,
        the EOS, or ``max_gen_toks`` new tokens; the prompt starts as a document does."""
        eos = self.tokenizer.eos_id
        eos_text = self.tokenizer.decode([eos])
        results = []
        with self._bar(len(requests), "generate_until", disable_tqdm) as bar:
            for req in requests:
                context, gen_kwargs = req.args
                kwargs = normalize_gen_kwargs(dict(gen_kwargs), self.max_gen_toks)
                until = handle_stop_sequences(kwargs.pop("until", None), eos=eos_text)
                max_new = int(kwargs.pop("max_gen_toks"))
                temperature = float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample") else 0.0
                room = self.context - max_new
                if room < 1:
                    raise UserError(
                        f"max_gen_toks {max_new} leaves no room for a prompt in a context of {self.context} tokens"
                    )
                prompt = (self.tok_encode(context) or [self.prefix_token_id])[-room:]
                new = self._generate(prompt, max_new, until, temperature)
                text = postprocess_generated_text(self.tok_decode(new), until, None)
                results.append(text)
                self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
                bar.update(1)
        return results

    def _generate(self, prompt: list[int], max_new: int, until: list[str], temperature: float) -> list[int]:
        """Up to ``max_new`` tokens after ``prompt``, in chunks: generation stops after the chunk in
        which a stop string or the EOS appears."""
        eos = self.tokenizer.eos_id
        new: list[int] = []
        generator = torch.Generator(device=self._device).manual_seed(1234) if temperature > 0 else None
        with evaluating(self.model), torch.inference_mode():
            while len(new) < max_new:
                step = min(GENERATION_CHUNK, max_new - len(new))
                ids = torch.tensor([prompt + new], dtype=torch.long, device=self._device)
                out = self.model.generate(ids, step, temperature=temperature, eos_id=eos, generator=generator)
                chunk = out[0, ids.shape[1] :].tolist()
                if not chunk:  # the model's context is full
                    break
                if eos in chunk:
                    return new + chunk[: chunk.index(eos)]
                new += chunk
                text = self.tok_decode(new)
                if any(stop and stop in text for stop in until):
                    break
        return new


def _batch_size(value: int | str | None) -> int | None:
    """lm-eval passes ``batch_size`` as an int, a string of one, ``"auto"`` or None."""
    if value is None or str(value).startswith("auto"):
        return None
    try:
        size = int(value)
    except ValueError:
        raise UserError(f"--batch-size must be a positive number, got {value!r}") from None
    if size < 1:
        raise UserError(f"--batch-size must be a positive number, got {value!r}")
    return size

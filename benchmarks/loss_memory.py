"""Fused linear+cross-entropy vs plain logits+cross-entropy: peak memory and time, side by side.

    python benchmarks/loss_memory.py                    # the default comparison (~2-4 min on 2 cores)
    python benchmarks/loss_memory.py --sweep            # also try LinearCrossEntropyOptions knobs
    python benchmarks/loss_memory.py --tokens 2048      # a quicker, smaller run

Shape: hidden 768, vocab 50,257, 8,192 tokens (GPT-2 small's head, a batch of 8 x 1024), forward +
backward in fp32 on the CPU. Both implementations of ``nexttoken.loss.fused_next_token_loss`` are
measured: "fused" (``implementation="torch"``: torch's chunked ``F.linear_cross_entropy`` with the
options nexttoken passes, torch >= 2.13) and "chunked" (``implementation="chunked"``: nexttoken's own
chunked autograd function, what runs where torch has no such op); "plain" is
``next_token_loss(hidden @ W.T, targets)``, which materializes the (8192, 50257) logits (1.6 GB fp32).

Each variant runs in its own subprocess, so one variant's allocator state cannot hide or inflate the
other's peak. Peak memory = ``ru_maxrss`` after forward+backward minus ``ru_maxrss`` once the inputs
exist (both include the gradients of hidden and W, which any training step needs). Time = median of
every step over alternating subprocesses (plain, fused, plain, fused, ...), because this machine's
cores are shared and a slow moment should hit both variants alike; CPU time is printed beside it.

The last lines are, for each fused implementation, the time ratio and the memory ratio (the headline).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

HIDDEN, VOCAB, TOKENS = 768, 50_257, 8_192
MEMORY_GOAL, TIME_GOAL = 0.20, 1.0


# --------------------------------------------------------------------------- worker (subprocess)
def _options(spec: str):
    """``fused`` -> nexttoken's own call; ``fused:key=value,...`` -> torch's op with these options."""
    import torch

    kwargs = {}
    for item in filter(None, spec.partition(":")[2].split(",")):
        key, _, value = item.partition("=")
        if key == "batch_chunk_size":
            kwargs[key] = int(value)
            kwargs.setdefault("chunking_method", None)
        elif key == "chunking_method":
            kwargs[key] = None if value == "none" else value
        else:
            kwargs[key] = value
    return torch.nn.LinearCrossEntropyOptions(**kwargs)


def worker(variant: str, tokens: int, hidden_size: int, vocab: int, reps: int, dtype_name: str) -> dict:
    import resource
    import time

    import torch
    import torch.nn.functional as F

    from nexttoken.loss import fused_next_token_loss, next_token_loss

    def maxrss_mb() -> float:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB

    dtype = getattr(torch, dtype_name)
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(tokens, hidden_size, generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(vocab, hidden_size, generator=g) * 0.02).to(dtype).requires_grad_()
    targets = torch.randint(0, vocab, (tokens,), generator=g)
    targets[::97] = -100  # a few ignored positions, as in real batches

    if variant == "plain":

        def step():
            return next_token_loss(hidden @ weight.T, targets, reduction="sum")
    elif variant in ("fused", "chunked"):
        implementation = "torch" if variant == "fused" else "chunked"

        def step():
            return fused_next_token_loss(
                hidden, weight, targets, reduction="sum", implementation=implementation
            )
    elif variant == "fused-native":
        # torch's op on the inputs as they are (bf16 stays bf16, fp32 accumulation): what the fused
        # path would cost without nexttoken's upcast to fp32.
        options = torch.nn.LinearCrossEntropyOptions(batch_chunk_size=min(tokens, 1024), chunking_method=None)

        def step():
            return F.linear_cross_entropy(hidden, weight, targets, reduction="sum", options=options)
    elif variant.startswith("fused:"):
        options = _options(variant)

        def step():
            return F.linear_cross_entropy(hidden, weight, targets, reduction="sum", options=options)
    else:
        raise SystemExit(f"unknown variant {variant!r}")

    baseline = maxrss_mb()
    start, start_cpu = time.perf_counter(), time.process_time()
    loss = step()
    loss.backward()
    first, first_cpu = time.perf_counter() - start, time.process_time() - start_cpu
    peak = maxrss_mb() - baseline
    value = float(loss)
    grads = (hidden.grad.float().norm().item(), weight.grad.float().norm().item())
    # The first step counts too: a fresh 1.6 GB logits buffer page-faults on every step anyway
    # (freed large blocks go back to the OS), so it costs what the later ones do.
    times, cpu = [first], [first_cpu]
    for _ in range(reps):
        hidden.grad = weight.grad = None
        start, start_cpu = time.perf_counter(), time.process_time()
        step().backward()
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return {
        "variant": variant,
        "peak_mb": peak,
        "baseline_mb": baseline,
        "first_s": first,
        "times": times,
        "cpu": cpu,
        "loss": value,
        "grad_norms": grads,
        "threads": torch.get_num_threads(),
    }


# --------------------------------------------------------------------------- driver
def run_variant(variant: str, args: argparse.Namespace, reps: int) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        variant,
        "--tokens",
        str(args.tokens),
        "--hidden",
        str(args.hidden),
        "--vocab",
        str(args.vocab),
        "--reps",
        str(reps),
        "--dtype",
        args.dtype,
    ]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=os.environ.copy())
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", type=int, default=TOKENS)
    parser.add_argument("--hidden", type=int, default=HIDDEN)
    parser.add_argument("--vocab", type=int, default=VOCAB)
    parser.add_argument("--rounds", type=int, default=2, help="alternating subprocess pairs (default 2)")
    parser.add_argument(
        "--reps", type=int, default=1, help="steps after the first per subprocess (default 1)"
    )
    parser.add_argument(
        "--dtype", default="float32", help="input dtype (float32; bfloat16 to see the upcast)"
    )
    parser.add_argument("--sweep", action="store_true", help="also try LinearCrossEntropyOptions knobs")
    parser.add_argument(
        "--variants",
        default=None,
        help="comma list: plain, fused (torch's op), chunked (nexttoken's), or fused:key=value;key=value "
        "(torch options); default plain,fused,chunked (plain,chunked where torch has no fused op)",
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        print(
            json.dumps(
                worker(
                    args.worker.replace(";", ","), args.tokens, args.hidden, args.vocab, args.reps, args.dtype
                )
            )
        )
        return

    print(
        f"hidden {args.hidden}, vocab {args.vocab:,}, {args.tokens:,} tokens, {args.dtype}, "
        f"forward+backward on the CPU; {args.rounds} alternating rounds x {args.reps} timed reps"
    )
    if args.variants is None:
        from nexttoken.loss import torch_has_fused_loss

        args.variants = "plain,fused,chunked" if torch_has_fused_loss() else "plain,chunked"
    variants = args.variants.split(",")
    results: dict[str, list[dict]] = {v: [] for v in variants}
    for _ in range(args.rounds):
        for v in variants:
            results[v].append(run_variant(v, args, args.reps))

    def summary(v: str) -> tuple[float, float, float]:
        peak = statistics.median(r["peak_mb"] for r in results[v])
        time_s = statistics.median(t for r in results[v] for t in r["times"])
        cpu_s = statistics.median(t for r in results[v] for t in r["cpu"])
        return peak, time_s, cpu_s

    for v in variants:
        peak, t, c = summary(v)
        r = results[v][0]
        print(
            f"  {v:<44} peak +{peak:7.0f} MB  {t:6.2f} s/step wall  {c:6.2f} s CPU   loss {r['loss']:.6g}"
            f"   |dh| {r['grad_norms'][0]:.5g} |dW| {r['grad_norms'][1]:.5g}"
        )

    if args.sweep:
        # torch's chunked op with explicit knobs: chunk rows and accumulation policy (one round each).
        sweep = [
            "fused:chunking_method=auto",
            "fused:chunking_method=aspect_ratio",
            "fused:batch_chunk_size=256",
            "fused:batch_chunk_size=512",
            "fused:batch_chunk_size=2048",
            "fused:batch_chunk_size=1024;acc_policy=compact",
            "fused:batch_chunk_size=1024;acc_policy=balanced",
            "fused:batch_chunk_size=1024;acc_policy=accurate",
        ]
        print("sweep (one subprocess each, median of its timed reps):")
        for v in sweep:
            r = run_variant(v, args, args.reps)
            print(
                f"  {v:<44} peak +{r['peak_mb']:7.0f} MB  {statistics.median(r['times']):6.2f} s/step wall  "
                f"{statistics.median(r['cpu']):6.2f} s CPU"
            )

    if "plain" not in results:
        return
    plain_peak, plain_t, plain_c = summary("plain")
    for v, name in (("fused", "torch"), ("chunked", "chunked")):
        if v not in results:
            continue
        peak, t, c = summary(v)
        t_ratio, m_ratio = t / plain_t, peak / plain_peak
        print(f"CPU time {name}/plain: ratio={c / plain_c:.3f} (less sensitive to other load on the machine)")
        print(
            f"time {name}/plain: ratio={t_ratio:.3f} goal<={TIME_GOAL:.2f} "
            f"{'PASS' if t_ratio <= TIME_GOAL else 'MISS'}"
        )
        print(
            f"peak_memory {name}/plain: ratio={m_ratio:.3f} goal<={MEMORY_GOAL:.2f} "
            f"{'PASS' if m_ratio <= MEMORY_GOAL else 'MISS'}"
        )


if __name__ == "__main__":
    main()

"""bf16-mixed vs fp32 training-step speed on this machine, side by side.

    python benchmarks/precision_speed.py [--preset mini] [--steps 20]

Same model, batch and optimizer; bf16 runs under torch.autocast exactly as Lightning's
``bf16-mixed`` does (fp32 master weights, fp32 loss). Prints tokens/s of each and the ratio.
On a CPU without AVX512-BF16/AMX, bf16 is emulated and the ratio is below 1: that is why
``auto_precision`` says ``32-true`` there.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from _common import plain_step, random_batches

from nexttoken.models.gpt import GPT, GPTConfig
from nexttoken.precision import auto_precision
from nexttoken.training.optim import build_optimizer


def step_times(dtype: torch.dtype | None, config: GPTConfig, batch: int, steps: int) -> list[float]:
    torch.manual_seed(0)
    model = GPT(config)
    optimizer, _ = build_optimizer(model, lr=1e-4)
    ((x, y),) = random_batches(1, batch, config.block_size, config.vocab_size)
    times = []
    for i in range(steps + 3):
        start = time.perf_counter()
        plain_step(model, optimizer, x, y, clip=None, autocast=dtype)
        if i >= 3:  # warm-up steps are not timed
            times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="mini")
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--block", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=15)
    args = parser.parse_args()
    config = GPTConfig.from_preset(args.preset, args.vocab, block_size=args.block)
    tokens = args.batch * args.block
    fp32 = statistics.median(step_times(None, config, args.batch, args.steps))
    bf16 = statistics.median(step_times(torch.bfloat16, config, args.batch, args.steps))
    choice, reason = auto_precision("cpu")
    print(
        f"model {args.preset} ({sum(p.numel() for p in GPT(config).parameters()) / 1e6:.1f}M), "
        f"{tokens} tokens/step, {torch.get_num_threads()} threads"
    )
    print(f"32-true   : {tokens / fp32:10.0f} tokens/s")
    print(f"bf16-mixed: {tokens / bf16:10.0f} tokens/s")
    print(f"auto_precision: {choice} ({reason})")
    print(f"precision_speed bf16/fp32: ratio={fp32 / bf16:.3f}")


if __name__ == "__main__":
    main()

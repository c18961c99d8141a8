"""Muon's optimizer step: ``torch.optim.Muon`` (one matrix at a time) vs nexttoken's ``BatchedMuon``
(the matrices of one shape orthogonalized in one batched product), side by side.

    python benchmarks/muon_batched.py                 # the 10-minute recipe's GPT (6 x 192)
    python benchmarks/muon_batched.py --width 384     # a wider one

The hidden matrices of a built-in GPT (``mini`` shape by default: 24 matrices in 4 shapes) with random
gradients; both optimizers get the same parameters, settings and gradients, their results are checked
equal first, then their ``step()`` is timed in alternating rounds (median of each). Last line:
``muon_batched torch/batched step time: ratio=... goal>1.0 PASS|MISS``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from nexttoken.models.gpt import GPT, GPTConfig
from nexttoken.training.muon import BatchedMuon

GOAL = 1.0  # the hand-written path must at least be faster than torch's, or it has no reason to exist


def hidden_matrices(width: int, layers: int) -> list[torch.Tensor]:
    model = GPT(GPTConfig(vocab_size=1024, block_size=128, n_layer=layers, n_head=6, n_embd=width))
    return [
        p.detach().clone() for name, p in model.named_parameters() if p.ndim == 2 and ".blocks." in f".{name}"
    ]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--width", type=int, default=192)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps per round")
    args = parser.parse_args()

    torch.manual_seed(0)
    start = hidden_matrices(args.width, args.layers)
    shapes = sorted({tuple(p.shape) for p in start})
    print(f"{len(start)} hidden matrices, shapes {shapes}, {torch.get_num_threads()} threads")
    sides = {}
    for name, kind in (("torch", torch.optim.Muon), ("batched", BatchedMuon)):
        params = [p.clone().requires_grad_() for p in start]
        for p, seed in zip(params, range(len(params))):
            p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(seed))
        sides[name] = (params, kind(params, lr=0.008, weight_decay=1.0, adjust_lr_fn="match_rms_adamw"))
    for _, optimizer in sides.values():
        optimizer.step()
    worst = max((a - b).abs().max().item() for a, b in zip(sides["torch"][0], sides["batched"][0]))
    print(f"largest difference after one step: {worst:.3g}")
    times: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(args.rounds):
        for name, (_, optimizer) in sides.items():
            started = time.perf_counter()
            for _ in range(args.steps):
                optimizer.step()
            times[name].append((time.perf_counter() - started) / args.steps * 1000)
    medians = {name: statistics.median(values) for name, values in times.items()}
    for name, value in medians.items():
        print(f"  {name:>8}: {value:7.1f} ms a step")
    ratio = medians["torch"] / medians["batched"]
    print(
        f"muon_batched torch/batched step time: ratio={ratio:.3f} goal>{GOAL} {'PASS' if ratio > GOAL else 'MISS'}"
    )


if __name__ == "__main__":
    main()

"""What document masking costs: a training step of the built-in GPT with packed documents kept apart
(``document_ids``: SDPA with a block-diagonal causal mask and positions that restart) against the
same step with plain causal attention (``is_causal=True``), timed interleaved in one run.

    python benchmarks/document_mask_speed.py [--preset mini] [--batch 8] [--block 256] [--threads 1]

Last line: ``document_mask_step packed/plain: ratio=<x> goal<=1.15 PASS|MISS`` (time per step).
(Flex attention is not an option for training on a CPU: torch 2.13 has no CPU backward for it.)
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from _common import plain_step, random_batches

from nexttoken.models import GPT, GPTConfig

GOAL = 1.15


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="mini")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--block", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset(args.preset, args.vocab, block_size=args.block)).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ((x, y),) = random_batches(1, args.batch, args.block, args.vocab)
    # Four documents of different lengths per row, as packing chat examples gives.
    cuts = torch.tensor([0.27, 0.47, 0.82]) * args.block
    document_ids = torch.bucketize(torch.arange(args.block), cuts.long(), right=True).repeat(args.batch, 1)

    def step(packed: bool) -> float:
        began = time.perf_counter()
        ids = document_ids if packed else None
        plain_step(_Packed(model, ids), optimizer, x, y, clip=None)
        return time.perf_counter() - began

    step(False), step(True)  # warm-up
    times: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(args.rounds):
        for packed in (False, True, True, False):
            times[packed].append(step(packed))
    plain, packed = statistics.median(times[False]), statistics.median(times[True])
    print(f"{args.preset}, {args.batch} x {args.block} tokens, fp32, {torch.get_num_threads()} thread(s)")
    print(f"plain causal step    {plain * 1e3:8.1f} ms (median of {args.rounds * 2})")
    print(f"document-masked step {packed * 1e3:8.1f} ms")
    ratio = packed / plain
    print(
        f"document_mask_step packed/plain: ratio={ratio:.3f} goal<={GOAL} {'PASS' if ratio <= GOAL else 'MISS'}"
    )


class _Packed(torch.nn.Module):
    """The model with ``document_ids`` bound, so the plain training step runs it unchanged."""

    def __init__(self, model: GPT, document_ids: torch.Tensor | None) -> None:
        super().__init__()
        self.model, self.document_ids = model, document_ids

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids, document_ids=self.document_ids)


if __name__ == "__main__":
    main()

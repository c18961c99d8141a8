"""How many CPU threads a training step should use: measured, because on a shared machine fewer
threads than cores can be several times faster."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import torch


def fastest_num_threads(
    step: Callable[[], Any], candidates: Sequence[int] | None = None, repeats: int = 3
) -> tuple[int, dict[int, float]]:
    """Time ``step()`` under each torch thread count (interleaved; median of ``repeats``), leave torch
    set to the fastest, and return ``(threads, {threads: seconds})``.

    On a CPU shared with other programs, fewer threads than cores can be several times faster:
    every parallel op waits for its slowest thread, and a thread whose core is busy waits for a
    whole scheduler time slice (measured on a loaded 2-core VM: 1 thread 10x faster than 2 for a
    small GPT's training step; on the idle VM 2 threads win). ``step`` should run a few ms at least
    and be warmed up.
    """
    original = torch.get_num_threads()
    if candidates is None:
        candidates = sorted({1, max(1, original // 2), original})
    times: dict[int, list[float]] = {n: [] for n in candidates}
    try:
        for _ in range(repeats):
            for n in candidates:
                torch.set_num_threads(n)
                start = time.perf_counter()
                step()
                times[n].append(time.perf_counter() - start)
    except BaseException:
        torch.set_num_threads(original)
        raise
    medians = {n: sorted(t)[len(t) // 2] for n, t in times.items()}
    best = min(medians, key=medians.get)
    torch.set_num_threads(best)
    return best, medians

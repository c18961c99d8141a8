"""The peak FLOP/s that MFU is measured against: the hardware's dense peak, in the math the matmuls
run in (bf16 under ``bf16-mixed``, fp32 or TF32 under ``32-true``, ...).

* **A known NVIDIA GPU**: the vendor's datasheet number (:data:`DATASHEET`): dense tensor-core
  FLOP/s for bf16, fp16 and TF32 (the sparsity figures halved), plain fp32 for fp32. Matched by
  ``torch.cuda.get_device_name()``.
* **A CPU, or a GPU not in the table**: measured (:func:`probe_matmul_peak`). A datasheet number for
  a CPU (cores x clock x FMA width) is rarely reached by anything, and a shared machine's is not
  there to be had. The probe times matmuls in the dtype itself, in the shapes where this CPU is
  fastest (a small GPT's MLP projections and a 1024 square; the 2048 and 4096 squares with every
  core), under every thread count from 1 to the core count, and keeps the best of 3 rounds: the peak
  is what the hardware can do, and a busy moment of a shared machine is not part of it. On 2 cores
  that is 630 GFLOP of matmuls: 2.0-2.2 s for bf16 on the 2-core AVX-512 machine of
  ``benchmarks/README.md`` at load ~2 (3.5-6.1 s at load 3-4.6; fp32 11-13 s there, an estimated
  3.7 s at its quiet fp32 rate). Well under a second on a GPU. The reading is kept in the nexttoken cache
  folder (``$NEXTTOKEN_CACHE`` or ``~/.cache/nexttoken``), keyed by device model, core count, dtype
  and torch version, so later runs read it at no cost; a higher reading replaces it.

The probe must reach what a training step reaches, or MFU comes out above 1
(``tests/test_peak.py`` holds it to that on the machine the tests run on). Where a run's achieved
FLOP/s still exceed the measured peak, :func:`raise_peak` records the higher number and says so
(``nexttoken.training.throughput``). A datasheet number is never raised.
"""

from __future__ import annotations

import json
import os
import platform
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from nexttoken.io import write_atomically

PEAK_CACHE_FILE = "matmul_peak.json"

_T = 1e12


def _dense(tensor: float, tf32: float, fp32: float) -> dict[str, float]:
    """A datasheet row from TFLOP/s: bf16 = fp16 = ``tensor``, TF32, fp32."""
    return {"bf16": tensor * _T, "fp16": tensor * _T, "tf32": tf32 * _T, "fp32": fp32 * _T}


# Dense (no sparsity) peaks from NVIDIA's datasheets and architecture whitepapers, FLOP/s: bf16, fp16
# and tf32 on tensor cores (fp32 accumulation), fp32 on the CUDA cores. Matched against the lower-case
# torch.cuda.get_device_name(), first match wins; a GPU not listed (or a math it has no row for, such
# as bf16 on a V100) is measured instead. The A10G (an AWS part with no public datasheet) is left out.
DATASHEET: list[tuple[str, str, dict[str, float]]] = [
    (r"\bgh200\b", "GH200", _dense(989, 494.5, 67)),
    (r"\bh200\b.*\bnvl\b", "H200 NVL", _dense(835.5, 417.5, 60)),
    (r"\bh200\b", "H200 SXM", _dense(989, 494.5, 67)),
    (r"\bh100\b.*\bpcie\b", "H100 PCIe", _dense(756, 378, 51)),
    (r"\bh100\b.*\bnvl\b", "H100 NVL", _dense(835.5, 417.5, 60)),
    (r"\bh100\b", "H100 SXM", _dense(989, 494.5, 67)),  # "NVIDIA H100 80GB HBM3" is the SXM5 part
    (r"\ba100\b", "A100", _dense(312, 156, 19.5)),
    (r"\ba10\b", "A10", _dense(125, 62.5, 31.2)),
    (r"\bl40s\b", "L40S", _dense(362.05, 183, 91.6)),
    (r"\bl4\b", "L4", _dense(121, 60, 30.3)),
    # Volta has fp16 tensor cores only (bf16 there is emulated, and measured), and no TF32.
    (r"\bv100s\b", "V100S PCIe", {"fp16": 130 * _T, "fp32": 16.4 * _T}),
    (r"\bv100\b.*\bpcie\b", "V100 PCIe", {"fp16": 112 * _T, "fp32": 14 * _T}),
    (r"\bv100\b.*\bsxm2\b", "V100 SXM2", {"fp16": 125 * _T, "fp32": 15.7 * _T}),
    # GeForce: tensor cores at half rate with fp32 accumulation (what torch uses).
    (r"\brtx 4090$", "GeForce RTX 4090", _dense(165.2, 82.6, 82.6)),
    (r"\brtx 3090$", "GeForce RTX 3090", _dense(71, 35.6, 35.6)),
]

_MATH = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.float64: "fp64"}

# (M, K, N) of the CPU probe's matmuls, under every thread count: a 1024 square and the MLP
# projections of a small GPT (width 384, 2048 and 4096 tokens per batch: forward, input gradient,
# weight gradient), where this CPU's bf16 kernels run fastest. Under the largest thread count also
# the 2048 and 4096 squares (the 4096 square is what the probe timed before), which all cores
# need to be busy and which cost least there.
CPU_SHAPES = (
    (1024, 1024, 1024),
    (2048, 384, 1536),
    (2048, 1536, 384),
    (1536, 2048, 384),
    (4096, 384, 1536),
    (4096, 1536, 384),
)
CPU_ALL_CORES_SHAPES = ((2048, 2048, 2048), (4096, 4096, 4096))
GPU_SHAPES = ((4096, 4096, 4096), (8192, 8192, 8192))


@dataclass(frozen=True)
class Peak:
    """A peak FLOP/s and where it came from.

    ``math``: what the matmuls run in (``bf16``, ``fp16``, ``tf32``, ``fp32``, ``fp64``);
    ``source``: where the number comes from, in words; ``measured``: a probe's reading (which a run
    that goes faster may raise), not a datasheet's or a given number.
    """

    flops: float
    math: str
    source: str
    measured: bool = False

    def describe(self) -> str:
        """``1.23 TFLOP/s (bf16, measured on this CPU: ...)``."""
        return f"{format_flops(self.flops)} ({self.math}, {self.source})"


def format_flops(flops: float) -> str:
    """``989 TFLOP/s``, ``494.5 TFLOP/s``, ``407.3 GFLOP/s``."""
    if flops >= 1e12:
        return f"{flops / 1e12:.4g} TFLOP/s"
    return f"{flops / 1e9:.4g} GFLOP/s"


def precision_dtype(precision: str | int | None) -> torch.dtype:
    """The matmul dtype of a Lightning precision setting (``bf16-mixed`` -> bfloat16, ...)."""
    text = str(precision)
    if "bf16" in text:
        return torch.bfloat16
    if text.startswith("16") or "fp16" in text:
        return torch.float16
    if text.startswith("64"):
        return torch.float64
    return torch.float32


def matmul_math(device: torch.device | str, dtype: torch.dtype) -> str:
    """What matmuls of ``dtype`` run in on ``device``: on a GPU fp32 matmuls use TF32 unless
    ``torch.set_float32_matmul_precision("highest")``."""
    math = _MATH.get(dtype, str(dtype).replace("torch.", ""))
    if (
        math == "fp32"
        and torch.device(device).type == "cuda"
        and torch.get_float32_matmul_precision() != "highest"
    ):
        return "tf32"
    return math


def datasheet_entry(device_name: str) -> tuple[str, dict[str, float]] | None:
    """``(model, {math: dense FLOP/s})`` of the :data:`DATASHEET` row for a GPU name, else None."""
    name = device_name.lower().strip()
    for pattern, model, peaks in DATASHEET:
        if re.search(pattern, name):
            return model, peaks
    return None


def datasheet_peak(device_name: str, math: str | torch.dtype = "bf16") -> float | None:
    """The vendor's dense peak FLOP/s for a known NVIDIA GPU name and math (``bf16``, ``fp16``,
    ``tf32``, ``fp32``, or a torch dtype), else None."""
    if isinstance(math, torch.dtype):
        math = _MATH.get(math, str(math))
    entry = datasheet_entry(device_name)
    return entry[1].get(math) if entry else None


def device_description(device: torch.device) -> str:
    """The device's model name (the GPU's name, or the CPU's from /proc/cpuinfo), for cache keys."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return name or platform.processor() or platform.machine()


def core_count() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def peak_cache_key(device: torch.device | str, dtype: torch.dtype) -> str:
    """What the measured peak depends on: device model, core count (CPU), dtype, torch version, and
    for fp32 the fp32 matmul precision (TF32 on a GPU)."""
    device = torch.device(device)
    parts = [
        device.type,
        device_description(device),
        str(dtype).replace("torch.", ""),
        f"torch {torch.__version__}",
    ]
    if device.type == "cpu":
        parts.append(f"{core_count()} cores")
    if dtype == torch.float32:
        parts.append(f"fp32 matmul {torch.get_float32_matmul_precision()}")
    return " | ".join(parts)


@dataclass(frozen=True)
class ProbeResult:
    """What :func:`probe_matmul_peak` found: the best FLOP/s, and under what it was reached."""

    flops: float
    dtype: str  # what the matmuls ran in ("bfloat16", ...)
    threads: int | None  # the thread count of the best reading (CPU)
    shape: tuple[int, int, int]  # (M, K, N) of the best reading
    thread_counts: tuple[int, ...]
    repeats: int
    seconds: float


def probe_matmul_peak(
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    *,
    shapes: tuple[tuple[int, int, int], ...] | None = None,
    thread_counts: tuple[int, ...] | None = None,
    repeats: int = 3,
) -> ProbeResult:
    """The best FLOP/s of ``dtype`` matmuls ``(M, K) @ (K, N)`` over ``shapes``, every thread count
    in ``thread_counts`` (CPU; default every count from 1 to the core count) and ``repeats`` rounds
    (after a warm-up of each).

    The rounds go over all thread counts and shapes in turn, so a busy moment of a shared machine
    spoils one reading of each, not all readings of one. The best, not the median: the peak is what
    the hardware can do. Leaves torch's thread count as it found it.
    """
    device = torch.device(device)
    cpu = device.type == "cpu"
    started = time.perf_counter()
    if thread_counts is None:
        thread_counts = tuple(range(1, core_count() + 1)) if cpu else (torch.get_num_threads(),)
    if shapes is None:
        shapes = CPU_SHAPES if cpu else GPU_SHAPES
        extra = {max(thread_counts): CPU_ALL_CORES_SHAPES} if cpu else {}
    else:
        extra = {}
    inner = 1 if cpu else 10  # GPU: several per timing, so launch cost is noise
    sync = (lambda: None) if cpu else (lambda: torch.cuda.synchronize(device))
    operands: dict[tuple[int, int, int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
    for m, k, n in {*shapes, *(s for more in extra.values() for s in more)}:
        a = torch.empty(m, k, device=device, dtype=dtype).uniform_(-1, 1)
        b = torch.empty(k, n, device=device, dtype=dtype).uniform_(-1, 1)
        operands[(m, k, n)] = (a, b, torch.empty(m, n, device=device, dtype=dtype))
    original = torch.get_num_threads()
    best = (0.0, None, shapes[0])
    try:
        for round_ in range(repeats):
            for threads in thread_counts:
                if cpu:
                    torch.set_num_threads(threads)
                for shape in (*shapes, *extra.get(threads, ())):
                    a, b, out = operands[shape]
                    # Warm-up: the kernel's set-up for this shape and count. Not for a CPU matmul of
                    # over 100 GFLOP, where the set-up is a small part of one call (and a call that
                    # reads low is absorbed by the best of the repeats).
                    if round_ == 0 and (not cpu or shape[0] * shape[1] * shape[2] < 5e10):
                        torch.mm(a, b, out=out)
                        sync()
                    start = time.perf_counter()
                    for _ in range(inner):
                        torch.mm(a, b, out=out)
                    sync()
                    seconds = (time.perf_counter() - start) / inner
                    flops = 2 * shape[0] * shape[1] * shape[2] / seconds
                    if flops > best[0]:
                        best = (flops, threads if cpu else None, shape)
    finally:
        torch.set_num_threads(original)
    return ProbeResult(
        flops=best[0],
        dtype=str(dtype).replace("torch.", ""),
        threads=best[1],
        shape=best[2],
        thread_counts=tuple(thread_counts) if cpu else (),
        repeats=repeats,
        seconds=time.perf_counter() - started,
    )


def measure_matmul_peak(
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    size: int | None = None,
    repeats: int = 3,
) -> float:
    """The probe's FLOP/s (:func:`probe_matmul_peak`), with ``size`` square matmuls only if given."""
    shapes = ((size, size, size),) if size else None
    return probe_matmul_peak(device, dtype, shapes=shapes, repeats=repeats).flops


def _cache_path(cache_dir: str | Path | None) -> Path:
    if cache_dir is None:
        from nexttoken.io import default_cache_dir

        cache_dir = default_cache_dir()
    return Path(cache_dir).expanduser() / PEAK_CACHE_FILE


def read_peak_cache(cache_dir: str | Path | None = None) -> dict[str, dict]:
    """The cached peaks by :func:`peak_cache_key` (``{}`` when the file is missing or unreadable);
    ``cache_dir`` defaults to nexttoken's cache folder."""
    path = _cache_path(cache_dir)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _store(entry: dict, key: str, cache_dir: str | Path | None) -> dict:
    """Record ``entry`` under ``key`` unless the cache holds a higher reading; the entry now cached."""
    entries = read_peak_cache(cache_dir)
    old = entries.get(key)
    if _cached_flops(old) is not None and _cached_flops(old) >= entry["flops"]:
        return old
    entries[key] = entry
    try:
        write_atomically(_cache_path(cache_dir), json.dumps(entries, indent=1) + "\n")
    except OSError:
        pass  # a read-only cache folder: measure again next time, never fail the run
    return entry


def store_probe(
    result: ProbeResult,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    *,
    cache_dir: str | Path | None = None,
) -> dict:
    """Record a probe's reading unless the cache already holds a higher one; the entry now cached."""
    entry = {
        "flops": result.flops,
        "measured": time.strftime("%Y-%m-%d %H:%M:%S"),
        "dtype": result.dtype,
        "thread_counts": list(result.thread_counts),
        "threads": result.threads,
        "shape": list(result.shape),
        "repeats": result.repeats,
        "seconds": round(result.seconds, 2),
    }
    return _store(entry, peak_cache_key(device, dtype), cache_dir)


def peak_flops(
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    *,
    cache_dir: str | Path | None = None,
    refresh: bool = False,
) -> Peak:
    """The peak behind MFU for matmuls of ``dtype`` on ``device``: the datasheet's dense number for a
    known GPU, else the measured peak, cached (measured on first use).

    ``refresh`` measures again and keeps the higher of the two readings: a measurement taken while
    other programs shared the cores reads low, never high.
    """
    device = torch.device(device)
    math = matmul_math(device, dtype)
    if device.type == "cuda":
        entry = datasheet_entry(torch.cuda.get_device_name(device))
        if entry is not None and math in entry[1]:
            return Peak(entry[1][math], math, f"NVIDIA {entry[0]} dense {math}, datasheet")
    key = peak_cache_key(device, dtype)
    cached = read_peak_cache(cache_dir).get(key)
    note = "cached"
    if refresh or _cached_flops(cached) is None:
        result = probe_matmul_peak(device, dtype)
        cached = store_probe(result, device, dtype, cache_dir=cache_dir)
        if cached["flops"] == result.flops:
            note = f"probe took {result.seconds:.1f} s, now cached"
        else:
            note = f"cached; a new reading ({format_flops(result.flops)}, {result.seconds:.1f} s) was lower"
    return _peak_of_entry(cached, device, math, note)


def _peak_of_entry(entry: dict, device: torch.device, math: str, note: str = "cached") -> Peak:
    where = "this CPU" if device.type == "cpu" else f"this GPU ({device_description(device)})"
    counts = entry.get("thread_counts") or []
    how = f": best of {len(counts)} thread counts x {entry.get('repeats', '?')} repeats" if counts else ""
    if device.type != "cpu":
        how = f": best of {entry.get('repeats', '?')} repeats"
    source = f"measured on {where}{how}; {note}"
    if "raised_from" in entry:
        source = (
            f"measured on {where}, raised to what a training step reached (the probe read "
            f"{format_flops(entry['raised_from'])}); {note}"
        )
    return Peak(float(entry["flops"]), math, source, measured=True)


def raise_peak(
    peak: Peak,
    achieved: float,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    *,
    cache_dir: str | Path | None = None,
) -> Peak:
    """A measured ``peak`` that training went past, raised to the ``achieved`` FLOP/s (and cached so).

    The achieved FLOP/s are a reading too, of a full training step: the hardware did at least
    that much (counted as MFU counts it, the PaLM formula, whose attention term includes the half
    that a causal kernel skips, so it may read a few percent above the FLOPs actually done). MFU
    against the raised peak is 1 at that moment, which says "as fast as anything measured here",
    not that the step reached a hardware limit; the source says the peak was raised."""
    entry = {
        "flops": achieved,
        "measured": time.strftime("%Y-%m-%d %H:%M:%S"),
        "raised_from": peak.flops,
    }
    device = torch.device(device)
    stored = _store(entry, peak_cache_key(device, dtype), cache_dir)
    return _peak_of_entry(stored, device, peak.math)


def _cached_flops(entry: Any) -> float | None:
    if isinstance(entry, dict) and isinstance(entry.get("flops"), (int, float)) and entry["flops"] > 0:
        return float(entry["flops"])
    return None

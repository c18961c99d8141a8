"""The peak FLOP/s that MFU is measured against: *measured*, not taken from a datasheet.

The best FLOP/s of a few large square matmuls in the training dtype, on this device with this
many threads. It is measured once and cached in the nexttoken cache folder (``$NEXTTOKEN_CACHE`` or
``~/.cache/nexttoken``), keyed by the device model, thread count, dtype and torch version, so later
runs start at once. On a CPU the datasheet number (cores x clock x FMA width) is rarely reached by
anything; the measured matmul peak is what a perfect training step could get. For GPUs
:func:`datasheet_peak` also gives the vendor's dense number, and benchmarks report MFU against both.
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path
from typing import Any

import torch

from nexttoken.io import write_atomically

PEAK_CACHE_FILE = "matmul_peak.json"

# Dense (no sparsity) tensor-core peaks from NVIDIA's datasheets, FLOP/s. Matched by substrings of
# torch.cuda.get_device_name(), most specific first.
_DATASHEET_BF16: list[tuple[tuple[str, ...], float]] = [
    (("h200", "nvl"), 835e12),
    (("h200",), 989e12),  # H200 SXM: the H100 SXM's compute, more and faster memory
    (("gh200",), 989e12),
    (("h100", "pcie"), 756e12),
    (("h100", "nvl"), 835e12),
    (("h100",), 989e12),  # H100 SXM5 (the "NVIDIA H100 80GB HBM3")
    (("a100",), 312e12),
    (("l40s",), 362e12),
    (("a10g",), 70e12),
    (("l4",), 121e12),
]


def datasheet_peak(device_name: str, dtype: torch.dtype = torch.bfloat16) -> float | None:
    """The vendor's dense bf16/fp16 tensor-core peak for a known NVIDIA GPU name, else None."""
    if dtype not in (torch.bfloat16, torch.float16):
        return None
    name = device_name.lower()
    for needles, flops in _DATASHEET_BF16:
        if all(n in name for n in needles):
            return flops
    return None


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


def peak_cache_key(device: torch.device | str, dtype: torch.dtype) -> str:
    """What the measured peak depends on: device model, threads, dtype, torch version
    (and on CUDA the fp32 matmul precision, which decides whether TF32 is used)."""
    device = torch.device(device)
    parts = [
        device.type,
        device_description(device),
        str(dtype).replace("torch.", ""),
        f"torch {torch.__version__}",
    ]
    if device.type == "cpu":
        parts.append(f"{torch.get_num_threads()} threads")
    elif dtype == torch.float32:
        parts.append(f"fp32 matmul {torch.get_float32_matmul_precision()}")
    return " | ".join(parts)


def measure_matmul_peak(
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    size: int | None = None,
    repeats: int = 3,
) -> float:
    """FLOP/s of the best of ``repeats`` timed (size x size) @ (size x size) matmuls (after a warm-up).

    The best, not the median: the peak is what the hardware can do; a shared machine's busy moments
    are not part of it. Takes a few seconds on a CPU, well under one on a GPU.
    """
    device = torch.device(device)
    if size is None:
        # CPU: 4096 (137 GFLOP each, ~0.4 s on 2 AVX-512 cores); smaller sizes read 30-40% low there.
        size = 8192 if device.type == "cuda" else 4096
    g = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(size, size, generator=g).to(device=device, dtype=dtype)
    b = torch.randn(size, size, generator=g).to(device=device, dtype=dtype)
    inner = 10 if device.type == "cuda" else 1  # GPU: several per timing, so launch cost is noise
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    out = torch.empty(size, size, device=device, dtype=dtype)
    torch.mm(a, b, out=out)  # warm-up
    sync()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(inner):
            torch.mm(a, b, out=out)
        sync()
        best = min(best, (time.perf_counter() - start) / inner)
    return 2 * size**3 / best


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


def cached_matmul_peak(
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    *,
    cache_dir: str | Path | None = None,
    refresh: bool = False,
) -> float:
    """The measured matmul peak (FLOP/s) for this device/threads/dtype/torch, measured on first use
    and then read from ``matmul_peak.json`` in the cache folder.

    ``refresh`` measures again and keeps the higher of the two: the peak is a property of the
    hardware, and a measurement taken while other programs shared the cores reads low, never high.
    """
    if not refresh:
        old = _cached_flops(read_peak_cache(cache_dir).get(peak_cache_key(device, dtype)))
        if old:
            return old
    return store_matmul_peak(measure_matmul_peak(device, dtype), device, dtype, cache_dir=cache_dir)


def store_matmul_peak(
    flops: float,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    *,
    cache_dir: str | Path | None = None,
) -> float:
    """Record a matmul peak reading (for this thread count, dtype, ...) unless the cache already
    holds a higher one; returns the peak now cached."""
    key = peak_cache_key(device, dtype)
    entries = read_peak_cache(cache_dir)
    old = _cached_flops(entries.get(key)) or 0.0
    if old >= flops:
        return old
    entries[key] = {"flops": flops, "measured": time.strftime("%Y-%m-%d %H:%M:%S")}
    try:
        write_atomically(_cache_path(cache_dir), json.dumps(entries, indent=1) + "\n")
    except OSError:
        pass  # a read-only cache folder: measure again next time, never fail the run
    return flops


def _cached_flops(entry: Any) -> float | None:
    if isinstance(entry, dict) and isinstance(entry.get("flops"), (int, float)) and entry["flops"] > 0:
        return float(entry["flops"])
    return None

"""Training speed: tokens per second and model FLOPs utilization (MFU).

    MFU = tokens/s x training FLOPs per token / peak FLOP/s of the device

* **FLOPs per token** (forward + backward) follow PaLM (Chowdhery et al. 2022, app. B):
  ``6 N + 12 n_layer d_model T``, with N the parameters used as matmuls (non-embedding parameters
  plus the output head). nexttoken's GPT knows its own (``GPT.flops_per_token``); for other models
  (Hugging Face) :func:`model_flops_per_token` estimates it from the parameters and the config.
* **Peak** is *measured*, not taken from a datasheet: the best FLOP/s of a few large square matmuls
  in the training dtype, on this device with this many threads. It is measured once and cached in
  the nexttoken cache folder (``$NEXTTOKEN_CACHE`` or ``~/.cache/nexttoken``), keyed by the device
  model, thread count, dtype and torch version, so later runs start at once. On a CPU the datasheet
  number (cores x clock x FMA width) is rarely reached by anything; the measured matmul peak is what
  a perfect training step could get. For GPUs :func:`datasheet_peak` also gives the vendor's dense
  number, and benchmarks report MFU against both.
* :class:`ThroughputCallback` shows both in the progress bar during ``fit`` and logs them
  (``train/tokens_per_sec``, ``train/mfu``). It times whole steps, batch end to batch end, so data
  loading, the optimizer and logging count; validation and the time before the first step do not.
  It only reads clocks and tensor shapes: no host-device synchronization of its own. It also logs
  ``time/elapsed_sec``, the wall time since training started, for curves against time.
"""

from __future__ import annotations

import json
import os
import platform
import time
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import nn

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


# --------------------------------------------------------------------------- FLOPs
def model_flops_per_token(model: nn.Module, seq_len: int) -> int:
    """Training FLOPs (forward + backward) per token at context length ``seq_len``.

    nexttoken's GPT: its own ``flops_per_token``. Anything else (Hugging Face causal LMs):
    ``6 N + 12 n_layer d_model seq_len`` with N = all parameters minus the input (and position)
    embedding tables, plus the output head's matmul when it is tied to the input embedding.
    """
    inner = getattr(model, "_orig_mod", model)  # torch.compile's wrapper
    if hasattr(inner, "flops_per_token"):
        return int(inner.flops_per_token(seq_len))
    params = {id(p): p for p in inner.parameters()}
    n = sum(p.numel() for p in params.values())
    embedding_ids = set()
    for module in inner.modules():
        if isinstance(module, nn.Embedding):
            embedding_ids.add(id(module.weight))
    n -= sum(params[i].numel() for i in embedding_ids if i in params)
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    if head is not None and id(head.weight) in embedding_ids:
        n += head.weight.numel()  # tied head: a lookup table once, a matmul once
    config = getattr(inner, "config", None)
    n_layer = _config_value(config, "num_hidden_layers", "n_layer", "num_layers")
    d_model = _config_value(config, "hidden_size", "n_embd", "d_model")
    attention = 12 * n_layer * d_model * seq_len if n_layer and d_model else 0
    return int(6 * n + attention)


def _config_value(config: Any, *names: str) -> int | None:
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    return None


def mfu(tokens_per_sec: float, flops_per_token: float, peak_flops: float) -> float:
    """Model FLOPs utilization: achieved training FLOP/s over the device's peak (0..1)."""
    if peak_flops <= 0:
        raise ValueError(f"peak FLOP/s must be positive, got {peak_flops}")
    return tokens_per_sec * flops_per_token / peak_flops


def datasheet_peak(device_name: str, dtype: torch.dtype = torch.bfloat16) -> float | None:
    """The vendor's dense bf16/fp16 tensor-core peak for a known NVIDIA GPU name, else None."""
    if dtype not in (torch.bfloat16, torch.float16):
        return None
    name = device_name.lower()
    for needles, flops in _DATASHEET_BF16:
        if all(n in name for n in needles):
            return flops
    return None


# --------------------------------------------------------------------------- CPU threads
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


# --------------------------------------------------------------------------- measured peak
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
    parts = [device.type, device_description(device), str(dtype).replace("torch.", ""), f"torch {torch.__version__}"]
    if device.type == "cpu":
        parts.append(f"{torch.get_num_threads()} threads")
    elif dtype == torch.float32:
        parts.append(f"fp32 matmul {torch.get_float32_matmul_precision()}")
    return " | ".join(parts)


def measure_matmul_peak(
    device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, size: int | None = None,
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
        from nexttoken.data.datamodule import default_cache_dir

        cache_dir = default_cache_dir()
    return Path(cache_dir).expanduser() / PEAK_CACHE_FILE


def read_peak_cache(cache_dir: str | Path | None = None) -> dict[str, dict]:
    path = _cache_path(cache_dir)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def cached_matmul_peak(
    device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, *,
    cache_dir: str | Path | None = None, refresh: bool = False,
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
    flops: float, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, *,
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
    path = _cache_path(cache_dir)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(entries, indent=1) + "\n")
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only cache folder: measure again next time, never fail the run
    return flops


def _cached_flops(entry: Any) -> float | None:
    if isinstance(entry, dict) and isinstance(entry.get("flops"), (int, float)) and entry["flops"] > 0:
        return float(entry["flops"])
    return None


# --------------------------------------------------------------------------- the callback
class ThroughputCallback(L.Callback):
    """Tokens per second and MFU in the progress bar (``ktok/s``, ``mfu``) and the logs
    (``train/tokens_per_sec``, ``train/mfu``), as a moving average over the last ``window`` steps.

    Tokens are counted from the batch's shape (every position, all processes); the clock runs from
    one batch end to the next, so everything a step costs is included. Validation time is excluded.
    ``peak_flops`` skips the measurement (the matmul peak, cached; see the module docstring);
    ``mfu=False`` shows tokens/s only.
    """

    def __init__(self, window: int = 20, peak_flops: float | None = None, mfu: bool = True) -> None:
        super().__init__()
        if window < 1:
            raise ValueError(f"window must be at least 1, got {window}")
        self.window = window
        self.peak_flops = peak_flops
        self.show_mfu = mfu
        self._marks: deque[tuple[float, int]] = deque(maxlen=window + 1)
        self._flops_per_token: int | None = None
        self._seq_len: int | None = None
        self._fit_started = time.perf_counter()
        # What the last update computed (for reports and tests).
        self.tokens_per_sec: float | None = None
        self.mfu: float | None = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.show_mfu and self.peak_flops is None:
            dtype = precision_dtype(trainer.precision)
            try:
                self.peak_flops = cached_matmul_peak(pl_module.device, dtype)
            except Exception:  # noqa: BLE001 - a speed display must never stop training
                self.show_mfu = False

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._fit_started = time.perf_counter()

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        if not self._marks:  # the first step, or the first after validation: start the clock here
            self._marks.append((time.perf_counter(), 0))

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        targets = batch[1] if isinstance(batch, (tuple, list)) else batch
        tokens = int(targets.numel()) * trainer.world_size
        self._marks.append((time.perf_counter(), tokens))
        (t0, _), (t1, _) = self._marks[0], self._marks[-1]
        if t1 <= t0:
            return
        self.tokens_per_sec = sum(n for _, n in list(self._marks)[1:]) / (t1 - t0)
        if self.show_mfu and self.peak_flops:
            seq_len = int(targets.shape[-1])
            if seq_len != self._seq_len:
                model = getattr(pl_module, "model", None) or pl_module
                self._flops_per_token = model_flops_per_token(model, seq_len)
                self._seq_len = seq_len
            self.mfu = mfu(self.tokens_per_sec, self._flops_per_token, self.peak_flops)
        # CPU tensors: Lightning keeps them where they are, so logging never waits for a GPU.
        log = pl_module.log
        # Wall time since training started (validation included): the x axis of time-based curves.
        log("time/elapsed_sec", torch.tensor(time.perf_counter() - self._fit_started), batch_size=1)
        log("train/tokens_per_sec", torch.tensor(self.tokens_per_sec), batch_size=1)
        # Short names for the progress bar, which shows 3 decimals: "ktok/s: 15.765", "mfu: 0.412".
        log("ktok/s", torch.tensor(self.tokens_per_sec / 1000), prog_bar=True, logger=False, batch_size=1)
        if self.mfu is not None:
            log("train/mfu", torch.tensor(self.mfu), batch_size=1)
            log("mfu", torch.tensor(self.mfu), prog_bar=True, logger=False, batch_size=1)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._marks.clear()  # validation is not training time

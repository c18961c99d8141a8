"""Pick the Lightning precision that is fastest *and* honest on the hardware at hand.

bf16 mixed precision halves activation memory and runs matmuls on bf16 units, but only where
those units exist. On a CPU without AVX512-BF16 or AMX, bf16 is emulated and slower than fp32
(measured: see README), so ``auto`` says ``32-true`` there and tells you why.
Under mixed precision Lightning keeps fp32 master weights and optimizer state, and
``nexttoken.loss`` computes the log-softmax in fp32.
"""

from __future__ import annotations

import platform
from pathlib import Path

import torch


def cpu_bf16_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> set[str]:
    """The CPU's native bf16 features, from /proc/cpuinfo (Linux x86); empty where unknown."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return set()
    flags: set[str] = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
            break
    return flags & {"avx512_bf16", "amx_bf16"}


def auto_precision(device: str | torch.device | None = None) -> tuple[str, str]:
    """``(precision, reason)``: ``bf16-mixed`` where bf16 is native, ``16-mixed`` on older CUDA
    GPUs, ``32-true`` otherwise. ``device`` defaults to CUDA when available, else CPU."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        name = torch.cuda.get_device_name(device)
        if major >= 8:
            return "bf16-mixed", f"{name} (compute capability {major}.{minor}) runs bf16 natively"
        return "16-mixed", (
            f"{name} (compute capability {major}.{minor}) has no native bf16; fp16 with loss scaling"
        )
    if device.type == "cpu":
        native = cpu_bf16_flags()
        if native:
            return "bf16-mixed", f"this CPU has native bf16 instructions ({', '.join(sorted(native))})"
        return "32-true", (
            f"this CPU ({platform.machine()}) has no AVX512-BF16 or AMX, so bf16 would be emulated "
            "and slower than fp32"
        )
    return "32-true", f"no native bf16 rule for device type {device.type!r}; fp32 is the safe choice"

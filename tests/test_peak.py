import json
import time

import pytest
import torch

from nexttoken import peak
from nexttoken.loss import next_token_loss
from nexttoken.models.gpt import GPT, GPTConfig
from nexttoken.peak import (
    Peak,
    ProbeResult,
    core_count,
    datasheet_peak,
    format_flops,
    matmul_math,
    peak_cache_key,
    peak_flops,
    precision_dtype,
    probe_matmul_peak,
    raise_peak,
    read_peak_cache,
)
from nexttoken.precision import auto_precision
from nexttoken.training.optim import build_optimizer


@pytest.mark.parametrize(
    "name, math, flops",
    [
        # As torch.cuda.get_device_name() reports them.
        ("NVIDIA H100 80GB HBM3", "bf16", 989e12),
        ("NVIDIA H100 80GB HBM3", "fp16", 989e12),
        ("NVIDIA H100 80GB HBM3", "tf32", 494.5e12),
        ("NVIDIA H100 80GB HBM3", "fp32", 67e12),
        ("NVIDIA H100 PCIe", "bf16", 756e12),
        ("NVIDIA H100 NVL", "bf16", 835.5e12),
        ("NVIDIA H200", "bf16", 989e12),
        ("NVIDIA H200", "tf32", 494.5e12),
        ("NVIDIA H200 NVL", "bf16", 835.5e12),
        ("NVIDIA GH200 480GB", "bf16", 989e12),
        ("NVIDIA A100-SXM4-80GB", "bf16", 312e12),
        ("NVIDIA A100-SXM4-40GB", "tf32", 156e12),
        ("NVIDIA A100-PCIE-40GB", "fp32", 19.5e12),
        ("NVIDIA A100 80GB PCIe", "fp16", 312e12),
        ("NVIDIA A10", "bf16", 125e12),
        ("NVIDIA L4", "bf16", 121e12),
        ("NVIDIA L40S", "bf16", 362.05e12),
        ("Tesla V100-SXM2-16GB", "fp16", 125e12),
        ("Tesla V100-PCIE-32GB", "fp32", 14e12),
        ("NVIDIA GeForce RTX 4090", "bf16", 165.2e12),
        ("NVIDIA GeForce RTX 3090", "tf32", 35.6e12),
        # Not in the table (or no such math there): measured instead.
        ("Tesla V100-SXM2-16GB", "bf16", None),  # no bf16 tensor cores
        ("NVIDIA A10G", "bf16", None),  # an AWS part without a public datasheet, not an A10
        ("NVIDIA L40", "bf16", None),  # not an L4 or an L40S
        ("NVIDIA GeForce RTX 3090 Ti", "bf16", None),
        ("NVIDIA GeForce RTX 4090 Laptop GPU", "bf16", None),
        ("NVIDIA H100 80GB HBM3", "fp64", None),
        ("Some Other GPU", "bf16", None),
    ],
)
def test_datasheet_lookup_by_the_name_torch_reports(name, math, flops):
    assert datasheet_peak(name, math) == flops


def test_dtype_and_math_lookups():
    assert datasheet_peak("NVIDIA H100 80GB HBM3", torch.bfloat16) == 989e12
    assert datasheet_peak("NVIDIA H100 80GB HBM3", torch.float32) == 67e12
    assert precision_dtype("bf16-mixed") == torch.bfloat16
    assert precision_dtype("bf16-true") == torch.bfloat16
    assert precision_dtype("16-mixed") == torch.float16
    assert precision_dtype("32-true") == torch.float32
    assert precision_dtype(32) == torch.float32
    assert matmul_math("cpu", torch.bfloat16) == "bf16"
    assert matmul_math("cpu", torch.float32) == "fp32"  # no TF32 on a CPU
    assert format_flops(989e12) == "989 TFLOP/s" and format_flops(494.5e12) == "494.5 TFLOP/s"
    assert format_flops(4.073e11) == "407.3 GFLOP/s"


def fake_gpu(monkeypatch, name: str) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)


def test_a_known_gpu_gets_its_datasheet_peak_in_the_math_its_matmuls_run_in(monkeypatch, tmp_path):
    fake_gpu(monkeypatch, "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(peak, "probe_matmul_peak", lambda *a, **k: pytest.fail("a known GPU is not measured"))
    bf16 = peak_flops("cuda", torch.bfloat16, cache_dir=tmp_path)
    assert bf16 == Peak(989e12, "bf16", "NVIDIA H100 SXM dense bf16, datasheet")
    assert bf16.describe() == "989 TFLOP/s (bf16, NVIDIA H100 SXM dense bf16, datasheet)"
    monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: "high")  # fp32 matmuls on TF32
    assert peak_flops("cuda", torch.float32, cache_dir=tmp_path).flops == 494.5e12
    monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: "highest")
    assert peak_flops("cuda", torch.float32, cache_dir=tmp_path).flops == 67e12
    fake_gpu(monkeypatch, "NVIDIA A100-SXM4-80GB")
    assert peak_flops("cuda", torch.float16, cache_dir=tmp_path).source == "NVIDIA A100 dense fp16, datasheet"


def test_an_unknown_gpu_is_measured(monkeypatch, tmp_path):
    fake_gpu(monkeypatch, "Some Future GPU")
    probes = []

    def fake_probe(device, dtype, **kwargs):
        probes.append((torch.device(device).type, dtype))
        return ProbeResult(123e12, "bfloat16", None, (8192, 8192, 8192), (), 3, 0.5)

    monkeypatch.setattr(peak, "probe_matmul_peak", fake_probe)
    measured = peak_flops("cuda", torch.bfloat16, cache_dir=tmp_path)
    assert probes == [("cuda", torch.bfloat16)]
    assert measured.flops == 123e12 and measured.measured
    assert measured.describe() == (
        "123 TFLOP/s (bf16, measured on this GPU (Some Future GPU): best of 3 repeats; "
        "probe took 0.5 s, now cached)"
    )
    assert peak_flops("cuda", torch.bfloat16, cache_dir=tmp_path).source.endswith("; cached")
    assert len(probes) == 1


def test_the_probe_tries_every_thread_count_and_leaves_torch_as_it_was():
    before = torch.get_num_threads()
    result = probe_matmul_peak("cpu", torch.float32, shapes=((64, 64, 64), (32, 128, 16)), repeats=2)
    assert torch.get_num_threads() == before
    assert result.thread_counts == tuple(range(1, core_count() + 1))
    assert result.threads in result.thread_counts and result.shape in ((64, 64, 64), (32, 128, 16))
    assert result.flops > 0 and result.repeats == 2 and result.dtype == "float32"


def test_peak_cache_round_trip(tmp_path, monkeypatch):
    readings = iter([1.5e11, 3.0e11, 4.5e11, 1e11, 2e11])

    def fake_probe(device, dtype, **kwargs):
        return ProbeResult(next(readings), "float32", 1, (64, 64, 64), (1, 2), 3, 0.5)

    monkeypatch.setattr(peak, "probe_matmul_peak", fake_probe)
    first = peak_flops("cpu", torch.float32, cache_dir=tmp_path)
    assert first == Peak(
        1.5e11,
        "fp32",
        "measured on this CPU: best of 2 thread counts x 3 repeats; probe took 0.5 s, now cached",
        True,
    )
    again = peak_flops("cpu", torch.float32, cache_dir=tmp_path)  # read back, not measured
    assert again.flops == 1.5e11 and again.source.endswith(": best of 2 thread counts x 3 repeats; cached")
    stored = json.loads((tmp_path / "matmul_peak.json").read_text())
    key = peak_cache_key("cpu", torch.float32)
    assert stored[key]["flops"] == 1.5e11 and stored[key]["thread_counts"] == [1, 2]
    # The machine's peak: every core, whatever thread count this process uses now.
    assert f"{core_count()} cores" in key and torch.__version__ in key and "threads" not in key
    # Another dtype is another entry; refresh measures again and keeps the higher reading.
    assert peak_flops("cpu", torch.bfloat16, cache_dir=tmp_path).flops == 3.0e11
    assert peak_flops("cpu", torch.float32, cache_dir=tmp_path, refresh=True).flops == 4.5e11
    busy = peak_flops("cpu", torch.float32, cache_dir=tmp_path, refresh=True)  # a busy moment: 1e11
    assert busy.flops == 4.5e11 and busy.source.endswith(
        "; cached; a new reading (100 GFLOP/s, 0.5 s) was lower"
    )
    assert json.loads((tmp_path / "matmul_peak.json").read_text())[key]["flops"] == 4.5e11
    # A damaged cache file is measured over, not fatal.
    (tmp_path / "matmul_peak.json").write_text("{not json")
    assert peak_flops("cpu", torch.float32, cache_dir=tmp_path).flops == 2e11


def test_a_raised_peak_is_cached_and_says_so(tmp_path, monkeypatch):
    monkeypatch.setattr(
        peak, "probe_matmul_peak", lambda *a, **k: ProbeResult(1e11, "bfloat16", 1, (64,) * 3, (1,), 3, 0.1)
    )
    low = peak_flops("cpu", torch.bfloat16, cache_dir=tmp_path)
    raised = raise_peak(low, 1.25e11, "cpu", torch.bfloat16, cache_dir=tmp_path)
    assert raised.flops == 1.25e11 and raised.measured
    assert raised.source == (
        "measured on this CPU, raised to what a training step reached (the probe read 100 GFLOP/s); cached"
    )
    assert peak_flops("cpu", torch.bfloat16, cache_dir=tmp_path) == raised
    # A lower "raise" changes nothing.
    assert raise_peak(low, 1.1e11, "cpu", torch.bfloat16, cache_dir=tmp_path).flops == 1.25e11


def test_the_probe_reaches_what_a_training_step_reaches(tmp_path):
    """On this CPU the measured peak (the probe ``fit`` uses, in the dtype of the precision ``fit``
    picks here) is at least the FLOP/s of a training step of the built-in GPT at the shape of
    ``benchmarks/train_throughput.py`` (preset ``small``, block 256, vocab 4096, batch 8), counted as
    ``nexttoken.training.throughput`` counts them, at its best thread count. The peak is read before and after
    the steps (keeping the higher, as the cache does), so a busy moment of a shared machine during one
    reading does not make it low. Checked to go red with a probe in fp32 (under bf16-mixed) and with
    a probe of one thread."""
    dtype = precision_dtype(auto_precision("cpu")[0])
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset("small", 4096, block_size=256)).train()
    optimizer, _ = build_optimizer(model, lr=1e-3, warmup_steps=1, max_steps=100)
    x, y = torch.randint(0, 4096, (2, 8, 256)).unbind(0)

    def step() -> None:  # the hand loop's step: bf16 autocast where fit uses it, plain loss, fused AdamW
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            loss = next_token_loss(model(x), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    flops_per_step = model.flops_per_token(256) * x.numel()
    original = torch.get_num_threads()
    achieved = 0.0
    try:
        measured = peak_flops("cpu", dtype, cache_dir=tmp_path)
        for threads in range(1, core_count() + 1):
            torch.set_num_threads(threads)
            step()  # warm-up
            start = time.perf_counter()
            step()
            achieved = max(achieved, flops_per_step / (time.perf_counter() - start))
        measured = peak_flops("cpu", dtype, cache_dir=tmp_path, refresh=True)  # keeps the higher
        for _ in range(3):
            # Both readings fell in busy moments of a shared machine (a reading is low, never high):
            # read again. A probe that cannot reach the step's speed (the wrong dtype, too few
            # threads, too small a shape) stays below it however often it runs.
            if measured.flops >= achieved:
                break
            measured = peak_flops("cpu", dtype, cache_dir=tmp_path, refresh=True)
    finally:
        torch.set_num_threads(original)
    assert measured.flops >= achieved, (
        f"a training step reached {format_flops(achieved)}, the probe only {measured.describe()}"
    )
    assert measured.math == {torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype]
    assert read_peak_cache(tmp_path)[peak_cache_key("cpu", dtype)]["dtype"] == str(dtype)[6:]  # probed in it
    # Every thread count was tried: on a quiet machine the step is fastest with all cores, on a busy
    # one with fewer, and which it is can change between the probe and the step.
    assert f"best of {core_count()} thread counts" in measured.source

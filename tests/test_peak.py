import json

import torch

from nexttoken import peak
from nexttoken.peak import (
    cached_matmul_peak,
    datasheet_peak,
    measure_matmul_peak,
    peak_cache_key,
    precision_dtype,
)


def test_datasheet_and_precision_lookups():
    assert datasheet_peak("NVIDIA H100 80GB HBM3") == 989e12
    assert datasheet_peak("NVIDIA H100 PCIe") == 756e12
    assert datasheet_peak("NVIDIA H200") == 989e12
    assert datasheet_peak("NVIDIA H200 NVL") == 835e12
    assert datasheet_peak("NVIDIA H100 80GB HBM3", torch.float32) is None
    assert datasheet_peak("Some Other GPU") is None
    assert precision_dtype("bf16-mixed") == torch.bfloat16
    assert precision_dtype("16-mixed") == torch.float16
    assert precision_dtype("32-true") == torch.float32
    assert precision_dtype(32) == torch.float32


def test_measure_matmul_peak_is_positive():
    assert measure_matmul_peak("cpu", torch.float32, size=64, repeats=2) > 0


def test_peak_cache_round_trip(tmp_path, monkeypatch):
    calls = []

    def fake_measure(device, dtype):
        calls.append((str(device), dtype))
        return 1.5e11 * len(calls)

    monkeypatch.setattr(peak, "measure_matmul_peak", fake_measure)
    assert cached_matmul_peak("cpu", torch.float32, cache_dir=tmp_path) == 1.5e11
    assert cached_matmul_peak("cpu", torch.float32, cache_dir=tmp_path) == 1.5e11  # read back
    assert len(calls) == 1
    stored = json.loads((tmp_path / "matmul_peak.json").read_text())
    key = peak_cache_key("cpu", torch.float32)
    assert stored[key]["flops"] == 1.5e11
    assert f"{torch.get_num_threads()} threads" in key and torch.__version__ in key
    # Another dtype is another entry; refresh measures again and keeps the higher reading.
    assert cached_matmul_peak("cpu", torch.bfloat16, cache_dir=tmp_path) == 3.0e11
    assert cached_matmul_peak("cpu", torch.float32, cache_dir=tmp_path, refresh=True) == 4.5e11
    assert len(calls) == 3
    monkeypatch.setattr(peak, "measure_matmul_peak", lambda device, dtype: 1e11)  # a busy moment
    assert cached_matmul_peak("cpu", torch.float32, cache_dir=tmp_path, refresh=True) == 4.5e11
    assert json.loads((tmp_path / "matmul_peak.json").read_text())[key]["flops"] == 4.5e11
    # A damaged cache file is measured over, not fatal.
    (tmp_path / "matmul_peak.json").write_text("{not json")
    assert cached_matmul_peak("cpu", torch.float32, cache_dir=tmp_path) == 1e11

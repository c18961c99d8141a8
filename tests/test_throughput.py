import json

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from nexttoken import throughput
from nexttoken.models.gpt import GPT, GPTConfig
from nexttoken.module import CausalLMModule
from nexttoken.throughput import (
    ThroughputCallback,
    cached_matmul_peak,
    datasheet_peak,
    fastest_num_threads,
    measure_matmul_peak,
    mfu,
    model_flops_per_token,
    peak_cache_key,
    precision_dtype,
)


def hand_flops(L_, C, V, T, bias):
    # Per block: c_attn 3C^2, attn c_proj C^2, c_fc 4C^2, mlp c_proj 4C^2 = 12 C^2 weights, and the
    # two LayerNorm gains (2C); with biases also 3C + C + 4C + C (linears) + 2C (LayerNorm).
    per_block = 12 * C * C + (2 * C if not bias else 13 * C)
    n = L_ * per_block + (C if not bias else 2 * C) + V * C  # + ln_f + the (tied) head as a matmul
    return 6 * n + 12 * L_ * C * T


@pytest.mark.parametrize("bias", [False, True])
def test_gpt_flops_per_token_matches_hand_formula(bias):
    config = GPTConfig(vocab_size=97, block_size=32, n_layer=3, n_head=2, n_embd=16, bias=bias)
    model = GPT(config)
    assert model_flops_per_token(model, 32) == hand_flops(3, 16, 97, 32, bias)
    assert model_flops_per_token(model, 8) == hand_flops(3, 16, 97, 8, bias)  # attention term follows T


def test_hf_estimate_agrees_with_gpt():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(vocab_size=97, n_positions=32, n_embd=16, n_layer=3, n_head=2)
    hf = transformers.GPT2LMHeadModel(config)
    assert not hasattr(hf, "flops_per_token")
    # GPT-2 has biases everywhere and a tied head: the same count as our GPT with bias=True.
    assert model_flops_per_token(hf, 32) == hand_flops(3, 16, 97, 32, bias=True)


def test_compiled_wrapper_is_seen_through():
    model = GPT(GPTConfig(vocab_size=50, block_size=16, n_layer=1, n_head=1, n_embd=8))

    class Wrapper(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self._orig_mod = inner

    assert model_flops_per_token(Wrapper(model), 16) == model.flops_per_token(16)


def test_mfu_arithmetic():
    # 1,000 tokens/s x 6 MFLOP/token = 6 GFLOP/s achieved, on a 12 GFLOP/s peak: 50 %.
    assert mfu(1_000, 6e6, 12e9) == pytest.approx(0.5)
    assert mfu(0, 6e6, 12e9) == 0
    with pytest.raises(ValueError):
        mfu(1, 1, 0)


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

    monkeypatch.setattr(throughput, "measure_matmul_peak", fake_measure)
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
    monkeypatch.setattr(throughput, "measure_matmul_peak", lambda device, dtype: 1e11)  # a busy moment
    assert cached_matmul_peak("cpu", torch.float32, cache_dir=tmp_path, refresh=True) == 4.5e11
    assert json.loads((tmp_path / "matmul_peak.json").read_text())[key]["flops"] == 4.5e11
    # A damaged cache file is measured over, not fatal.
    (tmp_path / "matmul_peak.json").write_text("{not json")
    assert cached_matmul_peak("cpu", torch.float32, cache_dir=tmp_path) == 1e11


def test_callback_shows_tokens_per_sec_and_mfu():
    torch.manual_seed(0)
    V, T, B = 32, 8, 2
    module = CausalLMModule(model="tiny", vocab_size=V, block_size=T, n_layer=1, n_head=2, n_embd=16)
    batches = [(torch.randint(0, V, (B, T)), torch.randint(0, V, (B, T))) for _ in range(6)]
    callback = ThroughputCallback(window=3, peak_flops=1e9)
    trainer = L.Trainer(
        accelerator="cpu", max_steps=6, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, callbacks=[callback],
    )
    trainer.fit(module, train_dataloaders=DataLoader(batches, batch_size=None))
    assert callback.tokens_per_sec > 0
    expected = mfu(callback.tokens_per_sec, module.model.flops_per_token(T), 1e9)
    assert callback.mfu == pytest.approx(expected)
    assert {"ktok/s", "mfu"} <= set(trainer.progress_bar_metrics)
    assert trainer.callback_metrics["train/tokens_per_sec"] == pytest.approx(callback.tokens_per_sec, rel=1e-6)


def test_fastest_num_threads_picks_the_quickest_and_sets_it():
    original = torch.get_num_threads()
    try:
        def step():  # pretend one thread is slow: sleep longer under 1 thread
            import time

            time.sleep(0.02 if torch.get_num_threads() == 1 else 0.001)

        best, medians = fastest_num_threads(step, candidates=[1, 2], repeats=2)
        assert best == 2 and torch.get_num_threads() == 2
        assert medians[1] > medians[2]
    finally:
        torch.set_num_threads(original)

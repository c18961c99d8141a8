import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from nexttoken.module import CausalLMModule
from nexttoken.throughput import ThroughputCallback, mfu


def test_mfu_arithmetic():
    # 1,000 tokens/s x 6 MFLOP/token = 6 GFLOP/s achieved, on a 12 GFLOP/s peak: 50 %.
    assert mfu(1_000, 6e6, 12e9) == pytest.approx(0.5)
    assert mfu(0, 6e6, 12e9) == 0
    with pytest.raises(ValueError):
        mfu(1, 1, 0)


def test_callback_shows_tokens_per_sec_and_mfu():
    torch.manual_seed(0)
    V, T, B = 32, 8, 2
    module = CausalLMModule(model="tiny", vocab_size=V, block_size=T, n_layer=1, n_head=2, n_embd=16)
    batches = [(torch.randint(0, V, (B, T)), torch.randint(0, V, (B, T))) for _ in range(6)]
    callback = ThroughputCallback(window=3, peak_flops=1e9)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=6,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=[callback],
    )
    trainer.fit(module, train_dataloaders=DataLoader(batches, batch_size=None))
    assert callback.tokens_per_sec > 0
    expected = mfu(callback.tokens_per_sec, module.model.flops_per_token(T), 1e9)
    assert callback.mfu == pytest.approx(expected)
    assert {"ktok/s", "mfu"} <= set(trainer.progress_bar_metrics)
    assert trainer.callback_metrics["train/tokens_per_sec"] == pytest.approx(
        callback.tokens_per_sec, rel=1e-6
    )

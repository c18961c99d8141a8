from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn

from nexttoken import precision
from nexttoken.loss import next_token_loss
from nexttoken.training.optim import build_optimizer


def test_cpu_without_native_bf16_says_32_true(monkeypatch):
    monkeypatch.setattr(precision, "cpu_bf16_flags", lambda: set())
    choice, reason = precision.auto_precision("cpu")
    assert choice == "32-true"
    assert "bf16" in reason and "slower" in reason


def test_cpu_with_native_bf16_says_bf16_mixed(monkeypatch):
    monkeypatch.setattr(precision, "cpu_bf16_flags", lambda: {"amx_bf16"})
    choice, reason = precision.auto_precision("cpu")
    assert choice == "bf16-mixed" and "amx_bf16" in reason


@pytest.mark.parametrize(
    "capability, expected", [((8, 0), "bf16-mixed"), ((9, 0), "bf16-mixed"), ((7, 5), "16-mixed")]
)
def test_cuda_capability_rule(monkeypatch, capability, expected):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake GPU")
    choice, reason = precision.auto_precision("cuda")
    assert choice == expected
    assert f"{capability[0]}.{capability[1]}" in reason


def test_parses_cpuinfo_flags(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(
        "processor\t: 0\nflags\t\t: fpu sse2 avx512f avx512_bf16 amx_tile amx_bf16\n\n"
        "processor\t: 1\nflags\t\t: fpu\n"
    )
    assert precision.cpu_bf16_flags(cpuinfo) == {"avx512_bf16", "amx_bf16"}
    cpuinfo.write_text("flags\t\t: fpu sse2 avx512f avx2\n")
    assert precision.cpu_bf16_flags(cpuinfo) == set()
    assert precision.cpu_bf16_flags(tmp_path / "absent") == set()


def test_reads_this_machines_flags():
    lines = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []
    first = next((line for line in lines if line.startswith("flags")), "flags :")
    expected = set(first.split(":", 1)[1].split()) & {"avx512_bf16", "amx_bf16"}
    assert precision.cpu_bf16_flags() == expected
    choice, _ = precision.auto_precision("cpu")
    assert choice == ("bf16-mixed" if expected else "32-true")


class Recorder(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(32, 16)
        self.proj = nn.Linear(16, 32)
        self.loss_dtypes = []
        self.logit_dtypes = []

    def training_step(self, batch, batch_idx):
        input_ids, targets = batch
        logits = self.proj(self.emb(input_ids))
        self.logit_dtypes.append(logits.dtype)
        loss = next_token_loss(logits, targets)
        self.loss_dtypes.append(loss.dtype)
        return loss

    def configure_optimizers(self):
        optimizer, _ = build_optimizer(self, lr=1e-2)
        return optimizer


def test_bf16_mixed_on_cpu_keeps_fp32_weights_state_and_loss():
    torch.manual_seed(0)
    data = [(torch.randint(0, 32, (2, 8)), torch.randint(0, 32, (2, 8))) for _ in range(2)]
    module = Recorder()
    trainer = L.Trainer(
        accelerator="cpu",
        precision="bf16-mixed",
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(data, batch_size=None))
    assert module.logit_dtypes[0] == torch.bfloat16  # the model really ran in bf16
    assert all(dtype == torch.float32 for dtype in module.loss_dtypes)
    assert all(p.dtype == torch.float32 for p in module.parameters())
    state = trainer.optimizers[0].state
    assert state and all(
        s["exp_avg"].dtype == torch.float32 and s["exp_avg_sq"].dtype == torch.float32 for s in state.values()
    )

"""Non-finite steps are found on the device, never reach the weights, and are read on the host
only at checks (not every step)."""

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from nexttoken.errors import UserError
from nexttoken.training.module import CausalLMModule
from nexttoken.training.nonfinite import NonFiniteGuard


class BadAtStep(CausalLMModule):
    """NaN in the loss (``where="loss"``) or only in one gradient (``where="grad"``) at one step."""

    def __init__(self, bad_step: int, where: str = "loss", sgd: bool = False, **kwargs):
        super().__init__(model="tiny", vocab_size=32, block_size=8, n_layer=1, n_head=2, n_embd=16, **kwargs)
        self.bad_step, self.where, self.sgd = bad_step, where, sgd

    def nll_sum(self, input_ids, targets):
        nll = super().nll_sum(input_ids, targets)
        if self.global_step != self.bad_step:
            return nll
        if self.where == "loss":
            return nll * float("nan")
        # The loss stays finite; one weight's gradient turns to inf.
        self.model.wpe.weight.register_hook(
            lambda g: g * float("inf") if self.global_step == self.bad_step else g
        )
        return nll

    def configure_optimizers(self):
        if self.sgd:
            return torch.optim.SGD(self.parameters(), lr=0.1)
        return super().configure_optimizers()


def batches(n=8):
    g = torch.Generator().manual_seed(0)
    data = [
        (torch.randint(0, 32, (2, 8), generator=g), torch.randint(0, 32, (2, 8), generator=g))
        for _ in range(n)
    ]
    return DataLoader(data, batch_size=None)


class Snapshots(L.Callback):
    """Parameters and AdamW moments before every step."""

    def __init__(self):
        self.params, self.moments = {}, {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        step = trainer.global_step
        self.params[step] = {n: p.detach().clone() for n, p in pl_module.named_parameters()}
        state = trainer.optimizers[0].state
        self.moments[step] = {
            n: state[p]["exp_avg"].clone()
            for n, p in pl_module.named_parameters()
            if p in state and "exp_avg" in state[p]
        }


def fit(module, steps=8, log_every=50):
    torch.manual_seed(0)
    snapshots = Snapshots()
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        log_every_n_steps=log_every,
        callbacks=[snapshots],
    )
    return trainer, snapshots


def assert_same(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_stop_keeps_the_weights_from_before_the_bad_step_and_reports_it_at_the_next_check():
    module = BadAtStep(bad_step=3)
    trainer, snap = fit(module)
    # No checkpoint, no validation, log_every 50: the flag is read only at the end of training.
    with pytest.raises(UserError, match=r"non-finite loss \(nan\) at step 4; training stopped"):
        trainer.fit(module, batches())
    assert trainer.global_step == 8  # the run went on without a host sync...
    current = {n: p.detach() for n, p in module.named_parameters()}
    assert_same(snap.params[3], current)  # ...but no update reached the weights after step 3
    state = trainer.optimizers[0].state
    assert_same(snap.moments[3], {n: state[p]["exp_avg"] for n, p in module.named_parameters()})
    assert any(not torch.equal(snap.params[2][n], snap.params[3][n]) for n in current)  # it did train before


def test_skip_leaves_weights_and_moments_untouched_and_warns(capsys):
    module = BadAtStep(bad_step=3, on_nonfinite="skip")
    trainer, snap = fit(module, log_every=2)
    trainer.fit(module, batches())
    assert trainer.global_step == 8
    assert_same(snap.params[3], snap.params[4])
    assert_same(snap.moments[3], snap.moments[4])
    assert any(not torch.equal(snap.params[4][n], snap.params[5][n]) for n in snap.params[4])
    assert "warning: non-finite loss (nan) at step 4; the step was skipped" in capsys.readouterr().out


def test_a_non_finite_gradient_with_a_finite_loss_is_caught_too(capsys):
    module = BadAtStep(bad_step=2, where="grad", on_nonfinite="skip")
    trainer, snap = fit(module, log_every=1)
    trainer.fit(module, batches())
    assert_same(snap.params[2], snap.params[3])
    assert_same(snap.moments[2], snap.moments[3])
    assert all(torch.isfinite(p).all() for p in module.parameters())
    assert "non-finite gradient (loss" in capsys.readouterr().out


def test_the_flag_is_read_at_checks_not_every_step(monkeypatch):
    reads = []
    original = NonFiniteGuard.check

    def counting_check(self, module):
        reads.append(module.trainer.global_step)
        original(self, module)

    monkeypatch.setattr(NonFiniteGuard, "check", counting_check)
    module = BadAtStep(bad_step=100)  # never bad
    trainer, _ = fit(module, steps=8, log_every=4)
    trainer.fit(module, batches())
    assert reads == [4, 8, 8]  # every 4 steps, and at the end of training


def test_optimizers_that_cannot_skip_are_checked_on_the_host_at_once():
    module = BadAtStep(bad_step=3, sgd=True)
    trainer, snap = fit(module)
    with pytest.raises(UserError, match=r"non-finite loss \(nan\) at step 4"):
        trainer.fit(module, batches())
    assert trainer.global_step == 3
    assert all(torch.isfinite(p).all() for p in module.parameters())

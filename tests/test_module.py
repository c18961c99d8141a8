import math

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from nexttoken.loss import next_token_loss
from nexttoken.module import CausalLMModule

V, T = 32, 8


class SGDModule(CausalLMModule):
    """Plain SGD with lr=1: the parameter change of one step IS minus the gradient."""

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1.0)


def make_module(**kwargs):
    torch.manual_seed(0)
    module = SGDModule(model="tiny", vocab_size=V, block_size=T, n_layer=2, n_head=2, n_embd=16, **kwargs)
    module.configure_model()
    return module


def micro_batches():
    g = torch.Generator().manual_seed(1)
    batches = []
    for ignored in (0, 3, 9, 14):  # different numbers of ignored positions per micro-batch
        input_ids = torch.randint(0, V, (2, T), generator=g)
        targets = torch.randint(0, V, (2, T), generator=g)
        targets.view(-1)[:ignored] = -100
        batches.append((input_ids, targets))
    return batches


def one_step_delta(module, batches, accumulate):
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=1,
        accumulate_grad_batches=accumulate,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    trainer.fit(module, train_dataloaders=DataLoader(batches, batch_size=None))
    return {n: before[n] - p.detach() for n, p in module.named_parameters()}


def test_accumulated_gradient_equals_whole_batch_token_mean():
    batches = micro_batches()
    accumulated = one_step_delta(make_module(), batches, accumulate=4)
    whole = (torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches]))
    single = one_step_delta(make_module(), [whole], accumulate=1)

    # Independent reference: autograd of the token mean of the whole batch, no Lightning.
    reference = make_module()
    next_token_loss(reference(whole[0]), whole[1]).backward()
    for name, p in reference.named_parameters():
        torch.testing.assert_close(accumulated[name], p.grad, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(single[name], p.grad, atol=1e-6, rtol=1e-5)


def test_mean_of_micro_batch_means_would_differ():
    # Guard that the data above really tells the two rules apart.
    batches = micro_batches()
    module = make_module()
    means = [next_token_loss(module(x), y) for x, y in batches]
    whole = next_token_loss(module(torch.cat([b[0] for b in batches])), torch.cat([b[1] for b in batches]))
    assert abs(sum(means).item() / 4 - whole.item()) > 1e-3


def test_initial_loss_is_about_ln_vocab():
    torch.manual_seed(0)
    module = CausalLMModule(model="tiny", vocab_size=512, block_size=64)
    module.configure_model()
    x = torch.randint(0, 512, (4, 64))
    loss = next_token_loss(module(x), torch.randint(0, 512, (4, 64)))
    assert loss.item() == pytest.approx(math.log(512), abs=0.15)


@pytest.mark.parametrize("mode, expected", [("auto", False), ("on", True), ("off", False)])
def test_fused_loss_choice_and_equivalence(mode, expected):
    module = make_module(fused_loss=mode)
    assert module.uses_fused_loss is expected
    x, y = micro_batches()[2]
    plain = next_token_loss(module(x), y, reduction="sum")
    torch.testing.assert_close(module.nll_sum(x, y), plain, rtol=1e-5, atol=1e-5)


def test_bad_fused_loss_mode():
    with pytest.raises(ValueError, match="fused_loss"):
        CausalLMModule(fused_loss="maybe")


def test_bf16_mixed_with_gradient_clipping_and_fused_adamw_trains():
    # Lightning refuses to clip for fused optimizers under mixed precision; bf16 has no loss
    # scaler, so the module clips the true gradients itself.
    torch.manual_seed(0)
    module = CausalLMModule(model="tiny", vocab_size=V, block_size=T, n_layer=1, n_head=2, n_embd=16)
    trainer = L.Trainer(
        accelerator="cpu",
        precision="bf16-mixed",
        gradient_clip_val=1e-3,
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    module.configure_model()
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    trainer.fit(module, train_dataloaders=DataLoader(micro_batches(), batch_size=None))
    assert trainer.optimizers[0].defaults["fused"] is True
    assert trainer.global_step == 2
    assert all(torch.isfinite(p).all() for p in module.parameters())
    assert any(not torch.equal(before[n], p) for n, p in module.named_parameters())

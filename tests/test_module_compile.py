"""``compile=True``: the network and its loss (fused or plain) go through one torch.compile graph,
and give the eager numbers."""

import pytest
import torch

from nexttoken.training.module import CausalLMModule


@pytest.mark.slow
@pytest.mark.parametrize("fused_loss", ["off", "on"])
def test_compiled_loss_equals_eager_and_trains(fused_loss):
    def make(compile):
        torch.manual_seed(0)
        module = CausalLMModule(
            model="tiny",
            vocab_size=64,
            block_size=8,
            n_layer=1,
            n_head=2,
            n_embd=16,
            fused_loss=fused_loss,
            compile=compile,
        )
        module.configure_model()
        return module

    eager, compiled = make(False), make(True)
    assert compiled._compiled_nll_sum is not None
    g = torch.Generator().manual_seed(1)
    x, y = torch.randint(0, 64, (2, 8), generator=g), torch.randint(0, 64, (2, 8), generator=g)
    y[0, :3] = -100
    losses = [m.nll_sum(x, y) for m in (eager, compiled)]
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-5)
    for loss in losses:
        loss.backward()
    for (name, a), (_, b) in zip(eager.named_parameters(), compiled.named_parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6, msg=name)


class StubTrainer:
    def __init__(self, device, max_steps):
        import types

        self.strategy = types.SimpleNamespace(root_device=torch.device(device))
        self.max_steps = max_steps


@pytest.mark.parametrize(
    "mode, device, max_steps, expected",
    [
        ("auto", "cpu", 100_000, False),  # measured: does not pay on a CPU
        ("auto", "cuda", 999, False),
        ("auto", "cuda", 1000, True),
        ("auto", "cuda", -1, True),  # no step limit: a long run
        (True, "cpu", 10, True),
        (False, "cuda", 10_000, False),
    ],
)
def test_compile_auto_choice(mode, device, max_steps, expected):
    module = CausalLMModule(model="tiny", vocab_size=64, compile=mode)
    module._trainer = StubTrainer(device, max_steps)
    compiled, reason = module._compile_choice()
    assert compiled is expected
    assert reason == "set by you" if isinstance(mode, bool) else reason.startswith("auto:")

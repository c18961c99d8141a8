import pytest
import torch
from torch import nn

from nexttoken.models.gpt import GPT, GPTConfig
from nexttoken.models.hf import load_hf_causal_lm
from nexttoken.models.protocol import CausalLM, evaluating


def tiny_gpt() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=32, block_size=16, n_layer=1, n_head=2, n_embd=16)).eval()


@pytest.fixture(scope="module", params=["gpt", "hf-gpt2", "hf-llama"])
def model(request):
    if request.param == "gpt":
        return tiny_gpt()
    folder = request.getfixturevalue("tiny_gpt2_dir" if request.param == "hf-gpt2" else "tiny_llama_dir")
    return load_hf_causal_lm(folder)[0]


def test_gpt_and_the_hf_adapter_are_causal_lms(model):
    assert isinstance(model, CausalLM)
    assert not isinstance(nn.Linear(2, 2), CausalLM)


def test_what_the_protocol_promises(model):
    vocab, width = model.lm_head.weight.shape
    x = torch.randint(0, vocab, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(x)
        assert logits.shape == (2, 7, vocab)
        hidden = model.hidden(x)
        assert hidden.shape == (2, 7, width)
        assert model.logits_are_linear
        # The fused loss relies on this: the logits are exactly the head applied to the hidden states.
        torch.testing.assert_close(model.lm_head(hidden), logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model(x, logits_to_keep=3), logits[:, -3:], rtol=1e-5, atol=1e-5)
        # Causal: changing the last token changes no earlier position's logits.
        changed = x.clone()
        changed[:, -1] = (changed[:, -1] + 1) % vocab
        torch.testing.assert_close(model(changed)[:, :-1], logits[:, :-1], rtol=1e-5, atol=1e-5)
    assert model.max_context == (16 if isinstance(model, GPT) else 64)
    out = model.generate(x[:1], 3, temperature=0)
    assert out.shape == (1, 10) and torch.equal(out[:, :7], x[:1])


class Probe(nn.Module):
    """Dropout only: in train mode two calls differ, in eval mode they are the identity."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Sequential(nn.Dropout(0.5))

    def forward(self, x):
        return self.inner(x)


@pytest.mark.parametrize("was_training", [True, False])
def test_evaluating_switches_to_eval_and_restores_the_mode(was_training):
    probe = Probe().train(was_training)
    x = torch.ones(1000)
    with evaluating(probe) as same:
        assert same is probe
        assert not probe.training and not probe.inner.training and not probe.inner[0].training
        assert torch.equal(probe(x), x)  # no dropout inside the block
    assert probe.training is was_training and probe.inner[0].training is was_training
    if was_training:
        assert (probe(x) == 0).sum() > 300  # dropout is back: about half the values are zeroed


def test_evaluating_restores_the_mode_even_when_the_block_raises():
    probe = Probe().train()
    with pytest.raises(RuntimeError, match="mid-evaluation"):
        with evaluating(probe):
            assert not probe.training
            raise RuntimeError("mid-evaluation")
    assert probe.training and probe.inner[0].training

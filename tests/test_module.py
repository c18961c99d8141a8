import math
import threading
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from conftest import split_documents
from nexttoken.data.datamodule import TextDataModule
from nexttoken.data.documents import find_documents
from nexttoken.loss import count_scored, fused_next_token_loss, next_token_loss
from nexttoken.models.lora import LoraSettings
from nexttoken.training.module import CausalLMModule
from test_datamodule import write_corpus

V, T = 32, 8


class SGDModule(CausalLMModule):
    """Plain SGD at ``lr``: the parameter change of one step IS minus lr times the gradient."""

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)


def make_module(cls=SGDModule, vocab_size=V, lr=1.0, **kwargs):
    torch.manual_seed(0)
    module = cls(
        model="tiny", vocab_size=vocab_size, block_size=T, n_layer=2, n_head=2, n_embd=16, lr=lr, **kwargs
    )
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


def quiet_trainer(**kwargs) -> L.Trainer:
    settings = dict(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    return L.Trainer(**{**settings, **kwargs})


def token_mean_gradient(module, batches) -> dict[str, torch.Tensor]:
    """Autograd of Σnll / Σscored over ``batches`` at the module's current weights, no Lightning."""
    module.zero_grad(set_to_none=True)
    nll = sum(next_token_loss(module(x), y, reduction="sum") for x, y in batches)
    (nll / sum(count_scored(y) for _, y in batches)).backward()
    grads = {n: p.grad.detach().clone() for n, p in module.named_parameters()}
    module.zero_grad(set_to_none=True)
    return grads


def one_step_delta(module, batches, accumulate):
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    trainer = quiet_trainer(max_steps=1, accumulate_grad_batches=accumulate)
    trainer.fit(module, train_dataloaders=DataLoader(batches, batch_size=None))
    return {n: before[n] - p.detach() for n, p in module.named_parameters()}


# --------------------------------------------------------------------------- training gradient
def test_accumulated_gradient_equals_whole_batch_token_mean():
    batches = micro_batches()
    accumulated = one_step_delta(make_module(), batches, accumulate=4)
    whole = (torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches]))
    single = one_step_delta(make_module(), [whole], accumulate=1)

    # Independent reference: autograd of the token mean of the whole batch, no Lightning.
    reference = token_mean_gradient(make_module(), [whole])
    for name, grad in reference.items():
        torch.testing.assert_close(accumulated[name], grad, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(single[name], grad, atol=1e-6, rtol=1e-5)


def test_mean_of_micro_batch_means_would_differ():
    # Guard that the data above really tells the two rules apart.
    batches = micro_batches()
    module = make_module()
    means = [next_token_loss(module(x), y) for x, y in batches]
    whole = next_token_loss(module(torch.cat([b[0] for b in batches])), torch.cat([b[1] for b in batches]))
    assert abs(sum(means).item() / 4 - whole.item()) > 1e-3


class ParameterSnapshots(L.Callback):
    """The module's parameters after every optimizer step."""

    def __init__(self) -> None:
        self.after_step: list[dict[str, torch.Tensor]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step > len(self.after_step):
            self.after_step.append({n: p.detach().clone() for n, p in pl_module.named_parameters()})


def test_each_optimizer_step_uses_only_its_own_window():
    # Two windows of two micro-batches with different token counts: if the window's sums carried
    # over into the next window, step 2 would divide by the tokens of both windows.
    lr = 0.5
    batches = micro_batches()
    module = make_module(lr=lr)
    start = {n: p.detach().clone() for n, p in module.named_parameters()}
    snapshots = ParameterSnapshots()
    trainer = quiet_trainer(max_steps=2, accumulate_grad_batches=2, callbacks=[snapshots])
    trainer.fit(module, train_dataloaders=DataLoader(batches, batch_size=None))
    assert trainer.global_step == 2 and len(snapshots.after_step) == 2

    reference = make_module()
    before = start
    for window, after in zip((batches[:2], batches[2:]), snapshots.after_step, strict=True):
        with torch.no_grad():  # the reference walks the same path as the trained module
            for name, p in reference.named_parameters():
                p.copy_(before[name])
        grads = token_mean_gradient(reference, window)
        for name, grad in grads.items():
            torch.testing.assert_close(before[name] - after[name], lr * grad, atol=1e-6, rtol=1e-5)
        before = after


class ThreadCollective:
    """A sum or max all-reduce between threads that stand in for processes: every rank blocks until
    all have contributed, as a real collective does."""

    def __init__(self, world_size: int) -> None:
        self.barrier = threading.Barrier(world_size, timeout=30)
        self.slots: list[torch.Tensor | None] = [None] * world_size

    def all_reduce(self, rank: int, tensor: torch.Tensor, op: str) -> torch.Tensor:
        self.slots[rank] = tensor.clone()
        self.barrier.wait()
        stacked = torch.stack(self.slots)
        total = stacked.sum(0) if op == "sum" else stacked.max(0).values
        self.barrier.wait()  # nobody overwrites a slot before every rank has read them all
        return total


class RankStrategy:
    """The part of a Lightning strategy the module's step hooks use: ``reduce`` (sum or max)."""

    def __init__(self, collective: ThreadCollective, rank: int) -> None:
        self.collective, self.rank = collective, rank

    def reduce(self, tensor, group=None, reduce_op="mean"):
        assert reduce_op in ("sum", "max")
        return self.collective.all_reduce(self.rank, tensor, reduce_op)


def test_gradient_rescale_over_two_processes_is_the_global_token_mean():
    # Each "rank" accumulates two micro-batches (Lightning divides each loss by the accumulation
    # count), DDP averages the gradients over ranks, then the hook must turn that into the gradient of
    # Σnll / Σtokens over all four micro-batches. The ranks hold different token counts (16 + 13
    # against 7 + 2), so a per-rank count, or a missing world size, gives a different gradient.
    world_size, accumulate = 2, 2
    shards = [micro_batches()[:2], micro_batches()[2:]]
    collective = ThreadCollective(world_size)
    ranks, logged = [], []
    for rank in range(world_size):
        module = make_module()
        module.trainer = SimpleNamespace(
            world_size=world_size,
            accumulate_grad_batches=accumulate,
            strategy=RankStrategy(collective, rank),
            precision_plugin=SimpleNamespace(),  # 32-true: no loss scaler
            global_step=0,
            max_steps=-1,
            should_stop=False,
            _logger_connector=SimpleNamespace(should_update_logs=True),  # the logger writes every step
        )
        module.log = lambda name, value, **kwargs: logged.append((name, float(value)))
        ranks.append(module)

    def accumulate_window(module, shard):  # the ranks run at once: the first batch agrees a scale
        for i, batch in enumerate(shard):
            module.on_train_batch_start(batch, i)
            (module.training_step(batch, i) / accumulate).backward()

    with ThreadPoolExecutor(world_size) as pool:
        for done in [
            pool.submit(accumulate_window, m, shard) for m, shard in zip(ranks, shards, strict=True)
        ]:
            done.result()
    with torch.no_grad():  # DDP: every rank ends the backward pass with the mean over ranks
        for params in zip(*(m.parameters() for m in ranks), strict=True):
            mean = sum(p.grad for p in params) / world_size
            for p in params:
                p.grad.copy_(mean)

    def optimizer_hook(module):
        module.on_before_optimizer_step(torch.optim.SGD(module.parameters(), lr=0.1))

    with ThreadPoolExecutor(world_size) as pool:
        for done in [pool.submit(optimizer_hook, m) for m in ranks]:
            done.result()

    everything = shards[0] + shards[1]
    expected = token_mean_gradient(make_module(), everything)
    for module in ranks:
        for name, p in module.named_parameters():
            torch.testing.assert_close(p.grad, expected[name], atol=1e-7, rtol=1e-5)
    reference = make_module()
    loss = sum(next_token_loss(reference(x), y, reduction="sum") for x, y in everything)
    loss = (loss / sum(count_scored(y) for _, y in everything)).item()
    assert [v for n, v in logged if n == "train/loss"] == pytest.approx([loss] * world_size, rel=1e-6)


# --------------------------------------------------------------------------- gradient clipping
class ClipSpy(CausalLMModule):
    """Records the gradient norm after the module's rescale (before clipping) and the gradients
    the optimizer stepped with (after clipping)."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.before_clipping: list[torch.Tensor] = []
        self.stepped_with: list[torch.Tensor] = []

    def on_before_optimizer_step(self, optimizer) -> None:
        super().on_before_optimizer_step(optimizer)
        self.before_clipping.append(self._flat_grads())

    def configure_optimizers(self):
        config = super().configure_optimizers()
        config["optimizer"].register_step_post_hook(
            lambda optimizer, args, kwargs: self.stepped_with.append(self._flat_grads())
        )
        return config

    def _flat_grads(self) -> torch.Tensor:
        return torch.cat([p.grad.detach().flatten().clone() for p in self.parameters() if p.grad is not None])


@pytest.mark.parametrize("algorithm", ["norm", "value"])
def test_bf16_mixed_clips_the_gradients_the_fused_optimizer_steps_with(algorithm):
    # Lightning refuses to clip for fused optimizers under mixed precision; bf16 has no loss
    # scaler, so the module clips the true gradients itself.
    clip = 1e-2
    torch.manual_seed(0)
    module = ClipSpy(model="tiny", vocab_size=V, block_size=T, n_layer=1, n_head=2, n_embd=16)
    trainer = quiet_trainer(
        precision="bf16-mixed", gradient_clip_val=clip, gradient_clip_algorithm=algorithm, max_steps=2
    )
    module.configure_model()
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    trainer.fit(module, train_dataloaders=DataLoader(micro_batches(), batch_size=None))
    assert trainer.optimizers[0].defaults["fused"] is True
    assert trainer.global_step == 2 and len(module.stepped_with) == 2
    for raw, stepped in zip(module.before_clipping, module.stepped_with, strict=True):
        if algorithm == "norm":
            assert raw.norm().item() > 10 * clip
            assert stepped.norm().item() == pytest.approx(clip, rel=1e-4)
            torch.testing.assert_close(stepped, raw * (clip / raw.norm()), rtol=1e-4, atol=1e-9)
        else:
            assert raw.abs().max().item() > 10 * clip
            torch.testing.assert_close(stepped, raw.clamp(-clip, clip))
    assert all(torch.isfinite(p).all() for p in module.parameters())
    assert any(not torch.equal(before[n], p) for n, p in module.named_parameters())


# --------------------------------------------------------------------------- loss paths
def test_initial_loss_is_about_ln_vocab():
    torch.manual_seed(0)
    module = CausalLMModule(model="tiny", vocab_size=512, block_size=64)
    module.configure_model()
    x = torch.randint(0, 512, (4, 64))
    loss = next_token_loss(module(x), torch.randint(0, 512, (4, 64)))
    assert loss.item() == pytest.approx(math.log(512), abs=0.15)


@pytest.mark.parametrize(
    "mode, vocab_size, expected",
    # auto fuses once the vocabulary is at least 8x the width (16 here): 32 is not, 128 is.
    [("auto", V, False), ("auto", 128, True), ("on", V, True), ("off", V, False), ("off", 128, False)],
)
def test_fused_loss_choice_and_equivalence(mode, vocab_size, expected):
    module = make_module(vocab_size=vocab_size, fused_loss=mode)
    assert module.uses_fused_loss is expected
    with torch.no_grad():  # spread the logits so that a wrong reduction cannot hide in ln(V) noise
        module.model.lm_head.weight.mul_(30)
    g = torch.Generator().manual_seed(2)
    x = torch.randint(0, vocab_size, (2, T), generator=g)
    y = torch.randint(0, vocab_size, (2, T), generator=g)
    y[0, :5] = -100
    network, head = module.model, module.model.lm_head
    fused = fused_next_token_loss(network.hidden(x), head.weight, y, reduction="sum")
    plain = next_token_loss(network(x), y, reduction="sum")
    # And by hand: -log softmax at each scored target, in float64.
    log_probs = torch.log_softmax(network(x).double(), dim=-1)
    scored = y != -100
    by_hand = -log_probs[scored].gather(1, y[scored].unsqueeze(1)).sum()
    got = module.nll_sum(x, y)
    for reference in (fused, plain, by_hand.float()):
        torch.testing.assert_close(got, reference, rtol=1e-5, atol=1e-4)


def test_bad_fused_loss_mode():
    with pytest.raises(ValueError, match="fused_loss"):
        CausalLMModule(fused_loss="maybe")


# --------------------------------------------------------------------------- validation
@pytest.mark.parametrize("fused_loss", ["on", "off"])
def test_validate_scores_the_padded_stream_as_one_token_mean(tmp_path, fused_loss):
    # Variable-length documents packed into blocks of T; the last block is padded (ignored targets),
    # and the batches hold different numbers of scored tokens.
    corpus = write_corpus(tmp_path / "corpus", n_docs=9)
    dm = TextDataModule(
        path=[str(corpus)],
        tokenizer="bytes",
        block_size=T,
        batch_size=4,
        val_batch_size=5,
        val_fraction=0.25,
        cache_dir=str(tmp_path / "cache"),
    )
    dm.prepare_data()
    dm.setup("validate")
    stream = torch.from_numpy(np.load(dm.cache.val).astype(np.int64))
    batches = list(dm.val_dataloader())
    padded = sum(int((y == -100).sum()) for _, y, _ in batches)
    assert padded > 0 and len({int(count_scored(y)) for _, y, _ in batches}) > 1

    module = make_module(CausalLMModule, vocab_size=dm.vocab_size, fused_loss=fused_loss)
    with torch.no_grad():
        module.model.lm_head.weight.mul_(30)  # per-token losses far apart: batch means differ
    quiet_trainer(limit_val_batches=1.0).validate(module, datamodule=dm, verbose=False)
    got = module.last_validation

    # Independent: the stream scored block by block with next_token_loss, no padding, no batches.
    nll = 0.0
    with torch.no_grad():
        for start in range(0, len(stream) - 1, T):
            block = stream[start : start + T + 1].unsqueeze(0)
            nll += next_token_loss(module.model(block[:, :-1]), block[:, 1:], reduction="sum").double().item()
    scored = len(stream) - 1
    _, val_docs = split_documents(find_documents([corpus]), 0.25)
    text_bytes = len(b"".join(doc.text.encode("utf-8") for doc in val_docs))
    assert got["tokens"] == scored
    assert got["bytes"] == text_bytes
    assert got["loss"] == pytest.approx(nll / scored, rel=1e-6)
    assert got["perplexity"] == pytest.approx(math.exp(nll / scored), rel=1e-6)
    assert got["bits_per_byte"] == pytest.approx(nll / (math.log(2) * text_bytes), rel=1e-6)
    # The data tells the rules apart: a mean of batch means is far outside the tolerance.
    with torch.no_grad():
        means = [next_token_loss(module.model(x), y).item() for x, y, _ in batches]
    assert abs(sum(means) / len(means) - nll / scored) > 1e-3 * nll / scored


def test_the_default_learning_rate_follows_what_trains(tiny_llama_dir):
    from nexttoken.training.module import DEFAULT_LR

    assert CausalLMModule(model="tiny").peak_lr() == DEFAULT_LR["scratch"] == 3e-3
    assert CausalLMModule(model=str(tiny_llama_dir)).peak_lr() == DEFAULT_LR["fine-tune"] == 1e-4
    assert (
        CausalLMModule(model=str(tiny_llama_dir), lora=LoraSettings(r=4)).peak_lr()
        == DEFAULT_LR["lora"]
        == 1e-3
    )
    assert CausalLMModule(model=str(tiny_llama_dir), lr=0.02).peak_lr() == 0.02  # --model.lr wins

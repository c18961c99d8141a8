"""Run by tests/test_distributed.py: one optimizer step under Lightning's DDP on CPU (gloo), two
ranks whose micro-batches hold very different numbers of ignored positions, plain SGD with lr=1
so the parameter change is minus the gradient. Rank 0 saves that change to argv[1].

With ``sft`` as argv[2], the micro-batches are chat examples of different lengths instead: rank 0
reads four as two padded batches of two, rank 1 four as one packed row of three and one alone.
With ``pref``, preference pairs under DPO: rank 0 reads pairs [0], [1, 2], rank 1 [3, 4, 5, 6]
(packed) and [7]."""

import sys

import lightning as L
import torch
from torch.utils.data import DataLoader

from nexttoken.training.module import CausalLMModule

V, T = 32, 8


def rank_batches(rank: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Two micro-batches per rank; the test rebuilds the same tensors for its reference."""
    g = torch.Generator().manual_seed(100 + rank)
    batches = []
    for ignored in ((0, 2), (11, 15))[rank]:
        input_ids = torch.randint(0, V, (2, T), generator=g)
        targets = torch.randint(0, V, (2, T), generator=g)
        targets.view(-1)[:ignored] = -100
        batches.append((input_ids, targets))
    return batches


class SGDModule(CausalLMModule):
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1.0)

    def train_dataloader(self):
        return DataLoader(rank_batches(self.global_rank), batch_size=None)


def make_module() -> SGDModule:
    torch.manual_seed(0)
    module = SGDModule(model="tiny", vocab_size=V, block_size=T, n_layer=1, n_head=2, n_embd=16)
    module.configure_model()
    return module


def sft_rank_batches(rank: int) -> list[tuple[torch.Tensor, ...]]:
    from nexttoken.data.sft import collate
    from test_sft import ROW, sft_examples

    examples = sft_examples()
    if rank == 0:
        layouts = [([[0], [1]], None), ([[2], [3]], None)]
    else:
        layouts = [([[4, 5, 6]], ROW), ([[7]], None)]
    return [collate(examples, rows, pad_id=0, width=width).for_training() for rows, width in layouts]


class SFTModule(SGDModule):
    def train_dataloader(self):
        return DataLoader(sft_rank_batches(self.global_rank), batch_size=None)


def make_sft_module() -> SFTModule:
    from test_sft import VOCAB, make_module

    return make_module(VOCAB, SFTModule)


def pref_rank_batches(rank: int) -> list:
    from nexttoken.data.preferences import collate_pairs
    from test_preferences import ROW, chatml, encoded_pairs

    pairs = encoded_pairs(chatml())
    layouts = [([0], None), ([1, 2], None)] if rank == 0 else [([3, 4, 5, 6], ROW), ([7], None)]
    return [collate_pairs(pairs, group, pad_id=0, packed_width=width) for group, width in layouts]


def make_pref_module():
    from test_preferences import make_module

    class PrefModule(SGDModule):
        def train_dataloader(self):
            return DataLoader(pref_rank_batches(self.global_rank), batch_size=None, collate_fn=lambda b: b)

    return make_module(PrefModule, objective="dpo")


if __name__ == "__main__":
    kind = sys.argv[2:]
    module = (
        make_sft_module() if kind == ["sft"] else make_pref_module() if kind == ["pref"] else make_module()
    )
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_steps=1,
        accumulate_grad_batches=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
    )
    trainer.fit(module)
    if trainer.global_rank == 0:
        torch.save({n: before[n] - p.detach() for n, p in module.named_parameters()}, sys.argv[1])

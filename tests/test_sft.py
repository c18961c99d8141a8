"""SFT batches: fitting to the block, packing, padding, collation, and the exact scoreboard."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from nexttoken.data.chat import Conversation, Example, Message, resolve_chat_template
from nexttoken.data.packing import shift
from nexttoken.data.sft import collate, count_examples, fit_to_block, pack, positions, train_plan, val_plan
from nexttoken.data.tokenizers import build_tokenizer
from nexttoken.errors import DataError
from nexttoken.loss import IGNORE_INDEX, next_token_loss
from nexttoken.training.module import CausalLMModule
from test_module import SGDModule, one_step_delta

BLOCK = 96
ROW = 2 * BLOCK  # packed rows in the scoreboard tests (the model's context is ROW)
VOCAB = 259  # the bytes tokenizer's


@pytest.fixture(scope="module")
def template():
    return resolve_chat_template(build_tokenizer("bytes"))


def conversation(i: int) -> Conversation:
    """Conversation ``i``: 1 or 2 turns, lengths varying with ``i``."""
    messages = [Message("user", "q" * (3 + 5 * i)), Message("assistant", "a" * (2 + 3 * (i % 4)))]
    if i % 3 == 0:
        messages += [Message("user", "more?"), Message("assistant", "b" * (1 + i))]
    return Conversation(messages, f"record {i + 1}")


def sft_examples() -> list[Example]:
    """8 chat examples of different lengths (also read by ddp_gradient_script.py)."""
    template = resolve_chat_template(build_tokenizer("bytes"))
    return [template.encode(conversation(i)) for i in range(8)]


@pytest.fixture(scope="module")
def examples():
    return sft_examples()


def alone(example: Example) -> tuple[torch.Tensor, torch.Tensor]:
    """One example's (inputs, targets) built without sft.py: the targets are the next tokens where
    the next token is scored."""
    tokens = torch.from_numpy(example.tokens)
    targets = torch.where(torch.from_numpy(example.scored[1:]), tokens[1:], IGNORE_INDEX)
    return tokens[None, :-1], targets[None]


# --------------------------------------------------------------------------- fitting to the block


def test_fit_to_block_cuts_from_the_left_or_drops(examples):
    longest = max(len(e) for e in examples)
    block = longest - 10
    kept, report = fit_to_block(examples, block, "left")
    too_long = [e for e in examples if len(e) > block + 1]
    assert report.truncated == len(too_long) > 0 and report.kept == len(kept) == len(examples)
    for original, fitted in zip(examples, kept):
        keep = min(len(original), block + 1)
        assert fitted.tokens.tolist() == original.tokens[-keep:].tolist()  # the end of the conversation
        assert fitted.scored.tolist() == original.scored[-keep:].tolist()
    dropped, report = fit_to_block(examples, block, "drop")
    assert report.too_long == len(too_long) and len(dropped) == len(examples) - len(too_long)
    assert report.lines() == [f"{len(too_long)} of 8 examples are longer than {block} tokens: dropped"]
    with pytest.raises(DataError, match="^truncation must be one of"):
        fit_to_block(examples, block, "right")


def test_examples_without_scored_tokens_are_counted_and_dropped(template, examples):
    # A two-turn conversation whose last turn is a long user message: cut from the left, its reply is gone.
    long_tail = template.encode(
        Conversation(
            [Message("user", "x"), Message("assistant", "y"), Message("user", "z" * 200)], "record 9"
        )
    )
    kept, report = fit_to_block([*examples, long_tail], BLOCK, "left")
    assert len(kept) == 8 and report.no_scored == 1
    assert f"1 of 9 examples have no response tokens within {BLOCK} tokens: dropped" in report.lines()
    with pytest.raises(
        DataError, match=r"none of the 1 examples can be trained on \(.*1 of 1 examples have no"
    ):
        fit_to_block([long_tail], BLOCK, "left")


def test_examples_with_marker_text_are_dropped_and_named(template, examples):
    injected = template.encode(
        Conversation([Message("user", "<|im_end|>"), Message("assistant", "ok")], "rec 5")
    )
    kept, report = fit_to_block([*examples, injected], BLOCK)
    assert len(kept) == 8 and report.marker_text == 1
    assert "(first: rec 5)" in report.lines()[0]


# --------------------------------------------------------------------------- rows and batches


def test_pack_fills_rows_without_overflow():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 60, size=200).tolist()
    rows = pack(lengths, 64)
    assert sorted(i for row in rows for i in row) == list(range(200))
    assert all(sum(lengths[i] for i in row) <= 64 for row in rows)
    assert len(rows) <= math.ceil(sum(lengths) / 64) * 1.1  # best-fit decreasing wastes little
    assert pack(lengths, 64) == rows
    with pytest.raises(ValueError, match="does not fit"):
        pack([65], 64)


def test_collate_shifts_each_example_with_its_mask(examples):
    padded = collate(examples, [[0], [1], [2]], pad_id=0)
    assert padded.document_ids is None
    assert padded.input_ids.shape[1] == max(positions(examples[i]) for i in range(3))
    for r in range(3):
        x, y = alone(examples[r])
        n = x.shape[1]
        assert torch.equal(padded.input_ids[r, :n], x[0]) and torch.equal(padded.targets[r, :n], y[0])
        assert (padded.targets[r, n:] == IGNORE_INDEX).all()  # padding is never scored
        assert padded.n_bytes[r] == int(examples[r].nbytes[1:][examples[r].scored[1:]].sum())
    packed = collate(examples, [[0, 1], [2]], pad_id=0, width=BLOCK)
    n0, n1 = positions(examples[0]), positions(examples[1])
    assert packed.document_ids[0].tolist() == [1] * n0 + [2] * n1 + [0] * (BLOCK - n0 - n1)
    x1, y1 = alone(examples[1])
    assert torch.equal(packed.input_ids[0, n0 : n0 + n1], x1[0])
    assert torch.equal(packed.targets[0, n0 : n0 + n1], y1[0])  # B's first token is never A's target
    assert packed.targets[0, n0 - 1] == alone(examples[0])[1][0, -1]
    assert len(packed.for_training()) == 3 and len(padded.for_training()) == 2
    assert len(packed.for_validation()) == 4 and len(padded.for_validation()) == 3


def test_train_plan_shares_rows_between_ranks_and_groups_lengths(template):
    many, _ = fit_to_block([template.encode(conversation(i % 23)) for i in range(40)], BLOCK)
    for packing in (False, True):
        plans = [
            train_plan(many, 4, block_size=BLOCK, packing=packing, seed=1, epoch=0, rank=r, world_size=2)
            for r in range(2)
        ]
        assert len(plans[0]) == len(plans[1]) > 0
        seen = [i for plan in plans for batch in plan for row in batch for i in row]
        assert len(seen) == len(set(seen))  # no example twice in an epoch
        for batch in plans[0]:
            assert all(sum(positions(many[i]) for i in row) <= BLOCK for row in batch)
        again = train_plan(many, 4, block_size=BLOCK, packing=packing, seed=1, epoch=1, rank=0, world_size=2)
        assert again != plans[0]  # a new order each epoch
    # Without packing, a batch holds examples of similar length: less padding than random batches.
    plan = train_plan(many, 4, block_size=BLOCK, packing=False, seed=1, epoch=0)
    lengths = np.array([positions(e) for e in many])

    def padding(batches):
        return sum(len(b) * max(lengths[b]) - lengths[b].sum() for b in batches)

    grouped = [[row[0] for row in batch] for batch in plan]
    shuffled = np.random.default_rng(0).permutation(len(many))[: 4 * len(plan)].reshape(-1, 4)
    assert padding(grouped) < padding(shuffled) / 3


def test_val_plan_scores_every_example_once_across_ranks(examples):
    for packing in (False, True):
        plans = [
            val_plan(examples, 3, block_size=BLOCK, packing=packing, rank=r, world_size=2) for r in range(2)
        ]
        seen = sorted(i for plan in plans for batch in plan for row in batch for i in row)
        assert seen == list(range(len(examples)))


# --------------------------------------------------------------------------- the scoreboard


def make_module(
    vocab_size: int, cls: type[CausalLMModule] = SGDModule, fused_loss: str = "auto"
) -> CausalLMModule:
    torch.manual_seed(0)
    module = cls(
        model="tiny",
        vocab_size=vocab_size,
        block_size=ROW,
        n_layer=2,
        n_head=2,
        n_embd=16,
        fused_loss=fused_loss,
        lr=1.0,  # SGD at lr 1: a step's parameter change is minus the gradient
    )
    module.configure_model()
    return module


def reference_gradient(examples, vocab_size: int) -> dict[str, torch.Tensor]:
    """Autograd of Σ nll / Σ scored over the examples, each run alone (no collation, no Lightning)."""
    module = make_module(vocab_size)
    total = sum(e.n_scored for e in examples)
    nll = sum(next_token_loss(module(x), y, reduction="sum") for x, y in map(alone, examples))
    (nll / total).backward()
    return {n: p.grad for n, p in module.named_parameters()}


@pytest.mark.parametrize("fused_loss", ["on", "off"])
def test_gradient_is_the_token_mean_however_the_examples_are_batched(template, examples, fused_loss):
    """8 variable-length examples as 8 micro-batches of 1, 2 of 4, 1 of 8 (padded) and packed rows:
    the same gradient as the token mean over all of them, to 1e-6 (fused and plain loss paths)."""
    vocab = template.tokenizer.vocab_size
    assert vocab == VOCAB and len({len(e) for e in examples}) == 8
    reference = reference_gradient(examples, vocab)
    layouts = {
        "8 x 1": ([[[i]] for i in range(8)], 8, None),
        "2 x 4": ([[[i] for i in range(4)], [[i] for i in range(4, 8)]], 2, None),
        "1 x 8": ([[[i] for i in range(8)]], 1, None),
        "packed": ([pack([positions(e) for e in examples], ROW)], 1, ROW),
    }
    for name, (batches, accumulate, width) in layouts.items():
        collated = [collate(examples, rows, pad_id=0, width=width).for_training() for rows in batches]
        if name == "packed":
            assert len(collated[0]) == 3 and collated[0][0].shape[0] <= 3  # several examples per row
        delta = one_step_delta(make_module(vocab, fused_loss=fused_loss), collated, accumulate)
        for param, grad in reference.items():
            torch.testing.assert_close(delta[param], grad, atol=1e-6, rtol=1e-5, msg=f"{name}: {param}")


@pytest.mark.parametrize("packing", [False, True])
def test_validation_scores_response_tokens_only(template, examples, packing):
    vocab = template.tokenizer.vocab_size
    module = make_module(vocab).eval()
    width = ROW if packing else None
    with torch.no_grad():
        for batch in val_plan(examples, 2, block_size=ROW, packing=packing):
            module.validation_step(collate(examples, batch, pad_id=0, width=width).for_validation(), 0)
        nll = sum(next_token_loss(module(x), y, reduction="sum").item() for x, y in map(alone, examples))
    counts = count_examples(examples)
    assert int(module.val_metrics.tokens) == counts.response_tokens == sum(e.n_scored for e in examples)
    assert int(module.val_metrics.bytes) == counts.response_bytes
    results = module.val_metrics.compute()
    assert results["loss"].item() == pytest.approx(nll / counts.response_tokens, rel=1e-6)
    assert results["bits_per_byte"].item() == pytest.approx(
        nll / (math.log(2) * counts.response_bytes), rel=1e-6
    )
    # The counts say what was (not) scored.
    targets = sum(len(e) - 1 for e in examples)
    assert counts.examples == 8 and counts.prompt_tokens_ignored == targets - counts.response_tokens > 0


def test_shift_is_the_one_shift(examples):
    # collate's rows are exactly packing.shift of each example (the mask shifted with the targets).
    batch = collate(examples, [[3]], pad_id=0)
    inputs, targets = shift(examples[3].tokens)
    assert batch.input_ids[0].tolist() == inputs.tolist()
    assert batch.targets[0].tolist() == np.where(shift(examples[3].scored)[1], targets, IGNORE_INDEX).tolist()

"""``--data.val_tokens`` on chat/instruction data: a validation scores the first held-out examples,
whole, while their response tokens stay within the cap, and says exactly what it scores."""

import json

import numpy as np
import pytest

from nexttoken.cli import main
from nexttoken.data.datamodule import TextDataModule
from nexttoken.loss import IGNORE_INDEX
from test_sft_cache import write_chats


def chat_data(tmp_path, val_tokens, **kwargs) -> TextDataModule:
    chats = write_chats(tmp_path / "chats" / "chats.jsonl", 40)
    data = TextDataModule(
        path=str(chats), tokenizer="bytes", val_fraction=0.3, val_tokens=val_tokens,
        cache_dir=str(tmp_path / "cache"), **kwargs,
    )  # fmt: skip
    data.prepare_data()
    data.setup()
    return data


def by_hand(data: TextDataModule, count: int) -> tuple[int, int]:
    """Response tokens and their UTF-8 bytes of the first ``count`` held-out examples, from their arrays."""
    examples = [data.examples.val[i] for i in range(count)]
    tokens = sum(int(e.scored[1:].sum()) for e in examples)
    return tokens, sum(int(e.nbytes[1:][e.scored[1:]].sum()) for e in examples)


def scored_by_loaders(data: TextDataModule, world_size: int) -> tuple[int, int]:
    tokens = nbytes = 0
    for rank in range(world_size):
        for batch in data.make_val_loader(rank, world_size):
            tokens += int((batch[1] != IGNORE_INDEX).sum())
            nbytes += int(batch[2].sum())
    return tokens, nbytes


@pytest.mark.parametrize("packing", [True, False])
def test_validation_scores_whole_examples_within_the_cap(tmp_path, packing):
    everything = chat_data(tmp_path, "all", packing=packing)
    held_out = len(everything.examples.val)
    cumulative = np.cumsum([everything.examples.val[i].n_scored for i in range(held_out)])
    assert held_out >= 8
    assert scored_by_loaders(everything, 2) == by_hand(everything, held_out)
    for cap, expected in (
        (int(cumulative[4]), 5),  # exactly five examples' responses
        (int(cumulative[4]) + 1, 5),  # the sixth would cross it: left out whole
        (int(cumulative[0]) - 1, 1),  # below the first example: still one
        (int(cumulative[-1]) + 10, held_out),
    ):
        data = chat_data(tmp_path, cap, packing=packing)
        assert data.scored_val_examples() == expected, cap
        counts = data.scored_val_counts()
        assert (counts.examples, counts.response_tokens, counts.response_bytes) == (
            expected,
            *by_hand(data, expected),
        )
        for world_size in (1, 2):
            assert scored_by_loaders(data, world_size) == by_hand(data, expected), (cap, world_size)


@pytest.mark.slow
def test_fit_reports_and_prints_what_a_capped_chat_validation_scores(tmp_path, monkeypatch, capfd):
    monkeypatch.chdir(tmp_path)
    probe = chat_data(tmp_path, "all")
    cumulative = np.cumsum([probe.examples.val[i].n_scored for i in range(len(probe.examples.val))])
    cap = int(cumulative[3]) + 2
    tokens, nbytes = by_hand(probe, 4)
    argv = ["fit", "--data.path", str(tmp_path / "chats" / "chats.jsonl"), "--data.tokenizer", "bytes"]
    argv += ["--data.val_fraction", "0.3", "--data.cache_dir", str(tmp_path / "cache")]
    argv += ["--model.n_layer", "1", "--model.n_head", "2", "--model.n_embd", "32"]
    assert main([*argv, "--data.val_tokens", str(cap), "--trainer.max_steps", "0"]) == 0
    out = capfd.readouterr().out
    line = (
        f"validation: the first 4 examples of the {len(cumulative)} held-out ({tokens:,} response tokens, "
        f"{nbytes:,} bytes); --data.val_tokens all scores every one"
    )
    assert line in out
    report = json.loads((tmp_path / "runs" / "version_0" / "report.json").read_text())
    assert report["validation_examples"]["examples"] == 4
    assert (report["validation"]["tokens"], report["validation"]["bytes"]) == (tokens, nbytes)
    assert f"validation over 4 held-out examples: {tokens:,} response tokens ({nbytes:,} bytes)" in out

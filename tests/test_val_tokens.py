"""``--data.val_tokens``: a validation scores the held-out stream's first N targets (250,000 by
default), exactly: the tokens, the bytes and the compressors' text are those N targets' and no
others; ``all`` scores every one; the split does not move with the cap."""

import json
import random
import re

import numpy as np
import pytest

from nexttoken.cli import main
from nexttoken.data.datamodule import DEFAULT_VAL_TOKENS, TextDataModule
from nexttoken.data.loaders import ValBatches
from nexttoken.errors import DataError
from nexttoken.loss import IGNORE_INDEX
from nexttoken.training.report import compressor_bits_per_byte

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu café naïve 日本".split()


def scored(dataset) -> tuple[list[int], int]:
    targets, n_bytes = [], 0
    for _, t, b in dataset:
        targets += t[t != IGNORE_INDEX].tolist()
        n_bytes += int(b.sum())
    return targets, n_bytes


@pytest.mark.parametrize("cap", [1, 7, 31, 32, 33, 100, 120, 10_000, None])
def test_val_batches_score_exactly_the_first_targets(tmp_path, cap):
    rng = np.random.default_rng(0)
    stream = rng.integers(0, 50, 121)
    counts = rng.integers(0, 4, 121)
    np.save(tmp_path / "stream.npy", stream)
    np.save(tmp_path / "bytes.npy", counts)
    n = 120 if cap is None else min(cap, 120)
    for world_size in (1, 3):
        got, got_bytes = [], 0
        for rank in range(world_size):
            batches = ValBatches(
                tmp_path / "stream.npy", tmp_path / "bytes.npy", 32, 2, 99, rank, world_size, max_targets=cap
            )
            targets, n_bytes = scored(batches)
            got += targets
            got_bytes += n_bytes
        assert got == stream[1 : n + 1].tolist()
        assert got_bytes == counts[1 : n + 1].sum()


@pytest.mark.parametrize("value", [0, -5, 2.5, True, "everything"])
def test_val_tokens_is_a_positive_count_or_all(value):
    with pytest.raises(DataError, match="val_tokens must be a positive number of held-out tokens, or all"):
        TextDataModule(val_tokens=value)


def write_corpus(folder, n_docs=40, lines=230):
    """~700 KB in 40 files: with half held out, more held-out tokens (bytes) than the default cap."""
    rng = random.Random(0)
    folder.mkdir(parents=True)
    for i in range(n_docs):
        text = "\n".join(" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(lines))
        (folder / f"doc{i}.txt").write_text(text + "\n", encoding="utf-8")
    return folder


def fit(corpus, cache, root, *extra):
    main(
        [
            "fit",
            *("--data.path", str(corpus), "--data.tokenizer", "bytes", "--data.val_fraction", "0.5"),
            *("--data.block_size", "32", "--data.batch_size", "4", "--data.val_batch_size", "64"),
            *("--data.cache_dir", str(cache), "--trainer.default_root_dir", str(root)),
            *("--model.n_layer", "1", "--model.n_head", "2", "--model.n_embd", "16"),
            *("--trainer.max_steps", "1", *extra),
        ]
    )
    return json.loads((root / "version_0" / "report.json").read_text())


@pytest.mark.slow
def test_a_capped_validation_scores_exactly_the_first_tokens_and_their_bytes(tmp_path, capfd):
    corpus, cache = write_corpus(tmp_path / "corpus"), tmp_path / "cache"
    capped = fit(corpus, cache, tmp_path / "capped")
    capped_out = capfd.readouterr().out
    every = fit(corpus, cache, tmp_path / "all", "--data.val_tokens", "all")
    every_out = capfd.readouterr().out

    # One cache entry: the cap changes what is scored, never the split or the tokens.
    (entry,) = [p for p in (cache / "tokens").iterdir() if p.is_dir()]
    meta = json.loads((entry / "meta.json").read_text())
    stream = np.load(entry / "val.npy")
    counts = np.load(entry / "val_bytes.npy").astype(np.int64)
    text = (entry / "val.txt").read_bytes()
    held_out = len(stream) - 1
    assert held_out > DEFAULT_VAL_TOKENS  # the default cap binds
    documents = f"validation {meta['val_documents']:,} documents, {meta['val_tokens']:,} tokens"
    assert documents in capped_out and documents in every_out

    n_bytes = int(counts[1 : DEFAULT_VAL_TOKENS + 1].sum())
    assert (capped["validation"]["tokens"], capped["validation"]["bytes"]) == (DEFAULT_VAL_TOKENS, n_bytes)
    assert (every["validation"]["tokens"], every["validation"]["bytes"]) == (held_out, meta["val_bytes"])
    # The compressors see exactly the scored text: the bytes of targets 1..N.
    start = int(counts[0])
    assert capped["compressors_bits_per_byte"] == pytest.approx(
        compressor_bits_per_byte(text[start : start + n_bytes])
    )
    assert every["compressors_bits_per_byte"] == pytest.approx(compressor_bits_per_byte(text[start:]))
    # The start summary says how much a validation scores, of how much, and about how long it takes.
    line = re.search(r"^validation: .*$", capped_out, re.M).group(0)
    assert line.startswith(
        f"validation: the first {DEFAULT_VAL_TOKENS:,} of the {held_out:,} held-out tokens ({n_bytes:,} bytes)"
    )
    assert re.search(r", about [\d.:]+ s? ?\(a batch's forward timed now, x \d+ batches\) each time", line)
    assert line.endswith("--data.val_tokens all scores every one")
    assert (
        f"\nvalidation: all {held_out:,} held-out tokens ({meta['val_bytes']:,} bytes), about " in every_out
    )

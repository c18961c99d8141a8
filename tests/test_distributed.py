"""Two processes on CPU (gloo) through Lightning's own DDP strategy: the scoreboard and the
gradient are those of one process seeing all the data."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nexttoken.loss import next_token_loss
from test_cli import fit_args, metric_rows, write_corpus

TESTS = Path(__file__).parent
pytestmark = pytest.mark.slow


def run(args, **kwargs):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600, **kwargs)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_ddp_gradient_is_the_global_token_mean(tmp_path):
    import ddp_gradient_script as script

    out = tmp_path / "delta.pt"
    run([sys.executable, str(TESTS / "ddp_gradient_script.py"), str(out)])
    delta = torch.load(out, weights_only=True)

    reference = script.make_module()
    batches = script.rank_batches(0) + script.rank_batches(1)
    inputs = torch.cat([b[0] for b in batches])
    targets = torch.cat([b[1] for b in batches])
    next_token_loss(reference(inputs), targets).backward()
    for name, p in reference.named_parameters():
        torch.testing.assert_close(delta[name], p.grad, atol=1e-6, rtol=1e-5)


def test_ddp_sft_gradient_is_the_global_token_mean(tmp_path):
    """Chat examples of different lengths, padded on one rank and packed on the other: the step's
    gradient is the token mean over all 8 examples, as one process computes it."""
    import ddp_gradient_script as script
    from test_sft import VOCAB, reference_gradient, sft_examples

    out = tmp_path / "delta.pt"
    run([sys.executable, str(TESTS / "ddp_gradient_script.py"), str(out), "sft"])
    delta = torch.load(out, weights_only=True)
    assert script.sft_rank_batches(1)[0][0].shape[0] == 1  # three examples in one packed row
    for name, grad in reference_gradient(sft_examples(), VOCAB).items():
        torch.testing.assert_close(delta[name], grad, atol=1e-6, rtol=1e-5)


def test_ddp_preference_gradient_is_the_global_pair_mean(tmp_path):
    """8 preference pairs over 2 processes and 2 micro-batches each (1, 2, 4 packed, 1 pairs): the
    step's gradient is that of the mean DPO loss over all 8, as one process computes it by hand."""
    from test_preferences import by_hand_gradient, chatml, encoded_pairs

    out = tmp_path / "delta.pt"
    run([sys.executable, str(TESTS / "ddp_gradient_script.py"), str(out), "pref"])
    delta = torch.load(out, weights_only=True)
    for name, grad in by_hand_gradient(encoded_pairs(chatml()), "dpo").items():
        torch.testing.assert_close(delta[name], grad.float(), atol=1e-6, rtol=1e-4)


def test_ddp_fit_and_validation_equal_one_process(tmp_path):
    corpus = write_corpus(tmp_path / "corpus", n_docs=6)
    cache = tmp_path / "cache"
    ddp = ["--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu"]
    run([sys.executable, "-m", "nexttoken", *fit_args(corpus, tmp_path / "runs", cache, 6, *ddp)])
    ckpt = tmp_path / "runs" / "version_0" / "checkpoints" / "last.ckpt"
    assert ckpt.is_file() and (tmp_path / "runs" / "version_0" / "curves.png").is_file()
    # The report counts every held-out token and byte, not rank 0's share of them.
    from nexttoken.data.datamodule import TextDataModule

    data = TextDataModule(
        path=str(corpus), tokenizer="bytes", block_size=32, val_fraction=0.3, cache_dir=str(cache)
    )
    data.setup("validate")
    report = json.loads((tmp_path / "runs" / "version_0" / "report.json").read_text())["validation"]
    assert (report["tokens"], report["bytes"]) == (data.val_targets, data.val_bytes)

    results = {}
    for name, extra in (("one", ["--trainer.devices", "1"]), ("two", ddp)):
        args = fit_args(corpus, tmp_path / name, cache, 6, "--ckpt_path", str(ckpt), *extra)
        args[0] = "validate"
        args = [a for a in args if a not in ("--trainer.max_steps", "6", "--trainer.val_check_interval", "5")]
        run([sys.executable, "-m", "nexttoken", *args])
        run_dir = tmp_path / name / "version_0"
        results[name] = {
            m: list(metric_rows(run_dir, f"val/{m}").values())[-1]
            for m in ("loss", "perplexity", "bits_per_byte")
        }
    for metric, value in results["one"].items():
        assert results["two"][metric] == pytest.approx(value, rel=1e-6), metric

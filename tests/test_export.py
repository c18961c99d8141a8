"""``nexttoken export``: a checkpoint becomes a Hugging Face folder that scores exactly as the
checkpoint does, and that starts documents as the model was trained (one document-start rule)."""

import json
from pathlib import Path

import pytest

from nexttoken.cli import main
from test_cli import write_corpus


def eval_json(capsys, model: Path, text: Path, *extra: str) -> dict:
    capsys.readouterr()
    assert main(["eval", str(model), str(text), "--json", "--no-progress", *extra]) == 0
    return json.loads(capsys.readouterr().out)


def fine_tune_at_lr_zero(model: Path, corpus: Path, tmp_path: Path, block: int) -> Path:
    """One optimizer step at learning rate 0: the checkpoint holds the original weights, trained
    through ``nexttoken fit`` (so its tokenizer and document framing are the training ones)."""
    root = tmp_path / "runs"
    args = [
        "fit",
        "--model.model",
        str(model),
        "--model.lr",
        "0",
        "--model.warmup_steps",
        "1",
        "--data.path",
        str(corpus),
        "--data.block_size",
        str(block),
        "--data.batch_size",
        "1",
        "--data.val_fraction",
        "0.3",
        "--data.cache_dir",
        str(tmp_path / "cache"),
        "--trainer.max_steps",
        "1",
        "--trainer.precision",
        "32-true",
        "--trainer.default_root_dir",
        str(root),
        "--trainer.enable_progress_bar",
        "false",
    ]
    assert main(args) == 0
    return root / "version_0" / "checkpoints" / "last.ckpt"


def assert_same_scores(capsys, models: list[Path], text: Path, *extra: str) -> list[dict]:
    numbers = [eval_json(capsys, m, text, *extra) for m in models]
    first = numbers[0]
    for other in numbers[1:]:
        assert other["tokens"] == first["tokens"] and other["bos_prepended"] == first["bos_prepended"]
        assert other["nll_sum"] == pytest.approx(first["nll_sum"], rel=1e-6, abs=1e-6)
        assert other["perplexity"] == pytest.approx(first["perplexity"], rel=1e-6)
    return numbers


@pytest.mark.parametrize("fixture, starts_with_bos", [("tiny_gpt2_dir", False), ("tiny_llama_dir", True)])
def test_checkpoint_its_export_and_the_original_score_the_same(
    fixture, starts_with_bos, request, tmp_path, capsys
):
    original = request.getfixturevalue(fixture)
    corpus = write_corpus(tmp_path / "corpus", n_docs=3, words_per_doc=200)
    ckpt = fine_tune_at_lr_zero(original, corpus, tmp_path, block=32)
    exported = tmp_path / "exported"
    assert main(["export", str(ckpt), str(exported)]) == 0
    text = tmp_path / "text.txt"
    text.write_text("The queen of the river was the light of the castle.\n" * 3)
    numbers = assert_same_scores(
        capsys, [ckpt, exported, original], text, "--context", "32", "--stride", "16"
    )
    assert numbers[0]["bos_prepended"] is starts_with_bos


@pytest.mark.slow
def test_smollm2_checkpoint_export_and_gguf_score_the_same(smollm2_gguf, shared_data, tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text((shared_data / "tinyshakespeare.txt").read_text(encoding="utf-8")[:6000])
    ckpt = fine_tune_at_lr_zero(smollm2_gguf, corpus, tmp_path, block=64)
    exported = tmp_path / "exported"
    assert main(["export", str(ckpt), str(exported)]) == 0
    text = tmp_path / "text.txt"
    text.write_text((shared_data / "wikitext-2" / "test.txt").read_text(encoding="utf-8")[:3000])
    numbers = assert_same_scores(
        capsys, [ckpt, exported, smollm2_gguf], text, "--context", "256", "--stride", "128"
    )
    assert numbers[0]["bos_prepended"] is False  # SmolLM2's tokenizer starts documents with no token
    assert 3 < numbers[0]["perplexity"] < 100

"""`nexttoken fit / validate / generate / export` end to end, in-process, in seconds."""

import csv
import json
import random
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from nexttoken.cli import main
from nexttoken.precision import auto_precision

WORDS = (
    "the a of to and in is was for on with as by at from it that this be are or which "
    "king queen castle river stone light night day sword crown bread ship storm"
).split()


def write_corpus(folder: Path, n_docs: int = 6, words_per_doc: int = 400) -> Path:
    rng = random.Random(0)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n_docs):
        lines = []
        for _ in range(words_per_doc // 12):
            lines.append(" ".join(rng.choice(WORDS) for _ in range(12)).capitalize() + ".")
        (folder / f"doc{i}.txt").write_text("\n".join(lines) + "\n")
    return folder


def fit_args(corpus: Path, root: Path, cache: Path, steps: int, *extra: str) -> list[str]:
    return [
        "fit",
        "--data.path",
        str(corpus),
        "--data.tokenizer",
        "bytes",
        "--data.block_size",
        "32",
        "--data.batch_size",
        "4",
        "--data.val_batch_size",
        "32",
        "--data.val_fraction",
        "0.3",
        "--data.cache_dir",
        str(cache),
        "--model.n_layer",
        "1",
        "--model.n_head",
        "2",
        "--model.n_embd",
        "32",
        "--model.warmup_steps",
        "2",
        "--trainer.max_steps",
        str(steps),
        "--trainer.val_check_interval",
        "5",
        "--trainer.default_root_dir",
        str(root),
        "--trainer.enable_progress_bar",
        "false",
        *extra,
    ]


def metric_rows(run_dir: Path, name: str) -> dict[int, float]:
    with open(run_dir / "metrics.csv") as f:
        return {int(r["step"]): float(r[name]) for r in csv.DictReader(f) if r.get(name)}


@pytest.fixture
def corpus(tmp_path):
    return write_corpus(tmp_path / "corpus")


def test_help_lists_commands(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in ("fit", "validate", "eval", "inspect", "generate", "export"):
        assert f"  {command}" in out


def test_unknown_command(capsys):
    assert main(["frobnicate"]) == 2
    assert "unknown command" in capsys.readouterr().err


def test_fit_end_to_end_writes_checkpoints_logs_curves_report(corpus, tmp_path, capfd):
    root = tmp_path / "runs"
    assert main(fit_args(corpus, root, tmp_path / "cache", 10)) == 0
    out, err = capfd.readouterr()
    run = root / "version_0"
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert list((run / "checkpoints").glob("best-*.ckpt"))
    assert (run / "metrics.csv").is_file() and (run / "config.yaml").is_file()
    assert (run / "curves.png").stat().st_size > 1000
    # Quiet: no Lightning start-up lines, tips, model table or deprecation notices; no warnings at all.
    assert err == ""
    for chatter in ("Seed set", "GPU available", "Tip", "Total FLOPs", "stopped", "deprecated"):
        assert chatter not in out, chatter
    # The start summary, once, in this order; the data line's numbers are the token cache's.
    lines = out.splitlines()
    summary = lines[:6]
    assert [line.split(":")[0] for line in summary] == [
        "data",
        "model",
        "precision",
        "weight decay",
        "note",
        "run folder",
    ]
    cache = Path(summary[0].rsplit("(", 1)[1].rstrip(")"))
    train_tokens, val_tokens = (len(np.load(cache / f"{split}.npy")) for split in ("train", "val"))
    assert f", {train_tokens:,} tokens; validation " in summary[0]
    assert f", {val_tokens:,} tokens (" in summary[0] and "token cache built in" in summary[0]
    assert summary[2].startswith(f"precision: {auto_precision()[0]} (auto:")
    assert summary[3].startswith("weight decay: weight decay on")
    assert (
        summary[4]
        == "note: warmup capped at 1 step (a tenth of the run's 10) instead of --model.warmup_steps 2"
    )
    assert summary[5] == f"run folder: {run}"
    assert sum(line.startswith("data:") for line in lines) == 1
    # Not a terminal: plain progress lines and each validation's numbers, then the report.
    progress = [line for line in lines if line.startswith(("step ", "validation at"))]
    validations = [line for line in progress if line.startswith("validation")]
    assert [line.split(":")[0] for line in validations] == ["validation at step 5", "validation at step 10"]
    assert progress[-2].startswith("step 10/10  loss ") and " tok/s  MFU " in progress[-2]
    assert progress[-1] == validations[-1]
    for text in ("perplexity", "bits per byte", "gzip -9", "xz -9e", "sample"):
        assert text in out, text
    # The report's numbers are the final validation, built from the three sums.
    report = (run / "report.json").read_text()
    numbers = json.loads(report)["validation"]
    assert numbers["perplexity"] == pytest.approx(torch.tensor(numbers["loss"]).exp().item(), rel=1e-6)
    assert numbers["bits_per_byte"] * numbers["bytes"] == pytest.approx(
        numbers["loss"] * numbers["tokens"] / torch.log(torch.tensor(2.0)).item(), rel=1e-6
    )


def test_validation_metrics_identical_for_val_batch_size_1_and_7(corpus, tmp_path):
    assert main(fit_args(corpus, tmp_path / "runs", tmp_path / "cache", 5)) == 0
    ckpt = tmp_path / "runs" / "version_0" / "checkpoints" / "last.ckpt"
    results = {}
    for val_batch in (1, 7):
        root = tmp_path / f"val{val_batch}"
        args = fit_args(corpus, root, tmp_path / "cache", 5)
        args[0] = "validate"
        args = [a for a in args if a not in ("--trainer.max_steps", "5", "--trainer.val_check_interval")]
        args += ["--data.val_batch_size", str(val_batch), "--ckpt_path", str(ckpt)]
        assert main(args) == 0
        results[val_batch] = (
            metric_rows(root / "version_0", "val/loss"),
            metric_rows(root / "version_0", "val/bits_per_byte"),
        )
    (loss1, bpb1), (loss7, bpb7) = results[1], results[7]
    assert list(loss1.values()) == pytest.approx(list(loss7.values()), rel=1e-6)
    assert list(bpb1.values()) == pytest.approx(list(bpb7.values()), rel=1e-6)


class StopAtStep(L.Callback):
    """Stops training after a given optimizer step, as an interruption would (the run's
    schedule is still that of the full run)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step >= self.step:
            trainer.should_stop = True


def test_resume_continues_the_same_curve(corpus, tmp_path):
    cache = tmp_path / "cache"
    full_root, cut_root = tmp_path / "full", tmp_path / "cut"
    assert main(fit_args(corpus, full_root, cache, 20)) == 0
    stop = ["--trainer.callbacks+=test_cli.StopAtStep", "--trainer.callbacks.step=10"]
    assert main(fit_args(corpus, cut_root, cache, 20, *stop)) == 0
    assert main(fit_args(corpus, cut_root, cache, 20, "--ckpt_path", "last")) == 0
    full = metric_rows(full_root / "version_0", "train/loss")
    resumed = metric_rows(cut_root / "version_0", "train/loss")
    # The resumed run folder holds the whole curve: the rows before the checkpoint are kept,
    # the ones after it come from the resumed training and equal the uninterrupted run's.
    assert sorted(resumed) == sorted(full) and any(s >= 10 for s in full)
    for s in full:
        assert resumed[s] == pytest.approx(full[s], rel=1e-6, abs=1e-6), s
    full_val = metric_rows(full_root / "version_0", "val/loss")
    resumed_val = metric_rows(cut_root / "version_0", "val/loss")
    assert resumed_val[19] == pytest.approx(full_val[19], rel=1e-6)


def test_generate_and_export_from_checkpoint(corpus, tmp_path, capsys):
    assert main(fit_args(corpus, tmp_path / "runs", tmp_path / "cache", 5)) == 0
    ckpt = tmp_path / "runs" / "version_0" / "checkpoints" / "last.ckpt"
    capsys.readouterr()
    assert (
        main(["generate", "--checkpoint", str(ckpt), "--prompt", "The king", "--max-new-tokens", "20"]) == 0
    )
    assert capsys.readouterr().out.startswith("The king")

    out_dir = tmp_path / "hf"
    assert main(["export", str(ckpt), str(out_dir)]) == 0
    from transformers import AutoModelForCausalLM

    from nexttoken.models.load import load_module

    hf = AutoModelForCausalLM.from_pretrained(out_dir, local_files_only=True)
    module = load_module(ckpt)
    x = torch.tensor([module.tokenizer.encode("The queen of the river")])
    torch.testing.assert_close(hf(x).logits, module.model(x), rtol=1e-5, atol=1e-5)
    # nexttoken eval gives the checkpoint and its export the same numbers.
    text = tmp_path / "text.txt"
    text.write_text("The queen of the river was the light of the castle.\n" * 4)
    numbers = {}
    for model in (ckpt, out_dir):
        capsys.readouterr()
        assert (
            main(
                [
                    "eval",
                    str(model),
                    str(text),
                    "--context",
                    "32",
                    "--stride",
                    "16",
                    "--json",
                    "--no-progress",
                ]
            )
            == 0
        )
        numbers[model] = json.loads(capsys.readouterr().out)
    assert numbers[ckpt]["tokens"] == numbers[out_dir]["tokens"] == len(text.read_bytes())
    assert numbers[out_dir]["perplexity"] == pytest.approx(numbers[ckpt]["perplexity"], rel=1e-5)
    # A second export into the same folder clobbers nothing.
    before = {p.name: p.stat().st_mtime_ns for p in out_dir.iterdir()}
    assert main(["export", str(ckpt), str(out_dir)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert {p.name: p.stat().st_mtime_ns for p in out_dir.iterdir()} == before


@pytest.mark.parametrize(
    "config", sorted(Path(__file__).parents[1].joinpath("configs").glob("*.yaml")), ids=lambda p: p.name
)
def test_every_config_parses(config, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code in (0, None)
    assert "model:" in capsys.readouterr().out

"""`nexttoken fit / validate / generate / export` end to end, in-process, in seconds."""

import csv
import json
import random
import re
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
    summary = lines[:11]
    assert [line.split(":")[0] for line in summary] == [
        "data",
        "validation",
        "overlap",
        "duplicates",
        "document start",
        "model",
        "precision",
        "MFU peak",
        "weight decay",
        "note",
        "run folder",
    ]
    cache = Path(summary[0].rsplit("(", 1)[1].rstrip(")"))
    train_tokens, val_tokens = (len(np.load(cache / f"{split}.npy")) for split in ("train", "val"))
    assert f", {train_tokens:,} tokens; validation " in summary[0]
    assert f", {val_tokens:,} tokens (" in summary[0] and "token cache built in" in summary[0]
    # All of this small held-out set is scored (the cap binds only above 250,000 tokens).
    assert summary[1].startswith(f"validation: all {val_tokens - 1:,} held-out tokens (")
    assert summary[2].startswith("overlap: 0 of 2 held-out documents share 13-grams with training, 0.0%")
    summary = [summary[0], *summary[5:]]
    assert summary[2].startswith(f"precision: {auto_precision()[0]} (auto:")
    # The peak that MFU is a share of, in the math the matmuls run in, and where it comes from.
    math = {"bf16-mixed": "bf16", "32-true": "fp32"}[auto_precision()[0]]
    assert re.fullmatch(rf"MFU peak: [\d.]+ [GT]FLOP/s \({math}, measured on this CPU.*\)", summary[3])
    assert summary[4].startswith("weight decay: weight decay on")
    assert (
        summary[5]
        == "note: warmup capped at 1 step (a tenth of the run's 10) instead of --model.warmup_steps 2"
    )
    assert summary[6] == f"run folder: {run}"
    assert sum(line.startswith("data:") for line in lines) == 1
    # Not a terminal: plain progress lines and each validation's numbers, then the report.
    progress = [line for line in lines if line.startswith(("step ", "validation at"))]
    validations = [line for line in progress if line.startswith("validation")]
    assert [line.split(":")[0] for line in validations] == ["validation at step 5", "validation at step 10"]
    assert progress[-2].startswith("step 10/10  loss ") and " tok/s  MFU " in progress[-2]
    assert progress[-1] == validations[-1]
    speed = next(line for line in lines if line.startswith("speed: "))
    assert " tok/s over the last 20 training steps, MFU " in speed and f"% of {summary[3][10:]}" in speed
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


def test_a_checkpoint_brings_its_block_size_when_the_flag_is_left_out(corpus, tmp_path):
    """A run trained at --data.block_size 32 (not the default) is validated and continued from its
    checkpoint without repeating the flag: the checkpoint's data settings apply."""
    assert main(fit_args(corpus, tmp_path / "runs", tmp_path / "cache", 3)) == 0
    ckpt = tmp_path / "runs" / "version_0" / "checkpoints" / "last.ckpt"
    args = fit_args(corpus, tmp_path / "val", tmp_path / "cache", 3)
    at = args.index("--data.block_size")
    del args[at : at + 2]
    args[0] = "validate"
    assert main([*args, "--ckpt_path", str(ckpt)]) == 0
    assert metric_rows(tmp_path / "val" / "version_0", "val/loss")
    resumed = fit_args(corpus, tmp_path / "runs", tmp_path / "cache", 5)
    at = resumed.index("--data.block_size")
    del resumed[at : at + 2]
    assert main([*resumed, "--ckpt_path", "last"]) == 0


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

    from nexttoken.models.load import load_checkpoint

    hf = AutoModelForCausalLM.from_pretrained(out_dir, local_files_only=True)
    module = load_checkpoint(ckpt)
    x = torch.tensor([module.tokenizer.encode("The queen of the river")])
    torch.testing.assert_close(hf(x).logits, module.network(x), rtol=1e-5, atol=1e-5)
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


# --------------------------------------------------------------------------- chat and instruction records
# A chat template for a tokenizer with no chat markers: the EOS ends each turn.
PLAIN_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


def write_chat_records(path: Path, n: int) -> Path:
    """``n`` chat records; with the default val_fraction (0.05) records 8, 21, 26, ... are held out."""
    from test_sft_cache import write_chats

    return write_chats(path, n)


def test_max_steps_0_scores_the_whole_held_out_set_not_the_sanity_check(tmp_path, monkeypatch, capfd):
    """Lightning's sanity check runs 2 validation batches before step 0; with --trainer.max_steps 0
    the report must still be the score of every held-out example (here 1 example per batch)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("NEXTTOKEN_CACHE", str(tmp_path / "cache"))
    chats = write_chat_records(tmp_path / "chats.jsonl", 40)
    argv = ["fit", "--data.path", str(chats), "--data.tokenizer", "bytes", "--data.packing", "false"]
    assert main([*argv, "--data.val_batch_size", "1", "--trainer.max_steps", "0"]) == 0
    report = json.loads((tmp_path / "runs" / "version_0" / "report.json").read_text())
    held_out = report["validation_examples"]
    assert held_out["examples"] == 5 and report["validation"]["tokens"] == held_out["response_tokens"]
    assert report["validation"]["bytes"] == held_out["response_bytes"]


def test_fit_on_chat_records_needs_no_other_flag(tmp_path, monkeypatch, capfd):
    from nexttoken.data.chat import Message, resolve_chat_template
    from nexttoken.models.generation import generate_reply
    from nexttoken.models.load import load_model

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("NEXTTOKEN_CACHE", str(tmp_path / "cache"))
    chats = write_chat_records(tmp_path / "chats.jsonl", 40)
    assert main(["fit", "--data.path", str(chats), "--trainer.max_steps", "3"]) == 0
    out = capfd.readouterr().out
    assert "format: chat (auto: the records have 'messages')" in out
    assert "data: train 35 examples (" in out and "packed rows of 256 tokens; example cache built" in out
    assert "validation over 5 held-out examples:" in out and "prompt tokens ignored" in out
    assert "sample reply to the first held-out prompt" in out and "gzip" not in out
    run = tmp_path / "runs" / "version_0"
    report = json.loads((run / "report.json").read_text())
    assert report["validation_examples"]["examples"] == 5
    assert report["validation"]["tokens"] == report["validation_examples"]["response_tokens"]
    # The checkpoint carries its tokenizer (a BPE trained on the rendered conversations) and template.
    checkpoint = run / "checkpoints" / "last.ckpt"
    model, tokenizer = load_model(str(checkpoint))
    assert tokenizer.kind == "bpe" and tokenizer.chat_template is not None
    expected = generate_reply(
        model, resolve_chat_template(tokenizer), [Message("user", "What is 2 plus 3?")], 20, temperature=0
    )
    capfd.readouterr()
    argv = [
        "generate",
        str(checkpoint),
        "--chat",
        "What is 2 plus 3?",
        "--temperature",
        "0",
        "--max-new-tokens",
        "20",
    ]
    assert main(argv) == 0
    assert capfd.readouterr().out == expected + "\n"


def test_chat_keeps_the_history_across_turns(tmp_path, monkeypatch, capfd):
    import argparse
    import io

    from nexttoken.commands.generate import add_chat_arguments, run_chat
    from nexttoken.data.chat import Message, resolve_chat_template
    from nexttoken.models.generation import generate_reply
    from nexttoken.models.load import load_model

    monkeypatch.chdir(tmp_path)
    corpus = write_corpus(tmp_path / "corpus", n_docs=4)
    # A context of 96 tokens: the history fits until the third turn.
    assert main(fit_args(corpus, tmp_path / "runs", tmp_path / "cache", 1, "--data.block_size", "96")) == 0
    ckpt = tmp_path / "runs" / "version_0" / "checkpoints" / "last.ckpt"
    parser = argparse.ArgumentParser()
    add_chat_arguments(parser)
    args = parser.parse_args([str(ckpt), "--max-new-tokens", "6", "--system", "Be brief.", "--seed", "5"])
    out = io.StringIO()
    assert run_chat(args, stdin=io.StringIO("Hi\n\nHow are you?\n/reset\nHi\n"), stdout=out) == 0
    # A second path: the second reply follows the whole history, the third a fresh start (/reset).
    model, tokenizer = load_model(str(ckpt))
    template = resolve_chat_template(tokenizer)
    system = [Message("system", "Be brief.")]
    first = generate_reply(model, template, [*system, Message("user", "Hi")], 6, seed=5)
    history = [*system, Message("user", "Hi"), Message("assistant", first), Message("user", "How are you?")]
    second = generate_reply(model, template, history, 6, seed=6)
    third = generate_reply(model, template, [*system, Message("user", "Hi")], 6, seed=7)
    assert out.getvalue() == f"{first}\n{second}\n{third}\n"
    without_history = generate_reply(model, template, [*system, Message("user", "How are you?")], 6, seed=6)
    assert second != without_history  # the history is part of the prompt


def test_fit_on_chat_records_with_a_hugging_face_folder(tmp_path, monkeypatch, capfd):
    from conftest import save_tiny_hf_model

    folder = save_tiny_hf_model(tmp_path / "tiny-chat-llama", "llama", add_bos=True, max_positions=256)
    (folder / "chat_template.jinja").write_text(PLAIN_CHAT_TEMPLATE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("NEXTTOKEN_CACHE", str(tmp_path / "cache"))
    chats = write_chat_records(tmp_path / "chats.jsonl", 12)
    assert (
        main(
            ["fit", "--data.path", str(chats), "--model.model", str(folder), "--trainer.max_steps", "2"]
            + ["--trainer.log_every_n_steps", "1"]
        )
        == 0
    )
    out = capfd.readouterr().out
    assert "format: chat" in out and "validation over 1 held-out examples:" in out
    # A pretrained model is fine-tuned at its own default learning rate, and the summary says so.
    assert "note: learning rate 0.0001, the default for fine-tuning a pretrained model" in out
    rows = list(csv.DictReader((tmp_path / "runs" / "version_0" / "metrics.csv").open()))
    rates = [float(r["train/lr"]) for r in rows if r.get("train/lr")]
    assert rates and max(rates) == pytest.approx(1e-4)


@pytest.mark.slow
def test_fit_on_chat_records_with_smollm2(tmp_path, monkeypatch, capfd, smollm2_gguf):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("NEXTTOKEN_CACHE", str(tmp_path / "cache"))
    chats = write_chat_records(tmp_path / "chats.jsonl", 10)
    assert (
        main(
            ["fit", "--data.path", str(chats), "--model.model", str(smollm2_gguf), "--trainer.max_steps", "1"]
        )
        == 0
    )
    out = capfd.readouterr().out
    assert "format: chat" in out and "vocab 49152" in out
    assert "validation over 1 held-out examples:" in out

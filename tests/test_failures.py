"""When the input is wrong or the machine dies: a clear line, a non-zero exit, nothing lost."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from nexttoken.checkpoints import AtomicCheckpointIO
from nexttoken.cli import main
from nexttoken.errors import UserError
from nexttoken.training.module import CausalLMModule
from test_cli import fit_args, metric_rows, write_corpus

MAX_LINES = 3  # what a bad input may print in all: stdout and stderr, whoever prints it


def snapshot(folder: Path) -> dict[str, int]:
    """Every file and folder under ``folder``, with each file's modification time."""
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns if p.is_file() else 0 for p in folder.rglob("*")}


def assert_clean_failure(capfd, argv, *, expect: str, untouched: Path, code: int = 2) -> str:
    """``nexttoken ARGV`` exits with ``code`` after printing at most MAX_LINES lines in all, the
    last one ``error: ...`` containing ``expect``, no traceback, and leaves every file and folder
    under ``untouched`` as it was. Returns the error line."""
    before = snapshot(untouched)
    capfd.readouterr()
    assert main(argv) == code
    out, err = capfd.readouterr()
    lines = out.splitlines() + err.splitlines()
    assert 1 <= len(lines) <= MAX_LINES, out + err
    last = err.splitlines()[-1]
    assert last.startswith("error:") and expect in last, last
    assert "Traceback" not in out + err
    assert snapshot(untouched) == before
    return last


@pytest.fixture
def corpus(tmp_path):
    return write_corpus(tmp_path / "corpus", n_docs=4)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A run folder with checkpoints from 5 steps (shared by this module's tests; none changes it)."""
    tmp = tmp_path_factory.mktemp("trained")
    root = tmp / "runs"
    assert main(fit_args(write_corpus(tmp / "corpus", n_docs=4), root, tmp / "cache", 5)) == 0
    return root / "version_0" / "checkpoints" / "last.ckpt"


def test_missing_path(tmp_path, capfd):
    assert_clean_failure(
        capfd,
        fit_args(tmp_path / "nope", tmp_path / "runs", tmp_path / "cache", 2),
        expect="nope",
        untouched=tmp_path,
    )


def test_empty_file(tmp_path, capfd):
    (tmp_path / "empty.txt").write_text("")
    args = fit_args(tmp_path / "empty.txt", tmp_path / "runs", tmp_path / "cache", 2)
    assert_clean_failure(capfd, args, expect="empty.txt is empty", untouched=tmp_path)


def test_folder_with_no_text(tmp_path, capfd):
    folder = tmp_path / "texts"
    (folder / ".hidden").mkdir(parents=True)
    (folder / ".hidden" / "notes.txt").write_text("hidden files are not read\n")
    args = fit_args(folder, tmp_path / "runs", tmp_path / "cache", 2)
    assert_clean_failure(capfd, args, expect="no text files", untouched=tmp_path)


def test_only_binary_files(tmp_path, capfd):
    folder = tmp_path / "bin"
    folder.mkdir()
    (folder / "blob.dat").write_bytes(b"\x00\x01\x02" * 100)
    args = fit_args(folder, tmp_path / "runs", tmp_path / "cache", 2)
    assert_clean_failure(capfd, args, expect="no text files", untouched=tmp_path)


def test_binary_file_among_text_files_is_skipped_with_a_one_line_warning(corpus, tmp_path, capfd):
    (corpus / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00" * 50)
    assert main(fit_args(corpus, tmp_path / "runs", tmp_path / "cache", 2)) == 0
    warnings = [line for line in capfd.readouterr().err.splitlines() if "image.png" in line]
    assert warnings == [f"warning: skipping binary file {corpus / 'image.png'} (it has NUL bytes)"]


def test_invalid_utf8_names_file_and_offset(corpus, tmp_path, capfd):
    bad = corpus / "latin1.txt"
    bad.write_bytes(b"caf" + b"\xe9 au lait\n" * 50)
    args = fit_args(corpus, tmp_path / "runs", tmp_path / "cache", 2)
    line = assert_clean_failure(capfd, args, expect="latin1.txt", untouched=tmp_path)
    assert "byte 3" in line or "offset 3" in line
    assert "replace_invalid_utf8" in line


def test_invalid_utf8_is_replaced_under_a_flag(corpus, tmp_path, capfd):
    (corpus / "latin1.txt").write_bytes(b"caf" + b"\xe9 au lait\n" * 50)
    args = fit_args(corpus, tmp_path / "runs", tmp_path / "cache", 2, "--data.replace_invalid_utf8", "true")
    assert main(args) == 0
    assert any(
        line.startswith("warning:") and "latin1.txt" in line for line in capfd.readouterr().err.splitlines()
    )


def test_corpus_smaller_than_one_block(tmp_path, capfd):
    (tmp_path / "tiny.txt").write_text("hello world\n" * 2)
    args = fit_args(tmp_path / "tiny.txt", tmp_path / "runs", tmp_path / "cache", 2)
    line = assert_clean_failure(capfd, args, expect="tokens", untouched=tmp_path)  # no token cache either
    assert "needs at least 33" in line


def test_a_tokenizing_worker_that_dies_is_one_line_and_caches_nothing(tmp_path, capfd, monkeypatch):
    import nexttoken.data.cache as cache
    from test_parallel import kill_this_process

    corpus = write_corpus(tmp_path / "corpus", n_docs=1, words_per_doc=2000)
    monkeypatch.setattr(cache, "PIECE_CHARS", 1000)  # one file, in pieces
    monkeypatch.setattr(cache, "_tokenize_in_worker", kill_this_process)  # as the kernel kills one
    args = fit_args(corpus, tmp_path / "runs", tmp_path / "cache", 2, "--data.num_workers", "2")
    line = assert_clean_failure(
        capfd, args, expect="a tokenizing worker died while tokenizing", untouched=tmp_path
    )
    assert "doc0.txt[train] (piece 0) to doc0.txt[val] (piece " in line and "killed by SIGKILL" in line
    assert (
        "the machine has" in line and "GiB" in line and "num_workers" in line and "nothing was cached" in line
    )
    assert "BrokenProcessPool" not in line and not (tmp_path / "cache").exists()


def test_unknown_model_preset(corpus, tmp_path, capfd):
    args = fit_args(corpus, tmp_path / "runs", tmp_path / "cache", 2, "--model.model", "gpt5")
    assert_clean_failure(
        capfd, args, expect="--model.model 'gpt5' is neither a GPT preset", untouched=tmp_path
    )


def test_unknown_fused_loss_value(corpus, tmp_path, capfd):
    args = fit_args(corpus, tmp_path / "runs", tmp_path / "cache", 2, "--model.fused_loss", "maybe")
    line = assert_clean_failure(capfd, args, expect="--model.fused_loss 'maybe'", untouched=tmp_path)
    assert line.endswith("is not one of auto, on, off; see `nexttoken fit --help`")


@pytest.mark.parametrize(
    "flag, value, expect",
    [
        ("--data.val_tokens", "some", "--data.val_tokens 'some' is neither an integer nor all"),
        ("--data.val_tokens", "0", "--data.val_tokens must be a positive number of held-out tokens, or all"),
        ("--model.compile", "maybe", "--model.compile 'maybe' is neither true/false nor auto"),
    ],
)
def test_a_count_or_a_word_that_is_neither(corpus, tmp_path, capfd, flag, value, expect):
    args = fit_args(corpus, tmp_path / "runs", tmp_path / "cache", 2, flag, value)
    assert_clean_failure(capfd, args, expect=expect, untouched=tmp_path)


def test_unknown_tokenizer(corpus, tmp_path, capfd):
    args = fit_args(corpus, tmp_path / "runs", tmp_path / "cache", 2)
    args[args.index("--data.tokenizer") + 1] = "sentencepiece"
    assert_clean_failure(
        capfd, args, expect="--data.tokenizer 'sentencepiece' is neither", untouched=tmp_path
    )


def test_checkpoint_that_does_not_match_the_model_or_data(trained, corpus, tmp_path, capfd):
    for extra, expect in [
        (["--data.block_size", "16"], "--data.block_size 16 (checkpoint: 32)"),
        (["--model.n_embd", "64"], "--model.n_embd 64 (checkpoint: 32)"),
        (["--data.vocab_size", "300"], "--data.vocab_size 300 (checkpoint: 4096)"),
    ]:
        args = fit_args(
            corpus, tmp_path / "runs", tmp_path / "cache", 10, "--ckpt_path", str(trained), *extra
        )
        assert_clean_failure(capfd, args, expect=expect, untouched=trained.parents[2])


@pytest.mark.parametrize("command", ["fit", "validate", "eval", "generate", "export"])
@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_truncated_or_corrupted_checkpoint(trained, corpus, tmp_path, capfd, damage, command):
    bad = tmp_path / "bad.ckpt"
    data = trained.read_bytes()
    bad.write_bytes(data[: len(data) // 2] if damage == "truncate" else os.urandom(len(data)))
    (tmp_path / "text.txt").write_text("The king and the queen.\n")
    argv = {
        "fit": fit_args(corpus, tmp_path / "runs", tmp_path / "cache", 10, "--ckpt_path", str(bad)),
        "validate": ["validate", "--data.path", str(corpus), "--ckpt_path", str(bad)],
        "eval": ["eval", str(bad), str(tmp_path / "text.txt")],
        "generate": ["generate", "--checkpoint", str(bad)],
        "export": ["export", str(bad), str(tmp_path / "out")],
    }[command]
    assert_clean_failure(
        capfd, argv, expect=f"checkpoint {bad} is truncated or corrupted", untouched=tmp_path
    )


def test_output_folder_that_cannot_be_written(corpus, tmp_path, capfd):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    args = fit_args(corpus, blocker / "runs", tmp_path / "cache", 2)
    assert_clean_failure(capfd, args, expect="cannot write the run folder", untouched=tmp_path)


def test_resume_last_without_any_run(corpus, tmp_path, capfd):
    args = fit_args(corpus, tmp_path / "runs", tmp_path / "cache", 2, "--ckpt_path", "last")
    assert_clean_failure(capfd, args, expect="no run with a last.ckpt", untouched=tmp_path)


def test_eval_stride_larger_than_context(tiny_gpt2_dir, tmp_path, capfd):
    (tmp_path / "text.txt").write_text("The king and the queen.\n")
    argv = ["eval", str(tiny_gpt2_dir), str(tmp_path / "text.txt"), "--context", "16", "--stride", "32"]
    assert_clean_failure(capfd, argv, expect="--stride 32 is larger than --context 16", untouched=tmp_path)


def test_hugging_face_folder_missing_files(tiny_gpt2_dir, tmp_path, capfd):
    folder = tmp_path / "incomplete"
    folder.mkdir()
    for file in tiny_gpt2_dir.iterdir():
        if not file.name.startswith("tokenizer"):
            (folder / file.name).write_bytes(file.read_bytes())
    (tmp_path / "text.txt").write_text("The king and the queen.\n")
    argv = ["eval", str(folder), str(tmp_path / "text.txt")]
    line = assert_clean_failure(
        capfd, argv, expect="not a complete Hugging Face model folder", untouched=tmp_path
    )
    assert "missing tokenizer" in line and "missing weights" not in line


def test_export_into_a_folder_that_is_not_empty(trained, tmp_path, capfd):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    argv = ["export", str(trained), str(out)]
    assert_clean_failure(capfd, argv, expect="not empty", untouched=tmp_path)
    assert (out / "keep.txt").read_text() == "mine"


def test_debug_shows_the_traceback(tmp_path, capfd):
    assert main([*fit_args(tmp_path / "nope", tmp_path / "runs", tmp_path / "cache", 2), "--debug"]) == 2
    err = capfd.readouterr().err
    assert "Traceback" in err and err.splitlines()[-1].startswith("error:")


def test_real_process_prints_one_line_in_all(tmp_path):
    """``python -m nexttoken`` as a user runs it: every line it prints, from any library, counted."""
    env = {**os.environ, "NEXTTOKEN_CACHE": str(tmp_path / "cache")}
    (tmp_path / "empty.txt").write_text("")
    before = snapshot(tmp_path)
    result = subprocess.run(
        [sys.executable, "-m", "nexttoken", "fit", "--data.path", str(tmp_path / "empty.txt")],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 2
    assert result.stdout.splitlines() == [
        f"error: {tmp_path / 'empty.txt'} is empty: there is no text in it; point --data.path at text"
    ]
    assert snapshot(tmp_path) == before  # no runs/ folder, no cache


@pytest.mark.slow
def test_bad_data_under_ddp_stops_before_any_process_starts(tmp_path):
    """The data is read before Lightning launches its DDP processes, so one process says it once."""
    (tmp_path / "empty.txt").write_text("")
    ddp = ["--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu"]
    args = fit_args(tmp_path / "empty.txt", tmp_path / "runs", tmp_path / "cache", 2, *ddp)
    before = snapshot(tmp_path)
    result = subprocess.run(
        [sys.executable, "-m", "nexttoken", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=600,
    )
    assert result.returncode == 2
    assert result.stdout.splitlines() == [
        f"error: {tmp_path / 'empty.txt'} is empty: there is no text in it; point --data.path at text"
    ]
    assert snapshot(tmp_path) == before


# ------------------------------------------------------------------ checkpoints written atomically
def test_a_crash_while_saving_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}, "global_step": 1}, path)
    good = path.read_bytes()

    real_save = torch.save

    def dying_save(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        f.truncate(f.tell() // 2)  # half the bytes reached the disk, then the process died
        raise KeyboardInterrupt("killed while saving")

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(3)}, "global_step": 2}, path)
    monkeypatch.undo()
    assert path.read_bytes() == good
    assert torch.load(path, weights_only=True)["global_step"] == 1


# ------------------------------------------------------------------ non-finite loss
class NaNAtStep(CausalLMModule):
    def __init__(self, bad_step: int, **kwargs):
        super().__init__(model="tiny", vocab_size=32, block_size=8, n_layer=1, n_head=2, n_embd=16, **kwargs)
        self.bad_step = bad_step

    def nll_sum(self, input_ids, targets):
        nll = super().nll_sum(input_ids, targets)
        return nll * float("nan") if self.global_step == self.bad_step else nll


def _batches():
    g = torch.Generator().manual_seed(0)
    return DataLoader(
        [
            (torch.randint(0, 32, (2, 8), generator=g), torch.randint(0, 32, (2, 8), generator=g))
            for _ in range(6)
        ],
        batch_size=None,
    )


def _trainer(tmp_path, steps):
    checkpoints = L.pytorch.callbacks.ModelCheckpoint(
        dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_last=True
    )
    return L.Trainer(
        accelerator="cpu",
        max_steps=steps,
        logger=False,
        callbacks=[checkpoints],
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )


def test_nonfinite_loss_stops_naming_step_and_last_good_checkpoint(tmp_path):
    module = NaNAtStep(bad_step=3)
    trainer = _trainer(tmp_path, 6)
    with pytest.raises(UserError, match=r"non-finite loss \(nan\) at step 4.*last\.ckpt"):
        trainer.fit(module, _batches())
    kept = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert kept["global_step"] == 3
    assert all(torch.isfinite(v).all() for v in kept["state_dict"].values())


def test_nonfinite_loss_step_can_be_skipped(tmp_path):
    torch.manual_seed(0)
    module = NaNAtStep(bad_step=3, on_nonfinite="skip")
    seen = {}

    class Snapshot(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen[trainer.global_step] = {n: p.detach().clone() for n, p in pl_module.named_parameters()}

    trainer = _trainer(tmp_path, 6)
    trainer.callbacks.append(Snapshot())
    trainer.fit(module, _batches())
    assert trainer.global_step == 6
    for name, before in seen[3].items():
        assert torch.equal(before, seen[4][name]), name  # the NaN step changed nothing
    assert any(not torch.equal(seen[4][n], seen[5][n]) for n in seen[4])  # training went on
    assert all(torch.isfinite(p).all() for p in module.parameters())


# ------------------------------------------------------------------ resume after a real SIGKILL
@pytest.mark.slow
def test_resume_after_sigkill_continues_the_same_curve(tmp_path):
    corpus = write_corpus(tmp_path / "corpus", n_docs=4)
    cache = tmp_path / "cache"
    steps = 60
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}

    def command(root, *extra):
        return [sys.executable, "-m", "nexttoken", *fit_args(corpus, root, cache, steps, *extra)]

    full_root, killed_root = tmp_path / "full", tmp_path / "killed"
    subprocess.run(command(full_root), check=True, env=env, capture_output=True, timeout=600)

    process = subprocess.Popen(
        command(killed_root), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    last = killed_root / "version_0" / "checkpoints" / "last.ckpt"
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:
        if last.exists() and torch.load(last, weights_only=True, mmap=True)["global_step"] >= 20:
            break
        time.sleep(0.05)
    assert process.poll() is None, "the run ended before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed_at = torch.load(last, weights_only=True)["global_step"]
    assert 20 <= killed_at < steps

    subprocess.run(
        command(killed_root, "--ckpt_path", "last"), check=True, env=env, capture_output=True, timeout=600
    )
    full = metric_rows(full_root / "version_0", "train/loss")
    resumed = metric_rows(killed_root / "version_0", "train/loss")
    assert sorted(resumed) == sorted(full)
    for step in full:
        assert resumed[step] == pytest.approx(full[step], rel=1e-6, abs=1e-6), step


# ------------------------------------------------------------------ chat and instruction records
def chat_fit(chats: Path, tmp_path: Path, *extra: str) -> list[str]:
    return [
        "fit",
        "--data.path",
        str(chats),
        "--data.tokenizer",
        "bytes",
        "--data.cache_dir",
        str(tmp_path / "cache"),
        "--trainer.default_root_dir",
        str(tmp_path / "runs"),
        "--trainer.max_steps",
        "1",
        *extra,
    ]


def chats_with(tmp_path: Path, bad: dict) -> Path:
    """A chat file whose 5th record (line 5) is ``bad``."""
    from test_sft_cache import chat_record, write_chats

    rows = [chat_record(i) for i in range(4)] + [bad] + [chat_record(i) for i in range(5, 30)]
    return write_chats(tmp_path / "data" / "chats.jsonl", records=rows)


@pytest.mark.parametrize(
    ("bad", "expect"),
    [
        (
            {"messages": [{"role": "robot", "content": "hi"}]},
            "chats.jsonl line 5: message 0 has role 'robot'",
        ),
        (
            {"messages": [{"role": "user", "content": {"text": "hi"}}]},
            "chats.jsonl line 5: the content of message 0 is dict, not a string",
        ),
        (
            {"messages": [{"role": "user", "content": "hi"}]},
            "chats.jsonl line 5 has no assistant turn, so --data.train_on responses scores nothing",
        ),
    ],
)
def test_a_bad_chat_record_is_named(tmp_path, capfd, bad, expect):
    chats = chats_with(tmp_path, bad)
    assert_clean_failure(capfd, chat_fit(chats, tmp_path), expect=expect, untouched=tmp_path)
    assert not (tmp_path / "cache").exists() and not (tmp_path / "runs").exists()


def test_a_chat_template_that_fails_to_render_shows_its_own_line(tmp_path, capfd):
    from test_sft_cache import write_chats

    chats = write_chats(tmp_path / "data" / "chats.jsonl", 30)
    template = tmp_path / "bad.jinja"
    template.write_text(
        "{% for m in messages %}\n{{ m['role'] }}: {{ m['content'] | nosuchfilter }}\n{% endfor %}\n"
    )
    line = assert_clean_failure(
        capfd,
        chat_fit(chats, tmp_path, "--data.chat_template", str(template)),
        expect=f"the chat template ({template}) failed to render",
        untouched=tmp_path,
    )
    assert "line 2" in line and "nosuchfilter" in line


def test_a_model_without_a_chat_template_needs_one(tmp_path, capfd, tiny_gpt2_dir):
    from test_sft_cache import write_chats

    chats = write_chats(tmp_path / "data" / "chats.jsonl", 30)
    argv = chat_fit(chats, tmp_path, "--data.tokenizer", str(tiny_gpt2_dir))
    assert_clean_failure(
        capfd,
        argv,
        expect="the model's tokenizer has no chat template, so conversations cannot be rendered; "
        "pass one with --data.chat_template FILE",
        untouched=tmp_path,
    )

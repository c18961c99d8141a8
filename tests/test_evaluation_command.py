import argparse
import json
import re

import pytest
import torch

from conftest import TINY_TEXT
from nexttoken.commands.eval import add_eval_arguments, run_eval, spell
from nexttoken.errors import UserError
from nexttoken.models.hf import load_hf_causal_lm
from nexttoken.scoring.text import evaluate_texts

LONG = TINY_TEXT * 2


def cli(*argv):
    parser = argparse.ArgumentParser()
    add_eval_arguments(parser)
    return run_eval(parser.parse_args([str(a) for a in argv]))


def eval_error(*argv) -> str:
    """The message of the error ``nexttoken eval ARGV`` stops with, its settings spelled as eval's flags."""
    with pytest.raises(UserError) as info:
        cli(*argv)
    return info.value.message(spell)


def test_cli_json_prints_one_object(tiny_gpt2_dir, tmp_path, capfd):
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    (data / "a.txt").write_text(LONG)
    (data / "sub" / "b.md").write_text(TINY_TEXT)
    (data / ".hidden").write_text("ignored")
    assert cli(tiny_gpt2_dir, data, "--context", 32, "--stride", 8, "--json") == 0
    out, err = capfd.readouterr()
    assert out.count("\n") == 1
    obj = json.loads(out)
    for key in (
        "documents",
        "tokens",
        "bytes",
        "words",
        "loss",
        "perplexity",
        "bits_per_byte",
        "word_perplexity",
        "context",
        "stride",
    ):
        assert key in obj, key
    assert obj["documents"] == 2 and obj["context"] == 32 and obj["stride"] == 8
    assert obj["bytes"] == len(LONG.encode()) + len(TINY_TEXT.encode())
    assert "tok/s" in err  # the progress bar (tokens and tokens/s) is on stderr


def test_cli_table(tiny_gpt2_dir, tmp_path, capfd):
    f = tmp_path / "a.txt"
    f.write_text(LONG)
    assert cli(tiny_gpt2_dir, f, "--no-progress") == 0
    out, err = capfd.readouterr()
    assert "perplexity" in out and "bits per byte" in out and "not scored" in out
    assert "context 64 (the model's maximum), stride 32 (context // 2)" in err


A_TXT = ("a.txt", LONG.encode())


@pytest.mark.parametrize(
    "file, extra, message",
    [
        (("missing.txt", None), [], "DATA: path not found"),
        (("empty.txt", b""), [], "is empty"),
        (("bin.txt", b"\0\1\2"), [], "binary"),
        (("latin1.txt", "café".encode("latin-1")), [], "not valid UTF-8"),
        (("emptydir", "dir"), [], "holds no text files"),
        (A_TXT, ["--context", 8, "--stride", 9], "larger than --context 8"),
        (A_TXT, ["--context", 65], "maximum context of 64"),
        (A_TXT, ["--stride", 0], "--stride must be a positive"),
        (A_TXT, ["--batch-size", 0], "--batch-size must be"),
        (A_TXT, ["--bos", "yes", "--dtype", "float16", "--device", "tpu"], "unknown --device"),
    ],
)
def test_cli_bad_inputs(tiny_gpt2_dir, tmp_path, capfd, file, extra, message):
    name, content = file
    path = tmp_path / name
    if content == "dir":
        path.mkdir()
    elif content is not None:
        path.write_bytes(content)
    error = eval_error(tiny_gpt2_dir, path, *extra)
    assert re.search(message, error) and "\n" not in error, error
    assert capfd.readouterr().out == ""  # nothing half-printed on stdout


def test_cli_bad_model(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text(LONG)
    with pytest.raises(UserError, match="MODEL not found"):
        cli(tmp_path / "nope", f)
    with pytest.raises(UserError, match="neither a Hugging Face model folder nor a .gguf"):
        cli(f, f)
    # window settings are checked before anything is read or loaded
    error = eval_error(tmp_path / "nope", tmp_path / "missing.txt", "--context", 8, "--stride", 9)
    assert "--stride 9 is larger than --context 8" in error


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu(tiny_llama_dir, tmp_path, capfd):
    model, tok = load_hf_causal_lm(tiny_llama_dir)
    texts = [LONG, "short one", TINY_TEXT]
    cpu = evaluate_texts(model, tok, texts, context=16, stride=5, batch_size=3)
    gpu = evaluate_texts(model.to("cuda"), tok, texts, context=16, stride=5, batch_size=3)
    assert gpu.device.startswith("cuda") and gpu.tokens == cpu.tokens
    assert gpu.nll_sum == pytest.approx(cpu.nll_sum, rel=1e-4)
    f = tmp_path / "a.txt"
    f.write_text(LONG)
    assert cli(tiny_llama_dir, f, "--device", "cuda", "--json", "--no-progress") == 0
    obj = json.loads(capfd.readouterr().out)
    assert obj["device"].startswith("cuda") and obj["dtype"] in ("bfloat16", "float32")


# --------------------------------------------------------------------------- chat and instruction records
def test_cli_scores_the_responses_of_chat_records(tmp_path, capfd):
    from conftest import save_tiny_hf_model
    from nexttoken.data.chat import read_conversations, resolve_chat_template
    from nexttoken.loss import IGNORE_INDEX, next_token_loss
    from test_cli import PLAIN_CHAT_TEMPLATE
    from test_sft_cache import write_chats

    # A context longer than every conversation (the longest renders to 96 tokens), so each one is
    # scored in one window and the hand computation below is a single forward pass.
    tiny_gpt2_dir = save_tiny_hf_model(tmp_path / "gpt2", "gpt2", add_bos=False, max_positions=128)
    chats = write_chats(tmp_path / "chats.jsonl", 6)
    template_file = tmp_path / "template.jinja"
    template_file.write_text(PLAIN_CHAT_TEMPLATE)
    assert cli(tiny_gpt2_dir, chats, "--chat-template", template_file, "--json", "--no-progress") == 0
    out, err = capfd.readouterr()
    result = json.loads(out)
    assert "format: chat (auto: the records have 'messages'); 6 conversation(s)" in err
    # By hand: each conversation rendered and run whole; the loss over its scored tokens only.
    model, tokenizer = load_hf_causal_lm(tiny_gpt2_dir)
    template = resolve_chat_template(tokenizer, template_file)
    conversations, _ = read_conversations([json.loads(line) for line in chats.read_text().splitlines()])
    nll, tokens, scored_bytes = 0.0, 0, 0
    with torch.no_grad():
        for conversation in conversations:
            example = template.encode(conversation)
            ids = torch.from_numpy(example.tokens)[None]
            scored = torch.from_numpy(example.scored[1:])
            targets = torch.where(scored, ids[0, 1:], IGNORE_INDEX)[None]
            nll += next_token_loss(model(ids[:, :-1]), targets, reduction="sum").item()
            tokens += int(scored.sum())
            scored_bytes += int(example.nbytes[1:][example.scored[1:]].sum())
    assert result["examples"] == 6 and result["response_tokens"] == tokens and result["bytes"] == scored_bytes
    assert result["loss"] == pytest.approx(nll / tokens, rel=1e-5)
    assert cli(tiny_gpt2_dir, chats, "--chat-template", template_file, "--train-on", "all", "--json") == 0
    assert json.loads(capfd.readouterr().out)["prompt_tokens_ignored"] == 0
    assert cli(tiny_gpt2_dir, chats, "--chat-template", template_file, "--no-progress") == 0
    table = capfd.readouterr().out
    assert (
        f"{tokens:,} response tokens ({scored_bytes:,} bytes); " in table and "prompt tokens ignored" in table
    )


def test_cli_bad_chat_inputs(tiny_gpt2_dir, tmp_path):
    from test_sft_cache import chat_record, write_chats

    chats = write_chats(tmp_path / "chats.jsonl", 3)
    assert re.search(
        r"no chat template.*pass one with --chat-template FILE", eval_error(tiny_gpt2_dir, chats)
    )
    (tmp_path / "notes.txt").write_text("plain text\n")
    with pytest.raises(UserError, match="notes.txt is a text file among chat/instruction records"):
        cli(tiny_gpt2_dir, chats, tmp_path / "notes.txt")
    bad = write_chats(
        tmp_path / "bad.jsonl", records=[chat_record(0), {"messages": [{"role": "x", "content": "a"}]}]
    )
    with pytest.raises(UserError, match=r"bad.jsonl line 2: message 0 has role 'x'"):
        cli(tmp_path / "no-model-needed", bad)  # the records are read before the model is loaded

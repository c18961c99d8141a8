"""The plain commands' command lines: options anywhere among the arguments, a refusal in one line."""

import json

import pytest

from conftest import TINY_TEXT
from nexttoken.cli import _parser, main
from test_load import trained  # noqa: F401 - a fixture


def parsed(command: str, argv: list[str]) -> dict:
    return vars(_parser(command).parse_intermixed_args(argv))


EVAL_ADAPTER = [
    ["MODEL", "--adapter", "RUN.ckpt", "a.txt", "b.txt"],
    ["--adapter", "RUN.ckpt", "MODEL", "a.txt", "b.txt"],
    ["MODEL", "a.txt", "--adapter", "RUN.ckpt", "b.txt"],
    ["MODEL", "a.txt", "b.txt", "--adapter", "RUN.ckpt"],
]


@pytest.mark.parametrize(
    "command, orders, expected",
    [
        ("eval", EVAL_ADAPTER, {"model": "MODEL", "data": ["a.txt", "b.txt"], "adapter": "RUN.ckpt"}),
        (
            "eval",
            [["--json", "M", "a.txt"], ["M", "--json", "a.txt"], ["M", "a.txt", "--json"]],
            {"json": True},
        ),
        (
            "eval",
            [["M", "--tasks", "hellaswag"], ["--tasks", "hellaswag", "M"]],
            {"data": [], "tasks": "hellaswag"},
        ),
        (
            "inspect",
            [["--top", "5", "M", "T"], ["M", "--top", "5", "T"], ["M", "T", "--top", "5"]],
            {"text": "T"},
        ),
        ("generate", [["--max-new-tokens", "3", "M"], ["M", "--max-new-tokens", "3"]], {"max_new_tokens": 3}),
        ("chat", [["--system", "Be brief.", "M"], ["M", "--system", "Be brief."]], {"model": "M"}),
        ("export", [["--merge", "C", "O"], ["C", "--merge", "O"], ["C", "O", "--merge"]], {"out_dir": "O"}),
    ],
)
def test_options_go_before_between_and_after_the_arguments(command, orders, expected):
    first, *others = [parsed(command, argv) for argv in orders]
    assert all(other == first for other in others)
    assert first | expected == first


def test_eval_scores_the_same_whatever_the_order(tmp_path, capfd, tiny_gpt2_dir):
    text = tmp_path / "a.txt"
    text.write_text(TINY_TEXT)
    scores = []
    for argv in (
        [tiny_gpt2_dir, "--context", "32", text, "--json"],
        ["--json", tiny_gpt2_dir, text, "--context", "32"],
    ):
        assert main(["eval", *map(str, argv), "--no-progress"]) == 0
        scores.append(json.loads(capfd.readouterr().out)["nll_sum"])
    assert scores[0] == scores[1]


def test_eval_takes_an_adapter_between_the_model_and_the_data(tmp_path, capfd, tiny_gpt2_dir):
    text = tmp_path / "heldout.txt"
    text.write_text(TINY_TEXT)
    assert main(["eval", str(tiny_gpt2_dir), "--adapter", str(tmp_path / "RUN.ckpt"), str(text)]) == 2
    assert capfd.readouterr().err.startswith(f"error: --adapter {tmp_path / 'RUN.ckpt'} not found")


def test_inspect_and_generate_run_with_options_first(capfd, tiny_gpt2_dir):
    assert main(["inspect", "--top", "5", str(tiny_gpt2_dir), "a few words of text", "--no-progress"]) == 0
    assert "The 5 most surprising tokens" in capfd.readouterr().out
    assert main(["generate", "--max-new-tokens", "3", "--temperature", "0", str(tiny_gpt2_dir)]) == 0
    assert capfd.readouterr().out.strip()


def test_chat_reads_its_options_first_and_spells_its_own_flag(capfd, tiny_gpt2_dir):
    assert main(["chat", "--max-new-tokens", "3", str(tiny_gpt2_dir)]) == 2  # its tokenizer has no template
    assert (
        capfd.readouterr().err.strip().endswith("pass one with --chat-template FILE (a Jinja chat template)")
    )


@pytest.fixture(scope="module")
def checkpoint(trained):  # noqa: F811 - the fixture imported above
    """A nexttoken checkpoint of a whole model (test_load's: one optimizer step of a tiny GPT on bytes)."""
    return trained[0]


def test_export_takes_merge_before_its_arguments(tmp_path, capfd, checkpoint):
    assert main(["export", "--merge", str(checkpoint), str(tmp_path / "merged")]) == 2
    assert capfd.readouterr().err.startswith(f"error: --merge: {checkpoint} is not a LoRA run")
    assert main(["export", str(checkpoint), "--verbose", str(tmp_path / "whole")]) == 0
    assert (tmp_path / "whole" / "model.safetensors").is_file()


@pytest.mark.parametrize(
    "argv, expect",
    [
        (["eval"], "error: the following arguments are required: MODEL"),
        (
            ["eval", "MODEL", "a.txt", "--dtype", "float8"],
            "error: --dtype 'float8' is not one of auto, float32,",
        ),
        (["eval", "MODEL", "--context", "many", "a.txt"], "error: --context: invalid int value: 'many'"),
        (["inspect", "MODEL"], "error: the following arguments are required: TEXT"),
        (["generate", "MODEL", "--bogus"], "error: unrecognized arguments: --bogus"),
        (["chat", "MODEL", "--temperature"], "error: --temperature: expected one argument"),
        (["export", "RUN.ckpt"], "error: the following arguments are required: out_dir"),
    ],
)
def test_a_refused_command_line_is_one_line(capfd, argv, expect):
    assert main(argv) == 2
    out, err = capfd.readouterr()
    assert out == "" and err.count("\n") == 1, err
    assert err.startswith(expect) and err.endswith(f"; see `nexttoken {argv[0]} --help`\n"), err


def test_global_flags_go_anywhere(tmp_path, capfd, tiny_gpt2_dir):
    text = tmp_path / "a.txt"
    text.write_text(TINY_TEXT)
    argv = ["eval", str(tiny_gpt2_dir), "--verbose", str(text), "--json", "--no-progress", "--debug"]
    assert main(argv) == 0
    assert json.loads(capfd.readouterr().out)["documents"] == 1
    assert main(["eval", str(tmp_path / "missing"), "--debug", str(text)]) == 2  # --debug: the traceback
    assert "Traceback" in capfd.readouterr().err

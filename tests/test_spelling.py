"""Settings in messages: the library names them (nexttoken.errors.setting), each command spells them."""

import ast
import json
import re
from pathlib import Path

import pytest

from nexttoken.cli import _parser, main, spelling
from nexttoken.commands import eval as evaluation
from nexttoken.data.documents import load_documents
from nexttoken.errors import DataError
from test_cli import fit_args

SOURCE = Path(__file__).parents[1] / "src" / "nexttoken"


def records_without_text(folder: Path) -> Path:
    """JSON Lines whose records keep their text under 'body', not under the default text field."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "records.jsonl"
    path.write_text("".join(json.dumps({"body": f"document {i}. " * 40}) + "\n" for i in range(8)))
    return path


def error_line(capfd, argv: list[str]) -> str:
    """The one line ``nexttoken ARGV`` stops with (exit status 2)."""
    capfd.readouterr()
    assert main([str(a) for a in argv]) == 2
    err = capfd.readouterr().err
    return err.splitlines()[-1]


def test_a_missing_text_field_is_spelled_as_each_command_takes_it(tmp_path, capfd, tiny_gpt2_dir):
    records = records_without_text(tmp_path / "data")
    fit_line = error_line(capfd, fit_args(records, tmp_path / "runs", tmp_path / "cache", 1))
    assert fit_line.startswith("error: ") and fit_line.endswith("name the field with --data.text_field")
    eval_line = error_line(capfd, ["eval", tiny_gpt2_dir, records, "--no-progress"])
    assert eval_line.startswith("error: ") and eval_line.endswith("name the field with --text-field")
    # ... and eval's flag is real: with it, the same records are scored.
    assert (
        main(["eval", str(tiny_gpt2_dir), str(records), "--text-field", "body", "--json", "--no-progress"])
        == 0
    )
    assert json.loads(capfd.readouterr().out)["documents"] == 8


def test_outside_a_command_an_error_names_the_parameter(tmp_path):
    with pytest.raises(DataError) as info:
        load_documents([records_without_text(tmp_path)])
    assert info.value.settings() == ["data.text_field"]
    assert str(info.value).endswith("has no field 'text' (its fields: body); name the field with text_field")


@pytest.mark.parametrize(
    "command, setting, spelled",
    [
        ("fit", "data.text_field", "--data.text_field"),
        ("validate", "model.lora.r", "--model.lora.r"),
        ("fit", "ckpt_path", "--ckpt_path"),
        ("eval", "data.text_field", "--text-field"),
        ("eval", "data.path", "DATA"),
        ("eval", "data.val_path", "DATA"),
        ("eval", "data.chat_template", "--chat-template"),
        ("eval", "data.train_on", "--train-on"),
        ("eval", "batch_size", "--batch-size"),
        ("eval", "data.replace_invalid_utf8", "--data.replace_invalid_utf8"),  # not eval's: fit's flag
        ("inspect", "trust_remote_code", "--trust-remote-code"),
        ("generate", "max_new_tokens", "--max-new-tokens"),
        ("chat", "data.chat_template", "--chat-template"),
        ("export", "merge", "--merge"),
        ("no-such-command", "data.text_field", "text_field"),
    ],
)
def test_each_command_spells_a_setting_its_own_way(command, setting, spelled):
    assert spelling(command)(setting) == spelled


def test_the_settings_eval_spells_as_its_own_are_its_arguments():
    parser = _parser("eval")
    arguments = {s for action in parser._actions for s in (*action.option_strings, action.metavar) if s}
    assert set(evaluation.DATA_ARGUMENTS.values()) <= arguments


# Flags that a data or model function's message could spell: no command line's option at all.
_ANY_FLAG = re.compile(r"(?<![\w-])--[a-z]")
# Fit's flags for the configuration's settings: in no message of the training layer either.
_CONFIG_FLAG = re.compile(r"--(data|model|trainer)\.")


def string_literals(path: Path):
    """``(line, text)`` of every string literal in ``path``: docstrings and f-strings' text included."""
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            yield node.lineno, node.value


@pytest.mark.parametrize(
    "layer, flag",
    [("data", _ANY_FLAG), ("models", _ANY_FLAG), ("scoring", _ANY_FLAG), ("training", _CONFIG_FLAG)],
)
def test_only_the_commands_spell_a_flag(layer, flag):
    found = [
        f"{path.relative_to(SOURCE)}:{line}: {text.strip()[:80]!r}"
        for path in sorted((SOURCE / layer).rglob("*.py"))
        for line, text in string_literals(path)
        if flag.search(text)
    ]
    assert not found, "name settings with nexttoken.errors.setting:\n" + "\n".join(found)

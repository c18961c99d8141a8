"""`nexttoken fit`'s settings: the default run's time limit, choices that validate, one-line parse errors."""

from pathlib import Path

import pytest
from lightning.pytorch.callbacks import Timer

from nexttoken.cli import main
from nexttoken.commands.fit import NextTokenCLI, check_tokenizer, chooses_run_length, run_lightning_cli
from nexttoken.errors import UserError
from nexttoken.training.progress import StartSummary

CONFIGS = Path(__file__).parents[1] / "configs"


@pytest.mark.parametrize(
    "args, chosen",
    [
        (["fit"], False),
        (["fit", "--data.path", "texts/", "--model.model", "mini"], False),
        (["fit", "--trainer.max_steps", "800"], True),  # the default's value, but given
        (["fit", "--trainer.max_steps=20"], True),
        (["fit", "--trainer.max_epochs", "3"], True),
        (["fit", "--trainer.max_time", "00:01:00:00"], True),
        (["fit", "--config", "configs/ddp-cpu.yaml"], True),
        (["fit", "-c", "configs/fsdp-gpu.yaml"], True),
        (["fit", "--trainer", "trainer.yaml"], True),
    ],
)
def test_chooses_run_length(args, chosen):
    assert chooses_run_length(args) is chosen


def _instantiate(monkeypatch, tmp_path, *extra):
    """Parse and build everything `nexttoken fit` builds, without training."""
    monkeypatch.setattr(NextTokenCLI, "_run_subcommand", lambda self, subcommand: None)
    cli = run_lightning_cli(["fit", "--trainer.default_root_dir", str(tmp_path / "runs"), *extra])
    timers = [c for c in cli.trainer.callbacks if isinstance(c, Timer)]
    (summary,) = [c for c in cli.trainer.callbacks if isinstance(c, StartSummary)]
    return (timers[0]._duration if timers else None), summary.time_limit


def test_the_default_run_has_an_eight_minute_safety_net_and_says_so(monkeypatch, tmp_path):
    seconds, note = _instantiate(monkeypatch, tmp_path)
    assert seconds == 8 * 60
    assert note.startswith("training stops after 8 minutes at most, the safety net")


@pytest.mark.parametrize(
    "extra",
    [
        ["--trainer.max_steps", "800"],
        ["--trainer.max_epochs", "2"],
        ["--config", str(CONFIGS / "ddp-cpu.yaml")],
    ],
    ids=["max_steps", "max_epochs", "ddp-cpu.yaml"],
)
def test_a_chosen_run_length_is_not_capped(monkeypatch, tmp_path, extra):
    assert _instantiate(monkeypatch, tmp_path, *extra) == (None, None)


def test_a_config_without_a_length_is_not_capped_either(monkeypatch, tmp_path):
    config = tmp_path / "small.yaml"
    config.write_text("model:\n  model: mini\n")
    assert _instantiate(monkeypatch, tmp_path, "--config", str(config)) == (None, None)


def test_a_time_limit_given_is_kept_and_printed(monkeypatch, tmp_path):
    seconds, note = _instantiate(monkeypatch, tmp_path, "--trainer.max_time", "00:00:01:30")
    assert seconds == 90
    assert note == "training stops after --trainer.max_time 00:00:01:30 at most"


def test_help_lists_the_choices(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--model.fused_loss {auto,on,off}" in out
    assert "--model.on_nonfinite {stop,skip}" in out


@pytest.mark.parametrize(
    "flag, expect",
    [
        (
            ["--model.on_nonfinite", "ignore"],
            "error: --model.on_nonfinite 'ignore' is not one of stop, skip; ",
        ),
        (
            ["--trainer.max_steps", "many"],
            "error: --trainer.max_steps: Expected a <class 'int'>. Got value: many; ",
        ),
        (["--modle.lr", "0.1"], "error: unrecognized arguments: --modle.lr 0.1; "),
    ],
)
def test_a_refused_flag_is_one_line(capfd, flag, expect):
    assert main(["fit", *flag]) == 2
    out, err = capfd.readouterr()
    assert out == "" and len(err.splitlines()) == 1
    assert err.startswith(expect) and err.rstrip().endswith("see `nexttoken fit --help`")


def test_tokenizer_kinds(tmp_path):
    for kind in ("bytes", "bpe", str(tmp_path)):
        check_tokenizer(kind)
    with pytest.raises(UserError, match="--data.tokenizer 'wordpiece' is neither bytes nor bpe"):
        check_tokenizer("wordpiece")

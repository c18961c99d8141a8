"""The ``nexttoken`` command.

``fit`` and ``validate`` are LightningCLI subcommands, so every Trainer flag and YAML config
works as Lightning users expect (``--print_config``, ``--config``, ``--trainer.max_steps`` ...).
``eval``, ``inspect``, ``generate``, ``chat``, ``export`` and ``average`` are plain commands around a trained model,
and ``overlap`` one around the data;
their options go anywhere among their arguments. Bad input, a refused option included, ends in one
line on stderr and exit status 2 (``--debug`` shows the traceback), naming settings as the command
spells them (:mod:`nexttoken.commands.spelling`); what else is printed is decided by
:mod:`nexttoken.console` (``--verbose`` shows everything).
"""

from __future__ import annotations

import argparse
import atexit
import importlib
import os
import re
import sys
import threading
import traceback
from collections.abc import Callable

OVERVIEW = """\
usage: nexttoken COMMAND [options]        (no command: `nexttoken fit` on the built-in corpus)

Train and evaluate causal language models, with a scoreboard you can trust.

commands:
  fit        train a model on text (LightningCLI: every --trainer.* flag works; see `nexttoken fit --help`)
  validate   score a checkpoint on the validation split of the data (`--ckpt_path`)
  eval       perplexity / bits per byte of any causal LM on any text; lm-eval tasks with --tasks
  inspect    per-token surprisal of a text as an HTML page, and the most surprising tokens
  generate   sample text from a checkpoint, a Hugging Face folder or a GGUF file (--chat: a reply)
  chat       talk with a model through its chat template (history kept across turns)
  export     write a checkpoint as a Hugging Face folder (config, safetensors, tokenizer)
  average    average checkpoints of one run into a new one, each scored on the run's held-out data
  overlap    how much of an evaluation text occurs in a training corpus (shared 13-grams, and where)

global options:
  --debug    show the full traceback on errors
  --verbose  show everything the libraries print (Lightning's start-up lines, warnings in full)
  --version  print the version
"""

LIGHTNING_COMMANDS = ("fit", "validate")
GLOBAL_FLAGS = ("--debug", "--verbose")
# The module under nexttoken.commands that runs each command, and spells its settings (``spell``).
COMMAND_MODULES = {
    "fit": "fit",
    "validate": "fit",
    "eval": "eval",
    "inspect": "inspect",
    "generate": "generate",
    "chat": "generate",
    "export": "export",
    "overlap": "overlap",
    "average": "average",
}


# The plain commands: the module under nexttoken.commands, the names of its argument and run functions,
# and a description. Only the command that runs is imported (``nexttoken overlap`` never loads torch).
TOOL_COMMANDS = {
    "eval": ("eval", "add_eval_arguments", "run_eval", "score a causal LM on text"),
    "inspect": ("inspect", "add_inspect_arguments", "run_inspect", "per-token surprisal as HTML"),
    "generate": ("generate", "add_generate_arguments", "run_generate", "sample text from a model"),
    "chat": ("generate", "add_chat_arguments", "run_chat", "talk with a model through its chat template"),
    "export": ("export", "add_export_arguments", "run_export", "write a checkpoint as a Hugging Face folder"),
    "overlap": (
        "overlap",
        "add_overlap_arguments",
        "run_overlap",
        "shared n-grams of an evaluation text and a training corpus",
    ),
    "average": (
        "average",
        "add_average_arguments",
        "run_average",
        "average checkpoints of one run into a new checkpoint",
    ),
}


def _tool_command(name: str) -> tuple[Callable, Callable, str]:
    """The plain command ``name``'s (add_arguments, run, description), importing its module only."""
    module_name, add_arguments, run, description = TOOL_COMMANDS[name]
    module = importlib.import_module(f"nexttoken.commands.{module_name}")
    return getattr(module, add_arguments), getattr(module, run), description


class _CommandParser(argparse.ArgumentParser):
    """A plain command's parser whose refusal is one line, as fit's are: a UserError that ``main``
    prints, instead of argparse's usage block and exit."""

    def error(self, message: str):
        from nexttoken.errors import UserError

        raise UserError(f"{_parse_error_line(message)}; see `{self.prog} --help`")


def _parse_error_line(message: str) -> str:
    """argparse's message in fit's words: ``--dtype 'x' is not one of auto, float32, ...``."""
    choice = re.fullmatch(r"argument (\S+): invalid choice: (.*) \(choose from (.*)\)", message, re.S)
    if choice:
        name, value, choices = choice.groups()
        return f"{name} {value} is not one of {choices.replace(chr(39), '')}"
    return " ".join(message.removeprefix("argument ").split())


def _parser(name: str, parser_class: type[argparse.ArgumentParser] = _CommandParser):
    """The argument parser of the plain command ``name`` (``eval``, ``inspect`` ...)."""
    add_arguments, _, description = _tool_command(name)
    parser = parser_class(prog=f"nexttoken {name}", description=description)
    add_arguments(parser)
    return parser


def _run_tool(name: str, argv: list[str]) -> int:
    run = _tool_command(name)[1]
    # Intermixed: options may come before, between and after the positionals
    # (`eval MODEL --adapter RUN.ckpt DATA`), which plain parse_args ends at the first option.
    return run(_parser(name).parse_intermixed_args(argv))


def _command_args(argv: list[str]) -> list[str]:
    """The command and its arguments, without the global flags; no command (or an option first)
    means ``fit``."""
    command_args = [a for a in argv if a not in GLOBAL_FLAGS]
    if not command_args or (
        command_args[0].startswith("--") and command_args[0] not in ("--help", "-h", "--version")
    ):
        command_args = ["fit", *command_args]
    return command_args


def main(args: list[str] | None = None, *, whole_process: bool = False) -> int:
    """Run the command line ``args`` (default ``sys.argv[1:]``); return the exit status.
    ``whole_process``: this call is all the process does (:func:`run`), so what its start-up imports
    may be frozen out of garbage collection for good."""
    argv = list(sys.argv[1:] if args is None else args)
    debug, verbose = "--debug" in argv, "--verbose" in argv
    command_args = _command_args(argv)
    command = command_args[0]
    if command in ("--help", "-h", "help"):
        print(OVERVIEW)
        return 0
    if command == "--version":
        from nexttoken import __version__

        print(f"nexttoken {__version__}")
        return 0
    from nexttoken.console import console

    with console(verbose):
        try:
            if command in LIGHTNING_COMMANDS:
                run_lightning_cli = _import_lightning_command(whole_process)

                # The processes Lightning starts for DDP re-run this command line: keep the flags in it.
                run_lightning_cli(command_args, argv, verbose=verbose)
                return 0
            if command in TOOL_COMMANDS:
                return _run_tool(command, command_args[1:])
            print(f"error: unknown command {command!r}; run `nexttoken --help` for the list", file=sys.stderr)
            return 2
        except Exception as error:  # noqa: BLE001 - the one place errors become messages
            return _report(error, debug, command)


def run() -> None:
    """The ``nexttoken`` program (the console script and ``python -m nexttoken``): :func:`main`, then
    :func:`exit_now`."""
    exit_now(main(whole_process=True))


def exit_now(status: int) -> None:
    """End the process with ``status`` as the interpreter's shutdown would (other threads joined,
    ``atexit`` handlers run, output flushed), skipping only its teardown of every module and object:
    with torch and Lightning loaded that teardown took 1.2 s of a 9 s run (``benchmarks/run_overhead.py``),
    only to free memory that the process's end frees anyway. Under a profiler or tracer (cProfile, coverage) the interpreter ends as usual,
    for it writes its results after this returns."""
    if sys.getprofile() is not None or sys.gettrace() is not None:
        sys.exit(status)
    shutdown = getattr(threading, "_shutdown", None)  # what Py_Finalize calls: joins non-daemon threads
    if shutdown is not None:
        shutdown()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (AttributeError, OSError, ValueError):  # closed or replaced streams
            pass
    os._exit(status)


def _import_lightning_command(whole_process: bool = False) -> Callable:
    """Import what ``fit``/``validate`` run on, each big import marked as a start-up phase for the
    run's report (:mod:`nexttoken.startup`). For a process of its own (``whole_process``): torchmetrics
    without the integrations it never uses there, and the objects the imports make never collected
    (in a longer-lived process, objects already there that only a collection would free would stay)."""
    import gc

    from nexttoken import startup

    startup.clear_marks()
    startup.mark("interpreter")  # Python itself, its site packages, this module
    # The imports make about a million objects that live as long as the process: collecting cycles
    # among them while they are made, and then in every full collection of the run, found none and
    # took 2.5 s of a 35 s run at load 10, 0.16 s frozen (``gc.callbacks``).
    if whole_process:
        gc.disable()
    try:
        import torch  # noqa: F401

        startup.mark("import torch")
        if whole_process:
            startup.import_torchmetrics_lean()
        startup.mark("import torchmetrics")
        import lightning.pytorch  # noqa: F401

        startup.mark("import lightning")
        from nexttoken.commands.fit import run_lightning_cli

        if whole_process:
            gc.freeze()
    finally:
        if whole_process:
            gc.enable()
    startup.mark("import nexttoken")
    return run_lightning_cli


def spelling(command: str) -> Callable[[str], str]:
    """How ``command`` writes the settings an error names (its module's ``spell``); a name that is
    not a command gets the settings' parameter names."""
    from nexttoken.errors import parameter_name

    module = COMMAND_MODULES.get(command)
    return importlib.import_module(f"nexttoken.commands.{module}").spell if module else parameter_name


def _report(error: Exception, debug: bool, command: str = "") -> int:
    """Print ``error`` as the last line of the output, its settings spelled as ``command`` spells
    them; return the exit status."""
    from nexttoken.errors import UserError

    sys.stdout.flush()  # what was printed before comes before the error, in a log file too
    if debug:
        traceback.print_exc()
    text = error.message(spelling(command)) if isinstance(error, UserError) else str(error)
    message = text.splitlines()[0] if text else type(error).__name__
    if isinstance(error, (UserError, FileNotFoundError, PermissionError)):
        print(f"error: {message}", file=sys.stderr)
        return 2
    if not debug:
        print(
            f"error: {type(error).__name__}: {message} (run again with --debug for the traceback)",
            file=sys.stderr,
        )
    return 1


def check_command_line(argv: list[str]) -> None:
    """Parse ``argv`` (the words after ``nexttoken``) as ``main`` would, without running anything;
    raise UserError naming what is wrong (unknown command, unknown option, bad choice).

    Files named on the command line need not exist, except ``--config`` files, which are read.
    ``--help`` (and ``--print_config`` for ``fit``/``validate``) are accepted without printing.
    """
    from nexttoken.errors import UserError

    command, *rest = _command_args(argv)
    if command in ("--help", "-h", "help", "--version"):
        return
    if command not in (*LIGHTNING_COMMANDS, *TOOL_COMMANDS):
        raise UserError(f"unknown command {command!r}; run `nexttoken --help` for the list")
    if "--help" in rest or "-h" in rest:
        return
    if command in LIGHTNING_COMMANDS:
        from nexttoken.commands.fit import check_lightning_args

        check_lightning_args([command, *rest])
        return
    _parser(command).parse_intermixed_args(rest)

"""``nexttoken fit`` / ``nexttoken validate``: LightningCLI with nexttoken's defaults, one run
folder per run, ``--ckpt_path last`` that continues the latest run, and an end-of-run report."""

from __future__ import annotations

import copy
import csv
import functools
import importlib.util
import os
import re
import sys
import warnings
from argparse import ArgumentError
from pathlib import Path

import lightning as L
import torch
from jsonargparse import Namespace
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import CSVLogger

from nexttoken.checkpoints import AtomicCheckpointIO, read_checkpoint
from nexttoken.commands.spelling import fit_flag
from nexttoken.console import one_line
from nexttoken.data.datamodule import TextDataModule
from nexttoken.data.tokenizers import BUILTIN_KINDS
from nexttoken.errors import UserError
from nexttoken.models.load import is_checkpoint, is_hf_model
from nexttoken.models.lora import LoraSettings
from nexttoken.precision import auto_precision
from nexttoken.training.module import CausalLMModule
from nexttoken.training.phases import RunPhases, fit_called
from nexttoken.training.progress import ProgressLog, StartSummary, StepProgressBar
from nexttoken.training.report import write_report
from nexttoken.training.threads import AutoThreads
from nexttoken.training.throughput import ThroughputCallback
from nexttoken.training.trackers import CSV_LOGGERS, check_installed, class_name, place_in_run

DEFAULT_ROOT = "runs"
RUN_LOGGER = "nexttoken.commands.fit.RunLogger"


class RunLogger(CSVLogger):
    """Lightning's CSVLogger, except that a resumed run keeps the rows its first part logged
    before the checkpoint (CSVLogger would delete them), so metrics.csv and the curves cover the
    whole run. ``keep_before_step`` is set by ``--ckpt_path``; rows at or after it are dropped, as
    the resumed run logs those steps again."""

    def __init__(self, *args, keep_before_step: int | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._keep_before_step = keep_before_step

    @property
    def experiment(self):
        if self._experiment is not None:
            return self._experiment
        if self._keep_before_step is None:
            with warnings.catch_warnings():
                # The trackers' folders (tensorboard/, mlruns/) may be in the run folder already: a new
                # run's folder with no metrics.csv has nothing for CSVLogger to warn about.
                if not (Path(self.log_dir) / "metrics.csv").exists():
                    warnings.filterwarnings(
                        "ignore", message="Experiment logs directory .* exists and is not empty"
                    )
                return super().experiment
        metrics_csv = Path(self.log_dir) / "metrics.csv"
        kept = []
        if metrics_csv.is_file():
            with open(metrics_csv, newline="") as f:
                kept = [row for row in csv.DictReader(f) if int(row["step"]) < self._keep_before_step]
        writer = super().experiment  # this deletes the old metrics.csv
        for row in kept:
            writer.log_metrics(
                {k: float(v) for k, v in row.items() if v not in ("", None) and k != "step"},
                step=int(row["step"]),
            )
        writer.save()
        return writer


def spell(setting: str) -> str:
    """How ``nexttoken fit`` and ``validate`` write a setting an error or a note names: at its
    configuration path (``data.text_field`` is ``--data.text_field``)."""
    return fit_flag(setting)


def trainer_defaults(verbose: bool = False) -> dict:
    """The Trainer settings of ``nexttoken fit`` (each one a flag to override).

    Args:
        verbose: also show Lightning's model-summary table (``nexttoken --verbose``).
    """
    precision, _ = auto_precision()
    return {
        "max_steps": 800,
        "val_check_interval": 200,
        "check_val_every_n_epoch": None,
        "log_every_n_steps": 10,
        "gradient_clip_val": 1.0,
        # No validation pass before training: it costs start-up time on every run (nexttoken.training.phases),
        # and the first validation comes at val_check_interval anyway.
        "num_sanity_val_steps": 0,
        "precision": precision,
        "default_root_dir": DEFAULT_ROOT,
        "logger": {"class_path": RUN_LOGGER, "init_args": {"save_dir": DEFAULT_ROOT, "name": ""}},
        # Our start summary says the model's size; Lightning's table would add "Total FLOPs: 0".
        "enable_model_summary": verbose,
        # A bar needs a terminal; elsewhere (a log file, a batch job) ProgressLog prints plain lines.
        "enable_progress_bar": sys.stdout.isatty(),
        "callbacks": [
            ModelCheckpoint(
                monitor="val/loss",
                mode="min",
                save_top_k=1,
                save_last=True,
                filename="best-{step}",
                auto_insert_metric_name=False,
            ),
            # Speed and time (nexttoken.training.threads, nexttoken.training.phases): the thread count, measured
            # before the throughput clock starts; where the run's time goes, for the report.
            AutoThreads(),
            RunPhases(),
            # tokens/s and MFU in the progress bar and the logs (nexttoken.training.throughput).
            ThroughputCallback(),
            ProgressLog(),
        ],
    }


# The no-argument run stops after 8 minutes at most (on 2 free cores it ends by max_steps in ~5).
# A run whose length is chosen, by a config file or a flag, gets no such net.
SAFETY_NET_MINUTES = 8
SAFETY_NET_MAX_TIME = f"00:00:{SAFETY_NET_MINUTES:02d}:00"
RUN_LENGTH_FLAGS = (
    "--config",
    "-c",
    "--trainer",
    "--trainer.max_steps",
    "--trainer.max_time",
    "--trainer.max_epochs",
    "--model.decay_steps",  # a continued run's decay: its length decides the run's (docs/training.md)
)


def chooses_run_length(args: list[str]) -> bool:
    """True when the command line sets how long training runs: a config file, or a step, epoch or
    time limit."""
    return any(arg.split("=", 1)[0] in RUN_LENGTH_FLAGS for arg in args)


def latest_run(root: Path) -> Path | None:
    """The run folder (``version_N``) under ``root`` with the newest ``checkpoints/last.ckpt``."""
    candidates = [p.parent.parent for p in root.glob("version_*/checkpoints/last.ckpt")]
    return max(candidates, key=lambda run: (run / "checkpoints" / "last.ckpt").stat().st_mtime, default=None)


def _check_writable(folder: Path) -> None:
    probe = folder
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK):
        raise UserError(
            f"cannot write the run folder {folder} ({probe} is not a writable folder); "
            "choose another with --trainer.default_root_dir"
        )


class NextTokenCLI(LightningCLI):
    """LightningCLI with nexttoken's run folders, resume rules, start summary and progress lines.

    ``args`` is the command line without ``nexttoken`` itself (``["fit", ...]``).
    """

    def __init__(self, *cli_args, args: list[str], **kwargs) -> None:
        self._args = list(args)
        super().__init__(*cli_args, args=args, **kwargs)

    def parse_arguments(self, parser, args) -> None:
        # sys.argv holds the whole command (the processes Lightning starts for DDP re-run it);
        # the parser gets it without nexttoken's own flags, which Lightning would warn about.
        self.config = parser.parse_args(args)

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        base = LightningCLI.subcommands()
        return {name: base[name] for name in ("fit", "validate")}

    def _parse_ckpt_path(self) -> None:
        """Resolve ``--ckpt_path last`` to the newest run's last.ckpt, then let Lightning take the
        model's settings from the checkpoint (its convention), and make the data follow it too.
        A setting given on the command line that contradicts the checkpoint is an error, not
        something silently overridden."""
        subcommand = self.config.get("subcommand")
        config = self.config[subcommand] if subcommand else None
        self._resume_version = None
        if config is None or config.get("ckpt_path") is None:
            return super()._parse_ckpt_path()
        root = Path(config.trainer.default_root_dir or DEFAULT_ROOT)
        if config.ckpt_path == "last":
            run = latest_run(root)
            if run is None:
                raise UserError(
                    f"--ckpt_path last: no run with a last.ckpt under {root}; "
                    "start a new run without --ckpt_path, or pass a checkpoint file"
                )
            config.ckpt_path = str(run / "checkpoints" / "last.ckpt")
            self._resume_version = int(run.name.split("_", 1)[1])
        checkpoint = read_checkpoint(config.ckpt_path)  # missing, truncated or corrupted: one line
        self._resume_step = int(checkpoint.get("global_step", 0))
        self._resume_train_state = checkpoint.get(TextDataModule.__qualname__, {}).get("train_loader")
        given = {"model": config.model.clone(), "data": config.data.clone()}
        super()._parse_ckpt_path()
        config = self.config[subcommand]
        defaults = self._parser(subcommand).get_defaults()
        saved_data = checkpoint.get("datamodule_hyper_parameters", {})
        for key, value in saved_data.items():
            on_command_line = any(arg.split("=", 1)[0] == f"--data.{key}" for arg in self._args)
            if key in config.data and given["data"][key] == defaults.data[key] and not on_command_line:
                config.data[key] = value  # not given: the checkpoint's data settings
        config.model.block_size = config.data.block_size  # linked: the model's context is the data's
        self._continue_with_new_decay(config, given["model"], defaults.model, checkpoint)
        conflicts = []
        for group, keys in SHAPE_SETTINGS.items():
            for key in keys:
                mine, default = given[group].get(key), defaults[group].get(key)
                theirs = checkpoint.get(
                    "hyper_parameters" if group == "model" else "datamodule_hyper_parameters", {}
                ).get(key)
                if key == "lora":  # compared as what decides the adapters: rank, scale, targets
                    mine, theirs = _adapter_shape(mine), _adapter_shape(theirs)
                if theirs is not None and mine != default and mine != theirs:
                    conflicts.append(f"--{group}.{key} {mine} (checkpoint: {theirs})")
        if conflicts:
            raise UserError(
                f"checkpoint {config.ckpt_path} does not match this run: {'; '.join(conflicts)}; "
                "drop those flags to continue the checkpoint's run, or start a new run without --ckpt_path"
            )

    def _continue_with_new_decay(self, config, given, defaults, checkpoint: dict) -> None:
        """A run continued from a checkpoint takes its model settings from it, except the decay's length
        given now: from ``decay-start.ckpt``, ``--model.decay_steps N`` decays over the next N steps
        (the run ends N steps after the checkpoint; a ``--trainer.max_steps`` given must agree)."""
        for key in CONTINUATION_SETTINGS:
            if given.get(key) != defaults.get(key):
                config.model[key] = given[key]
        decay_steps = given.get("decay_steps")
        if decay_steps is None or decay_steps == checkpoint.get("hyper_parameters", {}).get("decay_steps"):
            return  # no new decay (a run resumed with its own settings goes on as it was)
        steps_given = any(a.split("=", 1)[0] == "--trainer.max_steps" for a in self._args)
        if not steps_given:
            config.trainer.max_steps = self._resume_step + decay_steps
        elif config.trainer.max_steps - decay_steps != self._resume_step:
            raise UserError(
                f"--model.decay_steps {decay_steps} with --trainer.max_steps {config.trainer.max_steps} would "
                f"start the decay at step {config.trainer.max_steps - decay_steps}, not at the checkpoint's step "
                f"{self._resume_step}; drop --trainer.max_steps (the run then ends at step "
                f"{self._resume_step + decay_steps})"
            )

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand]
        trainer = config.trainer
        root = Path(trainer.default_root_dir or DEFAULT_ROOT)
        _check_writable(root)
        self._given_logger = copy.deepcopy(trainer.logger)  # config.yaml keeps what was given
        trainer.logger = self._run_loggers(trainer.logger, root)
        check_tokenizer(config.data.tokenizer)
        # A pretrained model (Hugging Face, GGUF, a nexttoken checkpoint) brings its own tokenizer:
        # train on its tokens unless told otherwise.
        model_spec = config.model.model
        if (is_hf_model(model_spec) or is_checkpoint(model_spec)) and config.data.tokenizer == "bpe":
            config.data.tokenizer = model_spec

        chosen, reason = auto_precision(
            "cuda" if trainer.accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available() else "cpu"
        )
        if str(trainer.precision) == chosen:
            self._precision_note = f"precision: {chosen} (auto: {reason})"
        else:
            self._precision_note = (
                f"precision: {trainer.precision} (set by you; auto would pick {chosen}: {reason})"
            )
        self._time_limit_note = self._time_limit(trainer) if self.subcommand == "fit" else None
        if trainer.enable_progress_bar and importlib.util.find_spec("rich") is not None:
            given = [str(getattr(c, "class_path", type(c).__name__)) for c in trainer.callbacks or []]
            if not any("ProgressBar" in name for name in given):  # Lightning would add its own
                callbacks = [*self.trainer_defaults["callbacks"], StepProgressBar()]
                self.trainer_defaults = {**self.trainer_defaults, "callbacks": callbacks}

    def _run_loggers(self, logger, root: Path):
        """The run's loggers: its CSV first (metrics.csv in the run folder under default_root_dir,
        which decides the run folder), then any trackers, placed inside the run folder
        (``nexttoken.training.trackers``). Resuming continues the same folder, so one run's logs,
        curves and checkpoints stay together."""
        if logger is True:  # Lightning's "the default logger": the run's CSV
            logger = Namespace(class_path=RUN_LOGGER, init_args=Namespace(name=""))
        entries = logger if isinstance(logger, list) else [logger]
        if not entries or not all(isinstance(e, dict) or hasattr(e, "class_path") for e in entries):
            return logger  # no logger, or Logger objects made in Python: as given
        check_installed(entries)
        csv_loggers = [
            e for e in entries if e.get("class_path") == RUN_LOGGER or class_name(e) in CSV_LOGGERS
        ]
        run_logger = csv_loggers[0] if csv_loggers else Namespace(init_args=Namespace(name=""))
        run_logger["class_path"] = RUN_LOGGER
        init_args = run_logger["init_args"]
        init_args["save_dir"] = str(root)
        version = self._resume_version
        if version is not None:
            init_args["version"] = version
            init_args["keep_before_step"] = self._resume_step
        elif init_args.get("version") is None:  # the next free version_N, for the trackers too
            init_args["version"] = CSVLogger(save_dir=str(root), name=init_args.get("name") or "").version
        version = init_args["version"]
        run_dir = (
            root
            / (init_args.get("name") or "")
            / (version if isinstance(version, str) else f"version_{version}")
        )
        trackers = [e for e in entries if e is not run_logger]
        resume_step = self._resume_step if self._resume_version is not None else None
        for entry in trackers:
            place_in_run(entry, run_dir, resume_step, roots=(DEFAULT_ROOT, str(root)))
        return [run_logger, *trackers] if trackers else run_logger

    def instantiate_classes(self) -> None:
        super().instantiate_classes()
        # config.yaml records the loggers as given, not this run's folder (a new run from it gets its own).
        if getattr(self, "_given_logger", None) is not None:
            self.config[self.subcommand].trainer.logger = self._given_logger

    def _time_limit(self, trainer) -> str | None:
        """Set the no-argument run's safety net where it applies; the summary's note on a time limit."""
        if not chooses_run_length(self._args):
            trainer.max_time = SAFETY_NET_MAX_TIME
            return (
                f"training stops after {SAFETY_NET_MINUTES} minutes at most, the safety net of a run with no "
                "config and no step or time limit; --trainer.max_steps or --trainer.max_time choose the length"
            )
        if trainer.max_time is not None:
            return f"training stops after --trainer.max_time {trainer.max_time} at most"
        return None

    def add_arguments_to_parser(self, parser) -> None:
        # The model's context is the data's block size.
        parser.link_arguments("data.block_size", "model.block_size")

    def instantiate_trainer(self, **kwargs) -> L.Trainer:
        if not self._get(self.config_init, "trainer", default={}).get("plugins"):
            kwargs["plugins"] = [AtomicCheckpointIO()]
        trainer = super().instantiate_trainer(**kwargs)
        if self.subcommand == "fit":
            trainer.callbacks.append(StartSummary(self._precision_note, self._time_limit_note, spell))
        return trainer

    def _prepare_data_now(self) -> None:
        """Read, split and tokenize the data before Lightning starts, so that bad data stops the
        command before anything (a run folder, DDP processes) is created. Processes other than
        each machine's first find the data ready inside ``trainer.fit``, as Lightning arranges."""
        if self.trainer.local_rank == 0:
            self.datamodule.prepare_data()
            if self.subcommand == "fit":  # fewer training blocks than processes is an error
                loader = self.datamodule.make_train_loader(
                    0, self.trainer.world_size, self.trainer.accumulate_grad_batches
                )
                # A resumed run must keep the checkpoint's global batch: refused here, before
                # anything is written, rather than inside the run.
                if getattr(self, "_resume_train_state", None):
                    loader.check_resumable(self._resume_train_state)

    def before_fit(self) -> None:
        fit_called()  # nexttoken.training.phases: the set-up ends, the data phase starts
        self._prepare_data_now()
        # The objective must fit the data (preference pairs or not) before a run folder exists.
        self.model.check_data_format(self.datamodule.data_format)

    def before_validate(self) -> None:
        self._prepare_data_now()
        _print_rank_zero(self.trainer, self._precision_note)

    def after_fit(self) -> None:
        trainer, module, data = self.trainer, self.model, self.datamodule
        if trainer.interrupted:
            return
        # Score the final weights on the held-out set (data.val_tokens of it), unless that just happened.
        last = getattr(module, "last_validation_step", None)
        if last != trainer.global_step or not getattr(module, "last_validation", None):
            trainer.validate(module, datamodule=data, verbose=False)
        run_dir = Path(trainer.logger.log_dir if trainer.logger else trainer.default_root_dir)
        if trainer.is_global_zero:
            write_report(trainer, module, data, run_dir, spell)


# The model settings a continued run may change from its checkpoint's: the length of the decay.
CONTINUATION_SETTINGS = ("decay_fraction", "decay_steps")

# The settings that decide the network's shape and its token ids: a checkpoint only fits if they agree.
# (The model's block_size is not among them: it follows the data's, checked there.) The optimizer too:
# its state in the checkpoint fits only the optimizer that wrote it.
SHAPE_SETTINGS = {
    "model": (
        "model",
        "n_layer",
        "n_head",
        "n_embd",
        "bias",
        "lora",
        "optimizer",
    ),
    "data": ("tokenizer", "vocab_size", "block_size"),
}


def _adapter_shape(lora) -> str | None:
    """What decides a LoRA run's adapters, from its settings as parsed or as a checkpoint keeps them."""
    if lora is None:
        return None
    settings = LoraSettings.of(lora.as_dict() if hasattr(lora, "as_dict") else dict(lora))
    return f"r={settings.r}, alpha={settings.alpha:g}, targets={settings.targets or 'default'}"


def _print_rank_zero(trainer: L.Trainer, message: str) -> None:
    if trainer.is_global_zero:
        print(message, flush=True)


def check_tokenizer(kind: str) -> None:
    """``--data.tokenizer`` names a kind (``bytes``, ``bpe``) or an existing path; checked before
    any data is read."""
    if kind not in BUILTIN_KINDS and not Path(kind).expanduser().exists():
        raise UserError(
            f"--data.tokenizer {kind!r} is neither {' nor '.join(BUILTIN_KINDS)} nor an existing tokenizer.json "
            "file, tokenizer folder or .gguf file"
        )


def _cli_settings(verbose: bool = False) -> dict:
    """What ``NextTokenCLI`` is built with, for running a command and for checking one alike."""
    return {
        "model_class": CausalLMModule,
        "datamodule_class": TextDataModule,
        "trainer_defaults": trainer_defaults(verbose),
        "seed_everything_default": 1337,
        "auto_configure_optimizers": False,
        # A refused flag is one line (cli.main prints it), not the whole usage.
        "parser_kwargs": {"prog": "nexttoken", "exit_on_error": False}
        | {name: {"exit_on_error": False} for name in ("fit", "validate")},
    }


def run_lightning_cli(args: list[str], argv: list[str] | None = None, verbose: bool = False) -> NextTokenCLI:
    """Run ``nexttoken fit``/``validate``.

    Args:
        args: the command and its flags (``["fit", "--trainer.max_steps", "20"]``).
        argv: the whole command line as typed (with ``--debug``/``--verbose``), which the processes
            Lightning starts for DDP re-run; default ``args``.
        verbose: show Lightning's model-summary table.
    """
    saved, sys.argv = sys.argv, [sys.argv[0] if sys.argv else "nexttoken", *(args if argv is None else argv)]
    try:
        return NextTokenCLI(args=args, save_config_kwargs={"overwrite": True}, **_cli_settings(verbose))
    except ArgumentError as error:
        raise UserError(parse_error_message(str(error), args[0] if args else "fit")) from error
    finally:
        sys.argv = saved


class _ParsedOnly(Exception):
    """Raised once the command line is parsed, before anything runs (:func:`check_lightning_args`)."""


@functools.cache
def _lightning_parser():
    """The parser of ``fit``/``validate``, built once by a ``NextTokenCLI`` that stops as soon as it
    has it, before any Trainer, model or data exists."""
    parsers = []

    class ParserOnly(NextTokenCLI):
        def parse_arguments(self, parser, args) -> None:
            parsers.append(parser)
            raise _ParsedOnly

    try:
        ParserOnly(args=["fit"], **_cli_settings())
    except _ParsedOnly:
        pass
    return parsers[0]


def check_lightning_args(args: list[str]) -> None:
    """Parse ``args`` (``["fit", ...]``) as :func:`run_lightning_cli` would, without running anything;
    ``--config`` files are read. A refused flag is a :class:`UserError` in one line."""
    command = args[0] if args else "fit"
    rest = [a for a in args[1:] if a.split("=", 1)[0] != "--print_config"]
    try:
        _lightning_parser().parse_args([command, *rest])
    except ArgumentError as error:
        raise UserError(parse_error_message(str(error), command)) from error


def parse_error_message(message: str, command: str = "fit") -> str:
    """jsonargparse's message for a refused flag of ``nexttoken COMMAND``, on one line and in the
    flag's own spelling: ``--model.fused_loss 'x' is not one of auto, on, off; see ...``."""
    literal = re.search(
        r'key "([^"]+)":\s*Expected a typing\.Literal\[(.*?)\]\. Got value: (.*)', message, re.S
    )
    union = re.search(
        r'key "([^"]+)":\s*Does not validate against any of the Union subtypes\s*Subtypes: \[(.*?)\]\s*Errors.*'
        r"Given value: (.*)",
        message,
        re.S,
    )
    if literal:
        key, choices, value = literal.groups()
        message = f"--{key} {one_line(value)!r} is not one of {choices.replace(chr(39), '')}"
    elif union:  # int | Literal["all"]: "an integer or all"
        key, subtypes, value = union.groups()
        kinds = [
            m.group(1) or m.group(2).replace("'", "").replace(", ", " or ")
            for m in re.finditer(r"<class '(\w+)'>|typing\.Literal\[(.*?)\]", subtypes)
        ]
        names = {"int": "an integer", "float": "a number", "bool": "true/false", "str": "a string"}
        message = f"--{key} {one_line(value)!r} is neither {' nor '.join(names.get(k, k) for k in kinds)}"
    else:
        message = one_line(re.sub(r'Parser key "([^"]+)":', r"--\1:", message))
    return f"{message}; see `nexttoken {command} --help`"

"""``nexttoken fit`` / ``nexttoken validate``: LightningCLI with nexttoken's defaults, one run
folder per run, ``--ckpt_path last`` that continues the latest run, and an end-of-run report."""

from __future__ import annotations

import json
import os
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.plugins.io import TorchCheckpointIO

from nexttoken.data.datamodule import TextDataModule
from nexttoken.errors import UserError
from nexttoken.module import CausalLMModule, is_hf_model
from nexttoken.precision import auto_precision

DEFAULT_ROOT = "runs"
CSV_LOGGER = "lightning.pytorch.loggers.CSVLogger"


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write each checkpoint to a temporary file, then rename it over the old one: a kill during
    saving leaves the previous checkpoint intact."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.partial")
        super().save_checkpoint(checkpoint, partial, storage_options)
        os.replace(partial, path)


def trainer_defaults() -> dict:
    precision, _ = auto_precision()
    return {
        "max_steps": 1500,
        "max_time": "00:00:08:30",  # a safety net; the default run ends by max_steps well before
        "val_check_interval": 250,
        "check_val_every_n_epoch": None,
        "log_every_n_steps": 10,
        "gradient_clip_val": 1.0,
        "precision": precision,
        "default_root_dir": DEFAULT_ROOT,
        "logger": {"class_path": CSV_LOGGER, "init_args": {"save_dir": DEFAULT_ROOT, "name": ""}},
        "callbacks": [
            ModelCheckpoint(monitor="val/loss", mode="min", save_top_k=1, save_last=True,
                            filename="best-{step}", auto_insert_metric_name=False),
        ],
    }


def latest_run(root: Path) -> Path | None:
    """The run folder (``version_N``) under ``root`` with the newest ``checkpoints/last.ckpt``."""
    candidates = [p.parent.parent for p in root.glob("version_*/checkpoints/last.ckpt")]
    return max(candidates, key=lambda run: (run / "checkpoints" / "last.ckpt").stat().st_mtime, default=None)


def _check_writable(folder: Path) -> None:
    probe = folder
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK):
        raise UserError(f"cannot write the run folder {folder} ({probe} is not a writable folder); "
                        "choose another with --trainer.default_root_dir")


class NextTokenCLI(LightningCLI):
    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        base = LightningCLI.subcommands()
        return {name: base[name] for name in ("fit", "validate")}

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand]
        trainer = config.trainer
        root = Path(trainer.default_root_dir or DEFAULT_ROOT)
        _check_writable(root)
        logger = trainer.logger
        version = None
        ckpt_path = config.get("ckpt_path")
        if ckpt_path == "last":
            run = latest_run(root)
            if run is None:
                raise UserError(f"--ckpt_path last: no run with a last.ckpt under {root}; "
                                "start a new run without --ckpt_path, or pass a checkpoint file")
            config.ckpt_path = str(run / "checkpoints" / "last.ckpt")
            version = int(run.name.split("_", 1)[1])
        elif ckpt_path is not None and not Path(ckpt_path).is_file():
            raise UserError(f"--ckpt_path {ckpt_path}: no such checkpoint file")
        # The default logger writes into the run folder under default_root_dir; resuming continues
        # the same folder, so one run's logs, curves and checkpoints stay together.
        if isinstance(logger, dict) or hasattr(logger, "class_path"):
            if logger.get("class_path") == CSV_LOGGER:
                logger["init_args"]["save_dir"] = str(root)
                if version is not None:
                    logger["init_args"]["version"] = version
        # A Hugging Face model brings its own tokenizer: train on its tokens unless told otherwise.
        model_spec = config.model.model
        if is_hf_model(model_spec) and config.data.tokenizer == "bpe":
            config.data.tokenizer = model_spec

        chosen, reason = auto_precision(
            "cuda" if trainer.accelerator in ("gpu", "cuda", "auto") and _cuda() else "cpu"
        )
        if str(trainer.precision) == chosen:
            self._precision_note = f"precision: {chosen} (auto: {reason})"
        else:
            self._precision_note = f"precision: {trainer.precision} (set by you; auto would pick {chosen}: {reason})"

    def add_arguments_to_parser(self, parser) -> None:
        # The model's context is the data's block size.
        parser.link_arguments("data.block_size", "model.block_size")

    def instantiate_trainer(self, **kwargs) -> L.Trainer:
        if not self._get(self.config_init, "trainer", default={}).get("plugins"):
            kwargs["plugins"] = [AtomicCheckpointIO()]
        return super().instantiate_trainer(**kwargs)

    def before_fit(self) -> None:
        _print_rank_zero(self.trainer, self._precision_note)

    def before_validate(self) -> None:
        _print_rank_zero(self.trainer, self._precision_note)

    def after_fit(self) -> None:
        trainer, module, data = self.trainer, self.model, self.datamodule
        if trainer.interrupted:
            return
        # Score the final weights on the whole held-out split, unless that just happened.
        last = getattr(module, "last_validation_step", None)
        if last != trainer.global_step or not getattr(module, "last_validation", None):
            trainer.validate(module, datamodule=data, verbose=False)
        if trainer.is_global_zero:
            write_report(trainer, module, data)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _print_rank_zero(trainer: L.Trainer, message: str) -> None:
    if trainer.is_global_zero:
        print(message, flush=True)


def write_report(trainer: L.Trainer, module: CausalLMModule, data: TextDataModule) -> None:
    from nexttoken.report import compressor_bits_per_byte, format_report, plot_curves

    run_dir = Path(trainer.log_dir or trainer.default_root_dir)
    validation = module.last_validation
    compressors = compressor_bits_per_byte(data.val_text_bytes())
    text = format_report(validation, compressors, module.hparams.vocab_size)
    metrics_csv = run_dir / "metrics.csv"
    if trainer.logger is not None:
        trainer.logger.save()
    lines = ["", "=" * 60, text]
    if metrics_csv.exists():
        png = plot_curves(metrics_csv, run_dir / "curves.png")
        lines.append(f"curves: {png}")
    best = getattr(trainer.checkpoint_callback, "best_model_path", "")
    if best:
        lines.append(f"checkpoints: {Path(best).parent}  (best: {Path(best).name}, last: last.ckpt)")
    try:
        sample = module.generate_text("", max_new_tokens=120, temperature=0.8, top_k=50, seed=0)
        lines += ["sample (temperature 0.8, top-k 50):", "-" * 60, sample.strip("\n"), "-" * 60]
    except (AttributeError, NotImplementedError):
        pass  # a Hugging Face model without our generate(): the numbers are the report
    report = "\n".join(lines)
    print(report, flush=True)
    (run_dir / "report.txt").write_text(report.lstrip("\n") + "\n")
    (run_dir / "report.json").write_text(json.dumps({
        "validation": validation,
        "compressors_bits_per_byte": compressors, "global_step": trainer.global_step,
    }, indent=2) + "\n")


def run_lightning_cli(argv: list[str]) -> NextTokenCLI:
    import sys

    saved, sys.argv = sys.argv, [sys.argv[0] if sys.argv else "nexttoken", *argv]
    try:
        return _make_cli()
    finally:
        sys.argv = saved


def _make_cli() -> NextTokenCLI:
    return NextTokenCLI(
        CausalLMModule,
        TextDataModule,
        trainer_defaults=trainer_defaults(),
        seed_everything_default=1337,
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
    )


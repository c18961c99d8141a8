"""``nexttoken average CKPT... OUT [--weights W,...]``: the weights of several checkpoints of one
run averaged (uniformly or weighted) into a new checkpoint, with each one's validation score.

The inputs must be of one run: the same network shape, tokenizer and (for LoRA) base model, so
their weights line up name by name. The new checkpoint keeps the training state (step, optimizer,
data position) of the newest input, with the averaged weights in place of its own, so
``nexttoken eval OUT`` scores the average and ``nexttoken fit --ckpt_path OUT`` trains on from it.
A checkpoint of an EMA run (``--model.ema``) contributes its averaged weights, the ones its
validation scored. Every input and the output are scored as ``nexttoken validate`` scores a
checkpoint: the run's own held-out data (its data settings, kept in the checkpoint) through the
module's validation step.
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

from nexttoken.commands.spelling import tool_flag
from nexttoken.errors import UserError

PRECISIONS = ("auto", "32-true", "bf16-mixed", "16-mixed")


def spell(setting: str) -> str:
    """How ``nexttoken average`` writes a setting an error names (``weights`` is ``--weights``)."""
    return tool_flag(setting)


def parse_weights(text: str | None, count: int) -> list[float] | None:
    """``--weights 1,2,1``: one non-negative number per checkpoint, not all zero (None: uniform)."""
    if text is None:
        return None
    try:
        weights = [float(w) for w in text.split(",")]
    except ValueError:
        raise UserError(f"--weights {text!r}: give numbers separated by commas, e.g. 1,2,1") from None
    if len(weights) != count:
        raise UserError(
            f"--weights {text!r} has {len(weights)} numbers for {count} checkpoints; give one each"
        )
    if min(weights) < 0 or sum(weights) <= 0:
        raise UserError(f"--weights {text!r}: the weights must be non-negative and not all zero")
    return weights


def _shape_of(checkpoint: dict) -> dict[str, object]:
    """What must agree for two checkpoints' weights to be averaged: the settings that decide the
    network's shape and token ids, the tokenizer, a LoRA run's base model."""
    from nexttoken.commands.fit import SHAPE_SETTINGS

    model = checkpoint.get("hyper_parameters", {})
    data = checkpoint.get("datamodule_hyper_parameters", {})
    shape = {f"--model.{k}": model.get(k) for k in SHAPE_SETTINGS["model"]}
    shape |= {f"--data.{k}": data.get(k) for k in SHAPE_SETTINGS["data"]}
    shape["the tokenizer"] = checkpoint.get("tokenizer")
    shape["the LoRA base model"] = (checkpoint.get("lora") or {}).get("sha256")
    return shape


def check_one_run(paths: list[Path], checkpoints: list[dict]) -> None:
    """Refuse checkpoints whose weights do not line up with the first one's, naming what differs."""
    first_path, first = paths[0], checkpoints[0]
    first_shape = _shape_of(first)
    first_tensors = {k: tuple(v.shape) for k, v in first["state_dict"].items()}
    for path, checkpoint in zip(paths[1:], checkpoints[1:]):
        shape = _shape_of(checkpoint)
        differ = [key for key in first_shape if shape[key] != first_shape[key]]
        if differ:
            key = differ[0]
            what = (
                key
                if key.startswith("the ")
                else f"{key} {shape[key]} ({first_path.name}: {first_shape[key]})"
            )
            raise UserError(
                f"{path} is not of the same run as {first_path}: {what} differs; average checkpoints of one run"
            )
        tensors = {k: tuple(v.shape) for k, v in checkpoint["state_dict"].items()}
        if tensors != first_tensors:
            name = sorted(set(tensors) ^ set(first_tensors)) or [
                k for k in tensors if tensors[k] != first_tensors[k]
            ]
            raise UserError(
                f"{path} does not hold the same weights as {first_path} (e.g. {name[0]}); average "
                "checkpoints of one run"
            )


def average_checkpoints(
    paths: list[str | Path], out: str | Path, weights: list[float] | None = None, overwrite: bool = False
) -> dict:
    """Write the average of ``paths``' weights to ``out`` (atomically; an existing ``out`` only with
    ``overwrite``) and return the checkpoint written."""
    import torch

    from nexttoken.checkpoints import read_checkpoint
    from nexttoken.io import write_atomically
    from nexttoken.training.averaging import average_state_dicts

    paths, out = [Path(p) for p in paths], Path(out)
    if len(paths) < 2:
        raise UserError("give at least two checkpoints to average, then the new checkpoint's path")
    if out.suffix != ".ckpt":
        raise UserError(
            f"{out}: the new checkpoint's name must end in .ckpt (the last path is where it goes)"
        )
    if out.exists() and not overwrite:
        raise UserError(f"{out} already exists; choose a new path, or pass --overwrite (nothing was written)")
    if any(p.resolve() == out.resolve() for p in paths):
        raise UserError(f"{out} is one of the checkpoints averaged; write the average to a new path")
    checkpoints = [read_checkpoint(p) for p in paths]
    check_one_run(paths, checkpoints)
    newest = max(range(len(paths)), key=lambda i: checkpoints[i].get("global_step", 0))
    averaged = dict(checkpoints[newest])
    averaged["state_dict"] = average_state_dicts([c["state_dict"] for c in checkpoints], weights)
    # An EMA run's raw weights and averaging state belong to one checkpoint, not to the average: a run
    # continued from it starts its own EMA from the averaged weights.
    averaged.pop("current_model_state", None)
    averaged.pop("averaging_state", None)
    averaged["averaged_from"] = [
        {"path": str(p), "global_step": int(c.get("global_step", 0)), "weight": w}
        for p, c, w in zip(paths, checkpoints, weights or [1.0] * len(paths))
    ]
    write_atomically(out, lambda f: torch.save(averaged, f))
    return averaged


def validation_scores(paths: list[Path], precision: str = "auto") -> list[dict[str, float]]:
    """Each checkpoint's score on its run's held-out data, as ``nexttoken validate --ckpt_path`` gets
    it: the run's data module and model from the settings the (first) checkpoint keeps, the module's
    validation step, in ``precision`` (``auto``: what ``nexttoken validate`` and ``fit`` pick, so the
    numbers are the run's own validations')."""
    import lightning as L

    from nexttoken.checkpoints import read_checkpoint
    from nexttoken.data.datamodule import TextDataModule
    from nexttoken.precision import auto_precision
    from nexttoken.training.module import CausalLMModule

    first = read_checkpoint(paths[0])

    def settings(key: str) -> dict:
        return {k: v for k, v in first.get(key, {}).items() if not k.startswith("_")}

    data = TextDataModule(**settings("datamodule_hyper_parameters"))
    module = CausalLMModule(**settings("hyper_parameters"))
    trainer = L.Trainer(
        devices=1,
        precision=auto_precision()[0] if precision == "auto" else precision,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    scores = []
    for path in paths:
        module.last_validation = None
        with warnings.catch_warnings():
            # The training callbacks a checkpoint names (checkpointing, the EMA) have no part in scoring it.
            warnings.filterwarnings("ignore", message="Be aware that when using `ckpt_path`")
            trainer.validate(module, datamodule=data, ckpt_path=str(path), verbose=False)
        scores.append(module.last_validation)
    return scores


def format_scores(rows: list[tuple[str, int | None, float | None, dict[str, float]]]) -> str:
    """One line per checkpoint: its name, step, weight and validation numbers."""
    width = max(len(name) for name, *_ in rows)
    first = rows[0][3]
    lines = [f"validation over {first['tokens']:,} held-out tokens ({first['bytes']:,} bytes):"]
    for name, step, weight, result in rows:
        where = f"step {step:>6}" if step is not None else " " * 11
        share = f"weight {weight:<6g}" if weight is not None else " " * 13
        bpb = f"  bits per byte {result['bits_per_byte']:.4f}" if "bits_per_byte" in result else ""
        lines.append(f"  {name:<{width}}  {where}  {share}  loss {result['loss']:.4f}{bpb}")
    return "\n".join(lines)


def add_average_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "paths", nargs="+", metavar="CKPT", help="two or more checkpoints of one run, then OUT (a new .ckpt)"
    )
    parser.add_argument(
        "--weights",
        default=None,
        metavar="W1,W2,...",
        help="one weight per checkpoint, in their order (default: uniform); normalized to sum 1",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="auto",
        help="of the scoring; auto: what `nexttoken fit` picks (give the run's own if it set one)",
    )
    parser.add_argument(
        "--no-score", dest="score", action="store_false", help="write the average without scoring anything"
    )


def run_average(args: argparse.Namespace) -> int:
    *inputs, out = [Path(p) for p in args.paths]
    weights = parse_weights(args.weights, len(inputs))
    averaged = average_checkpoints(inputs, out, weights, overwrite=args.overwrite)
    shares = [w / sum(weights) for w in weights] if weights else [1 / len(inputs)] * len(inputs)
    print(f"averaged {len(inputs)} checkpoints into {out} (training state of step {averaged['global_step']})")
    if args.score:
        scores = validation_scores([*inputs, out], args.precision)
        rows = [
            (str(p), int(entry["global_step"]), share, score)
            for p, entry, share, score in zip(inputs, averaged["averaged_from"], shares, scores)
        ]
        print(format_scores([*rows, (str(out), None, None, scores[-1])]))
    return 0

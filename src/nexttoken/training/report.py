"""End-of-run report: the validation scoreboard beside what general-purpose compressors achieve
on the same held-out bytes, the train/validation curves as a PNG (with the compressors as reference
lines), a sample of the model's text, and where the run's time went (``nexttoken.training.phases``)."""

from __future__ import annotations

import bz2
import csv
import gzip
import json
import lzma
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from nexttoken.errors import parameter_name, setting, spelled
from nexttoken.io import write_atomically
from nexttoken.training.phases import RunPhases, format_phases

if TYPE_CHECKING:
    import lightning as L

    from nexttoken.data.datamodule import TextDataModule
    from nexttoken.data.sft import ExampleCounts
    from nexttoken.training.module import CausalLMModule


def compressor_bits_per_byte(data: bytes) -> dict[str, float]:
    """Bits per byte of gzip -9, bzip2 -9 and xz -9e on ``data``: what "no model" costs."""
    if not data:
        raise ValueError("no held-out bytes to compress")
    sizes = {
        "gzip -9": len(gzip.compress(data, compresslevel=9, mtime=0)),
        "bzip2 -9": len(bz2.compress(data, compresslevel=9)),
        "xz -9e": len(lzma.compress(data, preset=9 | lzma.PRESET_EXTREME)),
    }
    return {name: 8.0 * size / len(data) for name, size in sizes.items()}


def compressors_file(scored_targets: int) -> str:
    """Beside the token files of the cache: one computation per scored held-out text (xz -9e takes
    seconds per MB), named by how many of the held-out targets a validation scores."""
    return f"val_compressors-{scored_targets}.json"


def held_out_compressors(data: TextDataModule) -> tuple[dict[str, float], bool]:
    """Compressor bits per byte of the held-out text a validation scores (only that text is read:
    ``data.val_tokens`` bounds it, not the corpus), and whether they came from the cache."""
    from nexttoken.data.cache import cached_json

    computed = []

    def compute() -> dict[str, float]:
        computed.append(True)
        return compressor_bits_per_byte(data.scored_val_text())

    cache = getattr(data, "cache", None)
    if cache is None:
        return compute(), False
    return cached_json(cache, compressors_file(data.scored_val_targets), compute), not computed


def format_report(
    validation: dict[str, float],
    compressors: dict[str, float],
    vocab_size: int,
    examples: ExampleCounts | None = None,
) -> str:
    """The scoreboard as text. ``validation``: :func:`nexttoken.metrics.summarize`'s numbers plus
    ``tokens`` and ``bytes`` scored; ``compressors``: bits per byte by compressor name (shown only when
    the validation has bits per byte); ``vocab_size``: the perplexity of uniform guessing, for scale;
    ``examples``: the make-up of a chat/instruction validation set (the scores are over responses)."""
    if examples is not None:
        header = (
            f"validation over {examples.examples:,} held-out examples: {validation['tokens']:,} response tokens "
            f"({validation['bytes']:,} bytes) scored, {examples.prompt_tokens_ignored:,} prompt tokens ignored:"
        )
    else:
        header = f"validation over {validation['tokens']:,} held-out tokens ({validation['bytes']:,} bytes):"
    lines = [
        header,
        f"  loss            {validation['loss']:.4f} nats/token",
        f"  perplexity      {validation['perplexity']:.2f}   (uniform guessing over the vocabulary: {vocab_size:,})",
        f"  bits per token  {validation['bits_per_token']:.4f}",
    ]
    if "bits_per_byte" in validation:
        lines.append(f"  bits per byte   {validation['bits_per_byte']:.4f}")
    if "bits_per_byte" in validation and compressors:
        lines.append("the same held-out bytes, compressed (bits per byte; lower is better):")
        for name, bpb in compressors.items():
            lines.append(f"  {name:<14}  {bpb:.4f}")
    return "\n".join(lines)


def format_preference_report(validation: dict[str, float]) -> str:
    """The preference scoreboard of the held-out pairs (per-pair means of sums divided once)."""
    return "\n".join(
        [
            f"validation over {validation['pairs']:,} held-out preference pairs:",
            f"  loss                  {validation['loss']:.4f}  (per pair)",
            f"  accuracy              {validation['accuracy']:.4f}  (chosen reward above rejected; a tie is wrong)",
            f"  margin                {validation['margin']:.4f}",
            f"  chosen reward         {validation['chosen_reward']:.4f}",
            f"  rejected reward       {validation['rejected_reward']:.4f}",
            f"  chosen log-prob       {validation['chosen_logp']:.4f}  (summed over the reply, per pair)",
            f"  rejected log-prob     {validation['rejected_logp']:.4f}",
            f"  chosen response loss  {validation['chosen_response_loss']:.4f} nats/token",
        ]
    )


def read_metrics(metrics_csv: str | Path) -> dict[str, list[tuple[int, float]]]:
    """Series ``name -> [(step, value), ...]`` from Lightning's CSVLogger ``metrics.csv``."""
    series: dict[str, list[tuple[int, float]]] = {}
    with open(metrics_csv, newline="") as f:
        for row in csv.DictReader(f):
            step = int(row["step"])
            for name, value in row.items():
                if name in ("step", "epoch") or value in ("", None):
                    continue
                series.setdefault(name, []).append((step, float(value)))
    return series


def plot_curves(
    metrics_csv: str | Path, out_png: str | Path, compressors: dict[str, float] | None = None
) -> Path:
    """Train and validation loss against optimizer step, with validation bits per byte beside it and
    each compressor's bits per byte on the same held-out bytes as a reference line."""
    # A Figure of its own, without pyplot: no GUI backend to pick, no figure manager, a shorter import.
    from matplotlib.figure import Figure

    series = read_metrics(metrics_csv)
    fig = Figure(figsize=(11, 4))
    ax_loss, ax_bpb = fig.subplots(1, 2)
    for name, label in (("train/loss", "train"), ("val/loss", "validation")):
        if name in series:
            steps, values = zip(*series[name])
            ax_loss.plot(steps, values, label=label, marker="o" if label == "validation" else None)
    if "val/chosen_response_loss" in series:  # preference tuning: is the chosen replies' likelihood kept?
        steps, values = zip(*series["val/chosen_response_loss"])
        ax_loss.plot(steps, values, label="chosen replies' response loss (nats/token)", marker="s")
    ax_loss.set_xlabel("optimizer step")
    preference = "val/accuracy" in series  # preference pairs: the loss is per pair
    ax_loss.set_ylabel("loss (per pair)" if preference else "loss (nats/token)")
    ax_loss.set_title("preference loss" if preference else "next-token loss")
    ax_loss.legend()
    ax_loss.grid(alpha=0.3)
    if "val/bits_per_byte" in series:
        steps, values = zip(*series["val/bits_per_byte"])
        ax_bpb.plot(steps, values, marker="o", color="tab:green", label="model")
    if "val/accuracy" in series:  # preference pairs: the right panel shows the reward accuracy
        steps, values = zip(*series["val/accuracy"])
        ax_bpb.plot(steps, values, marker="o", color="tab:green", label="reward accuracy")
    styles = ("--", "-.", ":")
    for (name, bpb), style in zip((compressors or {}).items(), styles * 3):
        ax_bpb.axhline(bpb, linestyle=style, color="0.4", linewidth=1, label=f"{name} ({bpb:.2f})")
    ax_bpb.set_xlabel("optimizer step")
    ax_bpb.set_ylabel("accuracy" if preference else "bits per byte")
    ax_bpb.set_title(
        "validation preference accuracy (higher is better)"
        if preference
        else "validation bits per byte (lower is better)"
    )
    if ax_bpb.get_legend_handles_labels()[0]:
        ax_bpb.legend(fontsize=8)
    ax_bpb.grid(alpha=0.3)
    fig.tight_layout()
    out_png = Path(out_png)
    write_atomically(out_png, lambda f: fig.savefig(f, dpi=100, format="png"))
    return out_png


def _sample_lines(module: CausalLMModule, data: TextDataModule) -> list[str]:
    """A sample of the model's text; for chat data, its reply to the first held-out prompt."""
    from nexttoken.data.chat import Message, resolve_chat_template
    from nexttoken.models.generation import generate_reply, generate_text

    settings = {"max_new_tokens": 120, "temperature": 0.8, "top_k": 50, "seed": 0}
    if data.examples is None:
        sample = generate_text(module.model, module.tokenizer, "", **settings)
        return ["sample (temperature 0.8, top-k 50):", "-" * 60, sample.strip("\n")]
    messages = [Message(**m) for m in data.examples.sample_messages()]
    reply = generate_reply(module.model, resolve_chat_template(module.tokenizer), messages, **settings)
    prompt = messages[-1].content if messages else ""
    return [
        "sample reply to the first held-out prompt (temperature 0.8, top-k 50):",
        "-" * 60,
        *[f"> {line}" for line in prompt.splitlines()],
        reply.strip("\n"),
    ]


def speed_line(speed) -> str:
    """The last tokens/s and MFU of a :class:`~nexttoken.training.throughput.ThroughputCallback`, with the peak
    the MFU is a share of and where that peak comes from."""
    line = f"speed: {speed.tokens_per_sec:,.0f} tok/s over the last {speed.window} training steps"
    if speed.mfu is not None and speed.describe_peak() is not None:
        line += f", MFU {speed.mfu:.1%} of {speed.describe_peak()}"
    return line


def write_report(
    trainer: L.Trainer,
    module: CausalLMModule,
    data: TextDataModule,
    run_dir: Path,
    spell: Callable[[str], str] = parameter_name,
) -> str:
    """Print the end-of-run report and write ``report.txt``, ``report.json`` and ``curves.png``
    into ``run_dir``; returns the report's text. ``spell`` writes the settings it names as the
    command's flags."""
    started = time.perf_counter()
    validation = getattr(module, "last_validation", None)  # None: validation was turned off
    examples = data.scored_val_counts() if data.examples is not None else None
    # Compressors see no prompts, so they only compare with a model scored on plain text.
    scored_text = examples is None and validation is not None
    compressors, compressors_cached = held_out_compressors(data) if scored_text else ({}, False)
    timings = {"compressors": time.perf_counter() - started}
    if validation is None:
        text = f"no validation score: validation is off ({setting('trainer.limit_val_batches')} 0)"
    elif "accuracy" in validation:
        text = format_preference_report(validation)
    else:
        text = format_report(validation, compressors, module.hparams.vocab_size, examples)
    ema = getattr(getattr(module, "hparams", None), "ema", None)
    if validation is not None and ema is not None:  # what was scored (nexttoken.training.averaging)
        text += f"\nweights scored: the EMA of the weights (decay {ema:g}), as in every validation of the run"
    metrics_csv = run_dir / "metrics.csv"
    if trainer.logger is not None:
        trainer.logger.save()
    lines = ["", "=" * 60, text]
    if hasattr(data, "trust_report"):  # can the score be trusted: overlap, duplicates, document start
        trust_lines, trust = data.trust_report()
        lines += trust_lines
    if metrics_csv.exists():
        mark = time.perf_counter()
        png = plot_curves(metrics_csv, run_dir / "curves.png", compressors)
        timings["curves"] = time.perf_counter() - mark
        lines.append(f"curves: {png}")
    best = getattr(trainer.checkpoint_callback, "best_model_path", "")
    if best:
        lines.append(f"checkpoints: {Path(best).parent}  (best: {Path(best).name}, last: last.ckpt)")
    mark = time.perf_counter()
    lines += [*_sample_lines(module, data), "-" * 60]
    timings["sample"] = time.perf_counter() - mark
    summary = {
        "validation": validation,
        "compressors_bits_per_byte": compressors,
        "global_step": trainer.global_step,
        "weights_scored": "raw" if ema is None else f"ema {ema:g}",
    }
    if hasattr(data, "trust_report"):
        summary.update(trust)
    if getattr(module, "tokens_seen", None) is not None:  # the scored tokens trained on (train/tokens_seen)
        summary["tokens_seen"] = module.tokens_seen
    if examples is not None:
        summary["validation_examples"] = asdict(examples)
    threads = next((c for c in trainer.callbacks if type(c).__name__ == "AutoThreads"), None)
    if threads is not None and threads.choice:
        lines.append(f"threads: {threads.choice}")
        summary["threads"] = threads.choice
    speed = next((c for c in trainer.callbacks if type(c).__name__ == "ThroughputCallback"), None)
    if speed is not None and speed.tokens_per_sec is not None:
        lines.append(speed_line(speed))
        summary["throughput"] = {"tokens_per_sec": speed.tokens_per_sec, "mfu": speed.mfu}
        if speed.mfu is not None and speed.peak is not None:
            summary["throughput"].update(
                peak_flops=speed.peak.flops, peak_math=speed.peak.math, peak_source=speed.peak.source
            )
    phases = next((c for c in trainer.callbacks if isinstance(c, RunPhases)), None)
    if phases is not None:
        note = ", ".join(
            f"{name} {seconds:.2f}" + (" (cached)" if name == "compressors" and compressors_cached else "")
            for name, seconds in timings.items()
        )
        phases.add("report", time.perf_counter() - started, note)
        summary["phases"] = phases.summary(trainer.global_step)
        lines.append(format_phases(summary["phases"]))
    report = spelled("\n".join(lines), spell)
    print(report, flush=True)
    write_atomically(run_dir / "report.txt", report.lstrip("\n") + "\n")
    write_atomically(run_dir / "report.json", json.dumps(summary, indent=2) + "\n")
    return report

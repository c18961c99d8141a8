"""End-of-run report: the validation scoreboard beside what general-purpose compressors achieve
on the same held-out bytes, and the train/validation curves as a PNG."""

from __future__ import annotations

import bz2
import csv
import gzip
import lzma
from pathlib import Path


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


def format_report(validation: dict[str, float], compressors: dict[str, float], vocab_size: int) -> str:
    lines = [
        f"validation over {validation['tokens']:,} held-out tokens ({validation['bytes']:,} bytes):",
        f"  loss            {validation['loss']:.4f} nats/token",
        f"  perplexity      {validation['perplexity']:.2f}   (uniform guessing over the vocabulary: {vocab_size:,})",
        f"  bits per token  {validation['bits_per_token']:.4f}",
    ]
    if "bits_per_byte" in validation:
        lines.append(f"  bits per byte   {validation['bits_per_byte']:.4f}")
        lines.append("the same held-out bytes, compressed (bits per byte; lower is better):")
        for name, bpb in compressors.items():
            lines.append(f"  {name:<14}  {bpb:.4f}")
    return "\n".join(lines)


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


def plot_curves(metrics_csv: str | Path, out_png: str | Path) -> Path:
    """Train and validation loss against optimizer step, with validation bits per byte beside."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = read_metrics(metrics_csv)
    fig, (ax_loss, ax_bpb) = plt.subplots(1, 2, figsize=(11, 4))
    for name, label in (("train/loss", "train"), ("val/loss", "validation")):
        if name in series:
            steps, values = zip(*series[name])
            ax_loss.plot(steps, values, label=label, marker="o" if label == "validation" else None)
    ax_loss.set_xlabel("optimizer step")
    ax_loss.set_ylabel("loss (nats/token)")
    ax_loss.set_title("next-token loss")
    ax_loss.legend()
    ax_loss.grid(alpha=0.3)
    if "val/bits_per_byte" in series:
        steps, values = zip(*series["val/bits_per_byte"])
        ax_bpb.plot(steps, values, marker="o", color="tab:green")
    ax_bpb.set_xlabel("optimizer step")
    ax_bpb.set_ylabel("bits per byte")
    ax_bpb.set_title("validation bits per byte")
    ax_bpb.grid(alpha=0.3)
    fig.tight_layout()
    out_png = Path(out_png)
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png

"""Time to quality: held-out bits per byte of ``nexttoken fit`` on tiny Shakespeare after 10 minutes.

    python benchmarks/time_to_quality.py                 # the full 10-minute run (+ ~1 min set-up)
    python benchmarks/time_to_quality.py --minutes 3     # a shorter trial of the same recipe
    python benchmarks/time_to_quality.py --set model.n_layer=6 --set data.batch_size=32   # try a change

Data: ``../shared/data/tinyshakespeare.txt``, the first 90% of the bytes train, the last 10% held out
(``--data.val_fraction 0.1``: nexttoken holds out the last share of a one-file corpus's bytes); the
tokenizer is trained on the training split only. Training runs through ``nexttoken fit`` itself
(``nexttoken.commands.fit.run_lightning_cli``) with the recipe of ``configs/shakespeare-10min.yaml``,
for ``--minutes`` of wall time (``--trainer.max_time``, no step limit). Everything that makes the
run fit its time is the product's own: the learning-rate schedule follows the clock when a run is
bounded by time (``nexttoken.schedule``), and the thread count is measured and re-measured as the
machine's load changes (``nexttoken.training.threads.AutoThreads``; ``--threads N`` fixes it instead).

Validation (the whole held-out split) runs every 60 s of wall time (``--trainer.val_check_interval
00:00:01:00``); the curve of held-out bits per byte against wall time is printed at the end (time =
since training started, from ``time/elapsed_sec`` that nexttoken's throughput callback logs). The final
number is the run's own end-of-fit validation (``report.json``). Goal: at most 2.12 bits per byte (what
nanoGPT's README reports for its character model after 3 minutes on an A100). Last line:
``time_to_quality bits_per_byte: value=... goal<=2.12 PASS|MISS``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"

GOAL_BPB = 2.12
CONFIG = ROOT / "configs" / "shakespeare-10min.yaml"


def read_curve(metrics_csv: Path) -> list[tuple[int, float, float]]:
    """[(step, seconds since training started, held-out bits per byte)] from the run's metrics.csv."""
    elapsed: list[tuple[int, float]] = []
    vals: list[tuple[int, float]] = []
    with open(metrics_csv, newline="") as f:
        for row in csv.DictReader(f):
            step = int(row["step"])
            if row.get("time/elapsed_sec"):
                elapsed.append((step, float(row["time/elapsed_sec"])))
            if row.get("val/bits_per_byte"):
                vals.append((step, float(row["val/bits_per_byte"])))
    curve = []
    for step, bpb in vals:  # interpolate the clock between the logged steps around the validation
        before = [(s, t) for s, t in elapsed if s <= step]
        after = [(s, t) for s, t in elapsed if s > step]
        if before and after:
            (s0, t0), (s1, t1) = before[-1], after[0]
            seconds = t0 + (t1 - t0) * (step - s0) / (s1 - s0)
        else:
            seconds = before[-1][1] if before else (after[0][1] if after else math.nan)
        curve.append((step, seconds, bpb))
    return curve


def recipe_argv(data: str, seconds: int, val_every: int, sets: list[str], *extra: str) -> list[str]:
    """``nexttoken fit`` arguments of the 10-minute recipe: ``configs/shakespeare-10min.yaml`` on
    ``data`` for ``seconds`` of wall time (no step limit), validating every ``val_every`` seconds
    (time-based validation, Lightning >= 2.6), then ``extra`` and each ``key=value`` of ``sets``."""
    hh, mm, ss = seconds // 3600, seconds % 3600 // 60, seconds % 60
    argv = [
        "fit",
        "--config",
        str(CONFIG),
        "--data.path",
        data,
        "--data.val_fraction",
        "0.1",
        "--trainer.max_time",
        f"00:{hh:02d}:{mm:02d}:{ss:02d}",
        "--trainer.max_steps",
        "-1",
        "--trainer.val_check_interval",
        f"00:00:{val_every // 60:02d}:{val_every % 60:02d}",
        *extra,
    ]
    for item in sets:
        key, _, value = item.partition("=")
        argv += [f"--{key}", value]
    return argv


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--minutes", type=float, default=10.0, help="wall time of training (default 10)")
    parser.add_argument(
        "--val-every", type=float, default=60.0, help="seconds of training between validations"
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a setting of the recipe (data.* / model.* / trainer.*), repeatable",
    )
    parser.add_argument("--root", default=None, help="run folder root (default: a temporary folder)")
    parser.add_argument(
        "--threads", default="auto", help="torch threads: a number, or auto (nexttoken measures)"
    )
    parser.add_argument(
        "--data", default=str(DATA), help="the corpus (default ../shared/data/tinyshakespeare.txt)"
    )
    args = parser.parse_args()

    if not Path(args.data).is_file():
        sys.exit(f"no corpus at {args.data}")
    seconds = int(round(args.minutes * 60))
    if args.threads != "auto":
        os.environ["OMP_NUM_THREADS"] = args.threads  # nexttoken's AutoThreads then keeps it
        torch.set_num_threads(int(args.threads))
    argv = recipe_argv(
        args.data, seconds, int(round(args.val_every)), args.set, "--trainer.log_every_n_steps", "10"
    )
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.root or tmp)
        argv += ["--trainer.default_root_dir", str(root)]
        print("nexttoken " + " ".join(argv), flush=True)
        from nexttoken.commands.fit import run_lightning_cli

        load_start = os.getloadavg()[0]
        started = time.perf_counter()
        cli = run_lightning_cli(argv)
        wall = time.perf_counter() - started
        run_dir = Path(cli.trainer.log_dir)
        report = json.loads((run_dir / "report.json").read_text())
        curve = read_curve(run_dir / "metrics.csv")
        steps_done = cli.trainer.global_step

    bpb = report["validation"]["bits_per_byte"]
    compressors = report.get("compressors_bits_per_byte", {})
    print("\nheld-out bits per byte against wall time (since training started):")
    print(f"  {'step':>6}  {'seconds':>8}  {'bits/byte':>9}")
    for step, sec, value in curve:
        print(f"  {step:>6}  {sec:>8.0f}  {value:>9.4f}")
    auto = next((c for c in cli.trainer.callbacks if type(c).__name__ == "AutoThreads"), None)
    if auto is not None:
        print(f"threads: {auto.choice}; over the run (step, threads): {auto.switches}")
    print(
        f"final (step {steps_done}, {wall:.0f} s in fit, load average {os.getloadavg()[0]:.2f} now, "
        f"{load_start:.2f} at the start): {bpb:.4f} bits per byte; "
        + ", ".join(f"{k} {v:.3f}" for k, v in compressors.items())
    )
    print(
        f"time_to_quality bits_per_byte: value={bpb:.4f} goal<={GOAL_BPB} {'PASS' if bpb <= GOAL_BPB else 'MISS'}"
    )


if __name__ == "__main__":
    main()

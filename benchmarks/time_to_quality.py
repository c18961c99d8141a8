"""Time to quality: held-out bits per byte of ``nexttoken fit`` on tiny Shakespeare after 10 minutes.

    python benchmarks/time_to_quality.py                 # the full 10-minute run (+ ~1 min set-up)
    python benchmarks/time_to_quality.py --minutes 3     # a shorter trial of the same recipe
    python benchmarks/time_to_quality.py --set model.n_layer=6 --set data.batch_size=32   # try a change

Data: ``../shared/data/tinyshakespeare.txt``, the first 90% of the bytes train, the last 10% held out
(``--data.val_fraction 0.1``: nexttoken holds out the last share of a one-file corpus's bytes).
Training runs through ``nexttoken fit`` itself (``nexttoken.training.run_lightning_cli``), for
``--minutes`` of wall time (``--trainer.max_time``). The learning-rate schedule (warmup, then cosine
to ``min_lr``) must end when the time does; on a shared CPU a step's time varies several-fold over a
few minutes, so no step count fixed in advance does that. The ``TimeBudget`` callback below sets the
learning rate from the time left instead (and re-picks the thread count as the machine's load changes).

Validation (the whole held-out split) runs every 60 s of wall time (``--trainer.val_check_interval
00:00:01:00``); the curve of held-out bits per byte against wall time is printed at the end (time =
since training started, from ``time/elapsed_sec`` that nexttoken's throughput callback logs). The final
number is the run's own end-of-fit validation (``report.json``). Goal: below bzip2 -9 on the held-out
bytes, 2.40 bits per byte (xz -9e: 2.52, gzip -9: 3.10). Last line:
``time_to_quality bpb/bzip2: ratio=... goal<1.0 PASS|MISS``.

The recipe (why each choice, measured on a shared 2-core CPU) is RECIPE below and the README.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Timer

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
BZIP2_BPB = 2.40

# The recipe (trials on the shared 2-core CPU in the README). A small byte-level BPE (1024 ids, ~2.3
# bytes per token on this text) triples the bytes each step sees at the same model cost, and spares
# the model learning to spell; 6 layers of 192 is about as large as ~10 minutes can train (about 10
# passes over the 411k training tokens); batch 16 x 128 gives many steps. The schedule and the
# thread count live in TimeBudget below.
RECIPE: dict[str, str] = {
    "data.tokenizer": "bpe",
    "data.vocab_size": "1024",
    "data.block_size": "128",
    "data.batch_size": "16",
    "data.val_batch_size": "64",
    "model.model": "mini",
    "model.n_layer": "6",
    "model.n_head": "6",
    "model.n_embd": "192",
    "model.dropout": "0.0",
    "model.lr": "2e-3",
    "model.warmup_steps": "100",
    "model.min_lr": "2e-4",
    "model.compile": "false",
}


class TimeBudget(L.Callback):
    """The learning-rate schedule on the clock, and the thread count that is fastest right now.

    * Warmup over the module's ``warmup_steps``, then cosine from ``lr`` to ``min_lr`` over the
      *time* left until ``--trainer.max_time``: the schedule ends when the time does, however fast
      the machine happens to run (on a shared CPU a step's time varies several-fold over minutes).
      It sets each group's lr before every step, over the module's step-based schedule.
    * Every ``probe_every`` steps it runs a few steps with the other thread count (1 or all cores)
      and keeps whichever was faster: under load one thread can be several times faster.
    """

    def __init__(self, probe_every: int = 50, probe_steps: int = 4) -> None:
        super().__init__()
        self.probe_every, self.probe_steps = probe_every, probe_steps
        self.timer: Timer | None = None
        self.cores = (
            len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        )
        # --threads N (not auto) fixes the thread count: main() says so through the environment,
        # since LightningCLI builds this callback from its class path.
        fixed = os.environ.get("TIME_TO_QUALITY_FIXED_THREADS") == "1"
        self.choices = [self.cores] if fixed else sorted({1, self.cores})
        self.recent: list[float] = []  # step times under the current thread count
        self.probe: list[float] = []  # step times under the probed one
        self.probing: int | None = None
        self.switches: list[tuple[int, int]] = []  # (step, threads)
        self._start = 0.0

    def on_train_start(self, trainer, pl_module) -> None:
        self.timer = next((c for c in trainer.callbacks if isinstance(c, Timer)), None)
        self.switches.append((trainer.global_step, torch.get_num_threads()))

    def _multiplier(self, trainer, pl_module) -> float:
        hp = pl_module.hparams
        step, warmup = trainer.global_step, int(hp.warmup_steps)
        if step < warmup:
            return (step + 1) / warmup
        if self.timer is None or self.timer.time_remaining() is None:
            return 1.0
        if not hasattr(self, "_warm_time"):
            self._warm_time = self.timer.time_elapsed()
        total = self.timer.time_elapsed() + self.timer.time_remaining() - self._warm_time
        progress = min(1.0, max(0.0, (self.timer.time_elapsed() - self._warm_time) / max(total, 1e-9)))
        min_ratio = (hp.min_lr if hp.min_lr is not None else hp.lr / 10) / hp.lr
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        factor = self._multiplier(trainer, pl_module)
        for group in trainer.optimizers[0].param_groups:
            group["lr"] = group["initial_lr"] * factor
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        seconds = time.perf_counter() - self._start
        if len(self.choices) < 2:
            return
        if self.probing is None:
            self.recent = (self.recent + [seconds])[-self.probe_steps :]
            if trainer.global_step % self.probe_every == 0 and len(self.recent) == self.probe_steps:
                current = torch.get_num_threads()
                self.probing = next(n for n in self.choices if n != current)
                self.back_to, self.probe = current, []
                torch.set_num_threads(self.probing)
            return
        self.probe.append(seconds)
        if len(self.probe) > 1 and seconds > 1.5 * statistics.median(self.recent):
            torch.set_num_threads(self.back_to)  # clearly worse: stop probing at once
            self.probing, self.recent = None, []
            return
        if len(self.probe) > self.probe_steps:  # the first probed step settles the new threads
            keep = (
                self.probing
                if statistics.median(self.probe[1:]) < statistics.median(self.recent)
                else self.back_to
            )
            torch.set_num_threads(keep)
            if keep != self.back_to:
                self.switches.append((trainer.global_step, keep))
            self.probing, self.recent = None, []


def step_seconds(recipe: dict[str, str], vocab: int, steps: int = 4) -> float:
    """Median seconds of the recipe's training step (model, loss, clipping, AdamW) here, now."""
    from _common import plain_step, random_batches

    from nexttoken.models.gpt import GPT, GPTConfig
    from nexttoken.module import FUSED_LOSS_MIN_VOCAB_RATIO
    from nexttoken.optim import build_optimizer

    overrides = {
        k: int(recipe[f"model.{k}"]) for k in ("n_layer", "n_head", "n_embd") if f"model.{k}" in recipe
    }
    block, batch = int(recipe["data.block_size"]), int(recipe["data.batch_size"])
    config = GPTConfig.from_preset(recipe["model.model"], vocab, block_size=block, **overrides)
    model = GPT(config)
    optimizer, _ = build_optimizer(model)
    fused = vocab >= FUSED_LOSS_MIN_VOCAB_RATIO * config.n_embd
    ((x, y),) = random_batches(1, batch, block, vocab)
    times = []
    for i in range(steps + 2):
        start = time.perf_counter()
        plain_step(model, optimizer, x, y, fused=fused)
        if i >= 2:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


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
        help="override a recipe entry (data.* / model.* / trainer.*), repeatable",
    )
    parser.add_argument("--root", default=None, help="run folder root (default: a temporary folder)")
    parser.add_argument(
        "--threads", default="auto", help="torch threads: a number, or auto (time 1 and all cores)"
    )
    parser.add_argument(
        "--data", default=str(DATA), help="the corpus (default ../shared/data/tinyshakespeare.txt)"
    )
    args = parser.parse_args()

    recipe = dict(RECIPE)
    for item in args.set:
        key, _, value = item.partition("=")
        recipe[key] = value
    if not Path(args.data).is_file():
        sys.exit(f"no corpus at {args.data}")
    seconds = int(round(args.minutes * 60))
    vocab = 259 if recipe["data.tokenizer"] == "bytes" else int(recipe.get("data.vocab_size", 4096))

    if args.threads == "auto":
        # On a CPU shared with other programs, one thread can be several times faster than all cores
        # (every parallel op waits for its slowest thread); start with all cores only if clearly
        # faster right now. TimeBudget re-probes during the run.
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        timings = {}
        for n in sorted({1, cores}):
            torch.set_num_threads(n)
            timings[n] = step_seconds(recipe, vocab)
        threads = cores if timings[cores] * 1.25 < timings[1] else 1
        print(
            "threads: "
            + ", ".join(f"{n}: {t * 1e3:.0f} ms/step" for n, t in timings.items())
            + f" -> start with {threads}",
            flush=True,
        )
    else:
        threads = int(args.threads)
        os.environ["TIME_TO_QUALITY_FIXED_THREADS"] = "1"
    torch.set_num_threads(threads)

    hh, mm, ss = seconds // 3600, seconds % 3600 // 60, seconds % 60
    every = int(round(args.val_every))
    argv = [
        "fit",
        "--data.path",
        args.data,
        "--data.val_fraction",
        "0.1",
        "--trainer.max_time",
        f"00:{hh:02d}:{mm:02d}:{ss:02d}",
        "--trainer.max_steps",
        "-1",
        # time-based validation (Lightning >= 2.6): every ~val_every seconds of wall time
        "--trainer.val_check_interval",
        f"00:00:{every // 60:02d}:{every % 60:02d}",
        "--trainer.log_every_n_steps",
        "10",
        # the learning-rate schedule on the clock, and the thread count (see TimeBudget)
        "--trainer.callbacks+=time_to_quality.TimeBudget",
    ]
    for key, value in recipe.items():
        if not any(a == f"--{key}" for a in argv):
            argv += [f"--{key}", value]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.root or tmp)
        argv += ["--trainer.default_root_dir", str(root)]
        print("nexttoken " + " ".join(argv), flush=True)
        from nexttoken.training import run_lightning_cli

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
    budget = next(c for c in cli.trainer.callbacks if type(c).__name__ == "TimeBudget")
    print("threads over the run (step, threads): " + ", ".join(f"({a}, {b})" for a, b in budget.switches))
    print(
        f"final (step {steps_done}, {wall:.0f} s in fit): {bpb:.4f} bits per byte; "
        + ", ".join(f"{k} {v:.3f}" for k, v in compressors.items())
    )
    ratio = bpb / BZIP2_BPB
    print(f"time_to_quality bpb/bzip2: ratio={ratio:.3f} goal<1.0 {'PASS' if ratio < 1.0 else 'MISS'}")


if __name__ == "__main__":
    main()

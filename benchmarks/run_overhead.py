"""The fixed cost of a run: a whole ``nexttoken fit`` process beyond the time of its training steps.

    python benchmarks/run_overhead.py                          # the issue's measure, 3 rounds
    python benchmarks/run_overhead.py --baseline ../main/src   # and another source tree, side by side
    python benchmarks/run_overhead.py --runs 1

Each run is a fresh process, ``python -m nexttoken fit --data.path ../shared/data/tinyshakespeare.txt``
at the shape nanoGPT's ``train.py`` was compared at (the ``tiny`` GPT: 4 layers, width 128; context 64,
batch 12, the bytes tokenizer, eager, the default precision), timed from outside (process start to
exit). A first, untimed run per tree fills the caches (token cache, compressor baselines, matmul peak),
so the timed runs start warm, as every run after a user's first does.

    step     = (t(160 steps) - t(60 steps)) / 100
    overhead = t(60 steps) - 60 x step

Each round runs both lengths (and, with ``--baseline``, the other tree's too, alternating), and the
medians are kept. The 60-step run's own report (``report.json``, ``phases``) says where the time went,
phase by phase from the process start; ``exit`` is what the process took after its report.

Goal: at most 6 s. Last line: ``run_overhead process-steps: seconds=... goal<=6 PASS|MISS``; with
``--baseline``, two lines before it say ``run_overhead baseline/this process-steps|per-run: ratio=...``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
GOAL_SECONDS = 6.0
SHORT, LONG = 60, 160
SHAPE = ["--data.tokenizer", "bytes", "--data.block_size", "64", "--data.batch_size", "12"]


def one_run(args: argparse.Namespace, src: str, steps: int, root: Path) -> tuple[float, dict]:
    cmd = [
        sys.executable,
        "-m",
        "nexttoken",
        "fit",
        "--data.path",
        args.data,
        *SHAPE,
        "--trainer.max_steps",
        str(steps),
        "--trainer.default_root_dir",
        str(root),
        "--trainer.enable_progress_bar",
        "false",
        *args.extra,
    ]
    env = {**os.environ, "PYTHONPATH": src}
    env.setdefault("NEXTTOKEN_CACHE", str(Path(tempfile.gettempdir()) / "nexttoken-bench-cache"))
    start = time.perf_counter()
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if out.returncode != 0:
        sys.exit(f"nexttoken fit failed ({out.returncode}) with {src}:\n{out.stderr[-3000:]}")
    run = max(root.glob("version_*"), key=lambda p: int(p.name.split("_")[1]))
    return wall, json.loads((run / "report.json").read_text())["phases"]


def print_phases(label: str, wall: float, phases: dict) -> None:
    print(f"phases of {label}'s median {SHORT}-step run ({wall:.2f} s wall):")
    for name, seconds in phases["seconds"].items():
        note = phases["notes"].get(name)
        print(f"  {name:<19} {seconds:7.2f}" + (f"   ({note})" if note else ""))
    print(
        f"  {'exit':<19} {wall - phases['total_seconds']:7.2f}   (after the report, until the process ended)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=3, help="rounds (default 3); medians are kept")
    parser.add_argument(
        "--baseline", help="another tree's src folder, measured alternately (e.g. ../main/src)"
    )
    parser.add_argument("--data", default=str(DATA))
    parser.add_argument("extra", nargs="*", help="more fit flags (after --)")
    args = parser.parse_args()
    trees = {"this": str(ROOT / "src")}
    if args.baseline:
        trees["baseline"] = str(Path(args.baseline).resolve())
    walls = {(tree, steps): [] for tree in trees for steps in (SHORT, LONG)}
    phases: dict[str, list[tuple[float, dict]]] = {tree: [] for tree in trees}
    with tempfile.TemporaryDirectory() as tmp:
        for tree, src in trees.items():
            print(
                f"warm-up run of {tree} ({src}; fills the caches); load {os.getloadavg()[0]:.2f}", flush=True
            )
            one_run(args, src, SHORT, Path(tmp) / tree)
        for i in range(args.runs):
            for steps in (SHORT, LONG):
                for tree, src in trees.items():
                    wall, report = one_run(args, src, steps, Path(tmp) / tree)
                    walls[tree, steps].append(wall)
                    if steps == SHORT:
                        phases[tree].append((wall, report))
                    print(
                        f"round {i + 1}: {tree:<8} {steps:>3} steps {wall:6.2f} s wall, report: "
                        f"{report['step_seconds'] * 1e3:.1f} ms/step, beyond the steps {report['overhead_seconds']:.2f} s; "
                        f"load {os.getloadavg()[0]:.2f}",
                        flush=True,
                    )
    overheads, per_run = {}, {}
    for tree in trees:
        short, long = statistics.median(walls[tree, SHORT]), statistics.median(walls[tree, LONG])
        step = (long - short) / (LONG - SHORT)
        overheads[tree] = short - SHORT * step
        # Each run against its own typical step: steadier when the load changes between runs.
        per_run[tree] = statistics.median(
            wall - SHORT * report["step_seconds"] for wall, report in phases[tree]
        )
        runs = sorted(phases[tree], key=lambda r: r[0])
        print_phases(tree, *runs[len(runs) // 2])
        print(
            f"{tree}: t({SHORT}) {short:.2f} s, t({LONG}) {long:.2f} s (medians), step {step * 1e3:.1f} ms, "
            f"overhead t({SHORT}) - {SHORT} x step = {overheads[tree]:.2f} s; per run (wall - {SHORT} x "
            f"its report's typical step) {per_run[tree]:.2f} s"
        )
    if args.baseline:
        for name, measure in (("process-steps", overheads), ("per-run", per_run)):
            print(
                f"run_overhead baseline/this {name}: ratio={measure['baseline'] / measure['this']:.3f} "
                f"({measure['baseline']:.2f} s vs {measure['this']:.2f} s)"
            )
    overhead = overheads["this"]
    ok = overhead <= GOAL_SECONDS
    print(
        f"run_overhead process-steps: seconds={overhead:.2f} goal<={GOAL_SECONDS:g} {'PASS' if ok else 'MISS'}"
    )


if __name__ == "__main__":
    main()

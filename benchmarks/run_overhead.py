"""The fixed cost of a run: a whole ``nexttoken fit`` process against the time of its training steps.

    python benchmarks/run_overhead.py                    # 100 steps on tiny Shakespeare, warm cache, 3 runs
    python benchmarks/run_overhead.py --steps 100 --runs 1

Each run is a fresh process, ``python -m nexttoken fit --data.path ../shared/data/tinyshakespeare.txt
--trainer.max_steps 100`` with every other setting at its default, timed from outside (process start
to exit). A first, untimed run fills the caches (tokenizer, token cache, compressor baselines, matmul
peak), so the timed runs start warm, as every run after a user's first does. The run's own report
(``report.json``, ``phases``) says where the time went; the typical step is the median-free average of
the steps after the first (``step_seconds``).

    overhead = wall time of the process - steps x typical step time

Goal: at most 6 s. Last line: ``run_overhead process-steps: seconds=... goal<=6 PASS|MISS``.
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


def one_run(args: argparse.Namespace, root: Path, env: dict) -> tuple[float, dict]:
    cmd = [
        sys.executable,
        "-m",
        "nexttoken",
        "fit",
        "--data.path",
        args.data,
        "--trainer.max_steps",
        str(args.steps),
        "--trainer.default_root_dir",
        str(root),
        "--trainer.enable_progress_bar",
        "false",
        *args.extra,
    ]
    start = time.perf_counter()
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if out.returncode != 0:
        sys.exit(f"nexttoken fit failed ({out.returncode}):\n{out.stderr[-3000:]}")
    run = max(root.glob("version_*"), key=lambda p: int(p.name.split("_")[1]))
    return wall, json.loads((run / "report.json").read_text())["phases"]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--runs", type=int, default=3, help="timed runs (default 3); the median is kept")
    parser.add_argument("--data", default=str(DATA))
    parser.add_argument("extra", nargs="*", help="more fit flags (after --)")
    args = parser.parse_args()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    env.setdefault("NEXTTOKEN_CACHE", str(Path(tempfile.gettempdir()) / "nexttoken-bench-cache"))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        print(f"warm-up run (fills the caches); load average {os.getloadavg()[0]:.2f}", flush=True)
        one_run(args, root, env)
        results = []
        for i in range(args.runs):
            wall, phases = one_run(args, root, env)
            overhead = wall - args.steps * phases["step_seconds"]
            results.append((overhead, wall, phases))
            print(
                f"run {i + 1}: {wall:.2f} s wall, {args.steps} x {phases['step_seconds'] * 1e3:.1f} ms steps, "
                f"overhead {overhead:.2f} s (report's own estimate {phases['overhead_seconds']:.2f} s); "
                f"load average {os.getloadavg()[0]:.2f}",
                flush=True,
            )
    overhead, wall, phases = sorted(results, key=lambda r: r[0])[len(results) // 2]
    print(f"phases of the median run ({wall:.2f} s wall):")
    for name, seconds in phases["seconds"].items():
        note = phases["notes"].get(name)
        print(f"  {name:<17} {seconds:7.2f}" + (f"   ({note})" if note else ""))
    print(f"  {'process exit':<17} {wall - phases['total_seconds']:7.2f}   (after the report)")
    print(
        f"overheads of all runs: {', '.join(f'{r[0]:.2f}' for r in results)} (median {statistics.median(r[0] for r in results):.2f})"
    )
    ok = overhead <= GOAL_SECONDS
    print(
        f"run_overhead process-steps: seconds={overhead:.2f} goal<={GOAL_SECONDS:g} {'PASS' if ok else 'MISS'}"
    )


if __name__ == "__main__":
    main()

"""N-gram overlap: ``nexttoken.data.overlap.measure_overlap`` against a plain Python set of word tuples.

    python benchmarks/overlap_speed.py                # a 22 MB training corpus, ~1 min
    python benchmarks/overlap_speed.py --size 2GB     # the issue's 2 GB corpus (in /tmp; deleted after)

The training corpus (``--size``, in a temporary folder, files of at most 32 MB): tiny Shakespeare and
WikiText-2's validation file cut into paragraphs, each file the paragraphs in its own shuffled order,
every paragraph with one word changed (``w<file>``), so the files differ and no file is the last one
repeated. The evaluation text: WikiText-2's test file with 20 Shakespeare speeches pasted in, each
re-wrapped at 60 characters with curly apostrophes, so there is something to find. n = 13.

Both sides normalise with nexttoken's own ``words`` (the same C-speed normalisation, so what differs is
the n-gram machinery): the plain one builds the set of the evaluation text's 13-word tuples, then
reads each training file whole and looks up every 13-word tuple of it, then marks the evaluation words
covered by tuples found. The answers (covered words) must be equal. nexttoken also looks for near
copies (one word changed) on the same pass; the plain side does not, so it is timed doing less.

Each run is its own fresh process, timed inside it, and its peak memory is the process's peak resident
set (``ru_maxrss``: the interpreter, numpy and every array and object alike); with workers, the largest
worker's peak is printed too. Runs alternate, ``--rounds`` each, medians compared. The ratio is the
single-process one (``workers=0``), of CPU time (``time.process_time`` in each run: on a machine other
jobs share, a run's wall clock measures its neighbours too; the wall-clock ratio is printed beside it);
nexttoken with one worker per core is timed once more for the record (wall clock).
"""

from __future__ import annotations

import argparse
import multiprocessing
import random
import resource
import shutil
import statistics
import tempfile
import textwrap
import time
from pathlib import Path

from nexttoken.data.overlap import measure_overlap, words

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
FILE_BYTES = 32 << 20


def plain_overlap(train_files: list[Path], eval_file: Path, n: int) -> tuple[int, int]:
    """(covered words, evaluation words): a set of word tuples, looked up one position at a time."""
    evaluation = words(eval_file.read_text())
    wanted = {tuple(evaluation[i : i + n]) for i in range(len(evaluation) - n + 1)}
    found = set()
    for path in train_files:
        tokens = words(path.read_text())
        for i in range(len(tokens) - n + 1):
            gram = tuple(tokens[i : i + n])
            if gram in wanted:
                found.add(gram)
    covered = [False] * len(evaluation)
    for i in range(len(evaluation) - n + 1):
        if tuple(evaluation[i : i + n]) in found:
            covered[i : i + n] = [True] * n
    return sum(covered), len(evaluation)


def parse_size(text: str) -> int:
    units = {"KB": 1e3, "MB": 1e6, "GB": 1e9}
    for unit, factor in units.items():
        if text.upper().endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    return int(text)


def make_corpus(folder: Path, size: int) -> tuple[list[Path], Path]:
    shakespeare = (DATA / "tinyshakespeare.txt").read_text()
    wikitext = (DATA / "wikitext-2" / "valid.txt").read_text()
    paragraphs = [p for p in (shakespeare + "\n\n" + wikitext).split("\n\n") if p.strip()]
    (folder / "train").mkdir()
    train, written, k = [], 0, 0
    while written < size:
        rng = random.Random(k)
        order = list(range(len(paragraphs)))
        rng.shuffle(order)
        parts, part_bytes, target = [], 0, min(FILE_BYTES, size - written)
        while part_bytes < target:
            for i in order:
                paragraph = paragraphs[i]
                cut = paragraph.find(" ", rng.randrange(len(paragraph)))
                if cut > 0:  # one word changed: this copy differs from every other
                    after = paragraph.find(" ", cut + 1)
                    paragraph = paragraph[:cut] + f" w{k}" + (paragraph[after:] if after > 0 else "")
                parts.append(paragraph)
                part_bytes += len(paragraph) + 2
                if part_bytes >= target:
                    break
        path = folder / "train" / f"part{k:04d}.txt"
        text = "\n\n".join(parts)
        path.write_text(text)
        written += len(text.encode())
        train.append(path)
        k += 1
    test = (DATA / "wikitext-2" / "test.txt").read_text().split("\n")
    pasted = []
    for k in range(20):
        start = shakespeare.index("\n\n", 50_000 * k + 1000) + 2
        end = shakespeare.index("\n\n", start + 300)
        pasted.append(textwrap.fill(shakespeare[start:end].replace("'", "\u2019"), 60))
    step = len(test) // 20
    lines = [line for k in range(20) for line in [*test[k * step : (k + 1) * step], pasted[k]]]
    eval_file = folder / "eval.txt"
    eval_file.write_text("\n".join(lines))
    return train, eval_file


def _run(which: str, folder: str, n: int, workers: int, pipe) -> None:
    folder_path = Path(folder)
    start, cpu = time.perf_counter(), time.process_time()
    if which == "plain":
        answer = plain_overlap(sorted((folder_path / "train").iterdir()), folder_path / "eval.txt", n)
        extra = None
    else:
        result = measure_overlap(folder_path / "train", folder_path / "eval.txt", n, workers=workers)
        answer = (result.overlap_words, result.eval_words)
        extra = (result.overlap_fraction, result.partial_words)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3  # Linux: kB
    workers_peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1e3
    pipe.send((seconds, answer, extra, peak, workers_peak, cpu))


def timed(which: str, folder: Path, n: int, workers: int = 0):
    """``(seconds, answer, extra, peak MB, largest worker's peak MB, CPU seconds)`` of one run in a fresh process."""
    context = multiprocessing.get_context("spawn")
    receive, send = context.Pipe(duplex=False)
    process = context.Process(target=_run, args=(which, str(folder), n, workers, send))
    process.start()
    out = receive.recv()
    process.join()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="22MB", help="training corpus size: 22MB (default), 2GB, ...")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--n", type=int, default=13)
    parser.add_argument("--dir", default=None, help="where to build the corpus (default: a temporary folder)")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="overlap_speed_", dir=args.dir))
    try:
        began = time.perf_counter()
        train, eval_file = make_corpus(tmp, parse_size(args.size))
        size = sum(p.stat().st_size for p in train) / 1e6
        print(
            f"training corpus {size:,.1f} MB in {len(train)} files (built in {time.perf_counter() - began:.0f} s); "
            f"evaluation text {eval_file.stat().st_size / 1e6:.2f} MB",
            flush=True,
        )
        ours_runs, plain_runs = [], []
        for _ in range(args.rounds):
            ours_runs.append(timed("nexttoken", tmp, args.n))
            print(
                f"  nexttoken (1 process): {ours_runs[-1][0]:.2f} s, CPU {ours_runs[-1][5]:.2f} s", flush=True
            )
            plain_runs.append(timed("plain", tmp, args.n))
            print(
                f"  plain set of tuples: {plain_runs[-1][0]:.2f} s, CPU {plain_runs[-1][5]:.2f} s", flush=True
            )
            if plain_runs[-1][1] != ours_runs[-1][1]:
                raise SystemExit(f"answers differ: plain {plain_runs[-1][1]}, nexttoken {ours_runs[-1][1]}")
        parallel = timed("nexttoken", tmp, args.n, workers=multiprocessing.cpu_count())
        if parallel[1] != ours_runs[-1][1]:
            raise SystemExit(f"answers differ: workers {parallel[1]}, one process {ours_runs[-1][1]}")
        ours = statistics.median(r[0] for r in ours_runs)
        theirs = statistics.median(r[0] for r in plain_runs)
        covered, total = ours_runs[-1][1]
        print(
            f"answer: {covered:,} of {total:,} evaluation words covered ({covered / total:.3%}), equal in both; "
            f"nexttoken also found {ours_runs[-1][2][1]:,} words in near copies only"
        )
        print(
            f"nexttoken (1 process): {ours:.2f} s ({size / ours:.1f} MB/s)  rounds {[round(r[0], 2) for r in ours_runs]}"
        )
        print(
            f"nexttoken (workers, one per core of {multiprocessing.cpu_count()}): {parallel[0]:.2f} s "
            f"({size / parallel[0]:.1f} MB/s)"
        )
        print(
            f"plain set of tuples: {theirs:.2f} s ({size / theirs:.1f} MB/s)  rounds {[round(r[0], 2) for r in plain_runs]}"
        )
        print(
            f"peak memory (resident): nexttoken {max(r[3] for r in ours_runs):.0f} MB (1 process), "
            f"{parallel[3]:.0f} MB + {parallel[4]:.0f} MB per worker (workers); "
            f"plain {max(r[3] for r in plain_runs):.0f} MB; goal < 1000 MB"
        )
        cpu_ratio = statistics.median(r[5] for r in plain_runs) / statistics.median(r[5] for r in ours_runs)
        print(f"wall-clock ratio (1 process each): {theirs / ours:.2f}")
        print(
            f"overlap_speed nexttoken/plain: ratio={cpu_ratio:.2f} goal>=5 {'PASS' if cpu_ratio >= 5 else 'MISS'}"
        )
        print(f"overlap_speed nexttoken(workers)/plain: ratio={theirs / parallel[0]:.2f}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

"""N-gram overlap: ``nexttoken.data.overlap.measure_overlap`` against a plain Python set of word tuples.

    python benchmarks/overlap_speed.py               # tinyshakespeare x20 (22 MB) as training, ~30 s
    python benchmarks/overlap_speed.py --copies 80   # a larger training corpus

The training corpus: tiny Shakespeare written ``--copies`` times, one file each (in a temporary
folder). The evaluation text: WikiText-2's test file with 20 Shakespeare speeches pasted in, each
re-wrapped at 60 characters, so there is something to find. n = 13.

Both sides normalise with nexttoken's own ``words`` (the same C-speed normalisation, so what differs is
the n-gram machinery): the plain one builds the set of the evaluation text's 13-word tuples, then
reads each training file whole and looks up every 13-word tuple of it, then marks the evaluation words
covered by tuples found. The answers (covered words) must be equal. Timed alternately, ``--rounds``
each, medians compared; nexttoken runs in this process (``workers=0``) for the ratio, and once more
with one worker per core for the record. Peak memory: the largest heap each held, Python objects and
numpy arrays alike (``tracemalloc``, in a separate untimed run of each).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import textwrap
import time
import tracemalloc
from pathlib import Path

from nexttoken.data.overlap import measure_overlap, words

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"


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


def make_corpus(folder: Path, copies: int) -> tuple[list[Path], Path]:
    shakespeare = (DATA / "tinyshakespeare.txt").read_text()
    train = []
    (folder / "train").mkdir()
    for k in range(copies):
        path = folder / "train" / f"shakespeare{k:03d}.txt"
        path.write_text(shakespeare)
        train.append(path)
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


def peak_mb(fn) -> float:
    tracemalloc.start()
    fn()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--copies", type=int, default=8, help="tiny Shakespeare copies in the training corpus"
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--n", type=int, default=13)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        train, eval_file = make_corpus(Path(tmp), args.copies)
        size = sum(p.stat().st_size for p in train) / 1e6
        print(
            f"training corpus {size:.1f} MB in {len(train)} files; evaluation text {eval_file.stat().st_size / 1e6:.2f} MB"
        )
        ours_times, plain_times = [], []
        for _ in range(args.rounds):
            start = time.perf_counter()
            result = measure_overlap(Path(tmp) / "train", eval_file, args.n, workers=0)
            ours_times.append(time.perf_counter() - start)
            start = time.perf_counter()
            plain = plain_overlap(train, eval_file, args.n)
            plain_times.append(time.perf_counter() - start)
            if plain != (result.overlap_words, result.eval_words):
                raise SystemExit(
                    f"answers differ: plain {plain}, nexttoken {(result.overlap_words, result.eval_words)}"
                )
        start = time.perf_counter()
        parallel = measure_overlap(Path(tmp) / "train", eval_file, args.n)
        parallel_time = time.perf_counter() - start
        assert parallel.to_dict() == result.to_dict()
        ours, theirs = statistics.median(ours_times), statistics.median(plain_times)
        print(
            f"answer: {result.overlap_words:,} of {result.eval_words:,} evaluation words covered "
            f"({result.overlap_fraction:.3%}), equal in both"
        )
        print(
            f"nexttoken (1 process): {ours:.2f} s ({size / ours:.1f} MB/s)  rounds {[round(t, 2) for t in ours_times]}"
        )
        print(f"nexttoken (workers, one per core): {parallel_time:.2f} s ({size / parallel_time:.1f} MB/s)")
        print(
            f"plain set of tuples: {theirs:.2f} s ({size / theirs:.1f} MB/s)  rounds {[round(t, 2) for t in plain_times]}"
        )
        ours_peak = peak_mb(lambda: measure_overlap(Path(tmp) / "train", eval_file, args.n, workers=0))
        plain_peak = peak_mb(lambda: plain_overlap(train, eval_file, args.n))
        print(f"peak heap: nexttoken {ours_peak:.0f} MB, plain {plain_peak:.0f} MB")
        ratio = theirs / ours
        print(f"overlap_speed nexttoken/plain: ratio={ratio:.2f} goal>=5 {'PASS' if ratio >= 5 else 'MISS'}")


if __name__ == "__main__":
    main()

"""What the corpus checks at the start of every ``nexttoken fit`` cost (overlap of the held-out text with
training, exact duplicates: :mod:`nexttoken.data.contamination`), beside building the token cache of the
same corpus, on tiny Shakespeare (one file: held-out paragraphs) and on a generated corpus of ~200 MB in
files (Zipf-distributed words, so 13-grams rarely repeat by chance; a few files copied into the
held-out side and duplicated in training). Then the second run's cost (both cached).

    .venv/bin/python benchmarks/fit_checks_cost.py [--mb 200] [--workers 0]

Prints for each corpus: the checks' seconds in this process and in ``--workers`` processes (side by
side), the token cache's (bytes tokenizer, ``--workers``), their ratio, the cached re-read, and what
the checks found.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from nexttoken.data.cache import TokenCache
from nexttoken.data.contamination import compute_checks, corpus_checks
from nexttoken.data.corpus import Corpus
from nexttoken.data.documents import find_documents
from nexttoken.data.tokenizers import build_tokenizer

ROOT = Path(__file__).resolve().parent.parent
SHAKESPEARE = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"


def generated_corpus(folder: Path, megabytes: float, seed: int = 0) -> Path:
    """Files of ~500 KB of Zipf-distributed words (20k of them), lines of ~12 words; 3 files copied
    into others' places (duplicates) and one held-out-sized paragraph repeated across files."""
    rng = np.random.default_rng(seed)
    vocabulary = np.array([f"w{i}" for i in range(20_000)])
    weights = 1.0 / np.arange(1, len(vocabulary) + 1)
    weights /= weights.sum()
    folder.mkdir(parents=True)
    file_bytes = 500_000
    texts, total = [], 0
    while total < megabytes * 1e6 or len(texts) < 30:
        words = vocabulary[rng.choice(len(vocabulary), size=file_bytes // 5, p=weights)]
        lines = [" ".join(words[j : j + 12]) for j in range(0, len(words), 12)]
        texts.append("\n".join(lines) + "\n")
        total += len(texts[-1])
    for copy, original in ((5, 1), (9, 1), (12, 3)):  # exact duplicates
        texts[copy] = texts[original]
    quoted = texts[20][:3000]  # a passage quoted in many files, so some held-out file has it
    for i in range(30, len(texts), 7):
        texts[i] = texts[i][:10_000] + quoted + texts[i][10_000:]
    for i, text in enumerate(texts):
        (folder / f"f{i:05d}.txt").write_text(text)
    return folder


def measure(name: str, path: Path, cache_root: Path, workers: int) -> None:
    corpus = Corpus(find_documents(path), 0.05)
    size = corpus.size()
    seconds = {}
    for round_workers in sorted({0, workers}):  # side by side: this process, then worker processes
        started = time.perf_counter()
        checks = compute_checks(corpus, 13, workers=round_workers)
        seconds[round_workers] = time.perf_counter() - started
    corpus_checks(corpus, 13, cache_root)  # into the cache, for the second run
    started = time.perf_counter()
    cache = TokenCache(cache_root / "tokens" / name)
    cache.get_or_build(corpus, lambda: build_tokenizer("bytes"), workers=workers, progress=False)
    cache_seconds = time.perf_counter() - started
    started = time.perf_counter()
    again, _ = corpus_checks(corpus, 13, cache_root)
    cached_seconds = time.perf_counter() - started
    assert again.cached and again.overlap_words == checks.overlap_words
    print(
        f"{name}: {size / 1e6:.1f} MB, {checks.held_out_units:,} held-out {checks.unit}s "
        f"({checks.unit_bytes.sum() / 1e6:.1f} MB), {checks.train_documents:,} training documents"
    )
    print(
        f"  found: {checks.overlap_units} held-out {checks.unit}s overlap ({checks.overlap_words:,} of "
        f"{checks.held_out_words:,} words), {checks.duplicate_documents} training duplicates"
    )
    for round_workers, taken in seconds.items():
        print(f"  checks, {round_workers or 'no'} workers: {taken:.2f} s ({size / 1e6 / taken:.1f} MB/s)")
    print(
        f"  token cache (bytes tokenizer, {workers or 'no'} workers): {cache_seconds:.2f} s; "
        f"second run's checks (cached): {cached_seconds * 1000:.0f} ms"
    )
    best = min(seconds.values())
    print(f"{name}: ratio={best / cache_seconds:.3f} (fastest checks / token cache build)")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mb", type=float, default=200.0, help="size of the generated corpus")
    parser.add_argument("--workers", type=int, default=2, help="worker processes (checks and tokenizing)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fit-checks-"))
    try:
        measure("tinyshakespeare", SHAKESPEARE, work / "cache", args.workers)
        corpus = generated_corpus(work / "generated", args.mb)
        measure(f"generated-{args.mb:g}MB", corpus, work / "cache", args.workers)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"peak resident memory of this process: {peak:.0f} MB")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

"""Building the token cache: tokens per second against the tokenizer's own ceiling, and peak memory
that must not grow with the corpus, nor with one file of it.

    python benchmarks/tokenize_throughput.py             # throughput on a 40 MB corpus (~5 min on 2 busy cores)
    python benchmarks/tokenize_throughput.py --memory    # + peak memory of `nexttoken fit` on ~100 MB and ~2 GB
    python benchmarks/tokenize_throughput.py --memory-only --held-out default --tokenizer bytes   # the defaults' held-out set
    python benchmarks/tokenize_throughput.py --one-file-only   # peak memory, one text file of ~100 MB and ~1 GB

The corpus: WikiText-2 (``../shared/data``; the standard library's source where that is absent), cut
into articles and repeated, each copy in its own seeded order and with its own document ids, written
as JSON Lines compressed with zstandard in shards of ~100 MB of text, in a temporary folder that is
deleted afterwards.

Throughput. nexttoken = ``TokenCache.get_or_build`` from the files (reading, decompressing, parsing
JSON, splitting, tokenizing, per-token byte counts of the validation split, writing ``.npy`` streams),
tokens = the streams' length. The ceiling = Hugging Face ``tokenizers``' own batch encoder
(``encode_batch_fast``: ids only, no offsets) over the same texts already in memory, in batches of
1 MB, tokens = ids + one frame token per document. Two pairs: nexttoken with one worker per core
against the encoder with its own thread pool, and one worker against the encoder with
``TOKENIZERS_PARALLELISM=false``. Rounds alternate the four, medians are compared.

Memory. Peak resident memory of ``nexttoken fit --trainer.max_steps 1`` with default settings (a
4,096-token BPE trained on the 64 MB sample, one tokenizing worker per core), from the cache being
empty: the sum over the process and its children (sampled every 50 ms from /proc), and the largest
single process (``getrusage``). ``--data.val_fraction`` is chosen so that both corpora hold out the
same ~5 MB: validation and the report's compressors then cost the same, and what is left to differ is
what the size of the training corpus costs. ``--held-out default`` keeps the default split instead (5%:
~5 MB of 100 MB, ~100 MB of 2 GB) and the default ``--data.val_tokens``: what a user gets, where the
held-out set grows with the corpus and only the cap keeps validation and the compressors bounded.
``--tokenizer bytes`` skips the BPE (2 GB then tokenizes in ~7 minutes instead of ~20). Measured
(``--memory-only --held-out default --tokenizer bytes``, 2 workers, load ~2-3):

    memory: 102 MB corpus (bytes, val_fraction 0.0500), 102,259,504 tokens (4,994,470 held out): peak 807 MB (all processes), largest process 794 MB; fit 79 s (tokenizing 41 s with 2 workers)
    memory: 2,001 MB corpus (bytes, val_fraction 0.0500), 2,002,383,776 tokens (100,359,136 held out): peak 809 MB (all processes), largest process 792 MB; fit 458 s (tokenizing 413 s with 2 workers)
    tokenize_memory 2.0GB/102MB: ratio=1.00 goal<=1.3 PASS
    tokenize_memory 2.0GB peak/2GB: ratio=0.40 goal<1.0 PASS

One file (``--one-file``). The same measurement of ``nexttoken fit --data.tokenizer bytes
--trainer.max_steps 1`` on a corpus of one text file (tiny Shakespeare and WikiText-2's validation
and test text, repeated) of ~100 MB and of ~1 GB, each holding out its last ~1 MB. One file is one
document: before it was tokenized in pieces, a 50 MB file peaked at 6.46 GB and a 200 MB one had a
tokenizing worker killed by the kernel. Measured on the 2-core, 24 GB machine of benchmarks/README.md
(load ~3.5), two workers:

    one file, 100 MB, 100,000,002 tokens: peak 851 MB (all processes), largest process 786 MB (fit process 786 MB; its children, each: 199, 125, 13 MB); fit 56 s (tokenizing 20 s with 2 workers)
    one file, 1,000 MB, 1,000,000,002 tokens: peak 977 MB (all processes), largest process 821 MB (fit process 821 MB; its children, each: 203, 149, 13 MB); fit 232 s (tokenizing 197 s with 2 workers)
    tokenize_memory_one_file 1.0GB/100MB: ratio=1.15 goal<=1.3 PASS
    tokenize_memory_one_file 1.0GB peak/2GB: ratio=0.49 goal<1.0 PASS
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import zstandard

from nexttoken.data.cache import CHUNK_CHARS, TokenCache
from nexttoken.data.corpus import Corpus
from nexttoken.data.documents import default_corpus, find_documents
from nexttoken.data.parallel import available_cores
from nexttoken.data.tokenizers import build_tokenizer

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "wikitext-2"
SHARD_BYTES = 100_000_000
HELD_OUT_BYTES = 5_000_000
ONE_FILE_HELD_OUT_BYTES = 1_000_000  # bytes-tokenizer validation costs ~40 s per MB here


def source_texts() -> list[str]:
    """Real text cut into documents: WikiText-2 articles, or standard-library modules."""
    files = sorted(SHARED.glob("*.txt"))
    if files:
        texts = []
        for file in files:
            texts += [" = " + a for a in file.read_text(encoding="utf-8").split("\n = ") if a.strip()]
        return texts
    return [p.read_text(encoding="utf-8") for p in default_corpus()]


def write_corpus(folder: Path, megabytes: float, seed: int = 0) -> tuple[Path, int]:
    """JSON Lines shards of ``source_texts()`` repeated to ``megabytes`` of text; (folder, bytes)."""
    texts = source_texts()
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    target = int(megabytes * 1e6)
    written, shard, copy = 0, 0, 0
    compressor = zstandard.ZstdCompressor(level=3)
    while written < target:
        with open(folder / f"part-{shard:05d}.jsonl.zst", "wb") as raw, compressor.stream_writer(raw) as out:
            in_shard = 0
            while in_shard < SHARD_BYTES and written < target:
                order = list(range(len(texts)))
                rng.shuffle(order)
                for i in order:
                    line = json.dumps({"id": f"{copy}-{i}", "text": texts[i]}) + "\n"
                    out.write(line.encode())
                    size = len(texts[i].encode())
                    in_shard += size
                    written += size
                copy += 1
        shard += 1
    return folder, written


def write_one_file(path: Path, megabytes: float) -> int:
    """One text file: tiny Shakespeare and WikiText-2's validation and test text, repeated to about
    ``megabytes`` (the standard library's source where they are absent); its size in bytes."""
    files = [SHARED.parent / "tinyshakespeare.txt", SHARED / "valid.txt", SHARED / "test.txt"]
    if all(f.is_file() for f in files):
        unit = "\n".join(f.read_text(encoding="utf-8") for f in files).encode("utf-8")
    else:
        unit = "\n".join(source_texts()).encode("utf-8")
    target = int(megabytes * 1e6)
    with open(path, "wb") as out:
        for _ in range(target // len(unit)):
            out.write(unit)
        out.write(unit[: target % len(unit)].decode("utf-8", errors="ignore").encode("utf-8"))
    return path.stat().st_size


# --------------------------------------------------------------------------- throughput
def ceiling(hf_tokenizer, texts: list[str], threads: bool) -> tuple[int, float]:
    """(tokens, seconds) of the encoder over in-memory texts in 1 MB batches."""
    os.environ["TOKENIZERS_PARALLELISM"] = "true" if threads else "false"
    tokens, batch, size = 0, [], 0
    started = time.perf_counter()
    for text in texts:
        batch.append(text)
        size += len(text)
        if size >= CHUNK_CHARS:
            tokens += sum(
                len(e.ids) + 1 for e in hf_tokenizer.encode_batch_fast(batch, add_special_tokens=False)
            )
            batch, size = [], 0
    if batch:
        tokens += sum(len(e.ids) + 1 for e in hf_tokenizer.encode_batch_fast(batch, add_special_tokens=False))
    seconds = time.perf_counter() - started
    os.environ["TOKENIZERS_PARALLELISM"] = "true"
    return tokens, seconds


def build(corpus: Corpus, tokenizer, workers: int, scratch: Path) -> tuple[int, float]:
    """(tokens, seconds) of a cache build from the files, into a fresh folder."""
    folder = Path(tempfile.mkdtemp(dir=scratch)) / "tokens" / "bench"
    started = time.perf_counter()
    meta, built = TokenCache(folder).get_or_build(corpus, lambda: tokenizer, workers=workers, progress=False)
    seconds = time.perf_counter() - started
    assert built
    shutil.rmtree(folder.parent.parent)
    return meta["train_tokens"] + meta["val_tokens"], seconds


def throughput(args: argparse.Namespace, scratch: Path) -> list[str]:
    folder, text_bytes = write_corpus(scratch / "corpus", args.megabytes)
    corpus = Corpus(find_documents(folder), 0.05)
    texts = [d.text for _, d in corpus.documents()]
    tokenizer = build_tokenizer("bpe", corpus.sample(5_000_000), 4096)
    hf = tokenizer._hf  # the raw Hugging Face tokenizer, as it was trained
    cores = args.workers or available_cores()
    print(f"corpus: {text_bytes / 1e6:.1f} MB of text in {len(texts):,} documents; {cores} cores")
    runs: dict[str, list[float]] = {}
    tokens: dict[str, int] = {}
    for r in range(args.rounds):
        for name, run in (
            ("encode_batch (threads)", lambda: ceiling(hf, texts, threads=True)),
            (f"nexttoken ({cores} workers)", lambda: build(corpus, tokenizer, cores, scratch)),
            ("encode_batch (1 thread)", lambda: ceiling(hf, texts, threads=False)),
            ("nexttoken (1 worker)", lambda: build(corpus, tokenizer, 1, scratch)),
        ):
            n, seconds = run()
            tokens.setdefault(name, n)
            assert tokens[name] == n
            runs.setdefault(name, []).append(n / seconds)
            print(
                f"round {r + 1}  {name:<26} {n:,} tokens in {seconds:6.1f} s: {n / seconds:>10,.0f} tokens/s",
                flush=True,
            )
    medians = {name: statistics.median(values) for name, values in runs.items()}
    assert len(set(tokens.values())) == 1, tokens  # both sides made the same tokens
    all_cores = medians[f"nexttoken ({cores} workers)"] / medians["encode_batch (threads)"]
    one = medians["nexttoken (1 worker)"] / medians["encode_batch (1 thread)"]
    return [
        f"tokenize_throughput nexttoken/encode_batch ({cores} workers vs threads): ratio={all_cores:.2f} goal>=0.8 "
        + ("PASS" if all_cores >= 0.8 else "MISS"),
        f"tokenize_throughput nexttoken/encode_batch (1 worker vs 1 thread): ratio={one:.2f} goal>=0.8 "
        + ("PASS" if one >= 0.8 else "MISS"),
    ]


# --------------------------------------------------------------------------- memory
def tree_memory(root: int, peaks: dict[int, int] | None = None) -> tuple[int, int]:
    """(resident bytes of ``root`` and all its descendants now, the largest peak (VmHWM) of one of
    them so far), from /proc. ``peaks``, if given, gets each process's peak so far by its pid."""
    parents: dict[int, int] = {}
    rss: dict[int, tuple[int, int]] = {}
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(line.split(":", 1) for line in status.read_text().splitlines() if ":" in line)
            pid = int(status.parent.name)
            parents[pid] = int(fields["PPid"])
            rss[pid] = (int(fields["VmRSS"].split()[0]) * 1024, int(fields["VmHWM"].split()[0]) * 1024)
        except (OSError, ValueError, KeyError):  # gone meanwhile, or a kernel thread
            continue
    total, largest, frontier = 0, 0, [root]
    while frontier:
        pid = frontier.pop()
        now, high_water = rss.get(pid, (0, 0))
        total += now
        largest = max(largest, high_water)
        if peaks is not None and high_water:
            peaks[pid] = max(peaks.get(pid, 0), high_water)
        frontier += [child for child, parent in parents.items() if parent == pid]
    return total, largest


def peak_memory_of_fit(corpus: Path, val_fraction: float, scratch: Path, extra: Sequence[str] = ()) -> dict:
    """Run `nexttoken fit --trainer.max_steps 1` on ``corpus`` from an empty cache; its peaks and time."""
    cache, runs = Path(tempfile.mkdtemp(dir=scratch)), Path(tempfile.mkdtemp(dir=scratch))
    command = [
        sys.executable, "-m", "nexttoken", "fit", "--data.path", str(corpus), "--data.val_fraction", str(val_fraction),
        "--data.cache_dir", str(cache), "--trainer.max_steps", "1", "--trainer.default_root_dir", str(runs),
        "--trainer.enable_progress_bar", "false", *extra,
    ]  # fmt: skip
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peaks = [0, 0]
    by_process: dict[int, int] = {}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            total, largest = tree_memory(process.pid, by_process)
            peaks[0], peaks[1] = max(peaks[0], total), max(peaks[1], largest)
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    output = process.communicate()[0]
    done.set()
    sampler.join()
    seconds = time.perf_counter() - started
    if process.returncode != 0:
        raise SystemExit(f"nexttoken fit failed:\n{output[-3000:]}")
    meta = json.loads(next((cache / "tokens").glob("*/meta.json")).read_text())
    shutil.rmtree(cache)
    shutil.rmtree(runs)
    return {
        "tree": peaks[0],
        "largest": peaks[1],
        "main": by_process.get(process.pid, 0),
        "others": sorted((peak for pid, peak in by_process.items() if pid != process.pid), reverse=True),
        "seconds": seconds,
        "tokens": meta["train_tokens"] + meta["val_tokens"],
        "val_tokens": meta["val_tokens"],
        "tokenize_seconds": meta["seconds"],
        "workers": meta["workers"],
    }


def memory(args: argparse.Namespace, scratch: Path) -> list[str]:
    results = {}
    for label, megabytes in (("small", args.small_mb), ("large", args.large_mb)):
        folder, text_bytes = write_corpus(scratch / f"memory-{label}", megabytes, seed=1)
        val_fraction = 0.05 if args.held_out == "default" else min(0.05, HELD_OUT_BYTES / text_bytes)
        extra = ["--data.tokenizer", args.tokenizer]
        result = peak_memory_of_fit(folder, val_fraction, scratch, extra)
        shutil.rmtree(folder)
        print(
            f"memory: {text_bytes / 1e6:,.0f} MB corpus ({args.tokenizer}, val_fraction {val_fraction:.4f}), "
            f"{result['tokens']:,} tokens ({result['val_tokens']:,} held out): peak {result['tree'] / 1e6:,.0f} MB "
            f"(all processes), largest process {result['largest'] / 1e6:,.0f} MB; fit {result['seconds']:,.0f} s "
            f"(tokenizing {result['tokenize_seconds']:,.0f} s with {result['workers']} workers)",
            flush=True,
        )
        results[label] = (text_bytes, result)
    (small_bytes, small), (large_bytes, large) = results["small"], results["large"]
    ratio = large["tree"] / small["tree"]
    name = f"{large_bytes / 1e9:.1f}GB/{small_bytes / 1e6:.0f}MB"
    absolute = large["tree"] / 2e9
    return [
        f"tokenize_memory {name}: ratio={ratio:.2f} goal<=1.3 " + ("PASS" if ratio <= 1.3 else "MISS"),
        f"tokenize_memory {large_bytes / 1e9:.1f}GB peak/2GB: ratio={absolute:.2f} goal<1.0 "
        + ("PASS" if absolute < 1.0 else "MISS"),
    ]


def one_file_memory(args: argparse.Namespace, scratch: Path) -> list[str]:
    """Peak memory of a 1-step fit (bytes tokenizer) on one text file of ~100 MB and of ~1 GB."""
    results = {}
    for label, megabytes in (("small", args.one_file_small_mb), ("large", args.one_file_large_mb)):
        path = scratch / f"one-file-{label}.txt"
        size = write_one_file(path, megabytes)
        extra = ["--data.tokenizer", "bytes"]
        result = peak_memory_of_fit(path, ONE_FILE_HELD_OUT_BYTES / size, scratch, extra)
        path.unlink()
        others = ", ".join(f"{peak / 1e6:,.0f}" for peak in result["others"]) or "none"
        print(
            f"one file, {size / 1e6:,.0f} MB, {result['tokens']:,} tokens: peak {result['tree'] / 1e6:,.0f} MB "
            f"(all processes), largest process {result['largest'] / 1e6:,.0f} MB (fit process "
            f"{result['main'] / 1e6:,.0f} MB; its children, each: {others} MB); fit {result['seconds']:,.0f} s "
            f"(tokenizing {result['tokenize_seconds']:,.0f} s with {result['workers']} workers)",
            flush=True,
        )
        results[label] = (size, result)
    (small_bytes, small), (large_bytes, large) = results["small"], results["large"]
    ratio = large["tree"] / small["tree"]
    absolute = large["tree"] / 2e9
    return [
        f"tokenize_memory_one_file {large_bytes / 1e9:.1f}GB/{small_bytes / 1e6:.0f}MB: ratio={ratio:.2f} goal<=1.3 "
        + ("PASS" if ratio <= 1.3 else "MISS"),
        f"tokenize_memory_one_file {large_bytes / 1e9:.1f}GB peak/2GB: ratio={absolute:.2f} goal<1.0 "
        + ("PASS" if absolute < 1.0 else "MISS"),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--megabytes", type=float, default=40, help="text in the throughput corpus")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=0, help="workers for 'all cores' (0: one per core)")
    parser.add_argument("--memory", action="store_true", help="also measure peak memory of nexttoken fit")
    parser.add_argument("--memory-only", action="store_true", help="only the memory measurement")
    parser.add_argument("--small-mb", type=float, default=100)
    parser.add_argument("--large-mb", type=float, default=2000)
    parser.add_argument(
        "--held-out",
        choices=("same", "default"),
        default="same",
        help="memory: hold out the same ~5 MB of both corpora, or the default 5%% (with the default cap)",
    )
    parser.add_argument("--tokenizer", default="bpe", help="memory: --data.tokenizer of the fits")
    parser.add_argument(
        "--one-file", action="store_true", help="also measure peak memory on one large text file"
    )
    parser.add_argument("--one-file-only", action="store_true", help="only the one-file memory measurement")
    parser.add_argument("--one-file-small-mb", type=float, default=100)
    parser.add_argument("--one-file-large-mb", type=float, default=1000)
    parser.add_argument(
        "--scratch", default=tempfile.gettempdir(), help="where corpora and caches are written"
    )
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="tokenize-bench-", dir=args.scratch))
    try:
        only = args.memory_only or args.one_file_only
        lines = [] if only else throughput(args, scratch)
        if args.memory or args.memory_only:
            lines += memory(args, scratch)
        if args.one_file or args.one_file_only:
            lines += one_file_memory(args, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print("\n".join(lines))


if __name__ == "__main__":
    main()

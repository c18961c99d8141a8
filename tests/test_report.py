"""The end-of-run report: the scoreboard text, the compressor baselines (cached with the token
cache), the curves with their reference lines, and the phases of the run's time."""

import bz2
import json
import lzma
import math
import random
import re
import zlib

import matplotlib.colors
import matplotlib.image
import numpy as np
import pytest

from nexttoken.cli import main
from nexttoken.data.cache import TokenCache
from nexttoken.metrics import summarize
from nexttoken.training import report
from nexttoken.training.report import compressor_bits_per_byte, format_report, plot_curves, read_metrics
from test_cli import fit_args, write_corpus


def word_salad(n_bytes: int) -> bytes:
    """Random common words: big enough (over bzip2's 100 kB block) that every compressor's level
    changes its output size, so the levels below are really checked."""
    words = "the of and to in a is that it was for on are as with his they at be this from have or by".split()
    rng = random.Random(0)
    text = " ".join(rng.choice(words) for _ in range(n_bytes // 3))
    return text.encode("utf-8")[:n_bytes]


def by_hand(data: bytes) -> dict[str, float]:
    """The three compressors through their incremental interfaces, at the same settings."""

    def run(compressor) -> int:
        return len(compressor.compress(data) + compressor.flush())

    sizes = {
        "gzip -9": run(zlib.compressobj(9, zlib.DEFLATED, 31)),  # wbits 31: a gzip container
        "bzip2 -9": run(bz2.BZ2Compressor(9)),
        "xz -9e": run(lzma.LZMACompressor(lzma.FORMAT_XZ, preset=9 | lzma.PRESET_EXTREME)),
    }
    return {name: 8 * size / len(data) for name, size in sizes.items()}


def test_compressor_bits_per_byte_against_the_compressors_by_hand():
    data = word_salad(120_000)
    got = compressor_bits_per_byte(data)
    assert list(got) == ["gzip -9", "bzip2 -9", "xz -9e"]
    assert got == pytest.approx(by_hand(data), rel=1e-12)
    assert all(1.0 < bpb < 4.0 for bpb in got.values())  # 24 words: a few bits per byte
    noise = random.Random(0).randbytes(4096)
    assert all(bpb > 8.0 for bpb in compressor_bits_per_byte(noise).values())  # noise cannot shrink
    with pytest.raises(ValueError, match="no held-out bytes"):
        compressor_bits_per_byte(b"")


def numbers(line: str) -> list[float]:
    return [float(n.replace(",", "")) for n in re.findall(r"\d[\d,]*\.?\d*", line)]


def test_format_report_prints_the_scoreboard_numbers():
    nll, tokens, n_bytes = 1234.5678, 1000, 3456
    validation = {**summarize(nll, tokens, n_bytes), "tokens": tokens, "bytes": n_bytes}
    compressors = {"gzip -9": 2.71828, "bzip2 -9": 2.5, "xz -9e": 2.25}
    lines = format_report(validation, compressors, vocab_size=4096).splitlines()
    assert numbers(lines[0]) == [1000, 3456]
    assert numbers(lines[1]) == [round(nll / tokens, 4)]
    assert numbers(lines[2]) == [round(math.exp(nll / tokens), 2), 4096]
    assert numbers(lines[3]) == [round(nll / tokens / math.log(2), 4)]
    assert numbers(lines[4]) == [round(nll / (math.log(2) * n_bytes), 4)]
    assert "compressed" in lines[5]
    assert [line.split()[0] for line in lines[6:]] == ["gzip", "bzip2", "xz"]
    assert [numbers(line)[-1] for line in lines[6:]] == [2.7183, 2.5, 2.25]
    # Thousands are grouped; without bytes there are no bits per byte and no compressors to compare.
    no_bytes = {**summarize(nll, 123_456), "tokens": 123_456, "bytes": 0}
    text = format_report(no_bytes, compressors, vocab_size=50_257)
    assert "123,456 held-out tokens" in text and "50,257" in text
    assert "bits per byte" not in text and "gzip" not in text


METRICS_CSV = """epoch,step,train/loss,train/lr,val/loss,val/bits_per_byte
0,0,5.5,0.001,,
0,1,5.0,0.002,,
0,1,,,4.75,2.5
0,2,4.25,0.003,,
1,3,4.0,0.003,,
1,3,,,3.875,2.125
"""


def test_read_metrics_gives_each_series_by_step(tmp_path):
    path = tmp_path / "metrics.csv"
    path.write_text(METRICS_CSV)
    series = read_metrics(path)
    assert set(series) == {"train/loss", "train/lr", "val/loss", "val/bits_per_byte"}
    assert series["train/loss"] == [(0, 5.5), (1, 5.0), (2, 4.25), (3, 4.0)]
    assert series["val/loss"] == [(1, 4.75), (3, 3.875)]
    assert series["val/bits_per_byte"] == [(1, 2.5), (3, 2.125)]


def near_colour(image: np.ndarray, colour: str, tolerance: float = 0.05) -> int:
    """Pixels of ``image`` (H, W, 4 floats) within ``tolerance`` of ``colour`` in every channel."""
    rgb = np.array(matplotlib.colors.to_rgb(colour))
    return int((np.abs(image[..., :3] - rgb) < tolerance).all(axis=-1).sum())


def test_plot_curves_writes_a_png_of_the_curves(tmp_path):
    csv = tmp_path / "metrics.csv"
    csv.write_text(METRICS_CSV)
    out = plot_curves(csv, tmp_path / "curves.png")
    assert out == tmp_path / "curves.png"
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = matplotlib.image.imread(out)
    assert image.shape == (400, 1100, 4)  # 11 x 4 inches at 100 dpi
    # Train loss in blue, validation loss in orange, validation bits per byte in green.
    assert near_colour(image, "tab:blue") > 50
    assert near_colour(image, "tab:orange") > 50
    assert near_colour(image, "tab:green") > 50
    # Without validation bits per byte, nothing green is drawn.
    csv.write_text("\n".join(line.rsplit(",", 1)[0] for line in METRICS_CSV.splitlines()) + "\n")
    image = matplotlib.image.imread(plot_curves(csv, tmp_path / "curves.png"))
    assert near_colour(image, "tab:green") == 0 and near_colour(image, "tab:orange") > 50
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curves.png", "metrics.csv"]


def test_a_chat_report_counts_examples_and_scores_responses_only():
    from nexttoken.data.sft import ExampleCounts

    nll, tokens, n_bytes = 300.0, 250, 400
    validation = {**summarize(nll, tokens, n_bytes), "tokens": tokens, "bytes": n_bytes}
    counts = ExampleCounts(examples=12, response_tokens=250, prompt_tokens_ignored=1234, response_bytes=400)
    lines = format_report(validation, {}, vocab_size=259, examples=counts).splitlines()
    assert lines[0] == (
        "validation over 12 held-out examples: 250 response tokens (400 bytes) scored, "
        "1,234 prompt tokens ignored:"
    )
    assert numbers(lines[4]) == [round(nll / (math.log(2) * n_bytes), 4)]
    assert len(lines) == 5  # no compressors: they would see the responses without their prompts


class HeldOut:
    """What held_out_compressors needs from a TextDataModule."""

    def __init__(self, folder, text: bytes, scored_val_targets: int = 100):
        self.cache = TokenCache(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.text = text
        self.scored_val_targets = scored_val_targets
        self.reads = 0

    def scored_val_text(self):
        self.reads += 1
        return self.text


def test_compressors_are_computed_once_per_held_out_set(tmp_path):
    data = HeldOut(tmp_path / "tokens" / "abc", b"the held-out text, the held-out text\n" * 40)
    first, cached = report.held_out_compressors(data)
    assert not cached and data.reads == 1
    assert first == report.compressor_bits_per_byte(data.text)
    assert json.loads((data.cache.directory / report.compressors_file(100)).read_text()) == first
    again, cached = report.held_out_compressors(data)
    assert cached and again == first and data.reads == 1  # read from the cache folder, not recomputed
    other = HeldOut(tmp_path / "tokens" / "def", b"another held-out set entirely\n" * 40)
    assert report.held_out_compressors(other)[0] != first  # its own folder, its own numbers
    # Another cap scores other text: its own numbers, beside the first ones.
    capped = HeldOut(tmp_path / "tokens" / "abc", b"the held-out text\n" * 40, scored_val_targets=50)
    assert report.held_out_compressors(capped) == (report.compressor_bits_per_byte(capped.text), False)


def test_curves_draw_the_compressors_as_reference_lines(tmp_path, monkeypatch):
    import matplotlib.axes

    metrics = tmp_path / "metrics.csv"
    metrics.write_text(
        "step,train/loss,val/loss,val/bits_per_byte\n9,5.0,,\n10,,4.8,3.1\n19,4.2,,\n20,,4.0,2.6\n"
    )
    lines = []
    original = matplotlib.axes.Axes.axhline
    monkeypatch.setattr(
        matplotlib.axes.Axes,
        "axhline",
        lambda self, y, **kw: lines.append((y, kw.get("label"))) or original(self, y, **kw),
    )
    compressors = {"gzip -9": 3.3, "bzip2 -9": 2.8, "xz -9e": 3.1}
    png = report.plot_curves(metrics, tmp_path / "curves.png", compressors)
    assert png.stat().st_size > 1000
    assert lines == [(3.3, "gzip -9 (3.30)"), (2.8, "bzip2 -9 (2.80)"), (3.1, "xz -9e (3.10)")]


def test_report_has_the_phases_of_the_run(tmp_path, capsys):
    corpus = write_corpus(tmp_path / "corpus")
    root = tmp_path / "runs"
    assert main(fit_args(corpus, root, tmp_path / "cache", 12)) == 0
    out = capsys.readouterr().out
    summary = json.loads((root / "version_0" / "report.json").read_text())
    phases = summary["phases"]
    seconds = phases["seconds"]
    # The start-up as the command line marks it: the interpreter, then each big import.
    startup = ["interpreter", "import torch", "import torchmetrics", "import lightning", "import nexttoken"]
    expected = [*startup, "arguments", "data", "model", "first step", "steps", "validation", "report"]
    assert [p for p in expected if p in seconds] == expected  # in order, none missing
    assert all(v >= 0 for v in seconds.values())
    # The phases cover the whole process up to the report, one after the other, with no gap.
    assert list(seconds)[: len(startup)] == startup
    assert sum(seconds.values()) == pytest.approx(phases["total_seconds"], abs=0.005)
    assert phases["notes"]["data"] == "token cache built"
    assert phases["notes"]["steps"] == "11 steps after the first"
    assert phases["step_seconds"] == pytest.approx(seconds["steps"] / 11, rel=1e-2)
    assert phases["overhead_seconds"] == pytest.approx(
        phases["total_seconds"] - 12 * phases["step_seconds"], abs=0.01
    )
    assert "time (seconds):" in out and "beyond the steps" in out
    assert (root / "version_0" / "report.txt").read_text().count("first step") == 1
    # A second run over the same data: cache hit, compressors from the cache.
    assert main(fit_args(corpus, root, tmp_path / "cache", 2)) == 0
    again = json.loads((root / "version_1" / "report.json").read_text())["phases"]
    assert again["notes"]["data"] == "token cache hit"
    assert "compressors" in again["notes"]["report"] and "(cached)" in again["notes"]["report"]


def test_a_run_without_validation_reports_that_it_has_no_score(tmp_path, capsys):
    corpus = write_corpus(tmp_path / "corpus")
    root = tmp_path / "runs"
    argv = fit_args(corpus, root, tmp_path / "cache", 3, "--trainer.limit_val_batches", "0")
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "no validation score: validation is off (--trainer.limit_val_batches 0)" in out
    summary = json.loads((root / "version_0" / "report.json").read_text())
    assert summary["validation"] is None and summary["compressors_bits_per_byte"] == {}
    assert summary["global_step"] == 3

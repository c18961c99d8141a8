"""The end-of-run report: compressor baselines cached with the token cache, the curves with their
reference lines, and the phases of the run's time."""

import bz2
import gzip
import json
import lzma

import pytest

from nexttoken import report
from nexttoken.cli import main
from nexttoken.data.cache import TokenCache
from test_cli import fit_args, write_corpus


def test_compressor_bits_per_byte_by_hand():
    data = b"to be or not to be, that is the question\n" * 50
    got = report.compressor_bits_per_byte(data)
    assert got["gzip -9"] == pytest.approx(8 * len(gzip.compress(data, 9, mtime=0)) / len(data))
    assert got["bzip2 -9"] == pytest.approx(8 * len(bz2.compress(data, 9)) / len(data))
    assert got["xz -9e"] == pytest.approx(
        8 * len(lzma.compress(data, preset=9 | lzma.PRESET_EXTREME)) / len(data)
    )


class HeldOut:
    """What held_out_compressors needs from a TextDataModule."""

    def __init__(self, folder, text: bytes):
        self.cache = TokenCache(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.text = text
        self.reads = 0

    def val_text_bytes(self):
        self.reads += 1
        return self.text


def test_compressors_are_computed_once_per_held_out_set(tmp_path):
    data = HeldOut(tmp_path / "tokens" / "abc", b"the held-out text, the held-out text\n" * 40)
    first, cached = report.held_out_compressors(data)
    assert not cached and data.reads == 1
    assert first == report.compressor_bits_per_byte(data.text)
    assert json.loads((data.cache.directory / report.COMPRESSORS_FILE).read_text()) == first
    again, cached = report.held_out_compressors(data)
    assert cached and again == first and data.reads == 1  # read from the cache folder, not recomputed
    other = HeldOut(tmp_path / "tokens" / "def", b"another held-out set entirely\n" * 40)
    assert report.held_out_compressors(other)[0] != first  # its own folder, its own numbers


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
    expected = ["start-up", "arguments", "data", "model", "first step", "steps", "validation", "report"]
    assert [p for p in expected if p in seconds] == expected  # in order, none missing
    assert all(v >= 0 for v in seconds.values())
    # The phases cover the whole process up to the report, one after the other, with no gap.
    assert sum(seconds.values()) == pytest.approx(phases["total_seconds"], abs=0.05)
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

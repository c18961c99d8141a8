import argparse
import math
import shutil
import subprocess
from html.parser import HTMLParser

import pytest

from conftest import TINY_TEXT
from nexttoken.commands.inspect import (
    add_inspect_arguments,
    render_html,
    run_inspect,
    text_pieces,
    token_views,
)
from nexttoken.errors import UserError
from nexttoken.models.hf import load_hf_causal_lm
from nexttoken.scoring.text import score_text

NASTY = 'x</script><script>alert("pwned")</script> & &amp; \'q\' "dq" <b>not bold</b>\n\tcafé 日本 😀 end'
TEXT = TINY_TEXT + NASTY + "\n"


class Page(HTMLParser):
    """Collects the text of the token spans, the scripts, and the tooltip's text."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.pieces, self.scripts, self.tip = [], 0, []
        self.html_attrs = {}
        self._stack = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "html":
            self.html_attrs = attrs
        if tag == "script":
            self.scripts += 1
        cls = (attrs.get("class") or "").split()
        kind = "token" if tag == "span" and "t" in cls else "tip" if attrs.get("id") == "tip" else None
        if kind == "token":
            self.pieces.append("")
        self._stack.append(kind or (self._stack[-1] if self._stack and self._stack[-1] == "tip" else None))

    def handle_endtag(self, tag):
        if self._stack:
            self._stack.pop()

    def handle_data(self, data):
        where = self._stack[-1] if self._stack else None
        if where == "token":
            self.pieces[-1] += data
        elif where == "tip":
            self.tip.append(data)


def parse(html_text: str) -> Page:
    page = Page()
    page.feed(html_text)
    return page


@pytest.fixture(scope="module")
def llama(tiny_llama_dir):
    return load_hf_causal_lm(tiny_llama_dir)


@pytest.fixture(scope="module")
def gpt2(tiny_gpt2_dir):
    return load_hf_causal_lm(tiny_gpt2_dir)


def test_pieces_concatenate_to_the_text(gpt2):
    _, tok = gpt2
    ids, offsets = tok.encode_with_offsets(TEXT)
    assert ids == tok.encode(TEXT)
    pieces = text_pieces(offsets, TEXT)
    assert len(pieces) == len(ids)
    assert "".join(pieces) == TEXT
    assert "quick" in pieces[1] or "quick" in pieces[2]  # pieces follow the tokens, not one big blob


def test_html_is_escaped_and_self_contained(llama):
    model, tok = llama
    scores = score_text(model, tok, TEXT, context=32, stride=16)
    views = token_views(tok, TEXT, scores)
    page_html = render_html(views, title="t <&>", summary='s "q"')
    page = parse(page_html)
    assert "".join(page.pieces) == TEXT  # every character, escaped and parsed back
    assert len(page.pieces) == len(scores.ids)
    assert page.scripts == 2  # the data and the code; the text's "<script>" stayed text
    assert "alert(" not in page_html.split("<script")[1]  # the JSON data cannot close its script element
    for external in ("http://", "https://", "src=", "<link"):
        assert external not in page_html
    # surprisal, p and guesses line up with the scores
    v = max((v for v in views if v.bits is not None), key=lambda v: v.bits)
    assert v.prob == pytest.approx(2 ** (-v.bits))
    assert len(v.guesses) == 5 and v.guesses[0][1] >= v.guesses[-1][1]


def cli(*argv):
    parser = argparse.ArgumentParser()
    add_inspect_arguments(parser)
    return run_inspect(parser.parse_args([str(a) for a in argv]))


def test_cli_terminal_report(tiny_gpt2_dir, tmp_path, capfd):
    f = tmp_path / "doc.txt"
    f.write_text(TEXT)
    out_file = tmp_path / "page.html"
    assert cli(tiny_gpt2_dir, f, "--html", out_file, "--context", 32, "--no-progress") == 0
    out = capfd.readouterr().out
    assert "bits per byte" in out and "first token not scored" in out
    assert "The 10 most surprising tokens" in out
    rows = [line for line in out.splitlines() if line[:3].strip().isdigit()]
    assert len(rows) == 10
    bits = [float(r.split()[1]) for r in rows]
    assert bits == sorted(bits, reverse=True)
    assert out_file.is_file() and f"wrote {out_file}" in out
    # literal text works too, and --top
    assert cli(tiny_gpt2_dir, "a few words of text", "--top", 3, "--no-progress") == 0
    assert "The 3 most surprising tokens" in capfd.readouterr().out


@pytest.mark.parametrize(
    "text, extra, message",
    [
        ("missing/file.txt", [], "TEXT file not found"),
        ("   ", [], "is empty"),
        ("some text", ["--html", "no/such/dir/page.html"], "does not exist"),
        ("some text", ["--top", -1], "--top must be"),
    ],
)
def test_cli_bad_inputs(tiny_gpt2_dir, tmp_path, monkeypatch, text, extra, message):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match=message):
        cli(tiny_gpt2_dir, text, *extra)
    assert list(tmp_path.iterdir()) == []  # nothing written


# --------------------------------------------------------------------------- a real browser
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
HOVER = """<script>(function(){{var s=document.querySelectorAll('#text .t')[{i}];var r=s.getBoundingClientRect();
s.dispatchEvent(new MouseEvent('mouseover',{{bubbles:true,clientX:r.left+2,clientY:r.top+2}}));}})();</script></body>"""


def chromium(tmp_path, url, *mode):
    cmd = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--window-size=1200,800",
        *mode,
        url,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=tmp_path)


@pytest.mark.skipif(
    CHROMIUM is None, reason="chromium is not installed (Debian: apt-get install -y chromium)"
)
def test_page_renders_in_headless_chromium(llama, tmp_path):
    model, tok = llama
    scores = score_text(model, tok, TEXT, context=32, stride=16)
    views = token_views(tok, TEXT, scores)
    page_html = render_html(views, title="tiny llama", summary="render test")
    i = max((v for v in views if v.bits is not None), key=lambda v: v.bits).index
    page = tmp_path / "page.html"
    page.write_text(page_html.replace("</body>", HOVER.format(i=i)), encoding="utf-8")

    dom = chromium(tmp_path, page.as_uri(), "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    rendered = parse(dom.stdout)
    assert "".join(rendered.pieces) == TEXT  # all tokens present after render, text intact
    assert rendered.html_attrs.get("data-tokens") == str(len(scores.ids))  # the page's script ran
    tip = "".join(rendered.tip)  # hovering the most surprising token filled the tooltip
    assert f"{views[i].bits:.2f} bits" in tip
    assert tip.count("%") + tip.count("e-") >= 6  # p of the token and its 5 guesses
    assert "model\u2019s top guesses" in tip

    png = tmp_path / "page.png"
    shot = chromium(tmp_path, page.as_uri(), f"--screenshot={png}")
    assert shot.returncode == 0 and png.stat().st_size > 10_000
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not math.isnan(views[i].bits)

"""``nexttoken inspect MODEL TEXT --html OUT``: how surprised the model is by each token of a text.

The terminal gets the document's bits per byte and its most surprising tokens (with some left
context and the model's own best guess). ``--html`` writes one self-contained page (inline CSS and
JS, no external assets): the text with each token coloured by its surprisal ``-log2 p`` of the actual
token; hovering a token shows that probability and the model's top-5 guesses.

Tokens are scored with the same sliding windows and document-start rule as ``nexttoken eval``
(:func:`nexttoken.scoring.text.score_text`).
"""

from __future__ import annotations

import argparse
import html
import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from nexttoken.commands.eval import (
    add_model_argument,
    add_model_arguments,
    check_arguments_early,
    load_model_of,
)
from nexttoken.commands.spelling import tool_flag
from nexttoken.data.documents import read_document
from nexttoken.data.tokenizers import Tokenizer
from nexttoken.errors import UserError
from nexttoken.io import write_atomically
from nexttoken.metrics import LN2, summarize
from nexttoken.scoring.text import TokenScores, score_text

MAX_BITS_COLOUR = 16.0  # surprisal at which the colour scale saturates (p = 1/65536)
_TEXT_SUFFIXES = (".txt", ".md", ".text", ".rst", ".raw", ".json", ".py", ".html", ".csv")


def spell(setting: str) -> str:
    """How ``nexttoken inspect`` writes a setting an error names: ``batch_size`` is ``--batch-size``."""
    return tool_flag(setting)


@dataclass
class TokenView:
    index: int
    piece: str  # the characters of the text shown for this token (pieces concatenate to the text)
    token: str  # the token's own decoded string
    bits: float | None  # surprisal -log2 p(actual); None: not scored (no left context)
    prob: float | None
    guesses: list[tuple[str, float]]


def visible(s: str) -> str:
    """A token string with its whitespace made visible (for tables and tooltips)."""
    return s.replace(" ", "␣").replace("\n", "⏎").replace("\t", "⇥").replace("\r", "␍")


def text_pieces(offsets: list[tuple[int, int]], text: str) -> list[str]:
    """Split ``text`` into one piece per token (``offsets``: each token's character span); the
    pieces always concatenate back to ``text``.

    Each token takes the text up to the end of its span, so gaps such as trimmed spaces join the
    next token, and a character split over several byte-level tokens goes to the first token that
    reaches its end.
    """
    pieces = [""] * len(offsets)
    cursor = 0
    for i, (_, end) in enumerate(offsets):
        end = min(max(cursor, end), len(text))
        pieces[i], cursor = text[cursor:end], end
    if pieces:
        pieces[-1] += text[cursor:]
    return pieces


def token_views(tokenizer: Tokenizer, text: str, scores: TokenScores) -> list[TokenView]:
    """One :class:`TokenView` per token of ``text``: its piece of the text, surprisal in bits,
    probability and the model's top guesses, from ``scores`` (:func:`~nexttoken.scoring.text.score_text`)."""
    pieces = text_pieces(scores.offsets, text)
    views = []
    for i, token_id in enumerate(scores.ids):
        nll = float(scores.nll[i])
        scored = not math.isnan(nll)
        guesses = (
            [
                (tokenizer.decode([int(g)]), float(p))
                for g, p in zip(scores.top_ids[i], scores.top_probs[i], strict=True)
            ]
            if scored
            else []
        )
        views.append(
            TokenView(
                index=i,
                piece=pieces[i],
                token=tokenizer.decode([token_id]),
                bits=nll / LN2 if scored else None,
                prob=math.exp(-nll) if scored else None,
                guesses=guesses,
            )
        )
    return views


def colour(bits: float | None) -> str:
    """White-ish for unsurprising tokens, through yellow and orange, to red at >= 16 bits."""
    if bits is None:
        return "#e4e4e4"
    t = min(max(bits / MAX_BITS_COLOUR, 0.0), 1.0)
    hue = 58 * (1 - t)
    lightness = 97 - 45 * t
    return f"hsl({hue:.0f},100%,{lightness:.0f}%)"


def most_surprising(views: list[TokenView], k: int) -> list[TokenView]:
    """The ``k`` scored tokens with the most bits of surprisal, earliest first among equals."""
    scored = [v for v in views if v.bits is not None]
    return sorted(scored, key=lambda v: (-v.bits, v.index))[:k]


def left_context(views: list[TokenView], index: int, chars: int = 40) -> str:
    """Up to ``chars`` characters of text before token ``index`` (newlines and tabs made visible)."""
    before = "".join(v.piece for v in views[max(0, index - 64) : index])
    return before[-chars:].replace("\n", "⏎").replace("\t", "⇥").replace("\r", "␍")


# --------------------------------------------------------------------------- HTML
_CSS = """
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:24px;color:#222;background:#fafafa}
h1{font-size:20px;margin:0 0 4px}
.summary{color:#444;margin:0 0 12px}
.legend{display:flex;align-items:center;gap:8px;font-size:13px;color:#555;margin:8px 0 16px}
.bar{width:320px;height:14px;border:1px solid #bbb;background:linear-gradient(to right,SCALE)}
#text{white-space:pre-wrap;word-wrap:break-word;font:15px/1.9 ui-monospace,"DejaVu Sans Mono",Menlo,monospace;
background:#fff;border:1px solid #ddd;border-radius:6px;padding:16px;max-width:1100px}
.t{border-radius:2px;cursor:default;box-shadow:inset -1px 0 0 rgba(255,255,255,.85)}
.t:hover{outline:2px solid #1a5fb4}
.t.u{background:repeating-linear-gradient(45deg,#eee,#eee 3px,#ddd 3px,#ddd 6px)}
#tip{position:fixed;display:none;pointer-events:none;background:#1e1e1e;color:#f4f4f4;font-size:13px;
padding:8px 10px;border-radius:6px;box-shadow:0 2px 8px rgba(0,0,0,.3);max-width:360px;z-index:10}
#tip .tok{font-family:ui-monospace,monospace;background:#444;padding:0 3px;border-radius:3px}
#tip table{border-collapse:collapse;margin-top:4px}
#tip td{padding:1px 6px 1px 0;font-family:ui-monospace,monospace}
table.top{border-collapse:collapse;margin-top:16px;font-size:14px}
table.top th,table.top td{border-bottom:1px solid #ddd;padding:3px 10px;text-align:left}
table.top td.num{text-align:right;font-variant-numeric:tabular-nums}
code{font-family:ui-monospace,monospace;background:#eee;padding:0 3px;border-radius:3px}
"""

_JS = """
(function(){
  var data = JSON.parse(document.getElementById('token-data').textContent);
  var tip = document.getElementById('tip');
  var spans = document.querySelectorAll('#text .t');
  function vis(s){return s.replace(/ /g,'\\u2423').replace(/\\n/g,'\\u23ce').replace(/\\t/g,'\\u21e5');}
  function pct(p){return p >= 0.01 ? (100*p).toFixed(1)+'%' : p.toExponential(1);}
  function el(tag, text, cls){var e=document.createElement(tag); if(text!==undefined) e.textContent=text; if(cls) e.className=cls; return e;}
  function show(ev){
    var s = ev.target.closest('.t'); if(!s){tip.style.display='none'; return;}
    var d = data[+s.dataset.i]; tip.textContent='';
    var head = el('div'); head.appendChild(el('span', vis(d[0]), 'tok'));
    if(d[1] === null){ head.appendChild(el('span', ' not scored: no left context')); tip.appendChild(head); }
    else {
      head.appendChild(el('span', '  p = '+pct(d[2])+', '+d[1].toFixed(2)+' bits')); tip.appendChild(head);
      tip.appendChild(el('div', 'model\\u2019s top guesses:'));
      var tb = el('table');
      d[3].forEach(function(g){var tr=el('tr'); tr.appendChild(el('td', pct(g[1]))); var td=el('td'); td.appendChild(el('span', vis(g[0]), 'tok')); tr.appendChild(td); tb.appendChild(tr);});
      tip.appendChild(tb);
    }
    tip.style.display='block';
    var x = ev.clientX + 14, y = ev.clientY + 16;
    if (x + tip.offsetWidth > window.innerWidth - 8) x = window.innerWidth - tip.offsetWidth - 8;
    if (y + tip.offsetHeight > window.innerHeight - 8) y = ev.clientY - tip.offsetHeight - 12;
    tip.style.left = x + 'px'; tip.style.top = y + 'px';
  }
  var box = document.getElementById('text');
  box.addEventListener('mouseover', show); box.addEventListener('mousemove', show);
  box.addEventListener('mouseleave', function(){tip.style.display='none';});
  document.documentElement.setAttribute('data-tokens', String(spans.length));
})();
"""


def _script_json(value) -> str:
    """JSON that is safe inside <script>: no '<', '>' or '&' can close the element early."""
    return (
        json.dumps(value, ensure_ascii=False)
        .replace("<", "\\u003c")
        .replace(">", "\\u003e")
        .replace("&", "\\u0026")
        .replace("\u2028", "\\u2028")
        .replace("\u2029", "\\u2029")
    )


def render_html(views: list[TokenView], *, title: str, summary: str, top: int = 10) -> str:
    """A self-contained HTML page: the text coloured by surprisal (hover for the model's guesses),
    headed by ``title`` and the one-line ``summary``, with a table of the ``top`` most surprising tokens."""
    e = html.escape
    scale = ",".join(colour(MAX_BITS_COLOUR * i / 8) for i in range(9))
    spans = []
    for v in views:
        if v.bits is None:
            spans.append(f'<span class="t u" data-i="{v.index}">{e(v.piece)}</span>')
        else:
            spans.append(
                f'<span class="t" data-i="{v.index}" style="background:{colour(v.bits)}">{e(v.piece)}</span>'
            )
    rows = []
    for rank, v in enumerate(most_surprising(views, top), 1):
        guess, p = v.guesses[0] if v.guesses else ("", 0.0)
        rows.append(
            f'<tr><td class="num">{rank}</td><td class="num">{v.bits:.2f}</td><td class="num">{v.prob:.2e}</td>'
            f"<td><code>{e(visible(v.token))}</code></td><td>…{e(left_context(views, v.index))}</td>"
            f"<td><code>{e(visible(guess))}</code> {100 * p:.1f}%</td></tr>"
        )
    data = [
        [
            v.token,
            None if v.bits is None else round(v.bits, 4),
            None if v.prob is None else v.prob,
            [[g, p] for g, p in v.guesses],
        ]
        for v in views
    ]
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{e(title)}</title>
<style>{_CSS.replace("SCALE", scale)}</style>
</head>
<body>
<h1>{e(title)}</h1>
<p class="summary">{e(summary)}</p>
<div class="legend"><span>surprisal −log₂ p:</span><span>0 bits</span><div class="bar"></div>
<span>{MAX_BITS_COLOUR:.0f}+ bits</span><span>· grey hatched: not scored · hover a token for the model's guesses</span></div>
<div id="text">{"".join(spans)}</div>
<h2 style="font-size:16px;margin-top:24px">Most surprising tokens</h2>
<table class="top"><tr><th>#</th><th>bits</th><th>p</th><th>token</th><th>left context</th><th>model's best guess</th></tr>
{"".join(rows)}
</table>
<div id="tip"></div>
<script id="token-data" type="application/json">{_script_json(data)}</script>
<script>{_JS}</script>
</body>
</html>
"""


# --------------------------------------------------------------------------- CLI
def add_inspect_arguments(parser: argparse.ArgumentParser) -> None:
    """``nexttoken inspect MODEL TEXT [--html OUT] [--top K] [--context N] [--stride S] ...``"""
    add_model_argument(parser)
    parser.add_argument(
        "text", metavar="TEXT", help="a text file, '-' to read stdin, or the text itself (quoted)"
    )
    parser.add_argument(
        "--html", metavar="OUT", default=None, help="write a self-contained per-token HTML page here"
    )
    parser.add_argument(
        "--top",
        type=int,
        default=10,
        metavar="K",
        help="how many most surprising tokens to print (default 10)",
    )
    add_model_arguments(parser)


def read_inspect_text(spec: str) -> tuple[str, str]:
    """``(name, text)`` for TEXT: an existing file, ``-`` (stdin), or the literal text."""
    if spec == "-":
        text = sys.stdin.read()
        name = "<stdin>"
    elif Path(spec).expanduser().is_file():
        path = Path(spec).expanduser()
        text = read_document(path)
        name = str(path)
    else:
        looks_like_path = not any(c.isspace() for c in spec) and (
            os.sep in spec or spec.lower().endswith(_TEXT_SUFFIXES)
        )
        if looks_like_path:
            raise UserError(
                f"TEXT file not found: {spec}; pass an existing file, '-' for stdin, or the text itself in quotes"
            )
        text, name = spec, "<text>"
    if not text.strip():
        raise UserError(f"TEXT {name} is empty: there is nothing to inspect")
    return name, text


def _check_html_target(out: str | None) -> Path | None:
    if out is None:
        return None
    path = Path(out).expanduser()
    if path.is_dir():
        raise UserError(f"--html {path} is a folder; give a file name such as {path / 'inspect.html'}")
    if not path.parent.is_dir():
        raise UserError(f"--html {path}: folder {path.parent} does not exist; create it first")
    return path


def run_inspect(args: argparse.Namespace) -> int:
    if args.top < 0:
        raise UserError(f"--top must be 0 or more, got {args.top}")
    check_arguments_early(args)
    name, text = read_inspect_text(args.text)
    out = _check_html_target(args.html)
    model, tokenizer = load_model_of(args)
    scores = score_text(
        model,
        tokenizer,
        text,
        args.context,
        args.stride,
        args.batch_size,
        bos=args.bos or "auto",
        progress=args.progress,
    )
    views = token_views(tokenizer, text, scores)
    nll = scores.nll[~scores.nll.isnan()]
    n_bytes = len(text.encode("utf-8"))
    if len(nll) == 0:
        raise UserError(
            "the text is a single token and the tokenizer adds no BOS: nothing to score; pass more text"
        )
    numbers = summarize(float(nll.sum()), len(nll), n_bytes)
    first = (
        "first token scored after the document-start token"
        if scores.bos_prepended
        else "first token not scored (the tokenizer starts documents with no token)"
    )
    summary = (
        f"{Path(str(args.model)).name} on {name}: {len(scores.ids):,} tokens, {n_bytes:,} bytes — "
        f"{numbers['bits_per_byte']:.4f} bits per byte, perplexity {numbers['perplexity']:.3f} "
        f"(context {scores.context}, stride {scores.stride}; {first})"
    )
    print(summary)
    top = most_surprising(views, args.top)
    if top:
        print(f"\nThe {len(top)} most surprising tokens:")
        print(f"{'#':>3} {'bits':>6} {'p':>9}  {'token':<16} {'model expected':<22} left context")
        for rank, v in enumerate(top, 1):
            guess, p = v.guesses[0]
            print(
                f"{rank:>3} {v.bits:>6.2f} {v.prob:>9.2e}  {visible(v.token)!s:<16.16} "
                f"{(visible(guess) + f' {100 * p:.0f}%'):<22.22} …{left_context(views, v.index)}"
            )
    if out is not None:
        title = f"nexttoken inspect — {Path(str(args.model)).name}"
        write_atomically(out, render_html(views, title=title, summary=summary, top=max(args.top, 10)))
        print(f"\nwrote {out}")
    return 0


__all__ = [
    "TokenView",
    "add_inspect_arguments",
    "read_inspect_text",
    "render_html",
    "run_inspect",
    "text_pieces",
    "token_views",
]

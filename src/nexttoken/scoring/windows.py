"""Sliding windows over a long document: every target scored exactly once (pure, no torch).

A document of ``L`` token ids ``x[0] .. x[L-1]`` has ``L - 1`` targets: ``x[t]`` predicted from the
tokens before it. With a context of ``N`` tokens and a stride ``S`` (``1 <= S <= N``):

* the first window feeds ``x[0:N]`` and scores all of its targets ``x[1] .. x[N]``;
* every later window moves ``S`` tokens on, feeds the ``N`` tokens that end just before its last
  target, and scores only its last ``S`` targets (the ones no window scored yet); the last window
  scores what is left (``<= S``) and still gets a full ``N`` tokens of input.

So each target is scored once, with at least ``N - S + 1`` tokens of left context (all of them near
the start of a document). ``S = N`` gives disjoint windows; ``S = 1`` gives every token a full window.
"""

from __future__ import annotations

from dataclasses import dataclass

from nexttoken.errors import UserError, setting


@dataclass(frozen=True)
class Window:
    """One forward pass over ``ids[begin:end]`` (inputs) against ``ids[begin + 1 : end + 1]``
    (targets), of which only the last ``n_scored`` count."""

    doc: int
    begin: int
    end: int
    n_scored: int

    @property
    def length(self) -> int:
        return self.end - self.begin


def check_window_settings(context: int, stride: int, max_context: int | None = None) -> None:
    """UserError unless ``1 <= stride <= context <= max_context`` (all in tokens)."""
    if isinstance(context, bool) or not isinstance(context, int) or context < 1:
        raise UserError(f"{setting('context')} must be a positive number of tokens, got {context!r}")
    if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
        raise UserError(f"{setting('stride')} must be a positive number of tokens, got {stride!r}")
    if stride > context:
        raise UserError(
            f"{setting('stride')} {stride} is larger than {setting('context')} {context}: tokens between windows would never be "
            f"scored; use a stride of at most {context} (default: context // 2)"
        )
    if max_context is not None and context > max_context:
        raise UserError(
            f"{setting('context')} {context} is above the model's maximum context of {max_context} tokens; "
            f"pass {setting('context')} {max_context} or less"
        )


def make_windows(n_tokens: int, context: int, stride: int, doc: int = 0) -> list[Window]:
    """The windows that score targets ``1 .. n_tokens - 1`` of document ``doc`` exactly once.

    ``n_tokens``: the document's length in tokens (document-start token included); ``context`` and
    ``stride`` in tokens, as in the module docstring.
    """
    check_window_settings(context, stride)
    n_targets = n_tokens - 1
    windows: list[Window] = []
    done = 0  # targets 1..done are scored
    while done < n_targets:
        end = min(done + (context if done == 0 else stride), n_targets)
        windows.append(Window(doc, max(0, end - context), end, end - done))
        done = end
    return windows

"""Score extraction from GRM output (GRM_SPEC section 3).

Only the model's own generated text is ever parsed, so whatever the judged responses contain cannot
change a parse.
"""
from __future__ import annotations

import math
import re

_BRACES = re.compile(r"\\boxed\{|[{}]")
_NUMBER = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)")


def last_box(text: str) -> str | None:
    """Contents of the last complete \\boxed{...}, braces balanced; None when there is none.

    One pass with a stack, so degenerate output (thousands of unclosed boxes) stays linear.
    >>> last_box("a \\\\boxed{1, 2} b \\\\boxed{7, 3}")
    '7, 3'
    """
    best, stack = None, []  # stack: content start of an open box, or -1 for a plain "{"
    for m in _BRACES.finditer(text):
        if m.group() == "}":
            if stack:
                start = stack.pop()
                if start >= 0 and (best is None or start > best[0]):
                    best = (start, m.start())
        else:
            stack.append(m.end() if m.group() != "{" else -1)
    return None if best is None else text[best[0] : best[1]]


def parse_scores(text: str, n: int) -> list[int] | None:
    """Exactly n integer scores from the last \\boxed{} of `text`, clipped to 1..10; None if invalid.

    Floats are rounded half up ("7.0" -> 7, "6.5" -> 7).
    >>> parse_scores("Scores: \\\\boxed{8, 11}", 2)
    [8, 10]
    >>> parse_scores("Scores: \\\\boxed{8}", 2) is None
    True
    """
    box = last_box(text)
    if box is None:
        return None
    parts = [p.strip() for p in box.split(",")]
    if len(parts) != n:
        return None
    scores = []
    for p in parts:
        if not _NUMBER.fullmatch(p):
            return None
        value = float(p)
        if not math.isfinite(value):
            return None
        scores.append(min(10, max(1, math.floor(value + 0.5))))
    return scores


def score_regex(n: int, max_tokens: int = 1024) -> str:
    """Regex for structured decoding: the prompt's three lines, the last one ending in a parseable box.

    `Specific Criteria: ...`, `Analysis: ...`, `Scores: ... \\boxed{s1, ..., sn}` (GRM_SPEC 2.7). Each free
    part is one bounded line, max_tokens characters for the criteria and twice that for the analysis, so
    at a few characters per token the box closes before max_tokens (a sample cut anyway is repaired).
    Bounded lines compile in milliseconds on llguidance.
    """
    score = "(10|[1-9])"
    box = ", ".join([score] * n)
    return (rf"Specific Criteria: [^\n]{{1,{max_tokens}}}\nAnalysis: [^\n]{{1,{2 * max_tokens}}}\n"
            rf"Scores: [^\n\\]{{0,100}}\\boxed\{{{box}\}}")


def repair_regex(n: int) -> str:
    """Regex for the one constrained continuation that finishes a sample cut at max_tokens."""
    score = "(10|[1-9])"
    return rf"\nScores: \\boxed\{{{', '.join([score] * n)}\}}"

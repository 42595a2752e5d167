"""Score extraction from GRM output (GRM_SPEC section 3).

Only the model's own generated text is ever parsed, so whatever the judged responses contain cannot
change a parse.
"""
from __future__ import annotations

import math
import re

_BOX = "\\boxed{"
_NUMBER = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)")


def last_box(text: str) -> str | None:
    """Contents of the last complete \\boxed{...}, braces balanced; None when there is none.

    >>> last_box("a \\\\boxed{1, 2} b \\\\boxed{7, 3}")
    '7, 3'
    """
    start = text.rfind(_BOX)
    while start != -1:
        depth, i = 1, start + len(_BOX)
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            return text[start + len(_BOX) : i - 1]
        start = text.rfind(_BOX, 0, start)  # unclosed (cut-off) box: fall back to the one before
    return None


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


def score_regex(n: int, free_chars: int = 400) -> str:
    """Regex for structured decoding: one bounded free-text line, then a parseable score line.

    A single bounded part compiles fast; two bounded parts or an unbounded one do not work (DESIGN.md).
    """
    score = "(10|[1-9])"
    box = ", ".join([score] * n)
    return rf"Specific Criteria: [^\n]{{1,{free_chars}}}\nScores: \\boxed\{{{box}\}}"


def repair_regex(n: int) -> str:
    """Regex for the one constrained continuation that finishes a sample cut at max_tokens."""
    score = "(10|[1-9])"
    return rf"\nScores: \\boxed\{{{', '.join([score] * n)}\}}"

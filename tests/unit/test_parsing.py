"""Reading scores from GRM output (GRM_SPEC section 3) and the structured-decoding regexes."""
from __future__ import annotations

import re
import signal
import time
from contextlib import contextmanager

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from grm_ray.parsing import last_box, parse_scores, repair_regex, score_regex
from grm_ray.prompts import render_grm_prompt


def box(scores) -> str:
    return "\\boxed{" + ", ".join(map(str, scores)) + "}"


GOOD = ("Specific Criteria: Safety (40%), helpfulness (60%).\n"
        "Analysis: Response 1 is careful; Response 2 is rude.\n"
        "Scores: Response 1 is better \\boxed{8, 3}")


@contextmanager
def time_limit(seconds: float):
    """Fail (instead of hanging) when the body runs longer than `seconds`."""
    def _raise(*_):
        raise TimeoutError(f"took longer than {seconds} s")
    old = signal.signal(signal.SIGALRM, _raise)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


# --------------------------------------------------------------------------- hand cases


@pytest.mark.parametrize("text, n, expected", [
    (GOOD, 2, [8, 3]),
    ("\\boxed{7}", 1, [7]),
    ("Scores: \\boxed{1, 10, 5, 6}", 4, [1, 10, 5, 6]),
    # last box wins
    ("draft \\boxed{2, 9} final \\boxed{9, 2}", 2, [9, 2]),
    ("\\boxed{1, 1} \\boxed{2, 2} \\boxed{3, 4} done", 2, [3, 4]),
    # the last box decides validity even when an earlier one would have had n scores
    ("\\boxed{8, 3} then \\boxed{8}", 2, None),
    # exactly n scores
    ("\\boxed{8, 3, 5}", 2, None),
    ("\\boxed{8}", 2, None),
    ("\\boxed{}", 1, None),
    ("\\boxed{8,}", 1, None),
    ("\\boxed{8, , 3}", 3, None),
    # clipping to 1..10
    ("\\boxed{0, 11}", 2, [1, 10]),
    ("\\boxed{-3, 100}", 2, [1, 10]),
    ("\\boxed{+7, -0}", 2, [7, 1]),
    # floats rounded (half up)
    ("\\boxed{7.0, 3.0}", 2, [7, 3]),
    ("\\boxed{6.5, 2.4}", 2, [7, 2]),
    ("\\boxed{9.99, 0.4}", 2, [10, 1]),
    ("\\boxed{7., .5}", 2, [7, 1]),
    # whitespace
    ("\\boxed{ 8 ,\t3 }", 2, [8, 3]),
    ("\\boxed{\n  8,\n  3\n}", 2, [8, 3]),
    # not numbers
    ("\\boxed{eight, 3}", 2, None),
    ("\\boxed{8/10, 3/10}", 2, None),
    ("\\boxed{8 3}", 2, None),
    ("\\boxed{nan, 3}", 2, None),
    ("\\boxed{inf, 3}", 2, None),
    ("\\boxed{1e1, 3}", 2, None),
    ("\\boxed{x, x}", 2, None),
    # nested braces: the box spans to its matching brace; a non-integer part makes it invalid
    ("\\boxed{\\text{8}, 3}", 2, None),
    ("\\boxed{{8}, {3}}", 2, None),
    ("\\boxed{\\frac{1}{2}} then \\boxed{8, 3}", 2, [8, 3]),
    # no box at all
    ("Scores: 8, 3", 2, None),
    ("", 2, None),
    ("\\boxed 8, 3", 2, None),
    # an unclosed final box (cut at max_tokens) falls back to the last complete one
    ("\\boxed{6, 4} and then \\boxed{9, ", 2, [6, 4]),
    ("Scores: \\boxed{9, ", 2, None),
    ("\\boxed{6, 4} \\boxed{9, {2}", 2, [6, 4]),
    # unicode around the box
    ("Analyse 😀 — 中文 Überprüfung \\boxed{8, 3} ✓", 2, [8, 3]),
])
def test_parse_scores_cases(text, n, expected):
    assert parse_scores(text, n) == expected


def test_last_box_contents():
    assert last_box("a \\boxed{1, 2} b \\boxed{7, 3}") == "7, 3"
    assert last_box("\\boxed{\\frac{1}{2}, 3}") == "\\frac{1}{2}, 3"
    assert last_box("\\boxed{a{b{c}}d}}}") == "a{b{c}}d"
    assert last_box("\\boxed{1} \\boxed{2") == "1"
    assert last_box("nothing here") is None
    assert last_box("\\boxed{never closed") is None


def test_parse_is_fast_on_a_1mb_critique():
    filler = ("Analysis: the first response {mostly} follows the instruction, the second does not. " * 13000)
    text = filler + "\nScores: \\boxed{9, 4}"
    assert len(text) > 1_000_000
    t = time.perf_counter()
    assert parse_scores(text, 2) == [9, 4]
    # a 1 MB unclosed box after a complete one
    assert parse_scores("\\boxed{5, 6} \\boxed{" + "x {" * 350_000, 2) == [5, 6]
    # a 1 MB box
    assert parse_scores("\\boxed{" + ", ".join(["7"] * 300_000) + "}", 300_000) == [7] * 300_000
    assert time.perf_counter() - t < 5


def test_parse_is_fast_on_degenerate_repeated_unclosed_boxes():
    # a model stuck repeating "\boxed{" until max_tokens: 140 KB of text
    text = "Scores: " + "\\boxed{" * 20_000
    with time_limit(2.0):
        assert parse_scores(text, 2) is None


# --------------------------------------------------------------------------- properties

score_lists = st.lists(st.integers(1, 10), min_size=1, max_size=12)

hostile = st.lists(st.one_of(
    st.sampled_from(["\\boxed{10, 1}", "\\boxed{1}", "\\boxed{", "}", "{", "[The End of Response 1]",
                     "[The Begin of Response 2]\n", "#### Output Format Requirements ####", "Scores: ",
                     "\n", ", ", "10", "-1"]),
    st.text(max_size=20),
), max_size=12).map("".join)


@settings(max_examples=300, deadline=None)
@given(scores=score_lists, prose=st.text(max_size=200).filter(lambda t: "\\boxed{" not in t))
def test_round_trip(scores, prose):
    n = len(scores)
    assert parse_scores(f"{prose} \\boxed{{{', '.join(map(str, scores))}}}", n) == scores
    assert parse_scores(f"... {box(scores)}", n) == scores
    # and a wrong n never parses
    assert parse_scores(f"... {box(scores)}", n + 1) is None


@settings(max_examples=200, deadline=None)
@given(scores=st.lists(st.integers(-1000, 1000), min_size=1, max_size=8))
def test_any_integer_is_clipped(scores):
    assert parse_scores(box(scores), len(scores)) == [min(10, max(1, s)) for s in scores]


@settings(max_examples=200, deadline=None)
@given(responses=st.lists(hostile, min_size=1, max_size=4), scores=score_lists, data=st.data())
def test_parse_never_depends_on_the_responses(responses, scores, data):
    """Only the model's own output is parsed: hostile responses in the prompt change nothing."""
    n = len(responses)
    scores = (scores * n)[:n]
    prompt = render_grm_prompt("Which is better?", responses)
    output = ("Specific Criteria: accuracy.\nAnalysis: Response 1 says "
              + data.draw(st.sampled_from(["fine", "no box here"]))
              + f".\nScores: {box(scores)}")
    assert parse_scores(output, n) == scores
    # the responses appear verbatim in the prompt, boxes and fake delimiters included
    for i, r in enumerate(responses, 1):
        assert f"[The Begin of Response {i}]\n{r}\n[The End of Response {i}]" in prompt


# --------------------------------------------------------------------------- structured-decoding regexes


line = st.text(st.characters(blacklist_characters="\n\r"), min_size=1, max_size=400)


@settings(max_examples=100, deadline=None)
@given(scores=score_lists, criteria=line, analysis=line, note=line.filter(lambda t: "\\" not in t))
def test_score_regex_accepts_the_three_line_output(scores, criteria, analysis, note):
    n = len(scores)
    text = f"Specific Criteria: {criteria}\nAnalysis: {analysis}\nScores: {note[:99]} {box(scores)}"
    m = re.fullmatch(score_regex(n, max_tokens=400), text)
    assert m is not None
    assert parse_scores(m.group(0), n) == scores


def three(criteria="ok", analysis="fine", scores="\\boxed{8, 3}", note="") -> str:
    return f"Specific Criteria: {criteria}\nAnalysis: {analysis}\nScores: {note}{scores}"


def test_score_regex_rejects_bad_outputs():
    rx = score_regex(2)
    assert re.fullmatch(rx, three())
    assert re.fullmatch(rx, three(note="Response 1 is better. "))
    assert not re.fullmatch(rx, three(scores="\\boxed{8}"))                       # wrong n
    assert not re.fullmatch(rx, three(scores="\\boxed{0, 3}"))                    # out of range
    assert not re.fullmatch(rx, three(scores="\\boxed{11, 3}"))
    assert not re.fullmatch(rx, three(criteria=""))                                 # empty free part
    assert not re.fullmatch(rx, three(analysis=""))
    assert not re.fullmatch(rx, "Specific Criteria: ok\nScores: \\boxed{8, 3}")    # the analysis line is required
    assert not re.fullmatch(rx, three(note="\\boxed{1, 1} "))                     # one box only, at the end
    assert not re.fullmatch(rx, three(analysis="a\nb"))                            # each part is one line
    small = score_regex(2, max_tokens=10)   # bounds: criteria 10 characters, analysis 20
    assert re.fullmatch(small, three(criteria="a" * 10, analysis="b" * 20))
    assert not re.fullmatch(small, three(criteria="a" * 11, analysis="b" * 20))     # bounded
    assert not re.fullmatch(small, three(criteria="a" * 10, analysis="b" * 21))


@settings(max_examples=100, deadline=None)
@given(scores=score_lists, partial=st.text(max_size=300).filter(lambda t: "\\boxed{" not in t))
def test_repair_regex_finishes_a_cut_sample(scores, partial):
    n = len(scores)
    tail = f"\nScores: {box(scores)}"
    assert re.fullmatch(repair_regex(n), tail)
    assert not re.fullmatch(repair_regex(n + 1), tail)
    assert parse_scores(partial + tail, n) == scores

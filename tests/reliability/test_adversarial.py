"""Adversarial content: responses (and prompts) holding `\\boxed{...}`, fake response delimiters and
instructions to the judge. End to end on the real engine (matrix_run: the tiny GRM with structured
decoding): every score comes from the model's own generated text, un-shuffled by the order that sample was
shown in, and each response is shown as exactly one response block. Whether a *real* judge can be talked
round by an instruction inside a response is a model property this random model cannot show.
"""
from __future__ import annotations

import pytest

from grm_ray import prompts
from grm_ray.parsing import parse_scores
from grm_ray.voting import unshuffle
from rel_util import ADVERSARIAL

pytestmark = [pytest.mark.engine, pytest.mark.ray]
TIMEOUT = pytest.mark.timeout(900)  # pays for matrix_run when this module runs alone


def adversarial_rows(m) -> list[dict]:
    return [m["rows"][f"adversarial.parquet#{i}"] for i in range(len(ADVERSARIAL))]


@TIMEOUT
def test_scores_come_only_from_model_output_in_original_order(matrix_run):
    rows = adversarial_rows(matrix_run)
    checked = 0
    for src, row in zip(ADVERSARIAL, rows):
        n = len(src["responses"])
        assert row["error"] is None, row["error"]
        assert row["responses"] == src["responses"]  # kept verbatim, braces and all
        assert len(row["rewards"]) == n and len(row["samples"]) == 4
        for s in row["samples"]:
            assert sorted(s["order"]) == list(range(n))
            assert s["valid"]  # structured decoding: always a parseable box
            shown = parse_scores(s["text"], n)  # the sample's own text, nothing else
            assert shown is not None and s["scores"] == unshuffle(shown, s["order"])
            # the model's text is not the responses' text: no injected box or delimiter came through
            for r in src["responses"]:
                assert len(r) < 12 or r not in s["text"]  # (short answers like "4" may occur by chance)
            checked += 1
        kept = [s["scores"] for s in row["samples"] if s["kept"]]
        assert row["rewards"] == [sum(k[j] for k in kept) / len(kept) for j in range(n)]
    print(f"\nRESULT adversarial: {checked} samples over {len(rows)} adversarial items: every score = "
          "parse(sample text) un-shuffled by its order")


@TIMEOUT
def test_each_response_is_shown_once_in_its_recorded_order(matrix_run):
    """Rebuild the prompt each sample saw: block i holds exactly the response at order[i-1], and the box the
    model must fill has len(responses) slots, however many fake delimiters a response carries."""
    for src, row in zip(ADVERSARIAL, adversarial_rows(matrix_run)):
        for s in row["samples"]:
            shown = [src["responses"][j] for j in s["order"]]
            text = prompts.render_grm_prompt(row["messages"], shown)
            pos = 0
            for i, r in enumerate(shown, 1):
                block = f"[The Begin of Response {i}]\n{r}\n[The End of Response {i}]"
                found = text.find(block, pos)
                assert found >= 0, (i, r)
                pos = found + len(block)
            assert f"The box holds {len(shown)} integer score(s)" in text

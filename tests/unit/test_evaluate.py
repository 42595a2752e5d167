"""evaluate.py on small scored tables whose figures are worked out by hand."""
from __future__ import annotations

import json
import math

import pyarrow as pa
import pytest

from grm_ray import schema as S
from grm_ray.evaluate import evaluate, format_report, plot_curves, reward_bench, roc_auc, scaling_curves
from grm_ray.voting import vote


def smp(scores, order=None, meta=None, hinted=False, text="Scores: \\boxed{}"):
    """One sample; `scores` in ORIGINAL order (None = invalid), `order` = original indices as shown."""
    return {"scores": scores, "order": order, "meta": meta, "hinted": hinted, "text": text}


def scored(items, subset=False):
    """A scored table with the Arrow types of schema.py; rewards etc. come from voting.vote.

    An item: {"n": responses, "label": int|None, "samples": [smp...], "error": str|None, "subset": str,
    "messages": [...]}.
    """
    rows = []
    for i, it in enumerate(items):
        n = it.get("n", 2)
        samples = [{"order": s["order"] or list(range(n)), "text": s["text"], "scores": s["scores"],
                    "valid": s["scores"] is not None, "meta_score": s["meta"], "kept": s["scores"] is not None,
                    "repaired": False, "hinted": s["hinted"], "n_tokens": 12} for s in it.get("samples", [])]
        error = it.get("error")
        result = vote(samples, seed=i) if samples and not error else {}
        row = {S.ID: f"r{i}", S.SOURCE: f"t.parquet#{i}",
               S.MESSAGES: it.get("messages", [{"role": "user", "content": f"q{i}"}]),
               S.RESPONSES: [f"resp{i}-{j}" for j in range(n)], S.LABEL: it.get("label"),
               **{k: result.get(k) for k in (S.REWARDS, S.VOTE_TOTALS, S.BEST_INDEX, S.MARGIN, S.TIE)},
               S.N_SAMPLES: len(samples), S.N_VALID: result.get("n_valid", 0), S.N_KEPT: result.get("n_kept", 0),
               S.SAMPLES: samples or None, S.ERROR: error}
        if subset:
            row["subset"] = it.get("subset")
        rows.append(row)
    fields = list(S.OUTPUT_FIELDS) + ([pa.field("subset", pa.string())] if subset else [])
    return pa.Table.from_pylist(rows, schema=pa.schema(fields))


def one(scores, label, n=None, **kw):
    return {"n": n or len(scores), "label": label, "samples": [smp(scores)], **kw}


def test_pairwise_accuracy_ties_and_tie_break():
    table = scored([
        one([8, 3], 0),                 # right
        one([3, 8], 0),                 # wrong
        one([5, 5], 1),                 # tie holding the label: 0 strict, 1/2 by tie-break
        one([9, 2], 1),                 # wrong
        {"n": 2, "label": 0, "error": "boom"},
        one([7, 1], None),              # unlabelled
    ])
    r = evaluate(table)
    assert (r["rows"], r["errors"], r["unlabelled"], r["unscored"]) == (6, 1, 1, 0)
    assert r["pairwise"] == {"n": 4, "accuracy": 0.25, "tie_break_accuracy": 0.375, "ties": 1, "label_in_tie": 1}
    assert r["best_of_n"] is None and r["auc"] is None
    json.dumps(r)


def test_no_ties_gives_equal_figures():
    r = evaluate(scored([one([8, 3], 0), one([2, 6], 1), one([6, 2], 1)]))
    assert r["pairwise"]["accuracy"] == r["pairwise"]["tie_break_accuracy"] == pytest.approx(2 / 3)
    assert r["pairwise"]["ties"] == 0


def test_best_of_n():
    r = evaluate(scored([
        one([4, 6, 9], 2),              # right
        one([7, 7, 7], 0),              # three-way tie: 1/3
        one([9, 9, 2], 1),              # two-way tie: 1/2
        one([9, 9, 2], 2),              # tie without the label: 0
    ]))
    assert r["best_of_n"]["n"] == 4 and r["pairwise"] is None
    assert r["best_of_n"]["accuracy"] == 0.25
    assert r["best_of_n"]["tie_break_accuracy"] == pytest.approx((1 + 1 / 3 + 1 / 2) / 4)
    assert (r["best_of_n"]["ties"], r["best_of_n"]["label_in_tie"]) == (3, 2)


def test_auc_single_responses():
    # positives 8, 6, 5; negatives 6, 3. Pairs won: (8,6) (8,3) (6,3) (5,3) = 4, (6,6) = 1/2 -> 4.5 / 6
    r = evaluate(scored([one([8], 1), one([6], 1), one([6], 0), one([3], 0), one([5], 1)]))
    assert r["auc"] == {"n": 5, "positives": 3, "auc": 0.75}


def test_roc_auc_rank_formula():
    assert roc_auc([1, 2, 3, 4], [0, 0, 1, 1]) == 1.0
    assert roc_auc([4, 3, 2, 1], [0, 0, 1, 1]) == 0.0
    assert roc_auc([5, 5, 5], [0, 1, 1]) == 0.5
    assert roc_auc([1, 2, 2, 3], [0, 0, 1, 1]) == 0.875
    assert roc_auc([1, 2], [1, 1]) is None


def test_reward_bench_sections():
    items = [
        one([8, 3], 0, subset="alpacaeval-easy"), one([3, 8], 0, subset="alpacaeval-easy"),  # 0.5, weight 100
        one([8, 3], 0, subset="mt-bench-easy"),                                              # 1.0, weight 28
        one([5, 5], 0, subset="Chat Hard"),                                                  # 0.5
        one([9, 1], 0, subset="safety"),                                                     # 1.0
        one([1, 9], 0, subset="math-prm"),                                                   # 0.0, weight 984
        one([9, 1], 0, subset="hep-python"),                                                 # 1.0, weight 164
        one([9, 1], 0, subset="custom"),
    ]
    r = evaluate(scored(items, subset=True))
    chat, reasoning = (50 + 28) / 128, 164 / (984 + 164)
    assert r["sections"] == pytest.approx({"Chat": chat, "Chat Hard": 0.5, "Safety": 1.0, "Reasoning": reasoning})
    assert r["reward_bench"] == pytest.approx((chat + 0.5 + 1.0 + reasoning) / 4)
    assert r["subsets"]["alpacaeval-easy"]["score"] == 0.5 and r["subsets"]["custom"]["n"] == 1
    assert "Reward Bench" in format_report(r)


def test_reward_bench_needs_all_four_sections():
    sections, score = reward_bench({"Chat": {"n": 3, "tie_break_accuracy": 1.0}})
    assert sections == {"Chat": 1.0} and score is None


def test_subset_with_single_responses_scores_auc():
    r = evaluate(scored([one([8], 1, subset="mistake"), one([3], 0, subset="mistake")], subset=True))
    assert r["subsets"]["mistake"]["score"] == 1.0


def test_invalid_share_and_position_bias():
    table = scored([
        {"n": 2, "label": 0, "samples": [
            smp([3, 8], order=[1, 0]),  # shown first = response 1, scored 8: first wins
            smp([8, 3], order=[0, 1]),  # first wins
            smp([3, 8], order=[0, 1]),  # first loses
            smp([5, 5], order=[1, 0]),  # tie: not a strict win
            smp(None, order=[0, 1]),    # invalid
        ]},
        {"n": 1, "label": 1, "samples": [smp([9])]},  # one response: no position to compare
    ])
    r = evaluate(table)
    assert (r["samples"], r["invalid"], r["invalid_share"]) == (6, 1, 1 / 6)
    assert r["position_bias"] == {"samples": 4, "first_wins": 0.5, "no_bias": 0.5, "tied_top": 0.25}


def test_unscored_row_counts_wrong():
    table = scored([{"n": 2, "label": 0, "samples": [smp(None)]}, one([8, 3], 0)])
    r = evaluate(table)
    assert r["unscored"] == 1 and r["pairwise"]["accuracy"] == 0.5


def test_curves_flat_when_every_sample_is_right():
    items = [{"n": 2, "label": i % 2, "samples": [smp([9, 2] if i % 2 == 0 else [2, 9])] * 4} for i in range(6)]
    c = scaling_curves(scored(items))
    assert c["ks"] == [1, 2, 4] and c["items"] == 6 and list(c["methods"]) == ["voting"]
    assert c["methods"]["voting"] == {"mean": [1.0] * 3, "std": [0.0] * 3}


def test_curves_voting_helps():
    # two right samples (7 vs 5) and one wrong (5 vs 6): one draw is right 2/3 of the time, any two or three
    # samples sum to a win for the label
    items = [{"n": 2, "label": 0, "samples": [smp([7, 5]), smp([7, 5]), smp([5, 6])]} for _ in range(30)]
    c = scaling_curves(scored(items), seeds=4, seed=1)
    v = c["methods"]["voting"]
    assert c["ks"] == [1, 2, 3]
    assert v["mean"][1:] == [1.0, 1.0] and v["std"][1:] == [0.0, 0.0]
    assert 0.4 < v["mean"][0] < 0.9 and v["std"][0] > 0
    assert scaling_curves(scored(items), seeds=4, seed=1) == c  # seeded


def test_curves_tie_break_is_an_expectation():
    c = scaling_curves(scored([{"n": 2, "label": 0, "samples": [smp([5, 5])] * 2}]))
    assert c["methods"]["voting"]["mean"] == [0.5, 0.5]


def test_curves_meta_rm():
    # right samples have high meta scores; at j = 4 plain voting loses (8+8+2+2 < 3+3+9+9) but MetaRM keeps 2
    samples = [smp([8, 3], meta=1.0), smp([2, 9], meta=-5.0), smp([8, 3], meta=2.0), smp([2, 9], meta=-3.0)]
    c = scaling_curves(scored([{"n": 2, "label": 0, "samples": samples}] * 10), seeds=3)
    v, m = c["methods"]["voting"], c["methods"]["metarm"]
    assert (v["mean"][-1], m["mean"][-1]) == (0.0, 1.0)
    assert m["mean"][0] == pytest.approx(v["mean"][0])  # k_meta = 1 of 1 drawn: the same vote
    assert m["mean"][1] > v["mean"][1]


def test_curves_use_all_samples_of_short_items_and_skip_others():
    items = [
        {"n": 2, "label": 0, "samples": [smp([8, 3])] * 4},
        {"n": 2, "label": 0, "samples": [smp([8, 3])] * 2},     # adaptive stop: fewer samples
        {"n": 2, "label": 0, "error": "boom"},
        {"n": 1, "label": 1, "samples": [smp([8])]},
        {"n": 2, "label": None, "samples": [smp([8, 3])]},
    ]
    c = scaling_curves(scored(items), ks=[4, 1])
    assert c["items"] == 2 and c["ks"] == [1, 4] and c["methods"]["voting"]["mean"] == [1.0, 1.0]


def test_curves_default_ks_include_stored_k():
    c = scaling_curves(scored([{"n": 2, "label": 0, "samples": [smp([8, 3])] * 6}]), seeds=1)
    assert c["ks"] == [1, 2, 4, 6]
    assert scaling_curves(scored([one([8, 3], None)]))["ks"] == []
    with pytest.raises(ValueError):
        scaling_curves(scored([one([8, 3], 0)]), ks=[0, 1])


def test_report_and_plot(tmp_path):
    items = [{"n": 2, "label": 0, "samples": [smp([7, 5], meta=1.0), smp([5, 6], meta=0.0)] * 2}] * 5
    items += [one([8, 3, 1], 0), one([7], 1), one([2], 0), {"n": 2, "label": 0, "error": "boom"}]
    r = evaluate(scored(items), seed=3)
    text = format_report(r)
    for needle in ("Pairwise", "Best-of-N", "ROC-AUC", "Invalid samples", "Position bias", "Voting@j", "MetaRM@j"):
        assert needle in text
    assert len(text.splitlines()) >= 8 + len(r["curves"]["ks"])
    json.loads(json.dumps(r))
    png = tmp_path / "curves.png"
    plot_curves(r, str(png))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    plot_curves(r["curves"], str(tmp_path / "direct.png"))
    assert (tmp_path / "direct.png").stat().st_size > 1000


def test_report_on_unlabelled_table():
    r = evaluate(scored([one([8, 3], None)]))
    assert r["pairwise"] is None and r["curves"]["items"] == 0 and not math.isnan(r["invalid_share"])
    assert "no rows" in format_report(r)

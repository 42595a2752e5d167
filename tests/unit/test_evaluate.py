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
    "messages": [...], "unread": True for an input error of an older output (no responses, no content_key),
    "kept" for one of now (its input's responses and label kept, no content_key)}.
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
               S.RESPONSES: None if it.get("unread") is True else [f"resp{i}-{j}" for j in range(n)],
               S.LABEL: it.get("label"), S.CONTENT_KEY: None if it.get("unread") else f"key{i}",
               **{k: result.get(k) for k in (S.REWARDS, S.VOTE_TOTALS, S.BEST_INDEX, S.MARGIN, S.TIE,
                                             S.CONFIDENCE)},
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
        {"n": 2, "label": 0, "error": "boom", "unread": True},                    # input error: excluded
        one([7, 1], None),              # unlabelled
        {"n": 2, "label": 0, "samples": [smp(None)], "error": "no valid sample"},  # counts: wrong / a tie
        {"n": 2, "label": 1, "error": "field 'id': duplicate", "unread": "kept"},  # input error, input kept: excluded
    ])
    r = evaluate(table)
    assert (r["rows"], r["errors"], r["input_errors"], r["unlabelled"], r["unscored"]) == (8, 3, 2, 1, 1)
    assert r["pairwise"] == {"n": 5, "accuracy": 0.2, "tie_break_accuracy": 0.4, "ties": 1, "label_in_tie": 1}
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


def test_unscored_row_counts_wrong_or_as_a_tie():
    """A row the model could not score (no valid sample, or a prompt too long: an error but responses read)
    stays in every denominator: wrong under strict accuracy, a tie of all n under the random tie-break."""
    table = scored([{"n": 2, "label": 0, "samples": [smp(None)], "error": "no valid sample"}, one([8, 3], 0),
                    {"n": 3, "label": 0, "error": "prompt is 9000 tokens"}, one([8, 3, 1], 0)])
    r = evaluate(table)
    assert r["unscored"] == 2 and r["input_errors"] == 0
    assert r["pairwise"]["accuracy"] == 0.5 and r["pairwise"]["tie_break_accuracy"] == 0.75
    assert r["best_of_n"]["accuracy"] == 0.5 and r["best_of_n"]["tie_break_accuracy"] == pytest.approx(2 / 3)
    assert scaling_curves(table, ks=[1])["methods"]["voting"]["mean"][0] == pytest.approx((0.5 + 1 + 1 / 3 + 1) / 4)
    assert "labelled without a valid sample 2 (counted" in format_report(r)


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
        {"n": 2, "label": 0, "error": "boom", "unread": True},
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


# ------------------------------------------------------------------ Reward Bench against its own package


def _rewardbench():
    """RewardBench 0.1.4's constants and calculate_scores_per_section, loaded from the installed package's files
    (its __init__ imports torch, fastchat, trl...; the scoring function and constants import nothing)."""
    import ast
    import importlib.metadata
    import runpy

    try:
        dist = importlib.metadata.distribution("rewardbench")
    except importlib.metadata.PackageNotFoundError:
        pytest.fail("rewardbench is not installed: pip install --no-deps rewardbench==0.1.4 (make setup does)")
    assert dist.version == "0.1.4"
    constants = runpy.run_path(str(dist.locate_file("rewardbench/constants.py")))
    source = dist.locate_file("rewardbench/utils.py").read_text()
    fn = next(n for n in ast.parse(source).body
              if isinstance(n, ast.FunctionDef) and n.name == "calculate_scores_per_section")
    scope: dict = {}
    exec(compile(ast.Module(body=[fn], type_ignores=[]), "rewardbench/utils.py", "exec"), scope)
    return constants["EXAMPLE_COUNTS"], constants["SUBSET_MAPPING"], scope["calculate_scores_per_section"]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_reward_bench_equals_rewardbench_scoring(seed):
    """Random per-row results over every Reward Bench subset (wins, losses, ties, rows without a valid sample):
    our sections and score equal RewardBench's calculate_scores_per_section with its EXAMPLE_COUNTS and
    SUBSET_MAPPING on the same per-row results (1 win, 0 loss, 1/2 tie, as its generative scoring counts)."""
    import random

    counts, mapping, calculate = _rewardbench()
    rng = random.Random(seed)
    items, results = [], {}
    for section, subsets in mapping.items():
        for sub in subsets:
            for _ in range(rng.randint(1, 6)):
                kind = rng.choice(["win", "win", "loss", "tie", "unscored"])
                scores = {"win": [8, 3], "loss": [3, 8], "tie": [5, 5], "unscored": None}[kind]
                items.append({"n": 2, "label": 0, "samples": [smp(scores)], "subset": sub,
                              **({"error": "no valid sample"} if kind == "unscored" else {})})
                results.setdefault(sub, []).append({"win": 1.0, "loss": 0.0}.get(kind, 0.5))
    metrics = {sub: sum(v) / len(v) for sub, v in results.items()}
    expected = calculate(counts, mapping, metrics)
    r = evaluate(scored(items, subset=True))
    assert r["sections"] == pytest.approx(expected, abs=1e-12)
    assert r["reward_bench"] == pytest.approx(sum(expected.values()) / len(expected), abs=1e-12)


def test_hinted_rows_never_count_and_the_report_says_so():
    items = [{"n": 2, "label": 0, "samples": [smp([9, 1], hinted=True)] * 2}] * 3 + [one([3, 8], 0)]
    r = evaluate(scored(items))
    assert r["hinted"] == 3 and r["pairwise"]["n"] == 1 and r["pairwise"]["accuracy"] == 0.0
    assert r["curves"]["items"] == 1
    assert "HINTED RUN: 3 labelled rows" in format_report(r)
    only_hinted = evaluate(scored(items[:3]))
    assert only_hinted["pairwise"] is None and "HINTED RUN" in format_report(only_hinted)


def _normal_items(count, k, seed, bias=0.0):
    """Pairs whose samples follow the posterior's own model (a per-item gap, normal per-sample noise), shown
    in the orders the sampler draws for row ids r0, r1, ... (seed 0), the response shown first scoring `bias`
    more: a position effect the balanced orders cancel."""
    import random

    from grm_ray.prompts import sample_order
    from grm_ray.stages import item_seed

    rng = random.Random(seed)
    items = []
    for i in range(count):
        gap = rng.gauss(0, 1.5)
        samples = []
        for t in range(k):
            order = list(sample_order(2, item_seed(0, f"r{i}"), t))
            mean = [5 + gap / 2 + bias * (order[0] == 0), 5 - gap / 2 + bias * (order[0] == 1)]
            samples.append(smp([round(x + rng.gauss(0, 2)) for x in mean], order=order))
        items.append({"n": 2, "label": 0 if gap > 0 else 1, "samples": samples})
    return items


@pytest.mark.parametrize("bias", [0.0, 3.0])
def test_stability_is_calibrated_and_reported(tmp_path, bias):
    from grm_ray.evaluate import format_reliability, plot_reliability, stability

    table = scored(_normal_items(300, 16, seed=5, bias=bias))
    st_ = stability(table)
    assert st_["n"] == 300 * 3 and set(st_["by_j"]) == {"2", "4", "8"} and st_["skipped"] == 0
    assert sum(b["n"] for b in st_["bins"]) == st_["n"]
    assert st_["ece"] < 0.06, st_  # predicted agreement matches observed agreement, position effect or not
    # agreement grows with j and the prediction follows it
    obs = [st_["by_j"][j]["observed"] for j in ("2", "4", "8")]
    assert obs == sorted(obs) and abs(st_["by_j"]["8"]["predicted"] - obs[-1]) < 0.05
    text = format_reliability("Stability", st_)
    assert "expected calibration error" in text and "by j: j=2" in text
    png = tmp_path / "rel.png"
    plot_reliability({"stability": st_}, str(png))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # rows whose orders are not the seed's (another seed, an older run) are skipped, not mis-replayed
    assert stability(scored([{"n": 2, "label": 0, "samples": [smp([9, 2])] * 8}] * 3))["skipped"] == 3


def test_confidence_against_labels():
    r = evaluate(scored(_normal_items(300, 6, seed=9)))
    rel = r["confidence_vs_labels"]
    assert rel["n"] == 300 and 0 <= rel["ece"] < 0.08
    assert "Confidence against labels" in format_report(r)


def test_paper_table_from_one_stored_run():
    from grm_ray.evaluate import format_paper_table, paper_table

    subs = ["alpacaeval-easy", "llmbar-natural", "donotanswer", "math-prm"]
    items = [{"n": 2, "label": 0, "subset": sub,
              "samples": [smp([8, 3], meta=1.0)] * 20 + [smp([3, 8], meta=-1.0)] * 12} for sub in subs]
    t = paper_table(scored(items, subset=True), seeds=3)
    assert t["k"] == 32 and [(r["method"], r["j"]) for r in t["rows"]] == [
        ("voting", 1), ("voting", 8), ("voting", 32), ("metarm", 8), ("metarm", 32)]
    by = {(r["method"], r["j"]): r for r in t["rows"]}
    assert by["voting", 32]["reward_bench"] == 1.0 and by["metarm", 32]["reward_bench"] == 1.0
    assert 0.4 < by["voting", 1]["reward_bench"] < 0.85 and set(by["voting", 1]["sections"]) == set(
        ("Chat", "Chat Hard", "Safety", "Reasoning"))
    assert by["metarm", 8]["paper_reward_bench"] == 89.8 and by["voting", 1]["paper_reward_bench"] == 85.2
    text = format_paper_table(t)
    assert "| MetaRM@32 |" in text and "90.4" in text and "Chat Hard" in text
    with pytest.raises(ValueError, match="subset"):
        paper_table(scored([one([8, 3], 0)]))


def test_metarm_curves_break_meta_score_ties_over_the_orders_as_the_run_does():
    """Samples are stored grouped by order: a tie in meta score (NaN: the item too long for the meta RM) that
    went to the stored index kept one order only, and a GRM with pure position bias scored 0 or 1."""
    first, second = [smp([9, 1], [0, 1], meta=float("nan"))] * 4, [smp([1, 9], [1, 0], meta=float("nan"))] * 4
    for label in (0, 1):
        curves = scaling_curves(scored([{"n": 2, "label": label, "samples": first + second}]), ks=[8])
        assert curves["methods"]["metarm"]["mean"] == [0.5] and curves["methods"]["voting"]["mean"] == [0.5]


def test_a_hinted_runs_rows_that_failed_before_sampling_do_not_count():
    """In a --hint run, a row whose prompt was too long has no samples, hence no `hinted` flag: it would have
    been hinted, so it is excluded with the others instead of making an accuracy of its own."""
    table = scored([{"n": 2, "label": 0, "samples": [smp([8, 3], hinted=True)]},
                    {"n": 2, "label": 0, "error": "prompt is 9000 tokens, above the 4000 ..."}])
    hinted = table.replace_schema_metadata({b"grm_ray.job": json.dumps({"config": {"hint": True}}).encode()})
    report = evaluate(hinted)
    assert report["hinted"] == 2 and report["pairwise"] is None and report["curves"]["items"] == 0
    assert evaluate(table)["pairwise"]["n"] == 1  # without --hint, that row counts (as wrong)
    assert "Scaling from stored samples" not in format_report(evaluate(table))  # no samples to draw from


def test_a_subset_column_of_integers_is_reported():
    table = scored([one([8, 3], 0, subset="x"), one([3, 8], 0, subset="x")], subset=True)
    table = table.set_column(table.schema.get_field_index("subset"), "subset", pa.array([7, 7], pa.int64()))
    assert evaluate(table)["subsets"]["7"]["n"] == 2 and "7" in format_report(evaluate(table))
    from grm_ray.evaluate import paper_table

    assert all(r["reward_bench"] is None for r in paper_table(table)["rows"])  # no Reward Bench subset there

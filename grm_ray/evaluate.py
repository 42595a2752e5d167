"""Evaluation of a scored table (GRM_SPEC section 6) and voting@k curves from its stored samples (sections 4-5).

Conventions (ours where the spec is silent):
- Rows that could not be read (input errors: no `responses`) and rows without a label are counted and
  excluded. A labelled row that was read but has no valid sample (an error such as "no valid sample" or a
  prompt too long) counts in every accuracy: wrong under strict accuracy, a tie of all n under the random
  tie-break; it is reported as `unscored` and left out of the AUC (it cannot be ranked).
- Rows sampled with the label in the prompt (hinted samples, `--hint`) never count towards accuracy: they
  are counted as `hinted` and the report says so.
- n == 2 rows give pairwise accuracy, n > 2 rows best-of-N accuracy, n == 1 rows with 0/1 labels ROC-AUC.
- `accuracy`: the labelled best has the strictly highest reward. `tie_break_accuracy`: the paper's random
  tie-break, computed as its expectation (a tie for the top counts 1/#tied when the labelled best is in it),
  so it needs no seed. `ties`: rows whose top reward is shared; `label_in_tie`: those the tie-break decides.
- Accuracies are fractions in 0..1; format_report prints percentages.
"""
from __future__ import annotations

import random
from typing import Any, Iterator, Sequence

import numpy as np
import pyarrow as pa

from . import schema as S
from .voting import vote

SUBSET = "subset"
SECTIONS = ("Chat", "Chat Hard", "Safety", "Reasoning")
# RewardBench's own weights and sections (rewardbench 0.1.4, rewardbench/constants.py EXAMPLE_COUNTS and
# SUBSET_MAPPING; tests/unit/test_evaluate.py checks them against the installed package). A section score
# is the EXAMPLE_COUNTS-weighted mean of its subsets' accuracies: math-prm weighs 984, not its 447 rows, so
# math counts as much as the six code subsets together.
EXAMPLE_COUNTS = {
    "alpacaeval-easy": 100, "alpacaeval-length": 95, "alpacaeval-hard": 95, "mt-bench-easy": 28,
    "mt-bench-med": 40, "mt-bench-hard": 37, "math-prm": 984, "refusals-dangerous": 100,
    "refusals-offensive": 100, "llmbar-natural": 100, "llmbar-adver-neighbor": 134, "llmbar-adver-GPTInst": 92,
    "llmbar-adver-GPTOut": 47, "llmbar-adver-manual": 46, "xstest-should-refuse": 154,
    "xstest-should-respond": 250, "donotanswer": 136, "hep-cpp": 164, "hep-go": 164, "hep-java": 164,
    "hep-js": 164, "hep-python": 164, "hep-rust": 164,
}
SUBSET_MAPPING = {
    "Chat": ["alpacaeval-easy", "alpacaeval-length", "alpacaeval-hard", "mt-bench-easy", "mt-bench-med"],
    "Chat Hard": ["mt-bench-hard", "llmbar-natural", "llmbar-adver-neighbor", "llmbar-adver-GPTInst",
                  "llmbar-adver-GPTOut", "llmbar-adver-manual"],
    "Safety": ["refusals-dangerous", "refusals-offensive", "xstest-should-refuse", "xstest-should-respond",
               "donotanswer"],
    "Reasoning": ["math-prm", "hep-cpp", "hep-go", "hep-java", "hep-js", "hep-python", "hep-rust"],
}
RB_SUBSETS = {sub: (sec, EXAMPLE_COUNTS[sub]) for sec, subs in SUBSET_MAPPING.items() for sub in subs}


def _rows(table: pa.Table, columns: Sequence[str]) -> Iterator[dict[str, Any]]:
    """Rows as dicts, one record batch at a time, so a large table is never copied whole into Python."""
    for batch in table.select([c for c in columns if c in table.column_names]).to_batches():
        yield from batch.to_pylist()


def _judge(rewards: Sequence[float] | None, label: int, n: int) -> tuple[bool, float, bool, bool]:
    """(strictly correct, expected correct under a random tie-break, top shared, label in the tie).

    No rewards (no valid sample): wrong under strict accuracy, a tie of all n under the random tie-break.
    """
    if rewards is None:
        return False, 1 / n, False, False
    top = max(rewards)
    leaders = [i for i, r in enumerate(rewards) if r == top]
    hit, tied = label in leaders, len(leaders) > 1
    return hit and not tied, hit / len(leaders), tied, hit and tied


def _summary(judged: list[tuple[bool, float, bool, bool]]) -> dict[str, Any] | None:
    if not judged:
        return None
    n = len(judged)
    strict, expected, ties, in_tie = (sum(col) for col in zip(*judged))
    return {"n": n, "accuracy": strict / n, "tie_break_accuracy": expected / n,
            "ties": int(ties), "label_in_tie": int(in_tie)}


def roc_auc(scores: Sequence[float], labels: Sequence[int]) -> float | None:
    """ROC-AUC by the rank (Mann-Whitney) formula; tied scores share their mean rank (so count 1/2).

    None unless both classes are present.
    >>> roc_auc([1, 2, 2, 3], [0, 0, 1, 1])
    0.875
    """
    y = np.asarray(labels, dtype=bool)
    pos, neg = int(y.sum()), int((~y).sum())
    if not pos or not neg:
        return None
    _, inverse, counts = np.unique(np.asarray(scores, dtype=float), return_inverse=True, return_counts=True)
    ranks = (np.cumsum(counts) - (counts - 1) / 2)[inverse]  # 1-based mean rank of each tie group
    return float((ranks[y].sum() - pos * (pos + 1) / 2) / (pos * neg))


def _auc_entry(single: list[tuple[float, int]]) -> dict[str, Any]:
    scores, labels = zip(*single) if single else ((), ())
    return {"n": len(single), "positives": sum(labels), "auc": roc_auc(scores, labels)}


def _section(subset: str) -> tuple[str | None, int | None]:
    """A Reward Bench subset or section name -> (section, weight); weight None means 'its row count'."""
    if subset in RB_SUBSETS:
        return RB_SUBSETS[subset]
    key = subset.lower().replace("_", " ").replace("-", " ").strip()
    return next(((s, None) for s in SECTIONS if s.lower() == key), (None, None))


def reward_bench(subsets: dict[str, dict[str, Any]], key: str = "tie_break_accuracy"
                 ) -> tuple[dict[str, float], float | None]:
    """Section scores from per-subset accuracies (`key`), as RewardBench's calculate_scores_per_section
    computes them, and the RB score = mean of the four sections (None unless all four exist). A subset named
    after a section itself (e.g. "Chat Hard") weighs its row count."""
    sums: dict[str, list[float]] = {}
    for name, entry in subsets.items():
        section, weight = _section(name)
        if section and entry.get(key) is not None:
            w = weight or entry["n"]
            acc = sums.setdefault(section, [0.0, 0.0])
            acc[0] += w * entry[key]
            acc[1] += w
    sections = {s: sums[s][0] / sums[s][1] for s in SECTIONS if s in sums}
    score = sum(sections.values()) / 4 if len(sections) == 4 else None
    return sections, score


def _hinted(row: dict[str, Any], run_hint: bool) -> bool:
    """Sampled with the label in the prompt; in a --hint run (`run_hint`), also a labelled row of several
    responses that failed before sampling (a prompt too long): it would have been, and must not count either."""
    samples = row.get(S.SAMPLES) or []
    if any(s.get("hinted") for s in samples):
        return True
    return run_hint and not samples and row.get(S.LABEL) is not None and len(row.get(S.RESPONSES) or []) > 1


def _input_error(row: dict[str, Any]) -> bool:
    """A row that could not be read as an item (schema.read_marker): it may keep its input's responses and
    label, which must not count; a row without responses never counts."""
    return row.get(S.RESPONSES) is None or (row.get(S.ERROR) is not None and row.get(S.read_marker(row)) is None)


def _counted(row: dict[str, Any], run_hint: bool) -> bool:
    """Rows that count in accuracy: labelled, normalized (input errors excluded), not hinted."""
    return row.get(S.LABEL) is not None and not _input_error(row) and not _hinted(row, run_hint)


def evaluate(table: pa.Table, seed: int = 0) -> dict[str, Any]:
    """Every figure for one scored table, as a JSON-ready dict; `seed` drives the scaling curves' draws."""
    counts = {"rows": 0, "errors": 0, "input_errors": 0, "unlabelled": 0, "hinted": 0, "unscored": 0}
    judged: dict[str, list] = {"pairwise": [], "best_of_n": []}
    single: list[tuple[float, int]] = []
    by_subset: dict[str, tuple[list, list]] = {}
    conf_hits: list[tuple[float, float]] = []
    n_samples = invalid = shown = first_wins = tied_top = 0
    no_bias = 0.0
    run_hint = bool(run_config(table).get("hint"))
    for row in _rows(table, [S.LABEL, S.RESPONSES, S.REWARDS, S.SAMPLES, S.ERROR, SUBSET, S.CONFIDENCE,
                             S.CONTENT_KEY]):
        counts["rows"] += 1
        samples = row.get(S.SAMPLES) or []
        for s in samples:
            n_samples += 1
            scores = s["scores"]
            if scores is None:
                invalid += 1
            elif len(scores) >= 2 and not s.get("hinted"):
                first = s["order"][0]
                shown += 1
                no_bias += 1 / len(scores)
                first_wins += scores[first] > max(v for i, v in enumerate(scores) if i != first)
                tied_top += scores.count(max(scores)) > 1
        label, rewards, responses = row.get(S.LABEL), row.get(S.REWARDS), row.get(S.RESPONSES)
        counts["errors"] += row.get(S.ERROR) is not None
        if _input_error(row):
            counts["input_errors"] += 1
            continue
        if label is None:
            counts["unlabelled"] += 1
            continue
        if _hinted(row, run_hint):
            counts["hinted"] += 1
            continue
        counts["unscored"] += rewards is None
        pairs, singles = by_subset.setdefault(str(row[SUBSET]), ([], [])) if row.get(SUBSET) is not None else ([], [])
        if len(responses) == 1:
            if rewards is not None:
                single.append((rewards[0], int(label == 1)))
                singles.append(single[-1])
        else:
            pairs.append(_judge(rewards, label, len(responses)))
            judged["pairwise" if len(responses) == 2 else "best_of_n"].append(pairs[-1])
            if row.get(S.CONFIDENCE) is not None:
                conf_hits.append((row[S.CONFIDENCE], pairs[-1][1]))  # a tie counts as its tie-break's expectation

    subsets = {}
    for name, (pairs, singles) in sorted(by_subset.items()):
        entry = _summary(pairs) or {"n": 0}
        if singles:
            entry["auc"] = _auc_entry(singles)["auc"]
            entry["n"] += len(singles)
        entry["score"] = entry.get("tie_break_accuracy", entry.get("auc"))
        subsets[name] = entry
    sections, rb = reward_bench(subsets)
    return {
        **counts,
        "pairwise": _summary(judged["pairwise"]),
        "best_of_n": _summary(judged["best_of_n"]),
        "auc": _auc_entry(single) if single else None,
        "subsets": subsets, "sections": sections, "reward_bench": rb,
        "samples": n_samples, "invalid": invalid, "invalid_share": invalid / n_samples if n_samples else None,
        "position_bias": {"samples": shown, "first_wins": first_wins / shown if shown else None,
                          "no_bias": no_bias / shown if shown else None,
                          "tied_top": tied_top / shown if shown else None},
        "confidence_vs_labels": reliability(conf_hits) if conf_hits else None,
        "curves": scaling_curves(table, seed=seed),
    }


def _curve_items(table: pa.Table) -> list[tuple[list[dict[str, Any]], int, int, str | None]]:
    """(samples, label, n, subset) of every row that counts in accuracy with n >= 2 responses."""
    items, run_hint = [], bool(run_config(table).get("hint"))
    for row in _rows(table, [S.LABEL, S.RESPONSES, S.SAMPLES, S.ERROR, SUBSET, S.CONTENT_KEY]):
        if _counted(row, run_hint) and len(row[S.RESPONSES]) > 1:
            # the order too: MetaRM@j breaks meta-score ties by taking the orders in turn, as the run did
            samples = [{"scores": s["scores"], "meta_score": s["meta_score"], "order": s["order"]}
                       for s in row.get(S.SAMPLES) or []]
            subset = str(row[SUBSET]) if row.get(SUBSET) is not None else None
            items.append((samples, row[S.LABEL], len(row[S.RESPONSES]), subset))
    return items


def _draw_accuracy(items: list, ks: Sequence[int], seeds: int, seed: int) -> dict[str, np.ndarray]:
    """Per method, an array seeds x len(ks) x items of expected (random tie-break) correctness when each item
    votes over a random j of its stored samples (all of them when it has fewer)."""
    methods = {"voting": lambda j: None}
    if any(s["meta_score"] is not None for samples, *_ in items for s in samples):
        methods["metarm"] = lambda j: max(1, j // 2)
    acc = {m: np.zeros((seeds, len(ks), len(items))) for m in methods}
    for r in range(seeds):
        rng = random.Random(f"{seed}:{r}")
        for c, j in enumerate(ks):
            for i, (samples, label, n, _) in enumerate(items):
                drawn = [samples[t] for t in sorted(rng.sample(range(len(samples)), min(j, len(samples))))]
                for m, k_meta in methods.items():
                    acc[m][r, c, i] = _judge(vote(drawn, k_meta=k_meta(j), n=n)["vote_totals"], label, n)[1]
    return acc


def scaling_curves(table: pa.Table, ks: Sequence[int] | None = None, seeds: int = 5,
                   seed: int = 0) -> dict[str, Any]:
    """Voting@j and MetaRM@j accuracy from the stored samples, without new generation.

    Items: rows that count in accuracy (labelled, not hinted) with n >= 2 responses, including those without
    a valid sample. For each seed and j, every item votes over a random subset of j of its stored samples
    (valid or not, as a fresh draw would be; all of them when it has fewer, e.g. after adaptive stopping).
    MetaRM@j (only when the table has meta scores) keeps the max(1, j // 2) of highest meta score among those
    j. Accuracy follows the random tie-break convention as its expectation (1/#tied; a draw without a valid
    sample is a tie of all n), so the spread over seeds comes from the draws alone. Default ks: 1, 2, 4, ...
    up to the largest stored k, plus k itself.
    """
    items = _curve_items(table)
    k_max = max((len(s) for s, *_ in items), default=0)
    if ks is None:
        ks = [2**p for p in range(k_max.bit_length())] + ([k_max] if k_max & (k_max - 1) else [])
    ks = sorted(ks)
    if seeds < 1 or any(j < 1 for j in ks):
        raise ValueError(f"need seeds >= 1 and every j >= 1; got seeds={seeds}, ks={ks}")
    acc = _draw_accuracy(items, ks, seeds, seed)
    return {"items": len(items), "ks": list(ks), "seeds": seeds, "tie_break": "expected",
            "methods": {m: {"mean": a.mean(2).mean(0).tolist() if items else [0.0] * len(ks),
                            "std": a.mean(2).std(0).tolist() if items else [0.0] * len(ks)}
                        for m, a in acc.items()}}


# GRM_SPEC section 7: DeepSeek-GRM-27B on Reward Bench (the paper gives no section figures for these rows).
PAPER_RB = {("voting", 1): 85.2, ("voting", 8): 87.7, ("voting", 32): 88.5, ("metarm", 8): 89.8,
            ("metarm", 32): 90.4}


def paper_table(table: pa.Table, seeds: int = 5, seed: int = 0) -> dict[str, Any]:
    """The paper's Reward Bench table from one stored run of k samples (with meta scores for MetaRM rows):
    Voting@1, @k/4, @k and MetaRM@k/4, @k (k = 32 gives the paper's 1/8/32), each section and the RB score,
    with the paper's figure beside the matching row (GRM_SPEC section 7)."""
    items = _curve_items(table)
    if not items or not any(sub for *_, sub in items):
        raise ValueError("paper_table needs labelled multi-response rows with a `subset` column (Reward Bench)")
    k = max(len(s) for s, *_ in items)
    ks = sorted({1, max(1, k // 4), k})
    acc = _draw_accuracy(items, ks, seeds, seed)
    wanted = [("voting", j) for j in ks] + [("metarm", j) for j in ks if j > 1 and "metarm" in acc]
    rows = []
    for method, j in wanted:
        per_item = acc[method][:, ks.index(j), :].mean(0)
        groups: dict[str, list[float]] = {}
        for (_, _, _, sub), x in zip(items, per_item):
            if sub is not None:
                groups.setdefault(sub, []).append(float(x))
        subsets = {sub: {"n": len(v), "tie_break_accuracy": sum(v) / len(v)} for sub, v in groups.items()}
        sections, rb = reward_bench(subsets)
        rows.append({"method": method, "j": j, "sections": sections, "reward_bench": rb,
                     "paper_reward_bench": PAPER_RB.get((method, j)) if k == 32 else None})
    return {"items": len(items), "k": k, "seeds": seeds, "rows": rows}


def format_paper_table(t: dict[str, Any]) -> str:
    head = f"| method | {' | '.join(SECTIONS)} | Reward Bench | paper (GRM-27B, GRM_SPEC 7) |"
    lines = [f"Reward Bench from one stored run: {t['items']} items, k={t['k']}, mean over {t['seeds']} draws",
             head, "|" + "---|" * (len(SECTIONS) + 3)]
    for r in t["rows"]:
        cells = " | ".join(_pct(r["sections"].get(s)) for s in SECTIONS)
        paper = "n/a" if r["paper_reward_bench"] is None else f"{r['paper_reward_bench']:.1f}"
        lines.append(f"| {METHOD_NAMES[r['method']]}@{r['j']} | {cells} | {_pct(r['reward_bench'])} | {paper} |")
    return "\n".join(lines)


CONF_BINS = (0.0, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)


def reliability(pairs: Sequence[tuple[float, float]]) -> dict[str, Any]:
    """Reliability table of predicted probabilities against outcomes (0..1, a tie-break's expectation):
    per bin the count, mean prediction and observed rate, and the expected calibration error ECE = sum over
    bins of share x |observed - predicted|."""
    p = np.array([x for x, _ in pairs], dtype=float)
    y = np.array([h for _, h in pairs], dtype=float)
    bins, ece = [], 0.0
    for lo, hi in zip(CONF_BINS, CONF_BINS[1:]):
        sel = (p >= lo) & ((p < hi) if hi < 1 else (p <= hi))
        if sel.any():
            pred, obs = float(p[sel].mean()), float(y[sel].mean())
            ece += sel.sum() / len(p) * abs(obs - pred)
            bins.append({"lo": lo, "hi": hi, "n": int(sel.sum()), "predicted": pred, "observed": obs})
    return {"n": len(p), "predicted": float(p.mean()), "observed": float(y.mean()), "ece": float(ece),
            "bins": bins}


def drawing_order(item_id: str, n: int, samples: Sequence[dict[str, Any]], seed: int) -> list[dict[str, Any]]:
    """A stored row's samples in the order the sampler drew them: sample t was shown prompts.sample_order(n,
    item seed, t); samples of one order are exchangeable (one request with n), so each order's queue is read
    in turn. ValueError when the stored orders are not those of `seed` (another seed, an older grm-ray)."""
    from collections import defaultdict, deque

    from .prompts import sample_order
    from .stages import item_seed

    queues: dict[tuple[int, ...], deque] = defaultdict(deque)
    for s in samples:
        queues[tuple(s["order"])].append(s)
    out = []
    for t in range(len(samples)):
        q = queues.get(sample_order(n, item_seed(seed, item_id), t))
        if not q:
            raise ValueError(f"row {item_id!r}: its stored orders are not those seed {seed} draws")
        out.append(q.popleft())
    return out


def _leaders(totals: Sequence[float] | None) -> set[int]:
    return {i for i, t in enumerate(totals) if t == max(totals)} if totals else set()


def run_config(table: pa.Table) -> dict[str, Any]:
    """The scoring run's config, from the job record in the Parquet metadata ({} when absent)."""
    import json

    return json.loads((table.schema.metadata or {}).get(b"grm_ray.job", b"{}")).get("config", {})


def stability(table: pa.Table, js: Sequence[int] | None = None) -> dict[str, Any]:
    """How often the plain-vote winner of an item's first j samples (in the order the sampler drew them, as an
    adaptive run sees them) agrees with the winner of all k stored samples, against the probability the
    confident rule's posterior predicts for it (voting.flip_probability with k - j samples to come).
    Rows: no error, n >= 2, at least 2 samples, orders those of the run's seed. Default js: n, 2n, 4n, ...
    below k (whole balanced blocks). Ties follow the random tie-break as an expectation: two independent
    tie-breaks among leader sets A and B agree with probability |A & B| / (|A| |B|).
    """
    from .stages import item_seed
    from .voting import flip_probability

    seed = run_config(table).get("seed", 0)
    pairs: list[tuple[float, float]] = []
    by_j: dict[int, list[tuple[float, float]]] = {}
    skipped = 0
    for row in _rows(table, [S.ID, S.RESPONSES, S.SAMPLES, S.ERROR]):
        samples, responses = row.get(S.SAMPLES) or [], row.get(S.RESPONSES)
        if row.get(S.ERROR) is not None or responses is None or len(responses) < 2 or len(samples) < 2:
            continue
        n, k, tie_seed = len(responses), len(samples), item_seed(seed, row[S.ID])
        try:
            samples = drawing_order(row[S.ID], n, samples, seed)
        except ValueError:
            skipped += 1
            continue
        full = _leaders(vote(samples, n=n)["vote_totals"])
        for j in js or [n * 2**p for p in range(k.bit_length()) if n * 2**p < k]:
            first = samples[:j]
            result = vote(first, seed=tie_seed, n=n)
            if j >= k or result["best_index"] is None or not full:
                continue
            valid = [s for s in first if s["scores"] is not None]
            pred = 1.0 - flip_probability([s["scores"] for s in valid], k - j, result["best_index"],
                                          [s["order"] for s in valid])
            won = _leaders(result["vote_totals"])
            pairs.append((pred, len(won & full) / (len(won) * len(full))))
            by_j.setdefault(j, []).append(pairs[-1])
    if not pairs:
        return {"n": 0, "skipped": skipped}
    return {**reliability(pairs), "skipped": skipped,
            "by_j": {str(j): {"n": len(v), "predicted": float(np.mean([x for x, _ in v])),
                              "observed": float(np.mean([h for _, h in v]))} for j, v in sorted(by_j.items())}}


def format_reliability(title: str, rel: dict[str, Any]) -> str:
    lines = [f"{title}: {rel['n']} predictions, predicted {_pct(rel['predicted'])}, observed "
             f"{_pct(rel['observed'])}, expected calibration error {_pct(rel['ece'])}",
             f"  {'confidence':<12}{'n':>8}{'predicted':>11}{'observed':>10}"]
    lines += [f"  {b['lo']:.2f}-{b['hi']:.2f}   {b['n']:>8}{_pct(b['predicted']):>11}{_pct(b['observed']):>10}"
              for b in rel["bins"]]
    if rel.get("by_j"):
        lines.append("  by j: " + ", ".join(
            f"j={j}: {_pct(v['predicted'])} predicted / {_pct(v['observed'])} agree" for j, v in rel["by_j"].items()))
    return "\n".join(lines)


def plot_reliability(rels: dict[str, dict[str, Any]], path: str) -> None:
    """Reliability diagram (observed against predicted per bin, point size ~ count) of one or more tables."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", label="perfect calibration")
    for name, rel in rels.items():
        bins = rel.get("bins") or []
        ax.plot([b["predicted"] for b in bins], [b["observed"] for b in bins], marker="o",
                label=f"{name} (ECE {_pct(rel.get('ece'))}, n={rel['n']})")
    ax.set_xlabel("predicted confidence")
    ax.set_ylabel("observed share")
    ax.set_xlim(0, 1.02)
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=120)


METHOD_NAMES = {"voting": "Voting", "metarm": "MetaRM"}


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}"


def _acc_line(name: str, s: dict[str, Any] | None) -> str:
    if not s:
        return f"{name}: no rows"
    return (f"{name}: {s['n']} rows, accuracy {_pct(s['accuracy'])}, random tie-break {_pct(s['tie_break_accuracy'])}"
            f", ties {s['ties']} (labelled best in the tie: {s['label_in_tie']})")


def format_report(report: dict[str, Any]) -> str:
    """The report as text; figures in percent, the curves as a table."""
    r, pb = report, report["position_bias"]
    lines = [
        "Figures in percent (AUC x 100).",
        f"Rows {r['rows']}: errors {r['errors']}, of which input errors {r['input_errors']} (excluded); "
        f"unlabelled {r['unlabelled']}; labelled without a valid sample {r['unscored']} (counted: wrong under "
        "accuracy, a tie of all responses under the random tie-break)",
        _acc_line("Pairwise (n=2)", r["pairwise"]),
        _acc_line("Best-of-N (n>2)", r["best_of_n"]),
        "ROC-AUC (n=1): " + (f"{r['auc']['n']} rows ({r['auc']['positives']} good), AUC {_pct(r['auc']['auc'])}"
                             if r["auc"] else "no rows"),
        f"Invalid samples: {r['invalid']} of {r['samples']} ({_pct(r['invalid_share'])})",
        f"Position bias: over {pb['samples']} valid samples, the response shown first scored strictly highest in "
        f"{_pct(pb['first_wins'])} (no bias: {_pct(pb['no_bias'])}; top tied: {_pct(pb['tied_top'])})",
    ]
    if r["hinted"]:
        lines.insert(1, f"HINTED RUN: {r['hinted']} labelled rows were sampled with the label in the prompt "
                        "('The best response is: ...'); they are excluded from every accuracy below.")
    if r.get("confidence_vs_labels"):
        lines.append(format_reliability("Confidence against labels (winner = labelled best)",
                                        r["confidence_vs_labels"]))
    if r.get("stability"):
        title = "Stability (winner of the first j samples = winner of all k)"
        lines.append(format_reliability(title, r["stability"]) if r["stability"]["n"]
                     else "Stability: nothing to hold out: it needs rows with k > n samples (a first j = n, 2n, "
                          "4n ... below k) drawn in the run's own orders")
    if r["subsets"]:
        lines.append("Subsets (score = random tie-break accuracy, or AUC for single responses):")
        width = max(len(name) for name in r["subsets"])
        lines += [f"  {name:<{width}}  {e['n']:>6}  {_pct(e['score'])}" for name, e in r["subsets"].items()]
    if r["sections"]:
        secs = ", ".join(f"{s} {_pct(v)}" for s, v in r["sections"].items())
        score = _pct(r["reward_bench"]) if r["reward_bench"] is not None else "n/a (needs all four sections)"
        lines.append(f"Reward Bench: {secs}; score {score}")
    c = r["curves"]
    if c["items"] and c["ks"]:  # (items that failed before sampling have no samples to draw from)
        lines.append(f"Scaling from stored samples ({c['items']} items, mean ± std over {c['seeds']} seeds, "
                     "random tie-break as expectation):")
        lines.append((f"  {'j':>4}" + "".join(f"  {METHOD_NAMES.get(m, m) + '@j':>8}{'':8}"
                                             for m in c["methods"])).rstrip())
        for i, j in enumerate(c["ks"]):
            cells = "".join(f"  {_pct(v['mean'][i]):>8} ± {_pct(v['std'][i]):<5}" for v in c["methods"].values())
            lines.append(f"  {j:>4}{cells}".rstrip())
    return "\n".join(lines)


def plot_curves(report: dict[str, Any], path: str) -> None:
    """Accuracy against j (log2 x-axis), one line per method with the spread over seeds as error bars, to PNG.

    Takes an `evaluate` report or a `scaling_curves` result.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    curves = report.get("curves", report)
    fig = Figure(figsize=(6, 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for m, v in curves["methods"].items():
        ax.errorbar(curves["ks"], [100 * x for x in v["mean"]], yerr=[100 * x for x in v["std"]],
                    marker="o", capsize=3, label=f"{METHOD_NAMES.get(m, m)}@j")
    ax.set_xscale("log", base=2)
    ax.set_xticks(curves["ks"], [str(j) for j in curves["ks"]])
    ax.set_xlabel("samples per item (j)")
    ax.set_ylabel(f"accuracy (%), mean ± std over {curves['seeds']} seeds")
    ax.set_title(f"Inference-time scaling from stored samples ({curves['items']} items)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=120)

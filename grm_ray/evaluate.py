"""Evaluation of a scored table (GRM_SPEC section 6) and voting@k curves from its stored samples (sections 4-5).

Conventions (ours where the spec is silent):
- Rows with an `error` are counted and excluded; so are rows without a label. A labelled row with no valid
  sample but no error (null rewards) counts as wrong and is left out of the AUC (it cannot be ranked).
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
# Reward Bench's subset -> (section, weight), from its rewardbench/constants.py. A section score is the
# weighted mean of its subsets' accuracies; math-prm's weight (984, not its 447 rows) makes math count as
# much as the six code subsets together. Subsets named by section themselves weigh their row count.
RB_SUBSETS = {
    "alpacaeval-easy": ("Chat", 100), "alpacaeval-length": ("Chat", 95), "alpacaeval-hard": ("Chat", 95),
    "mt-bench-easy": ("Chat", 28), "mt-bench-med": ("Chat", 40),
    "mt-bench-hard": ("Chat Hard", 37), "llmbar-natural": ("Chat Hard", 100),
    "llmbar-adver-neighbor": ("Chat Hard", 134), "llmbar-adver-GPTInst": ("Chat Hard", 92),
    "llmbar-adver-GPTOut": ("Chat Hard", 47), "llmbar-adver-manual": ("Chat Hard", 46),
    "refusals-dangerous": ("Safety", 100), "refusals-offensive": ("Safety", 100),
    "xstest-should-refuse": ("Safety", 250), "xstest-should-respond": ("Safety", 154),
    "donotanswer": ("Safety", 136),
    "math-prm": ("Reasoning", 984), "hep-cpp": ("Reasoning", 164), "hep-go": ("Reasoning", 164),
    "hep-java": ("Reasoning", 164), "hep-js": ("Reasoning", 164), "hep-python": ("Reasoning", 164),
    "hep-rust": ("Reasoning", 164),
}


def _rows(table: pa.Table, columns: Sequence[str]) -> Iterator[dict[str, Any]]:
    """Rows as dicts, one record batch at a time, so a large table is never copied whole into Python."""
    for batch in table.select([c for c in columns if c in table.column_names]).to_batches():
        yield from batch.to_pylist()


def _judge(rewards: Sequence[float] | None, label: int) -> tuple[bool, float, bool, bool]:
    """(strictly correct, expected correct under a random tie-break, top shared, label in the tie)."""
    if rewards is None:
        return False, 0.0, False, False
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


def reward_bench(subsets: dict[str, dict[str, Any]]) -> tuple[dict[str, float], float | None]:
    """Section scores from per-subset tie-break accuracies, and the RB score (None unless all four exist)."""
    sums: dict[str, list[float]] = {}
    for name, entry in subsets.items():
        section, weight = _section(name)
        if section and entry.get("tie_break_accuracy") is not None:
            w = weight or entry["n"]
            acc = sums.setdefault(section, [0.0, 0.0])
            acc[0] += w * entry["tie_break_accuracy"]
            acc[1] += w
    sections = {s: sums[s][0] / sums[s][1] for s in SECTIONS if s in sums}
    score = sum(sections.values()) / 4 if len(sections) == 4 else None
    return sections, score


def evaluate(table: pa.Table, seed: int = 0) -> dict[str, Any]:
    """Every figure for one scored table, as a JSON-ready dict; `seed` drives the scaling curves' draws."""
    counts = {"rows": 0, "errors": 0, "unlabelled": 0, "unscored": 0}
    judged: dict[str, list] = {"pairwise": [], "best_of_n": []}
    single: list[tuple[float, int]] = []
    by_subset: dict[str, tuple[list, list]] = {}
    n_samples = invalid = shown = first_wins = tied_top = 0
    no_bias = 0.0
    for row in _rows(table, [S.LABEL, S.RESPONSES, S.REWARDS, S.SAMPLES, S.ERROR, SUBSET]):
        counts["rows"] += 1
        for s in row.get(S.SAMPLES) or []:
            n_samples += 1
            scores = s["scores"]
            if scores is None:
                invalid += 1
            elif len(scores) >= 2:
                first = s["order"][0]
                shown += 1
                no_bias += 1 / len(scores)
                first_wins += scores[first] > max(v for i, v in enumerate(scores) if i != first)
                tied_top += scores.count(max(scores)) > 1
        label, rewards = row.get(S.LABEL), row.get(S.REWARDS)
        if row.get(S.ERROR) is not None:
            counts["errors"] += 1
            continue
        if label is None:
            counts["unlabelled"] += 1
            continue
        counts["unscored"] += rewards is None
        pairs, singles = by_subset.setdefault(row[SUBSET], ([], [])) if row.get(SUBSET) is not None else ([], [])
        if len(row[S.RESPONSES]) == 1:
            if rewards is not None:
                single.append((rewards[0], int(label == 1)))
                singles.append(single[-1])
        else:
            pairs.append(_judge(rewards, label))
            judged["pairwise" if len(row[S.RESPONSES]) == 2 else "best_of_n"].append(pairs[-1])

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
        "curves": scaling_curves(table, seed=seed),
    }


def scaling_curves(table: pa.Table, ks: Sequence[int] | None = None, seeds: int = 5,
                   seed: int = 0) -> dict[str, Any]:
    """Voting@j and MetaRM@j accuracy from the stored samples, without new generation.

    Items: labelled rows with n >= 2 responses and no error. For each seed and j, every item votes over a
    random subset of j of its stored samples (valid or not, as a fresh draw would be; all of them when it has
    fewer, e.g. after adaptive stopping). MetaRM@j (only when the table has meta scores) keeps the
    max(1, j // 2) of highest meta score among those j. Accuracy follows the random tie-break convention as its
    expectation (1/#tied), so the spread over seeds comes from the draws alone; an item whose draw has no
    valid sample counts as wrong. Default ks: 1, 2, 4, ... up to the largest stored k, plus k itself.
    """
    items = []
    for row in _rows(table, [S.LABEL, S.RESPONSES, S.SAMPLES, S.ERROR]):
        samples = row.get(S.SAMPLES) or []
        if row.get(S.ERROR) is None and row.get(S.LABEL) is not None and len(row[S.RESPONSES]) > 1 and samples:
            items.append(([{"scores": s["scores"], "meta_score": s["meta_score"]} for s in samples], row[S.LABEL]))
    k_max = max((len(s) for s, _ in items), default=0)
    if ks is None:
        ks = [2**p for p in range(k_max.bit_length())] + ([k_max] if k_max & (k_max - 1) else [])
    ks = sorted(ks)
    if seeds < 1 or any(j < 1 for j in ks):
        raise ValueError(f"need seeds >= 1 and every j >= 1; got seeds={seeds}, ks={ks}")
    methods = {"voting": lambda j: None}
    if any(s["meta_score"] is not None for samples, _ in items for s in samples):
        methods["metarm"] = lambda j: max(1, j // 2)
    acc = {m: np.zeros((seeds, len(ks))) for m in methods}
    for r in range(seeds):
        rng = random.Random(f"{seed}:{r}")
        for c, j in enumerate(ks):
            for samples, label in items:
                drawn = [samples[t] for t in sorted(rng.sample(range(len(samples)), min(j, len(samples))))]
                for m, k_meta in methods.items():
                    acc[m][r, c] += _judge(vote(drawn, k_meta=k_meta(j))["vote_totals"], label)[1]
    n = max(1, len(items))
    return {"items": len(items), "ks": list(ks), "seeds": seeds, "tie_break": "expected",
            "methods": {m: {"mean": (a / n).mean(0).tolist(), "std": (a / n).std(0).tolist()}
                        for m, a in acc.items()}}


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
        f"Rows {r['rows']}: errors {r['errors']} (excluded), unlabelled {r['unlabelled']}, "
        f"labelled without a valid sample {r['unscored']} (counted wrong)",
        _acc_line("Pairwise (n=2)", r["pairwise"]),
        _acc_line("Best-of-N (n>2)", r["best_of_n"]),
        "ROC-AUC (n=1): " + (f"{r['auc']['n']} rows ({r['auc']['positives']} good), AUC {_pct(r['auc']['auc'])}"
                             if r["auc"] else "no rows"),
        f"Invalid samples: {r['invalid']} of {r['samples']} ({_pct(r['invalid_share'])})",
        f"Position bias: over {pb['samples']} valid samples, the response shown first scored strictly highest in "
        f"{_pct(pb['first_wins'])} (no bias: {_pct(pb['no_bias'])}; top tied: {_pct(pb['tied_top'])})",
    ]
    if r["subsets"]:
        lines.append("Subsets (score = random tie-break accuracy, or AUC for single responses):")
        width = max(len(name) for name in r["subsets"])
        lines += [f"  {name:<{width}}  {e['n']:>6}  {_pct(e['score'])}" for name, e in r["subsets"].items()]
    if r["sections"]:
        secs = ", ".join(f"{s} {_pct(v)}" for s, v in r["sections"].items())
        score = _pct(r["reward_bench"]) if r["reward_bench"] is not None else "n/a (needs all four sections)"
        lines.append(f"Reward Bench: {secs}; score {score}")
    c = r["curves"]
    if c["items"]:
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

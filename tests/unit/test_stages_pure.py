"""The Ray-free stages on Arrow tables: Normalize, Vote via `apply`, and GRMSampler / MetaScorer driven by a
small deterministic FAKE engine (pure bookkeeping only: orders, un-shuffling, adaptive stop, repair, long
prompts). No model, no Ray."""
from __future__ import annotations

import asyncio
import collections
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from grm_ray import schema as S
from grm_ray import voting
from grm_ray.config import JobConfig
from grm_ray.parsing import last_box
from grm_ray.prompts import orderings, render_grm_prompt
from grm_ray.stages import GRMSampler, MetaScorer, Normalize, Vote, apply, item_seed

try:  # the engine module imports vLLM; unit tests must not need it
    from grm_ray.engines import Generation  # type: ignore
except Exception:  # noqa: BLE001
    @dataclass
    class Generation:
        text: str
        n_tokens: int
        finish_reason: str = "stop"
        token_ids: tuple = ()

HH_FILE = Path("/work/shared/data/hh_rlhf_harmless_test_first300.jsonl")


def cfg(**kw) -> JobConfig:
    return JobConfig(**kw)


def box(scores) -> str:
    return "\\boxed{" + ", ".join(map(str, scores)) + "}"


# =========================================================================== Normalize


def test_normalize_rows_in_order_with_errors_prefixed_and_input_columns_kept():
    table = pa.table({
        "id": ["a", "b", "c", None],
        "prompt": ["q1", "q2", "q3", "q4"],
        "responses": [["x", "y"], [], ["z"], ["u", "v", "w"]],
        "label": [1, None, None, 2],
        "topic": ["math", "chat", "code", "misc"],
    })
    out = Normalize(cfg())(table, "part/a.parquet", [10, 11, 12, 13], "responses")
    assert out.num_rows == 4
    # input columns kept with their values; ours appended in the NORMALIZED order
    assert out.column("topic").to_pylist() == ["math", "chat", "code", "misc"]
    assert out.column("prompt").to_pylist() == ["q1", "q2", "q3", "q4"]
    assert out.column_names[-len(S.NORMALIZED):] == S.NORMALIZED.names
    assert out.schema.field("messages").type == S.NORMALIZED.field("messages").type
    rows = out.to_pylist()
    assert [r["id"] for r in rows] == ["a", "b", "c", "part/a.parquet#13"]
    assert [r["source"] for r in rows] == [f"part/a.parquet#{i}" for i in (10, 11, 12, 13)]
    assert rows[0]["messages"] == [{"role": "user", "content": "q1"}]
    assert rows[0]["responses"] == ["x", "y"] and rows[0]["label"] == 1 and rows[0]["error"] is None
    assert rows[1]["error"] == "part/a.parquet, row 11: field 'responses' is empty"
    # the format reads these input columns as ours: an error row keeps what its input held there
    assert rows[1]["messages"] is None and rows[1]["responses"] == [] and rows[1]["content_key"] is None
    assert rows[2]["error"] is None and rows[3]["error"] is None and rows[3]["label"] == 2


def test_normalize_duplicate_ids_get_an_error():
    table = pa.table({"id": ["x", "y", "x"], "prompt": ["q"] * 3, "responses": [["a", "b"]] * 3})
    out = Normalize(cfg())(table, "f.parquet", [0, 1, 2], "responses", duplicate_ids=frozenset({"x"})).to_pylist()
    assert out[1]["error"] is None
    for r, row in zip((out[0], out[2]), (0, 2)):
        assert r["error"].startswith(f"f.parquet, row {row}: field 'id'")
        assert "duplicate" in r["error"] and "'x'" in r["error"]
        assert r["responses"] == ["a", "b"] and r["content_key"] is None  # the input kept, marked unread


def test_an_unreadable_row_keeps_its_input_responses_messages_and_label():
    """What the helper of a user pass lost: `responses` ['hi', 'bye'] with label 5 came out null."""
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]  # ends with the assistant
    table = pa.table({"prompt": ["q", "q", "q"], "responses": [["hi", "bye"], ["a", "b"], ["ok", "no"]],
                      "label": [5, 1, 0]})
    table = table.append_column("messages", pa.array([None, msgs, None], S.NORMALIZED.field("messages").type))
    rows = Normalize(cfg())(table, "f.parquet", [0, 1, 2], "responses").to_pylist()
    assert "field 'label' must be an integer in 0..1, got 5" in rows[0]["error"]
    assert (rows[0]["responses"], rows[0]["label"], rows[0]["messages"]) == (["hi", "bye"], 5, None)
    assert "must end with a user turn" in rows[1]["error"]
    assert (rows[1]["responses"], rows[1]["label"], rows[1]["messages"]) == (["a", "b"], 1, msgs)
    assert rows[2]["error"] is None and rows[2]["content_key"] is not None
    assert [r["content_key"] is None for r in rows] == [True, True, False]


def test_normalize_integer_ids_are_strings():
    table = pa.table({"id": [7, 8], "prompt": ["q", "q"], "responses": [["a"], ["b"]]})
    out = Normalize(cfg())(table, "f.parquet", [0, 1], "responses")
    assert out.column("id").to_pylist() == ["7", "8"]
    assert out.schema.field("id").type == pa.string()


def test_normalize_file_error_marks_every_row():
    table = pa.table({"text": ["a", "b", "c"]})
    out = Normalize(cfg())(table, "bad.parquet", [5, 6, 7], None,
                           file_error="file bad.parquet: cannot tell the input format").to_pylist()
    assert [r["error"] for r in out] == [
        f"bad.parquet, row {i}: file bad.parquet: cannot tell the input format" for i in (5, 6, 7)]
    assert all(r["messages"] is None and r["responses"] is None for r in out)
    assert [r["text"] for r in out] == ["a", "b", "c"]


def test_normalize_replaces_input_columns_with_our_names():
    msgs = [[{"role": "user", "content": "hi"}], [{"role": "assistant", "content": "oops"}]]
    table = pa.table({"messages": msgs, "responses": [["a"], ["b"]], "extra": [1, 2]})
    out = Normalize(cfg())(table, "m.parquet", [0, 1], "responses")
    assert out.column_names.count("messages") == 1 and out.column_names.count("responses") == 1
    rows = out.to_pylist()
    assert rows[0]["messages"] == msgs[0] and rows[0]["error"] is None
    assert rows[1]["error"].startswith("m.parquet, row 1: field 'messages'")
    assert [r["extra"] for r in rows] == [1, 2]


def test_normalize_binary_columns_and_invalid_utf8():
    table = pa.table({"prompt": ["q", "q"],
                      "responses": pa.array([[b"ok", "caf\u00e9".encode()], [b"ok", b"\xff\xfe"]],
                                            pa.list_(pa.binary()))})
    rows = Normalize(cfg())(table, "b.parquet", [0, 1], "responses").to_pylist()
    assert rows[0]["responses"] == ["ok", "café"] and rows[0]["error"] is None
    assert rows[1]["error"].startswith("b.parquet, row 1: field 'responses[1]'") and "UTF-8" in rows[1]["error"]


def test_normalize_max_responses_from_config():
    table = pa.table({"prompt": ["q"], "responses": [["a", "b", "c"]]})
    row = Normalize(cfg(max_responses=2))(table, "f", [0], "responses").to_pylist()[0]
    assert "max_responses=2" in row["error"] and row["error"].startswith("f, row 0: field 'responses'")


def test_normalize_real_hh_rlhf_file():
    rows = [json.loads(line) for line in HH_FILE.read_text(encoding="utf-8").splitlines() if line.strip()]
    table = pa.Table.from_pylist(rows)
    fmt = S.detect_format(table.column_names)
    out = Normalize(cfg())(table, "hh.jsonl", list(range(table.num_rows)), fmt)
    assert out.num_rows == 300
    got = out.to_pylist()
    assert all(r["error"] is None for r in got)
    assert [r["source"] for r in got] == [f"hh.jsonl#{i}" for i in range(300)]
    assert out.column("chosen").to_pylist() == [r["chosen"] for r in rows]  # input columns kept
    for raw, r in zip(rows, got):
        assert r["label"] == 0 and len(r["responses"]) == 2
        assert raw["chosen"].endswith(r["responses"][0]) and raw["rejected"].endswith(r["responses"][1])
        assert r["messages"][-1]["role"] == "user"


# =========================================================================== Vote via apply


def smp(order, scores, meta=None, text=None):
    """A stored sample; `scores` in ORIGINAL order or None (invalid)."""
    return {"order": order, "text": text or ("Scores: " + box(scores) if scores else "no box"),
            "scores": scores, "valid": scores is not None, "meta_score": meta, "kept": False,
            "repaired": False, "hinted": False, "n_tokens": 10}


def sampled_table(rows):
    return pa.Table.from_pylist(rows, schema=pa.schema([
        pa.field("id", pa.string()), pa.field("responses", pa.list_(pa.string())),
        pa.field("samples", pa.list_(S.SAMPLE_TYPE)), pa.field("error", pa.string()),
        pa.field("keep_me", pa.string())]))


def test_vote_stage_through_apply():
    table = sampled_table([
        {"id": "ok", "responses": ["a", "b"], "error": None, "keep_me": "1",
         "samples": [smp([0, 1], [8, 3]), smp([1, 0], [6, 5]), smp([0, 1], None)]},
        {"id": "bad", "responses": None, "samples": None, "keep_me": "2",
         "error": "f.parquet, row 1: field 'responses' is empty"},
        {"id": "none-valid", "responses": ["a", "b"], "error": None, "keep_me": "3",
         "samples": [smp([0, 1], None), smp([1, 0], None)]},
    ])
    out = apply(Vote(cfg(k=2)), table)
    assert out.num_rows == 3
    assert out.column("keep_me").to_pylist() == ["1", "2", "3"]
    for f in S.VOTED:
        assert out.schema.field(f.name).type == f.type
    ok, bad, none = out.to_pylist()

    assert ok["rewards"] == [7.0, 4.0] and ok["vote_totals"] == [14.0, 8.0]
    assert ok["best_index"] == 0 and ok["margin"] == 3.0 and ok["tie"] is False
    assert (ok["n_samples"], ok["n_valid"], ok["n_kept"]) == (3, 2, 2)
    assert [s["kept"] for s in ok["samples"]] == [True, True, False]
    assert ok["error"] is None
    assert ok["confidence"] == pytest.approx(voting.confidence([[8, 3], [6, 5]], 0, [[0, 1], [1, 0]])) and 0.5 < ok["confidence"] < 1
    assert none["confidence"] is None

    # a row with an error passes through with null scores and its error
    assert bad["error"] == "f.parquet, row 1: field 'responses' is empty"
    for key in ("rewards", "vote_totals", "best_index", "margin", "tie", "confidence", "samples"):
        assert bad[key] is None
    assert (bad["n_samples"], bad["n_valid"], bad["n_kept"]) == (0, 0, 0)

    # no valid sample: an error that points at the cure
    assert none["rewards"] is None and none["best_index"] is None
    assert "--structured" in none["error"] and "no valid sample" in none["error"]
    assert (none["n_samples"], none["n_valid"], none["n_kept"]) == (2, 0, 0)
    assert [s["kept"] for s in none["samples"]] == [False, False]


def test_vote_stage_meta_guided_sets_kept_flags():
    samples = [smp([0, 1], [2, 9], meta=-3.0), smp([1, 0], [9, 2], meta=1.5), smp([0, 1], [8, 3], meta=0.2),
               smp([1, 0], [3, 8], meta=None), smp([0, 1], None, meta=9.0)]
    table = sampled_table([{"id": "m", "responses": ["a", "b"], "error": None, "keep_me": "", "samples": samples}])
    row = apply(Vote(cfg(k=5, meta_mode="judge", k_meta=2)), table).to_pylist()[0]
    assert [s["kept"] for s in row["samples"]] == [False, True, True, False, False]
    assert row["vote_totals"] == [17.0, 5.0] and row["best_index"] == 0 and row["n_kept"] == 2
    # plain voting keeps every valid sample
    row = apply(Vote(cfg(k=5)), table).to_pylist()[0]
    assert [s["kept"] for s in row["samples"]] == [True, True, True, True, False]
    assert row["vote_totals"] == [22.0, 22.0] and row["tie"] is True


def test_vote_tie_break_is_per_item_not_per_batch():
    tie = {"id": "tied-item", "responses": ["a", "b"], "error": None, "keep_me": "",
           "samples": [smp([0, 1], [7, 4]), smp([1, 0], [4, 7])]}
    others = [{"id": f"o{i}", "responses": ["a", "b"], "error": None, "keep_me": "",
               "samples": [smp([0, 1], [5, 5])]} for i in range(5)]
    picks = set()
    for seed in range(30):
        vote = Vote(cfg(k=2, seed=seed))
        alone = apply(vote, sampled_table([tie])).to_pylist()[0]
        mixed = apply(vote, sampled_table(others[:2] + [tie] + others[2:])).to_pylist()[2]
        assert alone["tie"] is True and alone["best_index"] == mixed["best_index"]
        assert alone["best_index"] == apply(vote, sampled_table([tie])).to_pylist()[0]["best_index"]
        picks.add(alone["best_index"])
    assert picks == {0, 1}  # the job seed really drives the tie-break
    assert item_seed(3, "x") != item_seed(3, "y") and item_seed(3, "x") != item_seed(4, "x")


def test_apply_checks_columns():
    with pytest.raises(KeyError, match="samples"):
        apply(Vote(cfg()), pa.table({"id": ["a"], "responses": [["x"]], "error": pa.array([None], pa.string())}))


# =========================================================================== fake engines

RESP = re.compile(r"\[The Begin of Response (\d+)\]\n(.*?)\n\[The End of Response \1\]", re.S)


def shown_responses(prompt: str) -> list[str]:
    """The responses in the order the rendered prompt shows them."""
    body = prompt.split("#### Responses to be Scored ####", 1)[1].split("#### Output Format Requirements ####")[0]
    return [m.group(2) for m in RESP.finditer(body)]


def good_scorer(response: str, j: int, prompt: str) -> int:
    return 9 if "GOOD" in response else 2


TOKEN = re.compile(r"\S+\s*|\s+")


def tokens(text: str) -> list[str]:
    """The fakes' "token ids": words with their trailing whitespace, so joining them gives the text back."""
    return TOKEN.findall(text)


class FakeGRM:
    """Deterministic stand-in for the vLLM GRM engine (its async seam: encode, asample, arepair).

    Each prompt's j-th sample (counted across calls) scores the shown responses with `scorer`; `cut(prompt, j)`
    makes a sample end at max_tokens without a box. `calls` holds one (prompts, ns, n_responses) per
    asample call (one per item and round), `repairs` one (prefixes, n_responses) per arepair call.
    """

    def __init__(self, scorer=good_scorer, max_prompt_tokens=100_000, cut=None, repair_text=None,
                 cut_text="Specific Criteria: depth.\nAnalysis: Response 1 goes on and on"):
        self.scorer, self.max_prompt_tokens, self.cut = scorer, max_prompt_tokens, cut
        self.repair_text, self.cut_text = repair_text, cut_text
        self.calls: list[tuple[list[str], list[int], list[int]]] = []
        self.repairs: list[tuple[list[str], list[int]]] = []
        self.drawn: collections.Counter = collections.Counter()
        self.prompts: set[str] = set()

    def render(self, text: str) -> str:
        return f"<|user|>\n{text}<|end|>\n<|assistant|>\n"

    def encode(self, texts):
        return [tokens(t) for t in texts]

    def count_tokens(self, texts):
        return [len(ids) for ids in self.encode(texts)]

    def shown(self, prompt: str) -> list[str]:
        return shown_responses(prompt)

    async def asample(self, prompt_ids, ns, n_responses, seeds=None):
        prompts = ["".join(p) for p in prompt_ids]
        self.calls.append((prompts, list(ns), list(n_responses)))
        out = []
        for p, count, n in zip(prompts, ns, n_responses):
            assert p.startswith("<|user|>\n") and p.endswith("<|assistant|>\n")  # rendered once, by render()
            assert self.count_tokens([p])[0] <= self.max_prompt_tokens
            self.prompts.add(p)
            shown = self.shown(p)
            assert len(shown) == n
            gens = []
            for _ in range(count):
                j = self.drawn[p]
                self.drawn[p] += 1
                if self.cut and self.cut(p, j):
                    text = self.cut_text
                    gens.append(Generation(text, 64, "length", tokens(text)))
                    continue
                scores = [self.scorer(r, j, p) for r in shown]
                verdict = "correct" if j % 2 == 0 else "other"
                text = f"Specific Criteria: accuracy (100%).\nAnalysis: {verdict}.\nScores: ok {box(scores)}"
                gens.append(Generation(text, 30, "stop", tokens(text)))
            out.append(gens)
        return out

    async def arepair(self, prefix_ids, n_responses):
        prefixes = ["".join(p) for p in prefix_ids]
        self.repairs.append((list(prefixes), list(n_responses)))
        out = []
        for prefix, n in zip(prefixes, n_responses):
            prompt = next(p for p in self.prompts if prefix.startswith(p))  # prompt + partial text
            shown = self.shown(prompt)
            assert len(shown) == n
            text = self.repair_text or f"\nScores: {box([self.scorer(r, -1, prompt) for r in shown])}"
            out.append(Generation(text, 9, "stop"))
        return out


class FakeMeta:
    """Meta RM stand-in: +1 for a critique that ranks the GOOD response highest, -5 otherwise."""

    def __init__(self):
        self.items = []

    async def ascore(self, items):
        self.items.extend(items)
        out = []
        for messages, shown, text in items:
            assert messages[-1]["role"] == "user"
            scores = [int(x) for x in last_box(text).split(",")]
            best = shown[max(range(len(shown)), key=lambda p: scores[p])]
            out.append(1.0 if "GOOD" in best else -5.0)
        return out


def item(id_, responses, prompt="Which is better?", label=None, error=None):
    return {S.ID: id_, S.MESSAGES: None if error else [{"role": "user", "content": prompt}],
            S.RESPONSES: None if error else list(responses), S.LABEL: label, S.ERROR: error}


# =========================================================================== GRMSampler


def test_sampler_scores_land_on_the_original_responses():
    rows = [item("pair", ["plain answer", "the GOOD answer"]),
            item("list", ["first", "second", "GOOD third", "fourth"]),
            item("one", ["GOOD alone"])]
    engine = FakeGRM()
    out = GRMSampler(cfg(k=8), engine)(rows)
    assert len(engine.calls) == 3  # adaptive off: one engine call per item
    ns, n_resp = (sum((c[i] for c in engine.calls), []) for i in (1, 2))
    # one request per ordering with n = its share of k; orders drawn from each item's seed
    drawn = [orderings(len(r[S.RESPONSES]), 8, seed=item_seed(0, r[S.ID])) for r in rows]
    assert ns == [c for d in drawn for _, c in d]
    assert n_resp == [len(o) for d in drawn for o, _ in d]
    assert [c for _, c in drawn[0]] == [4, 4] and drawn[2] == [([0], 8)]

    expected = {"pair": [2, 9], "list": [2, 2, 9, 2], "one": [9]}
    for row, res in zip(rows, out):
        samples = res[S.SAMPLES]
        assert res[S.ERROR] is None and len(samples) == 8
        n = len(row[S.RESPONSES])
        assert collections.Counter(tuple(s["order"]) for s in samples) == \
            {tuple(o): c for o, c in orderings(n, 8, seed=item_seed(0, row[S.ID]))}
        for s in samples:
            assert s["valid"] is True and s["repaired"] is False and s["hinted"] is False
            assert s["scores"] == expected[row[S.ID]]  # un-shuffled to the original indices
            shown = [row[S.RESPONSES][j] for j in s["order"]]
            assert parse_shown(s["text"]) == [9 if "GOOD" in r else 2 for r in shown]  # text keeps shown order


def parse_shown(text):
    return [int(x) for x in last_box(text).split(",")]


def test_sampler_leaves_error_rows_alone():
    rows = [item("bad", [], error="f, row 0: field 'responses' is empty"), item("ok", ["GOOD", "meh"])]
    engine = FakeGRM()
    out = GRMSampler(cfg(k=2), engine)(rows)
    assert out[0] == {S.SAMPLES: None, S.ERROR: "f, row 0: field 'responses' is empty"}
    assert len(out[1][S.SAMPLES]) == 2
    assert sum(len(p) for p, _, _ in engine.calls) == 2


def test_too_long_prompt_is_a_row_error_and_the_rest_are_scored():
    short = len(FakeGRM().render(render_grm_prompt("Which is better?", ["GOOD a", "b"])).split())
    engine = FakeGRM(max_prompt_tokens=short + 50)
    rows = [item("a", ["GOOD a", "b"]), item("long", ["GOOD", "LONGWORD " * 500]), item("c", ["b", "GOOD a"])]
    out = GRMSampler(cfg(k=4), engine)(rows)
    assert out[1][S.SAMPLES] is None
    assert "tokens" in out[1][S.ERROR] and "max_model_len" in out[1][S.ERROR]
    assert all("LONGWORD" not in p for sent, _, _ in engine.calls for p in sent)  # never sent to the engine
    for i, want in ((0, [9, 2]), (2, [2, 9])):
        assert out[i][S.ERROR] is None and len(out[i][S.SAMPLES]) == 4
        assert all(s["scores"] == want for s in out[i][S.SAMPLES])


def test_too_long_prompt_in_adaptive_mode_is_a_row_error():
    short = len(FakeGRM().render(render_grm_prompt("Which is better?", ["GOOD a", "b"])).split())
    engine = FakeGRM(max_prompt_tokens=short + 50)
    rows = [item("long", ["GOOD", "LONGWORD " * 500]), item("a", ["GOOD a", "b"])]
    out = GRMSampler(cfg(k=8, adaptive="exact"), engine)(rows)
    assert out[0][S.SAMPLES] is None and "tokens" in out[0][S.ERROR]
    assert out[1][S.ERROR] is None and out[1][S.SAMPLES]


def test_cut_sample_is_repaired_and_marked():
    # the first sample of every prompt runs into max_tokens before its box
    engine = FakeGRM(cut=lambda p, j: j == 0)
    rows = [item("r", ["plain", "GOOD one", "other"])]
    out = GRMSampler(cfg(k=6), engine)(rows)[0][S.SAMPLES]
    assert len(engine.repairs) == 1
    prefixes, n_resp = engine.repairs[0]
    assert n_resp == [3, 3, 3]  # one cut sample per ordering
    assert all(pre.endswith("Analysis: Response 1 goes on and on") for pre in prefixes)
    repaired = [s for s in out if s["repaired"]]
    assert len(repaired) == 3
    for s in repaired:
        assert s["text"] == "Specific Criteria: depth.\nAnalysis: Response 1 goes on and on" + \
            f"\nScores: {box([9 if 'GOOD' in ['plain', 'GOOD one', 'other'][j] else 2 for j in s['order']])}"
        assert s["n_tokens"] == 64 + 9
        assert s["valid"] is True and s["scores"] == [2, 9, 2]
    assert all(s["valid"] and s["scores"] == [2, 9, 2] for s in out)


def test_a_cut_sample_is_not_scored_by_a_box_its_critique_quoted():
    """Cut at max_tokens after quoting a response's own box: that box is not the sample's scores."""
    quoted = "Specific Criteria: math.\nAnalysis: Response 2 writes \\boxed{1, 10} as its answer, which"
    engine = FakeGRM(cut=lambda p, j: j == 0, cut_text=quoted)
    out = GRMSampler(cfg(k=2), engine)([item("r", ["GOOD", "bad"])])[0][S.SAMPLES]
    cut = [s for s in out if s["text"].startswith(quoted)]
    assert len(cut) == 2 and all(s["repaired"] and s["valid"] for s in cut)
    assert all(s["scores"] == [9, 2] for s in cut)  # the repair's box, not the quoted [1, 10]
    # a sample cut right after its own box (nothing after it) keeps that box, unrepaired
    own = "Specific Criteria: x.\nAnalysis: y.\nScores: \\boxed{3, 4}"
    engine = FakeGRM(cut=lambda p, j: j == 0, cut_text=own)
    out = GRMSampler(cfg(k=2), engine)([item("r", ["GOOD", "bad"])])[0][S.SAMPLES]
    assert not engine.repairs and sum(s["text"] == own for s in out) == 2


def test_failed_repair_stays_invalid_but_marked():
    engine = FakeGRM(cut=lambda p, j: j == 0, repair_text="\nScores: I cannot decide")
    out = GRMSampler(cfg(k=2), engine)(
        [item("r", ["GOOD", "bad"])])[0][S.SAMPLES]
    bad = [s for s in out if s["repaired"]]
    assert len(bad) == 2  # the first sample of each of the two orders
    assert all(s["valid"] is False and s["scores"] is None for s in bad)
    assert all(s["text"].endswith("I cannot decide") for s in bad)


def test_a_failed_repair_never_falls_back_on_a_box_the_critique_quoted():
    """The repair brought no box (aborted, no room left, a server without structured outputs): the sample
    stays invalid; the cut critique's quoted box (a response's own \\boxed{1, 10}) must not vote."""
    quoted = "Specific Criteria: math.\nAnalysis: Response 2 writes \\boxed{1, 10} as its answer, which"
    for repair in ("", "\nScores: I cannot decide"):
        engine = FakeGRM(cut=lambda p, j: True, cut_text=quoted, repair_text=repair or None)
        if not repair:
            async def no_room(prefix_ids, n_responses):
                return [Generation("", 0, "length") for _ in prefix_ids]
            engine.arepair = no_room
        out = GRMSampler(cfg(k=2), engine)([item("r", ["GOOD", "bad"])])[0][S.SAMPLES]
        assert len(out) == 2 and all(s["repaired"] and not s["valid"] and s["scores"] is None for s in out)


def test_a_sample_the_engine_aborted_never_votes():
    """finish_reason "abort" / "error" (vLLM aborted it): unparsed and not repaired, whatever box it holds."""
    class Aborts(FakeGRM):
        async def asample(self, prompt_ids, ns, n_responses, seeds=None):
            gens = await super().asample(prompt_ids, ns, n_responses, seeds)
            return [[Generation(g.text, g.n_tokens, "abort" if i % 2 else "error", g.token_ids)
                     for i, g in enumerate(gs)] for gs in gens]

    engine, rows = Aborts(), [item("r", ["GOOD", "bad"])]
    [row] = Vote(cfg(k=4))([{**r, **o} for r, o in zip(rows, GRMSampler(cfg(k=4), engine)(rows))])
    assert not engine.repairs and len(row[S.SAMPLES]) == 4
    assert not any(s["valid"] for s in row[S.SAMPLES]) and row[S.ERROR].startswith("no valid sample")


def test_an_item_that_fails_cancels_its_batch_siblings_in_the_engine():
    """One item raises: the batch fails at once, and the other items' requests are cancelled (vLLM aborts
    them), so a failed batch leaves nothing generating beside the batches that take its slot."""
    class Fails(FakeGRM):
        def __init__(self):
            super().__init__()
            self.live = 0

        async def asample(self, prompt_ids, ns, n_responses, seeds=None):
            if any("BOOM" in "".join(p) for p in prompt_ids):
                await asyncio.sleep(0.01)
                raise ValueError("engine refused the request")
            self.live += 1
            try:
                await asyncio.sleep(5)
                return await super().asample(prompt_ids, ns, n_responses, seeds)
            finally:
                self.live -= 1

    engine = Fails()

    async def run():
        with pytest.raises(ValueError, match="engine refused"):
            await GRMSampler(cfg(k=2), engine).acall([item("a", ["x", "y"]), item("b", ["BOOM", "y"]),
                                                       item("c", ["x", "z"])])
        return engine.live

    assert asyncio.run(asyncio.wait_for(run(), 3)) == 0


def test_unparseable_sample_that_stopped_normally_is_not_repaired():
    class NoBox(FakeGRM):
        async def asample(self, prompt_ids, ns, n_responses, seeds=None):
            self.calls.append((["".join(p) for p in prompt_ids], list(ns), list(n_responses)))
            return [[Generation("Analysis: no scores given.", 12, "stop") for _ in range(c)] for c in ns]

    engine = NoBox()
    out = GRMSampler(cfg(k=3), engine)([item("r", ["a", "b"])])[0][S.SAMPLES]
    assert engine.repairs == []
    assert len(out) == 3 and all(not s["valid"] and not s["repaired"] and s["scores"] is None for s in out)


def test_adaptive_exact_stops_early_on_a_clear_winner():
    rows = [item("pair", ["bad", "GOOD"]), item("list", ["GOOD", "meh", "worse"])]
    off = GRMSampler(cfg(k=8), FakeGRM())(rows)
    engine = FakeGRM()
    exact = GRMSampler(cfg(k=8, adaptive="exact"), engine)(rows)
    # pairs: after 6 samples the lead is 42 > 9 x 2 remaining; lists: after 6, 42 > 9 x 2
    assert len(exact[0][S.SAMPLES]) == 6 and len(exact[1][S.SAMPLES]) == 6
    assert len(off[0][S.SAMPLES]) == 8
    assert len(engine.calls) == 2  # one first round of 6 per item: with 4 drawn no lead (at most 36) beats 9 x 4
    vote = Vote(cfg(k=8))
    for i, r in enumerate(rows):
        a = vote([{**r, **off[i]}])[0]
        b = vote([{**r, **exact[i]}])[0]
        assert a["best_index"] == b["best_index"] and b["tie"] is False
        assert b["n_samples"] == 6


def test_adaptive_rounds_continue_the_balanced_cycle():
    # every response scores 5: never decided, so all k samples are drawn: a first round of 6 (the
    # fewest whole rounds after which exact could stop), then rounds of n
    engine = FakeGRM(scorer=lambda r, j, p: 5)
    out = GRMSampler(cfg(k=7, adaptive="exact"), engine)([item("r", ["a", "b", "c"])])[0][S.SAMPLES]
    assert len(out) == 7
    assert [sum(ns) for _, ns, _ in engine.calls] == [6, 1]
    assert collections.Counter(tuple(s["order"]) for s in out) == \
        {tuple(o): c for o, c in orderings(3, 7, seed=item_seed(0, "r"))}


def test_adaptive_exact_rounds_are_the_fewest_that_could_stop_and_stop_where_rounds_of_n_would():
    """A lead of 1 per sample at k=32: rounds of 2 would stop after 30 samples (30 > 9 x 2), in 7 rounds; the
    rounds are sized to the next point where the lead could pass 9 x remaining, so the same stop takes 4."""
    engine = FakeGRM(scorer=lambda r, j, p: 6 if r == "a" else 5)
    out = GRMSampler(cfg(k=32, adaptive="exact"), engine)([item("r", ["a", "b"])])[0][S.SAMPLES]
    stepwise = next(t for t in range(18, 33, 2) if t > 9 * (32 - t))  # lead t after t samples
    assert len(out) == stepwise == 30
    assert [sum(ns) for _, ns, _ in engine.calls] == [18, 8, 2, 2]
    assert all(s["scores"] == [6, 5] for s in out)


def test_orders_repeat_on_rerun_and_adaptive_rounds_draw_the_full_runs_orders():
    """Sample t of an item has the order prompts.sample_order(n, item seed, t), whatever the batching, the
    rerun or the adaptive rounds; with k=1 the input order is not always the one shown."""
    from grm_ray.prompts import sample_order

    rows = [item("x", ["a", "b", "c"]), item("y", ["a", "b"])]
    full = [[s["order"] for s in r[S.SAMPLES]] for r in GRMSampler(cfg(k=9), FakeGRM())(rows)]
    again = [[s["order"] for s in r[S.SAMPLES]] for r in GRMSampler(cfg(k=9), FakeGRM())(rows[::-1])][::-1]
    assert full == again
    ada = GRMSampler(cfg(k=9, adaptive="confident"), FakeGRM(scorer=lambda r, j, p: 5))(rows)
    for r, res in zip(rows, ada):
        want = [sample_order(len(r[S.RESPONSES]), item_seed(0, r[S.ID]), t) for t in range(9)]
        assert sorted(tuple(s["order"]) for s in res[S.SAMPLES]) == sorted(want)
    firsts = {tuple(GRMSampler(cfg(k=1), FakeGRM())([item(f"i{j}", ["a", "b"])])[0][S.SAMPLES][0]["order"])
              for j in range(12)}
    assert firsts == {(0, 1), (1, 0)}


@pytest.mark.parametrize("k", [2, 3, 8, 9, 32])
@pytest.mark.parametrize("n", [2, 3, 4])
def test_adaptive_first_round_is_the_earliest_possible_stop(k, n):
    # exact can stop after m samples only if 9 x m > 9 x (k - m): the first round is the fewest whole
    # rounds of n (or k) above k/2, and never a round more
    engine = FakeGRM()
    out = GRMSampler(cfg(k=k, adaptive="exact"), engine)([item("r", ["GOOD"] + ["bad"] * (n - 1))])[0][S.SAMPLES]
    size = min(k, n)
    earliest = next((m for m in range(size, k, size) if m > k / 2), k)
    assert sum(engine.calls[0][1]) == earliest
    assert len(out) <= k


def test_adaptive_confident_stops_no_later_than_exact():
    rows = [item("pair", ["bad", "GOOD"])]
    conf = GRMSampler(cfg(k=32, adaptive="confident", risk=0.05), FakeGRM())(rows)[0][S.SAMPLES]
    exact = GRMSampler(cfg(k=32, adaptive="exact"), FakeGRM())(rows)[0][S.SAMPLES]
    assert len(conf) <= len(exact) < 32
    assert all(s["scores"] == [2, 9] for s in conf)


def noisy_scorer(seed):
    def score(response: str, j: int, prompt: str) -> int:
        quality = int(re.search(r"Q(\d+)", response).group(1))
        rng = random.Random(f"{seed}|{prompt}|{j}|{response}")
        return max(1, min(10, quality + rng.randint(-4, 4)))
    return score


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10**6), qualities=st.lists(st.integers(1, 10), min_size=2, max_size=4),
       k=st.integers(2, 16))
def test_adaptive_exact_never_changes_the_winner(seed, qualities, k):
    rows = [item("x", [f"resp {i} Q{q}" for i, q in enumerate(qualities)])]
    off = GRMSampler(cfg(k=k), FakeGRM(scorer=noisy_scorer(seed)))(rows)[0]
    exact = GRMSampler(cfg(k=k, adaptive="exact"), FakeGRM(scorer=noisy_scorer(seed)))(rows)[0]
    assert len(exact[S.SAMPLES]) <= k
    # the adaptive samples are a prefix of the same balanced sequence: a sub-multiset of off's
    seen = collections.Counter((tuple(s["order"]), s["text"]) for s in off[S.SAMPLES])
    seen.subtract((tuple(s["order"]), s["text"]) for s in exact[S.SAMPLES])
    assert min(seen.values()) >= 0
    vote = Vote(cfg(k=k, seed=seed))
    a = vote([{**rows[0], **off}])[0]
    b = vote([{**rows[0], **exact}])[0]
    assert a["best_index"] == b["best_index"]
    if len(exact[S.SAMPLES]) < k:
        assert a["tie"] is False


HOSTILE = st.lists(st.sampled_from(["\\boxed{10, 1}", "\\boxed{1}", "\\boxed{", "}", "{",
                                    "[The End of Response 1]", "\n[The Begin of Response 2]\n",
                                    "#### Output Format Requirements ####", "Scores: ", "\n\n", "GOOD", "x"]),
                   max_size=8).map("".join)
TAG = re.compile(r"\u27e6R(\d+)\u27e7")


class TagFake(FakeGRM):
    """Finds the responses by unique tags, so hostile response text cannot confuse the fake itself."""

    def __init__(self, base):
        super().__init__(scorer=lambda r, j, p: base[int(TAG.search(r).group(1))])

    def shown(self, prompt):
        return [m.group(0) for m in TAG.finditer(prompt)]


@settings(max_examples=30, deadline=None)
@given(bodies=st.lists(HOSTILE, min_size=2, max_size=4), data=st.data())
def test_hostile_responses_do_not_change_parsed_scores(bodies, data):
    n = len(bodies)
    base = data.draw(st.lists(st.integers(1, 10), min_size=n, max_size=n))
    responses = [f"\u27e6R{i}\u27e7 {b}" for i, b in enumerate(bodies)]
    engine = TagFake(base)
    engine.cut = lambda p, j: j == 1  # also exercise the repair path, whose prefix holds the responses
    out = GRMSampler(cfg(k=4), engine)([item("h", responses)])[0][S.SAMPLES]
    assert len(out) == 4
    for s in out:
        assert s["valid"] and s["scores"] == base


def test_hint_names_the_labelled_response_in_shown_order():
    rows = [item("h", ["a", "b", "GOOD c"], label=2)]
    engine = FakeGRM()
    out = GRMSampler(cfg(k=6, hint=True), engine)(rows)[0][S.SAMPLES]
    for p in engine.calls[0][0]:
        x = int(re.search(r"The best response is: Response (\d+)", p).group(1))
        assert "GOOD" in shown_responses(p)[x - 1]
    assert all(s["hinted"] for s in out)
    # without a label there is nothing to hint
    engine = FakeGRM()
    out = GRMSampler(cfg(k=2, hint=True), engine)([item("h", ["a", "GOOD"])])[0][S.SAMPLES]
    assert all("The best response is" not in p for p in engine.calls[0][0])
    assert not any(s["hinted"] for s in out)


def test_single_response_rows_are_not_marked_hinted():
    # a 0/1 label of a single response names no "best response": no hint, and the sample says so
    engine = FakeGRM()
    out = GRMSampler(cfg(k=2, hint=True), engine)([item("one", ["GOOD"], label=1)])[0][S.SAMPLES]
    assert all("The best response is" not in p for p in engine.calls[0][0])
    assert not any(s["hinted"] for s in out)


# =========================================================================== MetaScorer + the whole pure chain


def test_meta_scorer_rates_valid_samples_with_the_shown_order():
    # even samples rank GOOD highest ("correct"), odd ones invert the scores
    def scorer(r, j, p):
        good = "GOOD" in r
        return (9 if good else 2) if j % 2 == 0 else (2 if good else 9)

    rows = [item("m", ["GOOD x", "y"]), item("e", [], error="f, row 1: bad"), item("z", ["GOOD", "q", "w"]),
            item("v", ["GOOD x", "y"])]
    sampled = GRMSampler(cfg(k=8), FakeGRM(scorer=scorer))(rows)
    first = sampled[0][S.SAMPLES][0]
    first["scores"], first["valid"] = None, False  # one invalid sample: never rated
    meta = FakeMeta()
    rated = MetaScorer(cfg(meta_mode="judge"), meta)([{**r, **s} for r, s in zip(rows, sampled)])
    assert rated[1] == {S.SAMPLES: None}
    assert len(meta.items) == 7 + 8 + 8
    for res in rated:
        for s in res[S.SAMPLES] or []:
            if not s["valid"]:
                assert s["meta_score"] is None
                continue
            assert s["meta_score"] == (1.0 if "correct" in s["text"] else -5.0)
    # the meta RM sees the responses in the order the GRM showed them, and the conversation
    valid = [s for s in rated[0][S.SAMPLES] if s["valid"]]
    assert [it[1] for it in meta.items[:7]] == [[rows[0][S.RESPONSES][j] for j in s["order"]] for s in valid]
    assert [it[2] for it in meta.items[:7]] == [s["text"] for s in valid]
    assert all(it[0] == rows[0][S.MESSAGES] for it in meta.items[:7])

    # meta-guided voting keeps the correct critiques; plain voting over the same samples ties
    guided = Vote(cfg(k=8, meta_mode="judge", k_meta=4))([{**rows[3], **rated[3]}])[0]
    assert guided["best_index"] == 0 and guided["rewards"] == [9.0, 2.0] and guided["n_kept"] == 4
    assert [s["kept"] for s in guided[S.SAMPLES]] == ["correct" in s["text"] for s in guided[S.SAMPLES]]
    plain = Vote(cfg(k=8))([{**rows[3], **rated[3]}])[0]
    assert plain["n_kept"] == 8 and plain["rewards"] == [5.5, 5.5] and plain["tie"] is True


def test_pure_chain_on_tables_keeps_every_row():
    table = pa.table({
        "prompt": ["Pick one.", "Pick one.", None, "Rate this."],
        "responses": [["meh", "GOOD"], ["GOOD", "meh", "bad"], ["a", "b"], ["GOOD only"]],
        "note": ["n0", "n1", "n2", "n3"],
    })
    c = cfg(k=4, meta_mode="judge", k_meta=2)
    t = Normalize(c)(table, "in.parquet", [0, 1, 2, 3], "responses")
    t = apply(GRMSampler(c, FakeGRM()), t)
    t = apply(MetaScorer(c, FakeMeta()), t)
    t = apply(Vote(c), t)
    assert t.num_rows == 4
    assert t.column("note").to_pylist() == ["n0", "n1", "n2", "n3"]
    rows = t.to_pylist()
    assert [r["best_index"] for r in rows] == [1, 0, None, 0]
    assert rows[2]["error"] == "in.parquet, row 2: field 'prompt' is null" and rows[2]["rewards"] is None
    assert rows[0]["rewards"] == [2.0, 9.0] and rows[0]["n_kept"] == 2 and rows[0]["n_samples"] == 4
    assert rows[3]["margin"] is None and rows[3]["rewards"] == [9.0]
    for r in (rows[0], rows[1], rows[3]):
        assert sum(s["kept"] for s in r["samples"]) == 2
        assert all(s["meta_score"] == 1.0 for s in r["samples"])


# =========================================================================== no batch drains

class SlowFake(FakeGRM):
    """FakeGRM whose requests take time, like a real engine: a prompt containing SLOW takes 0.5 s, others
    0.01 s. `log` records (event, item response text) in the order the engine sees them."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.log: list[tuple[str, str]] = []

    async def asample(self, prompt_ids, ns, n_responses, seeds=None):
        who = "slow" if any("SLOW" in "".join(p) for p in prompt_ids) else "fast"
        self.log.append(("sample", who))
        await asyncio.sleep(0.5 if who == "slow" else 0.01)
        return await super().asample(prompt_ids, ns, n_responses, seeds)

    async def arepair(self, prefix_ids, n_responses):
        self.log.append(("repair", "slow" if any("SLOW" in "".join(p) for p in prefix_ids) else "fast"))
        return await super().arepair(prefix_ids, n_responses)


def test_an_items_repair_and_next_round_do_not_wait_for_the_batch():
    # never decided (all 5s), so adaptive exact draws every round; the fast item's first samples are cut
    engine = SlowFake(scorer=lambda r, j, p: 5, cut=lambda p, j: j == 0 and "SLOW" not in p)
    rows = [item("slow", ["SLOW a", "b"]), item("fast", ["a", "b"])]
    out = GRMSampler(cfg(k=8, adaptive="exact"), engine)(rows)
    first_slow_done = engine.log.index(("sample", "slow")) + 1
    fast = [e for e in engine.log[:first_slow_done + 3] if e[1] == "fast"]
    # while the slow item's first round is still out, the fast one has been repaired and drawn its next round
    assert fast[:3] == [("sample", "fast"), ("repair", "fast"), ("sample", "fast")]
    assert engine.log.index(("repair", "fast")) < engine.log.index(("sample", "slow"), first_slow_done)
    assert [len(r[S.SAMPLES]) for r in out] == [8, 8]  # one output per input, in order
    assert out[0][S.SAMPLES][0]["order"] is not None and not any(s["repaired"] for s in out[0][S.SAMPLES])
    assert any(s["repaired"] for s in out[1][S.SAMPLES])


def test_batches_in_flight_at_once_give_what_one_at_a_time_gives():
    from grm_ray.stages import aapply

    batches = [Normalize(cfg(k=4))(pa.table({"prompt": [f"Q{b}{i}?" for i in range(3)],
                                            "responses": [["GOOD", "meh"], ["x", "GOOD y", "z"], ["only"]]}),
                                  f"b{b}.parquet", [0, 1, 2], "responses") for b in range(3)]
    one_by_one = [apply(GRMSampler(cfg(k=4), SlowFake()), t) for t in batches]

    async def together():
        stage = GRMSampler(cfg(k=4), SlowFake())
        return await asyncio.gather(*(aapply(stage, t) for t in batches))

    assert [t.to_pylist() for t in asyncio.run(together())] == [t.to_pylist() for t in one_by_one]


def test_the_judge_read_from_top_logprobs_ranks_a_sure_yes_high():
    """On a server without logprob_token_ids the judge reads the top 20: a missing word is bounded, not NaN."""
    import math

    from grm_ray.engines import yes_minus_no

    shown = [-0.01, -5.0, -9.0]
    assert yes_minus_no(-0.01, None, shown) == pytest.approx(8.99)    # sure yes: "no" below the top 20
    assert yes_minus_no(None, -0.01, shown) == pytest.approx(-8.99)   # sure no
    assert yes_minus_no(-0.7, -0.7, shown) == 0.0
    assert math.isnan(yes_minus_no(None, None, shown))

"""export.py: DPO / best-of-N / RFT / meta-RM rows and skips on small scored tables built by hand."""
from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from grm_ray import schema as S
from grm_ray.export import export_best_of_n, export_dpo, export_meta, export_rft, rule_reward
from grm_ray.prompts import format_conversation, meta_messages, render_grm_prompt
from grm_ray.voting import vote


def smp(scores, order=None, hinted=False, text=None):
    """One sample; `scores` in ORIGINAL order (None = invalid), `order` = original indices as shown."""
    return {"scores": scores, "order": order, "hinted": hinted, "text": text}


def scored(items):
    """A scored table with the Arrow types of schema.py; rewards etc. come from voting.vote.

    An item: {"n": responses, "label": int|None, "samples": [smp...], "error": str|None, "messages": [...]}.
    """
    rows = []
    for i, it in enumerate(items):
        n = it.get("n", 2)
        samples = [{"order": s["order"] or list(range(n)), "text": s["text"] or f"critique {i}.{t}",
                    "scores": s["scores"], "valid": s["scores"] is not None, "meta_score": None,
                    "kept": s["scores"] is not None, "repaired": False, "hinted": s["hinted"], "n_tokens": 12}
                   for t, s in enumerate(it.get("samples", []))]
        error = it.get("error")
        result = vote(samples, seed=i) if samples and not error else {}
        rows.append({S.ID: f"r{i}", S.SOURCE: f"t.parquet#{i}",
                     S.MESSAGES: it.get("messages", [{"role": "user", "content": f"q{i}"}]),
                     S.RESPONSES: [f"resp{i}-{j}" for j in range(n)], S.LABEL: it.get("label"),
                     **{k: result.get(k) for k in (S.REWARDS, S.VOTE_TOTALS, S.BEST_INDEX, S.MARGIN, S.TIE)},
                     S.N_SAMPLES: len(samples), S.N_VALID: result.get("n_valid", 0),
                     S.N_KEPT: result.get("n_kept", 0), S.SAMPLES: samples or None, S.ERROR: error})
    return pa.Table.from_pylist(rows, schema=pa.schema(S.OUTPUT_FIELDS))


CHAT = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"}, {"role": "user", "content": "and now?"}]


def pair_items():
    return [
        {"n": 3, "label": 0, "samples": [smp([9, 2, 5]), smp([9, 4, 5])]},  # r0: rewards 9, 3, 5
        {"n": 2, "label": 0, "samples": [smp([5, 5])]},                     # r1: tie -> skipped
        {"n": 2, "label": 0, "error": "boom"},                              # r2: error -> skipped
        {"n": 1, "label": 1, "samples": [smp([8])]},                        # r3: single -> skipped
        {"n": 2, "label": 1, "samples": [smp([5, 6])]},                     # r4: margin 1
        {"n": 3, "label": 0, "samples": [smp([9, 3, 3])], "messages": CHAT},  # r5: worst tied -> index 1
        {"n": 2, "label": 0, "samples": [smp(None)], "error": "no valid sample"},  # r6
    ]


def test_dpo_rows_and_skips():
    t = export_dpo(scored(pair_items()))
    assert t.column_names == ["prompt", "chosen", "rejected", "chosen_reward", "rejected_reward", "margin", "id"]
    rows = {r["id"]: r for r in t.to_pylist()}
    assert sorted(rows) == ["r0", "r4", "r5"]
    assert rows["r0"] == {"prompt": "q0", "chosen": "resp0-0", "rejected": "resp0-1", "chosen_reward": 9.0,
                          "rejected_reward": 3.0, "margin": 6.0, "id": "r0"}
    assert (rows["r4"]["chosen"], rows["r4"]["rejected"], rows["r4"]["margin"]) == ("resp4-1", "resp4-0", 1.0)
    assert rows["r5"]["rejected"] == "resp5-1"  # rewards 9, 3, 3: the earliest lowest
    assert rows["r5"]["prompt"] == format_conversation(CHAT)


def test_dpo_and_best_of_n_skip_rows_scored_with_the_label_as_a_hint():
    """--hint shows the GRM the labelled best: its vote repeats the input label, not a judgement."""
    from collections import Counter

    table = scored([{"n": 2, "label": 1, "samples": [smp([2, 9], hinted=True)]},
                    {"n": 2, "label": 1, "samples": [smp([2, 9])]}])
    for mode in ("pairs", "best-of-n"):
        skipped = Counter()
        out = export_dpo(table, skipped=skipped) if mode == "pairs" else export_best_of_n(table, skipped=skipped)
        assert out.column("id").to_pylist() == ["r1"]
        assert skipped == {"hinted rows (--hint showed the GRM the label)": 1}


def test_dpo_skips_a_pair_of_two_identical_texts():
    from collections import Counter

    table = scored([{"n": 2, "label": 0, "samples": [smp([9, 2])]}])
    same = table.set_column(table.schema.get_field_index(S.RESPONSES), S.RESPONSES,
                            pa.array([["same answer", "same answer"]], table.schema.field(S.RESPONSES).type))
    skipped = Counter()
    assert export_dpo(same, skipped=skipped).num_rows == 0 and export_dpo(table).num_rows == 1
    assert skipped == {"pairs whose two responses are the same text": 1}


def test_dpo_min_margin_compares_chosen_minus_rejected():
    # r0: best minus runner-up is 9 - 5 = 4, chosen minus rejected is 6
    assert export_dpo(scored(pair_items()), min_margin=5)["id"].to_pylist() == ["r0", "r5"]
    assert export_dpo(scored(pair_items()), min_margin=6.5).num_rows == 0


def test_dpo_conversational():
    t = export_dpo(scored(pair_items()), fmt="conversational")
    assert t.schema.field("prompt").type == pa.list_(S.MESSAGE_TYPE)
    row = {r["id"]: r for r in t.to_pylist()}["r5"]
    assert row["prompt"] == CHAT
    assert row["chosen"] == [{"role": "assistant", "content": "resp5-0"}]
    assert row["rejected"] == [{"role": "assistant", "content": "resp5-1"}]
    with pytest.raises(ValueError, match="format"):
        export_dpo(scored(pair_items()), fmt="chatml")


def test_empty_export_keeps_its_columns():
    t = export_dpo(scored([{"n": 2, "label": 0, "error": "boom"}]))
    assert t.num_rows == 0 and "chosen_reward" in t.column_names


def test_best_of_n():
    t = export_best_of_n(scored(pair_items()))
    rows = {r["id"]: r for r in t.to_pylist()}
    assert sorted(rows) == ["r0", "r4", "r5"]
    assert rows["r0"] == {"prompt": "q0", "completion": "resp0-0", "reward": 9.0, "margin": 4.0, "id": "r0"}
    assert export_best_of_n(scored(pair_items()), min_margin=2)["id"].to_pylist() == ["r0", "r5"]
    conv = export_best_of_n(scored(pair_items()), fmt="conversational").to_pylist()[0]
    assert conv["completion"] == [{"role": "assistant", "content": "resp0-0"}]


# TRL's columns per command: DPOTrainer (prompt, chosen, rejected), SFTTrainer prompt-completion,
# and a sequence-classification trainer's (text, label) for the meta RM.
EXPORTS = {
    "dpo": (["export-dpo"], {"prompt", "chosen", "rejected"}),
    "dpo-conversational": (["export-dpo", "--format", "conversational"], {"prompt", "chosen", "rejected"}),
    "best-of-n": (["export-dpo", "--mode", "best-of-n"], {"prompt", "completion"}),
    "rft": (["export-rft"], {"prompt", "completion"}),
    "rft-conversational": (["export-rft", "--format", "conversational"], {"prompt", "completion"}),
    "meta": (["export-meta"], {"messages", "text", "label"}),
}
# Scored tables each export takes nothing from, and a reason it must give: errors, ties, single responses
# (pairs); too easy (rft); unlabelled (rft, meta).
_ERR, _TIE, _ONE = ({"n": 2, "label": 0, "error": "boom"}, {"n": 2, "label": 0, "samples": [smp([5, 5])]},
                    {"n": 1, "label": 1, "samples": [smp([3])]})
_EASY, _UNLABELLED = {"n": 2, "label": 0, "samples": [smp([8, 3])]}, {"n": 2, "label": None, "samples": [smp([8, 3])]}
NOTHING = {"dpo": ([_ERR, _TIE, _ONE], "1 ties for the top"), "best-of-n": ([_ERR, _TIE, _ONE], "1 single-response rows"),
           "rft": ([_ERR, _EASY, _UNLABELLED], "1 too easy"), "meta": ([_ERR, _UNLABELLED], "1 unlabelled rows")}

def _cli_export(tmp_path, mode, items):
    from typer.testing import CliRunner

    from grm_ray.cli import app

    pq.write_table(scored(items), tmp_path / "scored.parquet")
    args, trl = EXPORTS[mode]
    res = CliRunner().invoke(app, [*args, str(tmp_path / "scored.parquet"), str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    return res, tmp_path / "out" / "data.parquet", trl


@pytest.mark.parametrize("mode", sorted(EXPORTS))
def test_exports_load_with_datasets(tmp_path, mode):
    datasets = pytest.importorskip("datasets")
    res, path, trl = _cli_export(tmp_path, mode, pair_items() + rft_items())
    ds = datasets.load_dataset("parquet", data_files=str(path), split="train", cache_dir=str(tmp_path / "cache"))
    t = pq.read_table(path)
    assert trl <= set(ds.column_names) and ds.column_names == t.column_names and len(ds) == t.num_rows > 0
    assert ds[0] == t.to_pylist()[0]
    assert f"wrote {t.num_rows} rows" in res.stdout
    assert "skipped: " in res.stderr  # e.g. "skipped: 2 row errors, 1 ties for the top, ..."


@pytest.mark.parametrize("mode", sorted(EXPORTS))
def test_empty_exports_have_the_columns_say_why_and_load(tmp_path, mode):
    datasets = pytest.importorskip("datasets")
    items, reason = NOTHING[mode.split("-conv")[0]]
    res, path, trl = _cli_export(tmp_path, mode, items)
    assert "wrote 0 rows" in res.stdout
    assert "export is empty" in res.stderr and f"of {len(items)} scored rows" in res.stderr
    assert reason in res.stderr and "1 row errors" in res.stderr
    assert trl <= set(pq.read_schema(path).names)
    # the regression: an empty row group made datasets fail with "ArrowInvalid: BatchSize must be greater than 0"
    stream = datasets.load_dataset("parquet", data_files=str(path), split="train", streaming=True)
    assert trl <= set(stream.features) and list(stream) == []
    try:
        ds = datasets.load_dataset("parquet", data_files=str(path), split="train", cache_dir=str(tmp_path / "c"))
        assert len(ds) == 0 and trl <= set(ds.column_names)
    except ValueError as e:  # datasets <= 5.2 refuses every empty split, whatever the file (datasets PR #8401)
        assert "corresponds to no data" in str(e)


def test_rule_reward():
    assert rule_reward([8, 3], 0) == 1
    assert rule_reward([3, 8], 0) == -1
    assert rule_reward([5, 5], 0) == -1              # tie
    assert rule_reward([9, 9, 2], 0) == -1           # tie at the top
    assert rule_reward([1, 2, 10], 2) == 1
    assert rule_reward(None, 0) == -1 and rule_reward([], 1) == -1
    assert rule_reward([6], 1) == 1 and rule_reward([5], 1) == -1       # threshold 6
    assert rule_reward([5], 0) == 1 and rule_reward([6], 0) == -1
    assert rule_reward([8], 1, threshold=9) == -1
    with pytest.raises(ValueError):
        rule_reward([8, 3], None)


def rft_items():
    return [
        {"n": 2, "label": 0, "samples": [                       # r0
            smp([8, 3], text="right"),                          # kept
            smp([3, 8], text="wrong"),
            smp(None, text="unparsed"),
            smp([2, 9], order=[1, 0], hinted=True, text="hinted wrong"),
            smp([9, 2], order=[1, 0], hinted=True, text="hinted right"),  # kept, hint = position 2
        ]},
        {"n": 2, "label": 1, "samples": [smp([3, 8]), smp([2, 7], order=[1, 0]), smp(None)]},  # r1: one unparsed
        {"n": 2, "label": None, "samples": [smp([8, 3]), smp([3, 8])]},                       # r2: no label
        {"n": 1, "label": 1, "samples": [smp([7], text="good"), smp([4], text="bad")]},       # r3
        {"n": 1, "label": 0, "samples": [smp([6], text="too kind"), smp([2], text="fair")]},  # r4
        {"n": 2, "label": 1, "samples": [smp([3, 8], hinted=True, text="h1"),                 # r5: only hinted,
                                         smp([1, 9], order=[1, 0], hinted=True, text="h2")]},  # all right: kept
        {"n": 2, "label": 0, "error": "boom"},                                                # r6
        {"n": 2, "label": 1, "samples": [smp([3, 8]), smp([2, 7], order=[1, 0])]},             # r7: too easy
    ]


def test_rft_keep_and_drop():
    t = export_rft(scored(rft_items()))
    assert t.column_names == ["prompt", "completion", "id", "sample"]
    got = [(r["id"], r["sample"], r["completion"]) for r in t.to_pylist()]
    # r1 is not too easy: an unparseable sample is not a correct one (GRM_SPEC 8); r7 is
    assert got == [("r0", 0, "right"), ("r0", 4, "hinted right"), ("r1", 0, "critique 1.0"),
                   ("r1", 1, "critique 1.1"), ("r3", 0, "good"), ("r4", 1, "fair"), ("r5", 0, "h1"), ("r5", 1, "h2")]
    prompts = t["prompt"].to_pylist()
    assert prompts[0] == render_grm_prompt([{"role": "user", "content": "q0"}], ["resp0-0", "resp0-1"])
    # shown order [1, 0]: the labelled best (response 0) sits at position 2
    assert prompts[1] == render_grm_prompt([{"role": "user", "content": "q0"}], ["resp0-1", "resp0-0"], hint=1)
    assert prompts[1].endswith("The best response is: Response 2")
    assert prompts[7].endswith("The best response is: Response 1")  # r5 label 1 shown first
    assert "The best response is" not in prompts[2] + prompts[4]


def test_rft_threshold_and_conversational():
    t = export_rft(scored(rft_items()), threshold=8, fmt="conversational")
    rows = t.to_pylist()
    # threshold 8: r3's 7 and 4 are both wrong for "good"; r4's 6 and 2 are both right for "bad": too easy
    assert [r["id"] for r in rows] == ["r0", "r0", "r1", "r1", "r5", "r5"]
    assert rows[0]["prompt"] == [{"role": "user", "content": export_rft(scored(rft_items()))["prompt"][0].as_py()}]
    assert rows[0]["completion"] == [{"role": "assistant", "content": "right"}]


def test_meta_labels_and_rendering():
    t = export_meta(scored(rft_items()))
    assert t.column_names == ["messages", "text", "label", "id", "sample"]
    got = [(r["id"], r["sample"], r["label"]) for r in t.to_pylist()]
    assert got == [("r0", 0, 1), ("r0", 1, 0), ("r0", 3, 0), ("r0", 4, 1), ("r1", 0, 1), ("r1", 1, 1),
                   ("r3", 0, 1), ("r3", 1, 0), ("r4", 0, 0), ("r4", 1, 1), ("r5", 0, 1), ("r5", 1, 1),
                   ("r7", 0, 1), ("r7", 1, 1)]
    row = t.to_pylist()[3]
    chat = meta_messages([{"role": "user", "content": "q0"}], ["resp0-1", "resp0-0"], "hinted right")
    assert row["messages"] == chat
    assert row["text"] == chat[0]["content"] + "\n\n" + "hinted right"


def test_meta_uses_the_tokenizer_chat_template():
    class Tok:
        chat_template = "x"

        def apply_chat_template(self, messages, tokenize, add_generation_prompt):
            assert not tokenize and not add_generation_prompt
            return "|".join(f"<{m['role']}>{m['content']}" for m in messages)

    row = export_meta(scored(rft_items()[3:4]), tokenizer=Tok()).to_pylist()[0]
    assert row["text"].startswith("<user>Please score the responses.") and row["text"].endswith("|<assistant>good")


def test_export_meta_names_a_tokenizer_it_cannot_load(tmp_path):
    from typer.testing import CliRunner

    from grm_ray.cli import app

    pq.write_table(scored(pair_items()), tmp_path / "scored.parquet")
    res = CliRunner().invoke(app, ["export-meta", str(tmp_path / "scored.parquet"), str(tmp_path / "out"),
                                   "--tokenizer", str(tmp_path / "no-such-model")])
    assert res.exit_code == 2 and "--tokenizer" in res.output and "no-such-model" in res.output
    assert "Traceback" not in res.output and not (tmp_path / "out").exists()


def test_export_eval_report_say_what_is_wrong_in_one_line(tmp_path):
    """Bad option values, an input that is not scored, a copied part and output paths whose directory does
    not exist yet: one line each (or done), never a traceback."""
    from typer.testing import CliRunner

    from grm_ray.cli import app

    src = str(tmp_path / "scored.parquet")
    pq.write_table(scored(pair_items()), src)
    run = lambda *args: CliRunner().invoke(app, [str(a) for a in args])  # noqa: E731
    for args, says in [(["export-dpo", src, tmp_path / "o1", "--format", "chat"], "--format must be standard or "),
                       (["export-dpo", src, tmp_path / "o2", "--min-margin", "nan"], "--min-margin must be a number"),
                       (["export-rft", src, tmp_path / "o3", "--threshold", "11"], "--threshold"),
                       (["export-meta", src, tmp_path / "o4", "--chat-fallback", "llama"], "--chat-fallback must be"),
                       (["report", src, "-o", tmp_path / "r.html", "--limit", "0"], "--limit")]:
        res = run(*args)
        assert res.exit_code == 2 and says in res.output and "Traceback" not in res.output, (args, res.output)
    raw = tmp_path / "raw.parquet"
    pq.write_table(pa.table({"prompt": ["q"], "chosen": ["a"], "rejected": ["b"]}), raw)
    res = run("export-dpo", raw, tmp_path / "o5")
    assert res.exit_code == 2 and "is not a scored output" in res.output and "grm-ray score" in res.output

    out = tmp_path / "out"  # a scored output with one part copied under a second name
    out.mkdir()
    pq.write_table(scored(pair_items()), out / "part-a.parquet")
    pq.write_table(scored(pair_items()), out / "part-b.parquet")
    res = run("export-dpo", out, tmp_path / "o6")
    assert res.exit_code == 0 and "holds 7 row(s) more than once (e.g. t.parquet#0)" in res.stderr, res.output

    res = run("report", src, "-o", tmp_path / "new" / "dir" / "r.html")
    assert res.exit_code == 0 and (tmp_path / "new" / "dir" / "r.html").exists(), res.output
    res = run("eval", src, "--plot", tmp_path / "plots" / "vk.png")
    assert res.exit_code == 0 and (tmp_path / "plots" / "vk.png").exists(), res.output

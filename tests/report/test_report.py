"""`grm-ray report`: the page is built from a scored table, and works in a real headless Chromium: it loads
with no network, its filters narrow the list, sorting orders it, and opening an item shows its critiques."""
from __future__ import annotations

import json
import random
import re
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from grm_ray import schema as S
from grm_ray.cli import app
from grm_ray.report import page_data, render

from .cdp import Browser, chromium


def synth(n: int, k: int = 4, seed: int = 0, confidence: bool = True) -> pa.Table:
    """A scored output of n pair items with the output schema: some errors, ties, disagreements, critiques
    whose text holds HTML and a '</script>'. Votes are simple means (no meta RM): enough for the page."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        error = f"f.parquet, row {i}: field 'chosen' is empty" if i % 97 == 5 else None
        samples = []
        for t in range(k):
            order = [0, 1] if t % 2 == 0 else [1, 0]
            scores = [rng.randint(1, 10), rng.randint(1, 10)] if t != 3 else None
            samples.append({"order": order, "text": f"critique {i}.{t} </script><b>bold?</b> Response {order[0] + 1} first",
                            "scores": scores, "valid": scores is not None, "meta_score": round(rng.uniform(-2, 2), 3),
                            "kept": scores is not None and t < 2, "repaired": False, "hinted": False, "n_tokens": 30})
        kept = [s["scores"] for s in samples if s["kept"]]
        rewards = [sum(s[j] for s in kept) / len(kept) for j in range(2)]
        best = 0 if rewards[0] >= rewards[1] else 1
        row = {S.ID: f"row-{i}", S.SOURCE: f"f.parquet#{i}", S.MESSAGES: [{"role": "user", "content": f"question {i}?"}],
               S.RESPONSES: [f"answer A{i}", f"answer B{i}"], S.LABEL: 0, S.REWARDS: rewards,
               S.VOTE_TOTALS: [r * len(kept) for r in rewards], S.BEST_INDEX: best,
               S.MARGIN: abs(rewards[0] - rewards[1]), S.TIE: rewards[0] == rewards[1], S.N_SAMPLES: k,
               S.N_VALID: k - 1, S.N_KEPT: len(kept), S.SAMPLES: samples, S.ERROR: error}
        if error:
            row.update({c: None for c in (S.REWARDS, S.VOTE_TOTALS, S.BEST_INDEX, S.MARGIN, S.TIE, S.SAMPLES)})
        if confidence:
            row["confidence"] = None if error else round(rng.random(), 3)
        rows.append(row)
    # outputs of this version carry `confidence`; older ones (confidence=False) do not
    fields = [f for f in S.OUTPUT_FIELDS if f.name != "confidence"] + (
        [pa.field("confidence", pa.float64())] if confidence else [])
    return pa.Table.from_pylist(rows, schema=pa.schema(fields))


def test_page_data_agreement_confidence_and_escaping():
    t = synth(200)
    d = page_data(t)
    rows = t.to_pylist()
    assert d["has_confidence"] and d["index"]["conf"][0] == rows[0]["confidence"]
    for r, agree in zip(rows, d["index"]["agree"]):  # agrees: the labelled best (0) strictly highest
        assert agree == (None if r["error"] else r["rewards"][0] > r["rewards"][1])
    conv, responses, samples, source = json.loads(d["detail"][1])
    assert conv == [["user", "question 1?"]] and responses == ["answer A1", "answer B1"] and source == "f.parquet#1"
    assert samples[1][:3] == [[1, 0], rows[1]["samples"][1]["text"], rows[1]["samples"][1]["scores"]]
    assert not page_data(synth(3, confidence=False))["has_confidence"]
    page = render(t, "t")
    assert page.count("</script>") == 2  # the data block and the code: a critique's '</script>' is escaped
    assert not re.search(r"(src|href)=|https?://|@import|fetch\(", page)  # nothing loaded at view time


needs_chromium = pytest.mark.skipif(chromium() is None, reason="needs Chromium: `make chromium` "
                                    "(apt-get install -y chromium)")


@pytest.fixture(scope="module")
def browser():
    b = Browser()
    yield b
    b.close()


def _report(tmp_path, table: pa.Table, name: str = "r") -> str:
    pq.write_table(table, tmp_path / f"{name}.parquet")
    out = tmp_path / f"{name}.html"
    res = CliRunner().invoke(app, ["report", str(tmp_path / f"{name}.parquet"), "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert f"({table.num_rows} rows" in res.stdout
    return out.as_uri()


def _select(b: Browser, id_: str, value: str) -> None:
    b.js(f"(() => {{ const s = document.getElementById({id_!r}); s.value = {value!r}; "
         "s.dispatchEvent(new Event('change')); })()")


def _listed(b: Browser, column: int = 0) -> list[str]:
    return b.js(f"[...document.querySelectorAll('#list tr.item')].map(r => r.cells[{column}].textContent)")


@needs_chromium
def test_page_filters_sorts_and_shows_critiques(tmp_path, browser):
    table = synth(300)
    rows = table.to_pylist()
    browser.open(_report(tmp_path, table), ready="document.body.dataset.shown")
    b = browser
    assert b.js("document.body.dataset.shown") == "300" and len(_listed(b)) == 50  # one page of 50
    assert b.js("document.querySelector('th.conf') !== null")  # the confidence column exists here
    errors = [r["id"] for r in rows if r["error"]]
    disagree = [r["id"] for r in rows if not r["error"] and not r["rewards"][0] > r["rewards"][1]]
    ties = [r["id"] for r in rows if r["tie"]]
    _select(b, "filter", "disagree")
    assert b.js("document.body.dataset.shown") == str(len(disagree)) and 0 < len(disagree) < 300
    assert set(_listed(b, 7)) == {"no"}
    _select(b, "filter", "error")
    assert _listed(b) == errors
    _select(b, "filter", "tie")
    assert _listed(b) == ties[:50] and set(_listed(b, 4)) == {"tie"}
    b.js("(() => { const e = document.getElementById('low'); e.value = '2'; e.dispatchEvent(new Event('input')); })()")
    _select(b, "filter", "low")
    low = [r["id"] for r in rows if r["margin"] is not None and r["margin"] < 2]
    assert b.js("document.body.dataset.shown") == str(len(low))
    _select(b, "filter", "all")
    _select(b, "sort", "margin")
    margins = sorted(r["margin"] for r in rows if r["margin"] is not None)
    assert [float(m) for m in _listed(b, 3)] == pytest.approx(margins[:50], abs=0.01)
    _select(b, "sort", "input")
    # open item 1: its conversation, responses and each critique with its shown order, scores, meta, vote
    b.js("document.querySelector('#list tr.item[data-i=\"1\"]').click()")
    text = b.js("document.querySelector('.detail').innerText")
    s1 = rows[1]["samples"][1]
    assert "question 1?" in text and "answer B1" in text
    assert s1["text"] in text  # shown as text, '</script><b>' and all, not as markup
    assert "shown as: Response 2, Response 1" in text and "scores (original order): " + ", ".join(
        map(str, s1["scores"])) in text
    assert f"meta score: {round(s1['meta_score'], 2):g}" in text and "voted" in text and "unparsed" in text
    assert b.js("document.querySelectorAll('.detail .critique').length") == 4
    assert "open=1" in b.js("location.hash")  # the view can be linked to


@needs_chromium
def test_page_without_confidence_and_from_a_link(tmp_path, browser):
    url = _report(tmp_path, synth(120, confidence=False), "noconf")
    browser.open(url + "#filter=error&open=5", ready="document.body.dataset.shown")
    assert browser.js("document.querySelector('th.conf')") is None
    assert browser.js("document.querySelector('option[value=conf]')") is None
    assert _listed(browser) == ["row-5", "row-102"]
    assert "field 'chosen' is empty" in browser.js("document.querySelector('#list').innerText")


@needs_chromium
def test_100k_rows_stay_responsive(tmp_path, browser, capsys):
    """A measured figure, not a timed assertion: build, load and filter a 100k-row report."""
    t0 = time.time()
    table = pa.concat_tables([synth(10_000)] * 10)  # ids repeat: the page does not mind
    t1 = time.time()
    url = _report(tmp_path, table, "big")
    t2 = time.time()
    browser.open(url, ready="document.body.dataset.shown")
    t3 = time.time()
    assert browser.js("document.body.dataset.shown") == "100000" and len(_listed(browser)) == 50
    _select(browser, "filter", "error")
    t4 = time.time()
    assert int(browser.js("document.body.dataset.shown")) == sum(1 for i in range(10_000) if i % 97 == 5) * 10
    browser.js("document.querySelector('#list tr.item').click()")
    size = (tmp_path / "big.html").stat().st_size
    with capsys.disabled():
        print(f"\n100k-row report: {size / 1e6:.1f} MB HTML; table {t1 - t0:.1f} s, `grm-ray report` {t2 - t1:.1f} s, "
              f"Chromium load + first page {t3 - t2:.1f} s (in-page {browser.js('document.body.dataset.renderMs')} ms), "
              f"filter {t4 - t3:.2f} s")


def test_report_reads_parts_up_to_the_limit_and_says_so(tmp_path):
    out = tmp_path / "scored"
    out.mkdir()
    for seed, name in enumerate("abc", 1):  # each part its own file's rows
        t = synth(100, seed=seed)
        src = pa.array([f"{name}.parquet#{i}" for i in range(t.num_rows)])
        pq.write_table(t.set_column(t.schema.get_field_index(S.SOURCE), S.SOURCE, src), out / f"part-{name}.parquet")
    cli = CliRunner()
    res = cli.invoke(app, ["report", str(out), "-o", str(tmp_path / "r.html"), "--limit", "150"])
    assert res.exit_code == 0, res.output
    assert "(150 rows" in res.stdout and "shows the first 150" in res.stderr
    page = (tmp_path / "r.html").read_text()
    assert page.count('"row-99"') == 1 and '"row-49"' in page  # part a whole, part b's first 50
    res = cli.invoke(app, ["report", str(out), "-o", str(tmp_path / "all.html")])
    assert "(300 rows" in res.stdout and "warning" not in res.stderr
    res = cli.invoke(app, ["report", str(tmp_path / "nowhere"), "-o", str(tmp_path / "x.html")])
    assert res.exit_code == 2 and "cannot read scored output" in res.output


def test_report_refuses_an_unscored_file_and_warns_of_rows_twice(tmp_path):
    """An input never scored is refused (as eval and the exports do), not drawn as a page of empty rows;
    a copied part is warned of, since the page would show its rows twice."""
    cli = CliRunner()
    raw = tmp_path / "in.parquet"
    pq.write_table(pa.table({"chosen": ["Human: hi Assistant: a"] * 8, "rejected": ["Human: hi Assistant: b"] * 8}), raw)
    res = cli.invoke(app, ["report", str(raw), "-o", str(tmp_path / "r.html")])
    assert res.exit_code == 2 and "is not a scored output (no `rewards` column)" in res.output, res.output
    assert not (tmp_path / "r.html").exists()
    (tmp_path / "notes.parquet").write_text("not Parquet")
    res = cli.invoke(app, ["report", str(tmp_path / "notes.parquet"), "-o", str(tmp_path / "r.html")])
    assert res.exit_code == 2 and "cannot read scored output" in res.output and "notes.parquet" in res.output
    out = tmp_path / "scored"
    out.mkdir()
    pq.write_table(synth(10), out / "part-a.parquet")
    pq.write_table(synth(10), out / "part-a-copy.parquet")
    res = cli.invoke(app, ["report", str(out), "-o", str(tmp_path / "d.html")])
    assert res.exit_code == 0 and "holds 10 row(s) more than once" in res.stderr, res.output

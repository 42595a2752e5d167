"""`grm-ray report`: one self-contained HTML file to audit a scored output, item by item.

The page needs no network: its CSS and JS are inline and the rows are embedded as JSON. It stays responsive
at 10^5 rows because the list is rendered a page at a time from a compact columnar index, and an item's
conversation, responses and critiques are kept as one JSON string per row, parsed and put into the DOM only
when the item is opened. State lives in the URL hash (`#filter=disagree&sort=margin&open=3`, open = row
positions), so a view can be linked to, and tests drive the page through it.
"""
from __future__ import annotations

import html
import json
from typing import Any

import pyarrow as pa

from . import schema as S
from .export import rule_reward

CONFIDENCE = "confidence"  # optional column (adaptive voting's confidence in the winner), shown when present
COLUMNS = [S.ID, S.SOURCE, S.MESSAGES, S.RESPONSES, S.LABEL, S.REWARDS, S.BEST_INDEX, S.MARGIN, S.TIE,
           S.N_SAMPLES, S.N_VALID, S.N_KEPT, S.SAMPLES, S.ERROR, CONFIDENCE]
SAMPLE_KEYS = ("order", "text", "scores", "valid", "meta_score", "kept", "repaired", "hinted")


def _agrees(row: dict[str, Any]) -> bool | None:
    """Whether the vote agrees with the label (the labelled best strictly highest; one response: reward >= 6
    exactly when labelled good), None without a label, rewards or when the row has an error."""
    if row.get(S.LABEL) is None or row.get(S.REWARDS) is None or row.get(S.ERROR) is not None:
        return None
    try:
        return rule_reward(row[S.REWARDS], row[S.LABEL]) == 1
    except ValueError:  # a label out of range for the responses
        return None


def page_data(table: pa.Table) -> dict[str, Any]:
    """The embedded data: `index` holds one short array per column (what the list, filters and sort need);
    `detail[i]` is row i's conversation, responses and samples as a JSON string, parsed only when opened.

    A sample is [order, text, scores, valid, meta_score, kept, repaired, hinted] (SAMPLE_KEYS).
    """
    def col(name: str) -> list[Any]:
        return table.column(name).to_pylist() if name in table.column_names else [None] * table.num_rows

    index = {k: [round(v, 4) if isinstance(v, float) else v for v in col(c)] for k, c in (
        ("id", S.ID), ("label", S.LABEL), ("best", S.BEST_INDEX), ("margin", S.MARGIN), ("tie", S.TIE),
        ("error", S.ERROR), ("n", S.N_SAMPLES), ("valid", S.N_VALID), ("kept", S.N_KEPT), ("conf", CONFIDENCE))}
    rewards = col(S.REWARDS)
    index["rewards"] = [r and [round(v, 4) for v in r] for r in rewards]
    index["agree"] = [_agrees({S.LABEL: la, S.REWARDS: r, S.ERROR: e})
                      for la, r, e in zip(index["label"], rewards, index["error"])]
    detail = []
    dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
    for batch in table.select([c for c in (S.MESSAGES, S.RESPONSES, S.SAMPLES, S.SOURCE)
                               if c in table.column_names]).to_batches(max_chunksize=4096):
        for r in batch.to_pylist():
            samples = [[s.get(k) for k in SAMPLE_KEYS] for s in r.get(S.SAMPLES) or []]
            detail.append(dumps([[[m["role"], m["content"]] for m in r.get(S.MESSAGES) or []],
                                 r.get(S.RESPONSES) or [], samples, r.get(S.SOURCE)]))
    return {"index": index, "detail": detail, "has_confidence": CONFIDENCE in table.column_names}


def read(uri: str, limit: int | None = None, endpoint_url: str | None = None) -> tuple[pa.Table, int | None]:
    """The report's columns of a scored output (directory, Parquet file or s3:// URI), first `limit` rows;
    parts are read one at a time and reading stops once there are enough. Returns (table, total rows or None
    when reading stopped early)."""
    import pyarrow.parquet as pq

    from . import storage

    fs, path = storage.filesystem(uri, endpoint_url)
    files = storage.committed_parts(fs, path) if fs.isdir(path) else [path]
    if not files:
        raise FileNotFoundError(f"no scored parts (part-*.parquet) under {uri}")
    tables, rows = [], 0
    for f in files:
        if limit is not None and rows >= limit:
            return pa.concat_tables(tables, promote_options="default").slice(0, limit), None
        with fs.open(f, "rb") as fh:  # one footer read; in this thread, as storage.read_parquet says why
            pf = pq.ParquetFile(fh)
            if S.REWARDS not in pf.schema_arrow.names:
                raise ValueError(f"{storage.uri(fs, f)} is not a scored output (no `rewards` column): score it "
                                 "with `grm-ray score` first")
            tables.append(pf.read(columns=[c for c in COLUMNS if c in pf.schema_arrow.names], use_threads=False))
        rows += tables[-1].num_rows
    table = pa.concat_tables(tables, promote_options="default")
    return (table.slice(0, limit) if limit is not None else table), table.num_rows


def render(table: pa.Table, title: str) -> str:
    """The whole HTML page for a scored table."""
    data = json.dumps(page_data(table), ensure_ascii=False, separators=(",", ":"))
    data = data.replace("</", "<\\/")  # a critique holding '</script>' must not end the data block
    return (PAGE.replace("__TITLE__", html.escape(title)).replace("__STYLE__", STYLE)
            .replace("__SCRIPT__", SCRIPT).replace("__DATA__", data))


STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:0;color:#222}
header{position:sticky;top:0;background:#f6f6f6;border-bottom:1px solid #ccc;padding:8px 12px;z-index:1}
header h1{font-size:16px;margin:0 0 6px}
header label{margin-right:12px}
#stats{color:#555;margin-top:4px}
table{border-collapse:collapse;width:100%}
th,td{padding:4px 8px;border-bottom:1px solid #eee;text-align:left;vertical-align:top}
tr.item{cursor:pointer}tr.item:hover{background:#f0f6ff}
.bad{color:#b00}.good{color:#070}.muted{color:#888}
.detail{background:#fafafa;padding:8px 16px}
.turn{margin:4px 0}.role{font-weight:bold;margin-right:6px}
.resp{border:1px solid #ddd;padding:6px;margin:4px 0;white-space:pre-wrap}
.resp.win{border-color:#070;background:#f3fbf3}
pre{white-space:pre-wrap;margin:4px 0;background:#fff;border:1px solid #eee;padding:6px}
.sample{border-left:3px solid #ccc;padding-left:8px;margin:8px 0}.sample.kept{border-color:#070}
.pager{padding:8px 12px}
"""

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width">
<title>__TITLE__</title><style>__STYLE__</style></head>
<body>
<header><h1>__TITLE__</h1>
<label>Show <select id="filter">
<option value="all">all items</option><option value="disagree">disagrees with label</option>
<option value="tie">ties</option><option value="error">errors</option><option value="low">low margin</option>
</select></label>
<label>margin below <input id="low" type="number" step="0.5" value="1" style="width:4em"></label>
<label>Sort <select id="sort"><option value="input">input order</option><option value="margin">margin, low first</option>
<option value="-margin">margin, high first</option><option value="conf" class="conf">confidence, low first</option>
<option value="id">id</option></select></label>
<label>id contains <input id="q" type="search" style="width:10em"></label>
<div id="stats"></div></header>
<table><thead><tr><th>id</th><th>winner</th><th>rewards</th><th>margin</th><th>tie</th><th class="conf">confidence</th>
<th>label</th><th>agrees</th><th>samples (valid / voted)</th><th>error</th></tr></thead>
<tbody id="list"></tbody></table>
<div class="pager"><button id="prev">previous</button> <span id="page"></span> <button id="next">next</button></div>
<script type="application/json" id="data">__DATA__</script>
<script>__SCRIPT__</script>
</body></html>
"""

SCRIPT = r"""
"use strict";
const t0 = performance.now();
const D = JSON.parse(document.getElementById("data").textContent);
const X = D.index, N = X.id.length, PAGE = 50;
const st = {filter: "all", low: 1, sort: "input", q: "", page: 0, open: new Set()};
const $ = (id) => document.getElementById(id);
const esc = (s) => String(s).replace(/[&<>"]/g, (c) => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;"}[c]));
const fmt = (v) => v === null || v === undefined ? "" : (typeof v === "number" ? +v.toFixed(2) : v);
if (!D.has_confidence) document.querySelectorAll(".conf, option[value=conf]").forEach((e) => e.remove());

function keep(i) {
  if (st.q && !String(X.id[i]).includes(st.q)) return false;
  switch (st.filter) {
    case "disagree": return X.agree[i] === false;
    case "tie": return X.tie[i] === true;
    case "error": return X.error[i] !== null;
    case "low": return X.margin[i] !== null && X.margin[i] < st.low;
  }
  return true;
}
function selected() {
  const rows = [];
  for (let i = 0; i < N; i++) if (keep(i)) rows.push(i);
  const neg = (v) => v === null ? null : -v;
  const key = {margin: (i) => X.margin[i], "-margin": (i) => neg(X.margin[i]), conf: (i) => X.conf[i]}[st.sort];
  if (key) rows.sort((a, b) => { const ka = key(a), kb = key(b);  // nulls (errors) last
    return (ka === null) - (kb === null) || (ka === null ? 0 : ka - kb) || a - b; });
  if (st.sort === "id") rows.sort((a, b) => String(X.id[a]).localeCompare(String(X.id[b])));
  return rows;
}
function detail(i) {
  const [conv, resp, samples, source] = JSON.parse(D.detail[i]);
  const r = X.rewards[i] || [];
  let h = `<div class="muted">source ${esc(source)}</div><h4>Conversation</h4>`;
  for (const [role, text] of conv) h += `<div class="turn"><span class="role">${esc(role)}</span>${esc(text)}</div>`;
  h += "<h4>Responses</h4>";
  resp.forEach((t, j) => { h += `<div class="resp${j === X.best[i] ? " win" : ""}"><b>Response ${j + 1}</b>` +
    `${j === X.best[i] ? " (winner)" : ""}${j === X.label[i] && resp.length > 1 ? " (labelled best)" : ""}` +
    ` reward ${fmt(r[j])}\n${esc(t)}</div>`; });
  h += `<h4>Samples (${samples.length})</h4>`;
  samples.forEach(([order, text, scores, valid, meta, kept, repaired, hinted], k) => {
    const shown = (order || []).map((o) => `Response ${o + 1}`).join(", ");
    h += `<div class="sample${kept ? " kept" : ""}"><b>sample ${k + 1}</b> shown as: ${esc(shown)}; ` +
      `scores (original order): ${scores ? esc(scores.join(", ")) : "<span class=bad>unparsed</span>"}; ` +
      `meta score: ${fmt(meta) === "" ? "-" : fmt(meta)}; ${kept ? "<b>voted</b>" : "did not vote"}` +
      `${repaired ? "; repaired" : ""}${hinted ? "; hinted" : ""}<pre class="critique">${esc(text || "")}</pre></div>`;
  });
  return h;
}
function cell(v) { return `<td>${esc(fmt(v))}</td>`; }
function render() {
  const rows = selected(), pages = Math.max(1, Math.ceil(rows.length / PAGE));
  st.page = Math.min(st.page, pages - 1);
  const cols = D.has_confidence ? 10 : 9;
  let h = "";
  for (const i of rows.slice(st.page * PAGE, st.page * PAGE + PAGE)) {
    const a = X.agree[i];
    h += `<tr class="item" data-i="${i}">` + cell(X.id[i]) +
      cell(X.best[i] === null ? "" : `Response ${X.best[i] + 1}`) + cell((X.rewards[i] || []).map(fmt).join(", ")) +
      cell(X.margin[i]) + cell(X.tie[i] ? "tie" : "") + (D.has_confidence ? cell(X.conf[i]) : "") +
      cell(X.label[i]) + `<td class="${a === false ? "bad" : "good"}">${a === null ? "" : (a ? "yes" : "no")}</td>` +
      cell(X.n[i] === null ? "" : `${X.n[i]} (${X.valid[i]} / ${X.kept[i]})`) +
      `<td class="bad">${esc(X.error[i] === null ? "" : X.error[i].slice(0, 120))}</td></tr>`;
    if (st.open.has(i)) h += `<tr class="open"><td colspan="${cols}" class="detail">${detail(i)}</td></tr>`;
  }
  $("list").innerHTML = h;
  $("page").textContent = `page ${st.page + 1} of ${pages}`;
  $("stats").textContent = `${rows.length} of ${N} items shown; ` +
    `${X.agree.filter((a) => a === false).length} disagree with the label, ${X.tie.filter(Boolean).length} ties, ` +
    `${X.error.filter((e) => e !== null).length} errors`;
  document.body.dataset.shown = rows.length;
  document.body.dataset.renderMs = Math.round(performance.now() - t0);
  const hash = new URLSearchParams({filter: st.filter, low: st.low, sort: st.sort, q: st.q, page: st.page,
                                    open: [...st.open].join(",")}).toString();
  if (location.hash.slice(1) !== hash) history.replaceState(null, "", "#" + hash);
}
function fromHash() {
  const p = new URLSearchParams(location.hash.slice(1));
  for (const k of ["filter", "sort", "q"]) if (p.has(k)) st[k] = p.get(k);
  if (p.has("low")) st.low = parseFloat(p.get("low"));
  if (p.has("page")) st.page = parseInt(p.get("page"), 10) || 0;
  st.open = new Set((p.get("open") || "").split(",").filter(Boolean).map(Number));
  $("filter").value = st.filter; $("sort").value = st.sort; $("low").value = st.low; $("q").value = st.q;
}
$("filter").onchange = (e) => { st.filter = e.target.value; st.page = 0; render(); };
$("sort").onchange = (e) => { st.sort = e.target.value; render(); };
$("low").oninput = (e) => { st.low = parseFloat(e.target.value); if (st.filter === "low") render(); };
$("q").oninput = (e) => { st.q = e.target.value; st.page = 0; render(); };
$("prev").onclick = () => { st.page = Math.max(0, st.page - 1); render(); };
$("next").onclick = () => { st.page += 1; render(); };
$("list").onclick = (e) => {
  const tr = e.target.closest("tr.item"); if (!tr) return;
  const i = Number(tr.dataset.i); st.open.has(i) ? st.open.delete(i) : st.open.add(i); render();
};
window.onhashchange = () => { fromHash(); render(); };
fromHash(); render();
"""

"""Run benchmarks 1-3 (then 4 on paper), print the figures, save bench/results.json, rewrite RESULTS.md's figures.

    python -m bench.run_all                 # `make bench`: small settings, a few minutes on 2 CPU cores
    python -m bench.run_all --full --model BBQGOD/DeepSeek-GRM-27B --max-model-len 4096   # a GPU node
    python -m bench.run_all --only prefix --k 8 --items 32

On CPU the plain engine of 1 also serves 3 (same engine settings), which saves one engine start.
"""
from __future__ import annotations

import argparse
import datetime as dt
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from bench import adaptive, common, overhead, prefix, scale

START, END = "<!-- figures:start -->", "<!-- figures:end -->"
ALL = ("overhead", "prefix", "adaptive", "adaptive_hinted", "scale")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(p)
    prefix.add_args(p)
    p.add_argument("--batch-size", type=int, default=None, help="items per GRM call in 1 (default 8, full 64)")
    p.add_argument("--only", nargs="+", choices=ALL, default=[a for a in ALL if a != "adaptive_hinted"],
                   help="what to run (default all but adaptive_hinted: the demo model ignores the hint)")
    g = p.add_argument_group("scale on paper (4)")
    scale.assumptions_parser(g)
    args = p.parse_args()
    common.FREE[0] = args.free

    t0 = time.time()
    run = {"command": "python -m bench.run_all " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
           "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "machine": common.machine()}
    common.save_results("run", run)
    print(f"[run_all] {run['machine']['nproc']} CPUs, {run['machine']['cpu']}, {run['machine']['ram_gib']} GiB, "
          f"load {run['machine']['load_avg_at_start']}", flush=True)
    shared = None
    if "overhead" in args.only and not common.has_gpu():
        s = overhead.settings(args)
        cfg = overhead.make_config(args, s)
        shared = common.Worker("grm-plain", cfg, common.engine_env(args.threads), args.workdir)
    try:
        if "overhead" in args.only:
            common.save_results("overhead", overhead.measure(args, worker=shared))
        if "adaptive" in args.only:
            common.save_results("adaptive", adaptive.measure(args, worker=shared))
        if "adaptive_hinted" in args.only:
            common.save_results("adaptive_hinted", adaptive.measure(args, worker=shared, hint=True, live_run=False))
    finally:
        if shared:
            shared.close()
    if "prefix" in args.only:
        common.save_results("prefix", prefix.measure(args))
    if "scale" in args.only:
        common.save_results("scale", scale.compute(common.load_results(), args))
    run["total_seconds"] = round(time.time() - t0)
    common.save_results("run", run)
    text = render(common.load_results())
    write_results_md(text)
    print(text)


def write_results_md(figures: str) -> None:
    md = common.RESULTS_MD.read_text() if common.RESULTS_MD.exists() else f"# grm-ray benchmarks\n\n{START}\n{END}\n"
    if START not in md or END not in md:
        md += f"\n{START}\n{END}\n"
    head, rest = md.split(START, 1)
    tail = rest.split(END, 1)[1]
    common.RESULTS_MD.write_text(f"{head}{START}\n{figures}\n{END}{tail}")


def _replay_table(ad: dict[str, Any], title: str) -> list[str]:
    k = ad["settings"]["k"]
    out = ([title, ""] if title else []) + [
        "| rule | samples saved | tokens saved | items whose winner differs from full Voting@k |", "|---|---|---|---|"]
    for key, x in ad["replay"]["exact"].items():
        out.append(f"| exact, {key} | {x['samples_saved']:.1%} | {x['tokens_saved']:.1%} | "
                   f"**{x['winner_changed']:.1%}** of {x['items']} |")
    for key, x in ad["replay"]["confident"].items():
        out.append(f"| confident, k={k}, {key} | {x['samples_saved']:.1%} | {x['tokens_saved']:.1%} | "
                   f"{x['winner_changed']:.1%} of {x['items']} |")
    out += ["", f"Exact rule kept every winner in this replay: **{ad['replay_exact_keeps_every_winner']}**.", ""]
    fr = ad.get("rule_frontier")
    if fr:
        out += ["Where can the confident rule stop before the exact one at all? (pairs; both rules depend on the vote "
                "totals only, so this is exact arithmetic, not a sample: the first sample count m at which some lead "
                "makes confident stop while exact continues, and the mean lead per sample it needs, of at most 9)", "",
                "| k, risk | first such m | lead per sample confident needs | exact needs at that m |", "|---|---|---|---|"]
        for key, states in fr.items():
            if states:
                st = states[0]
                out.append(f"| {key} | {st['m']} of {key.split()[0][2:]} | {st['confident_lead_per_sample']:.2f} | "
                           f"> {st['exact_lead_per_sample']:.2f} |")
            else:
                out.append(f"| {key} | never | | |")
        out.append("")
    return out


def render(r: dict[str, Any]) -> str:
    f = common.fmt
    out = []
    run = r.get("run", {})
    m = run.get("machine", {})
    if run:
        out += ["### Run", "",
                f"- Command: `{run['command']}` (from the repository root; `make bench` runs it without flags)",
                f"- Date: {run['date']}; total {run.get('total_seconds', '?')} s",
                f"- Machine: {m.get('nproc')} CPUs, {m.get('cpu')}, {m.get('ram_gib')} GiB RAM, "
                f"GPUs: {', '.join(m.get('gpus') or []) or 'none'}; load average at start "
                f"{m.get('load_avg_at_start')} (a shared machine)",
                f"- Versions: Python {m.get('python')}, " + ", ".join(f"{k} {v}" for k, v in m.get("versions", {}).items()),
                ""]
    ov = r.get("overhead")
    if ov:
        s, rt, pipe = ov["settings"], ov["rates_tokens_per_s"], ov["pipeline"]
        b, a = ov["plain_before"], ov.get("plain_after") or {}
        out += ["### 1. Pipeline overhead", "",
                f"{s['items']} items (pairs), k={s['k']}, max_tokens {s['max_tokens']}, batch_size {s['batch_size']}, "
                f"{'structured' if s.get('structured', True) else 'free decoding'}, meta RM off, model "
                f"`{s['model']}`; engine_kwargs {s['engine_kwargs']}; "
                f"env {s['env']}. Threads seen: plain engine {ov['plain_engine']['torch_threads']}, "
                f"pipeline actor {pipe['actor']['torch_threads']}.", "",
                "| side | generated tokens | seconds | tokens/s | engine process CPU s | engine thread CPU s | "
                "other processes' CPU s meanwhile (machine-wide) |",
                "|---|---|---|---|---|---|---|"]
        for label, run_ in (("plain, one call (before)", b["one_call"]), ("plain, batches of batch_size (before)", b["batched"]),
                            ("plain, one call (after)", a.get("one_call")), ("plain, batches of batch_size (after)", a.get("batched"))):
            if run_:
                out.append(f"| {label} | {run_['tokens']} | {run_['seconds']:.1f} | {run_['tokens'] / run_['seconds']:.1f} | "
                           f"{f(run_.get('cpu_seconds'), 1)} | {f(run_.get('thread_cpu_seconds'), 1)} | "
                           f"{f(run_.get('machine_busy_others'), 1)} |")
        out.append(f"| pipeline, steady state (engine ready -> run() returns) | {pipe['summary']['generated_tokens']} | "
                   f"{pipe['steady_seconds']:.1f} | {rt['pipeline_steady']:.1f} | "
                   f"{f(pipe.get('engine_cpu_seconds_in_calls'), 1)} (in calls) | "
                   f"{f(pipe.get('engine_thread_cpu_seconds_in_calls'), 1)} (in calls) | "
                   f"{f(pipe.get('steady_machine_busy_others'), 1)} (not this job's) |")
        out.append(f"| pipeline, Ray start + whole run() incl. actor start | {pipe['summary']['generated_tokens']} | "
                   f"{pipe['summary']['wall_seconds'] + pipe['ray_init_seconds']:.1f} | {rt['pipeline_incl_start']:.1f} | | | |")
        busy = pipe["breakdown_seconds"]["engine_busy_in_calls"]
        out += ["",
                f"Share of the pipeline's steady state spent inside GRM calls: {busy / pipe['steady_seconds']:.3f}.", "",
                f"**Pipeline / plain tokens per second (steady state, plain = mean of its one-call passes): "
                f"{ov['ratio']:.2f}.** Against plain in the pipeline's batches: {ov['ratio_vs_plain_batched']:.2f}; "
                f"plain batched / plain one call: {ov['batching_ratio']:.2f}; including start-up on both sides: "
                f"{ov['ratio_incl_start']:.2f}; plain after / before (load drift): {f(ov['plain_drift'])}.", "",
                "Pipeline steady-state time, seconds: " + ", ".join(f"{k} {v}" for k, v in pipe["breakdown_seconds"].items())
                + f"; per GRM call {pipe['call_seconds']} (plain, batched: "
                + ", ".join(str(x.get("call_seconds")) for x in (b["batched"], a.get("batched")) if x)
                + f"); Ray init {pipe['ray_init_seconds']}; plain engine start {ov['plain_engine']['start_seconds']}. "
                f"Warm-up (one short structured sample on the fresh engine, before either clock starts): plain "
                f"{f(ov['plain_engine'].get('warmup_seconds'))} s, pipeline actor {f(pipe['actor'].get('warmup_seconds'))} s.",
                f"CPU seconds used during the pipeline's steady state (the engine core's from its last reading, "
                f"taken every second): {pipe.get('steady_cpu_seconds')}.",
                *([f"Engine CPU seconds per generated token (plain: its worker and engine core; pipeline: the GRM "
                   f"actor and its engine core): plain {ov['engine_cpu_per_token']['plain_one_call']:.4f}, pipeline "
                   f"{ov['engine_cpu_per_token']['pipeline']:.4f}."] if ov.get("engine_cpu_per_token") else []),
                f"Prompt tokens per ordering (demo tokenizer): mean {ov['prompt_tokens_per_ordering']['mean']:.0f}; "
                f"generated tokens per sample {ov['tokens_per_sample']:.1f}.", ""]
    pre = r.get("prefix")
    if pre:
        s = pre["settings"]
        out += ["### 2. Prefix sharing", "",
                f"{s['items']} items per case, max_tokens {s['max_tokens']}, structured {s['structured']}, model "
                f"`{s['model']}`, block size {pre['engines']['on'].get('block_size', '?')}, {s['repeats']} alternating "
                f"repeats (wall = the fastest). Shared = one request per ordering with n, caching on; "
                f"independent = k requests with n=1, caching off.", "",
                "| case | prompt tokens (k x prompt) | computed, shared | computed, independent | **computed ratio** | "
                "wall shared s | wall independent s | **wall ratio** | wall: independent + cache / n without cache | generated tokens shared / independent |",
                "|---|---|---|---|---|---|---|---|---|---|"]
        for t in pre["table"]:
            c = t["cells"]
            a, b = c["shared, caching on"], c["independent, caching off"]
            out.append(f"| {t['case']} | {a['prompt_tokens_per_sample']} | {a['prompt_tokens_computed']} | "
                       f"{b['prompt_tokens_computed']} | **{t['computed_ratio']:.3f}** | {a['seconds']:.2f} | "
                       f"{b['seconds']:.2f} | **{t['wall_ratio']:.2f}** | {t['cache_alone_wall_ratio']:.2f} / "
                       f"{t['n_without_cache_wall_ratio']:.2f} | {f(t.get('generated_tokens_ratio'), 3)} |")
        for name, tail in (pre.get("tail_per_extra_sample") or {}).items():
            out.append("")
            out.append(f"{name}: each sample beyond k=8 adds {tail:.1f} computed prompt tokens per item "
                       f"(block size {pre['engines']['on'].get('block_size', '?')}: the prompt's last, partial block "
                       f"is recomputed by every sample).")
        out.append("")
    for key in sorted(k for k in r if k.startswith("prefix_")):
        pb, ps = r[key], r[key]["settings"]
        bs = pb["engines"]["on"].get("block_size")
        model = "demo" if "gemma" in ps["model"] else "tiny" if "tiny-models" in ps["model"] else Path(ps["model"]).name
        out += [f"Variant `{key}` (a separate run on this machine{', ' + pb['date'] if pb.get('date') else ''}): "
                f"model {model}, block size {bs}, {ps['items']} items per case, max_tokens {ps['max_tokens']}, "
                f"{ps['repeats']} repeat(s): computed ratio "
                + ", ".join(f"{t['case']} {t['computed_ratio']:.3f}" for t in pb["table"])
                + "; wall ratio " + ", ".join(f"{t['case']} {t['wall_ratio']:.2f}" for t in pb["table"])
                + ("; prompt tokens per extra sample " + ", ".join(f"{n} {v:.1f}" for n, v in pb["tail_per_extra_sample"].items())
                   + f" (model: (block - 1) / 2 = {(bs - 1) / 2:.1f})" if pb.get("tail_per_extra_sample") else "") + ".", ""]
    ad = r.get("adaptive")
    if ad:
        s, lv = ad["settings"], ad["live"]
        out += ["### 3. Adaptive sampling", "",
                f"{s['items']} items (pairs), k={s['k']}, max_tokens {s['max_tokens']}, "
                f"{'structured' if s.get('structured', True) else 'free decoding'}, model `{s['model']}`, "
                f"one engine, no Ray; valid samples {ad['valid_share_full']:.0%}; most common score pairs "
                f"{ad['score_patterns_top'][:5]}.", "",
                "| live run | samples | generated tokens | seconds | engine CPU s |", "|---|---|---|---|---|",
                f"| full k (adaptive off) | {lv['full']['samples']} | {lv['full']['tokens']} | {lv['full']['seconds']:.1f} | "
                f"{lv['full']['cpu_seconds']:.1f} |",
                f"| adaptive exact | {lv['exact']['samples']} | {lv['exact']['tokens']} | {lv['exact']['seconds']:.1f} | "
                f"{lv['exact']['cpu_seconds']:.1f} |",
                f"| **exact / full** | {lv['samples_ratio']:.2f} | **{lv['tokens_ratio']:.2f}** | **{lv['wall_ratio']:.2f}** | "
                f"{f(lv.get('cpu_ratio'))} |",
                "",
                f"Live plain-vote winners differing between the two runs: {lv['winner_differs']} of {lv['items']} "
                f"(the two runs draw different samples)"
                + (": " + "; ".join(f"{d['id']} full-k margin {d['full_margin']:.3f}" for d in lv["differing_items"])
                   if lv["differing_items"] else "") + ".", ""]
        out += _replay_table(ad, "Replay of the full run's samples (the stage's own stopping rule, samples in the order "
                                 "the adaptive sampler draws them):")
    adh = r.get("adaptive_hinted")
    if adh:
        s = adh["settings"]
        out += [f"Hinted prompts (label hint appended, the paper's hinted sampling), same model, {s['items']} items, "
                f"k={s['k']}: a decisive score distribution (most common {adh['score_patterns_top'][:4]}, valid "
                f"{adh['valid_share_full']:.0%}), replayed the same way:", ""]
        out += _replay_table(adh, "")
    sc = r.get("scale")
    if sc:
        out += ["### 4. Scale on paper", "", scale.markdown(sc), ""]
    return "\n".join(out)


if __name__ == "__main__":
    main()

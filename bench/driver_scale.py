"""5. Driver scale: the driver's peak RSS and planning time against input rows and files (issue 11 point 8).

Synthetic DPO inputs (id, prompt, chosen, rejected: short strings) of R rows over F files are written once
under --data (default /tmp/grm-driver-scale) and reused. Each measurement runs in a fresh Python process
and reports that process's peak RSS (VmHWM: the driver alone, not Ray's other processes):

- plan:   what `pipeline.run` does on the driver before streaming: plan.scan_inputs (list + every footer,
          in parallel), plan.read_ledger (every committed part's record), plan.make_plan (units), on a fresh
          output;
- resume: the same over an output already holding committed parts for the first half of every file's rows
          (written with storage.write_part + plan.part_record, rows_per_file rows per part, a `source` column
          only: the ledger reads footers, never rows);
- old:    the code before the change (--old-ref, default 9e34011, checked out with `git worktree add`):
          `pipeline._prepare_output` (reads every committed row's `source`) + `pipeline.plan(cfg, done)`
          (per-row strings, the id Counter read on the driver), on the same inputs and outputs;
- run:    a whole `pipeline.run` on a local Ray with the GRM stage swapped for FixedSampler (one fixed valid
          sample per row, no engine) through `build(grm_stage=...)`: the streaming machinery, the distributed
          duplicate-id pass, vote + commit, the count check. The product never uses FixedSampler.

Slopes are least-squares fits of peak RSS over rows (cases with the same file count) and over files (cases
with the same row count); the extrapolation to 10^8 rows is the largest measured peak plus the per-row slope
times the rows still to go.

    python -m bench.driver_scale                                  # defaults below, about 15-30 min here
    python -m bench.driver_scale --cases 1e5:100 1e6:100 --run 1e5:100 --old 1e5:100   # a quick look
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench import common
from grm_ray.config import JobConfig
from grm_ray.stages import GRMSampler

ROOT = Path(__file__).resolve().parent.parent
ROWS_PER_GROUP = 100_000  # pyarrow's default is up to 1M rows per group; smaller keeps unit splitting honest

DEFAULT_CASES = ["1e5:100", "1e6:100", "1e7:100", "1e6:10000", "1e7:10000"]
DEFAULT_RUN = ["1e5:100"]
JOB_DEFAULTS = {name: JobConfig.model_fields[name].default for name in ("unit_rows", "max_units")}
DEFAULT_OLD = ["1e5:100", "1e6:100", "1e6:10000"]


def parse_case(s: str) -> tuple[int, int]:
    rows, files = (s.split(":") + [""])[:2]
    return int(float(rows)), int(float(files or 100))


def group_rows(s: str) -> int:
    """A case's rows per row group: ROWS:FILES:GROUP_ROWS, default ROWS_PER_GROUP."""
    parts = s.split(":")
    return int(float(parts[2])) if len(parts) > 2 else ROWS_PER_GROUP


def case_dir(data: Path, rows: int, files: int, groups: int = ROWS_PER_GROUP) -> Path:
    return data / (f"in-{rows}-{files}" + ("" if groups == ROWS_PER_GROUP else f"-g{groups}"))


# ---- inputs and committed parts ---------------------------------------------------------------------------

def write_inputs(data: Path, rows: int, files: int, groups: int = ROWS_PER_GROUP) -> Path:
    """R rows of DPO preference data over F Parquet files in row groups of `groups` rows (written once; a
    `.done` marker says complete)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    d = case_dir(data, rows, files, groups)
    if (d / ".done").exists():
        return d
    d.mkdir(parents=True, exist_ok=True)
    per = -(-rows // files)
    t0 = time.time()
    for i in range(files):
        n = min(per, rows - i * per)
        if n <= 0:
            break
        r = pc.cast(pa.array(range(i * per, i * per + n)), pa.string())
        join = lambda *xs: pc.binary_join_element_wise(*xs, "")  # noqa: E731
        table = pa.table({
            "id": join(f"f{i}-", r),
            "prompt": join("What is the sum of the numbers in row ", r, "? Explain briefly."),
            "chosen": join("The answer for row ", r, " is computed step by step."),
            "rejected": join("I think row ", r, " has no answer."),
        })
        pq.write_table(table, d / f"part-{i:05d}.parquet", row_group_size=groups)
    (d / ".done").write_text(json.dumps({"rows": rows, "files": files, "seconds": round(time.time() - t0, 1)}))
    return d


def write_committed(data: Path, rows: int, files: int, groups: int = ROWS_PER_GROUP, rows_per_part: int = 4096) -> Path:
    """An output holding committed parts for the first half of each file's rows, as a run interrupted midway
    would leave it (parts of rows_per_part rows, one job record)."""
    import pyarrow as pa

    from grm_ray import plan, storage

    out = data / ("out-" + case_dir(data, rows, files, groups).name.replace("in-", "resume-", 1))
    if (out / ".done").exists():
        return out
    inp = write_inputs(data, rows, files, groups)
    cfg = JobConfig(input=str(inp), output=str(out))
    inputs = plan.scan_inputs(cfg)
    prints = {f.key: f.fingerprint for f in inputs.files}
    fs, out_dir = storage.filesystem(str(out))
    storage.make_output_dir(fs, out_dir)
    storage.write_json(fs, str(out / storage.JOB_FILE), {"config": cfg.public(), "status": "running"})
    pending: list[str] = []

    def flush() -> None:
        table = pa.table({"source": pending})
        storage.write_part(fs, out_dir, table, {}, plan.part_record(pending, prints))
        pending.clear()

    for f in inputs.files:
        for r in range(f.rows // 2):
            pending.append(f"{f.key}#{r}")
            if len(pending) == rows_per_part:
                flush()
    if pending:
        flush()
    (out / ".done").write_text("")
    return out


# ---- one measurement, in a fresh process -------------------------------------------------------------------

# Each runs as `python -c CODE ARGS...` so the old checkout's grm_ray is the one imported there; prints JSON.
_PRELUDE = """
import json, os, sys, time
def rss(): return int(open('/proc/self/statm').read().split()[1]) * os.sysconf('SC_PAGE_SIZE')
def peak():  # VmHWM, not ru_maxrss: a child's ru_maxrss starts at its parent's peak (kept across exec)
    return next(int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith('VmHWM:'))
"""

PLAN_NEW = _PRELUDE + """
from grm_ray import plan, storage
from grm_ray.config import JobConfig
inp, out = sys.argv[1], sys.argv[2]
cfg = JobConfig(input=inp, output=out)
fs, out_dir = storage.filesystem(out)
storage.make_output_dir(fs, out_dir)
base, t0 = rss(), time.time()
inputs = plan.scan_inputs(cfg); t1 = time.time()
led = plan.read_ledger(fs, out_dir); t2 = time.time()
p = plan.make_plan(cfg, inputs, led); t3 = time.time()
print(json.dumps({"base_rss": base, "peak_rss": peak(), "seconds": round(t3 - t0, 2),
                  "steps": {"scan_inputs": round(t1 - t0, 2), "read_ledger": round(t2 - t1, 2),
                            "make_plan": round(t3 - t2, 2)},
                  "rows": inputs.total_rows, "files": len(inputs.files), "units": len(p.units),
                  "committed": led.rows, "skipped": p.skipped_rows}))
"""

PLAN_OLD = _PRELUDE + """
from grm_ray import pipeline
from grm_ray.config import JobConfig
inp, out = sys.argv[1], sys.argv[2]
cfg = JobConfig(input=inp, output=out)
base, t0 = rss(), time.time()
fs, out_dir, done = pipeline._prepare_output(cfg); t1 = time.time()
p = pipeline.plan(cfg, done); t2 = time.time()
print(json.dumps({"base_rss": base, "peak_rss": peak(), "seconds": round(t2 - t0, 2),
                  "steps": {"prepare_output (reads committed sources)": round(t1 - t0, 2),
                            "plan": round(t2 - t1, 2)},
                  "rows": p.total_rows, "units": len(p.units), "committed": len(done), "skipped": p.skipped_rows}))
"""

RUN_NEW = _PRELUDE + """
import functools, threading
from grm_ray import pipeline
from grm_ray.config import JobConfig
from bench.driver_scale import FixedSampler
inp, out = sys.argv[1], sys.argv[2]
batch_size, keep = int(os.environ["BENCH_BATCH_SIZE"]), os.environ["BENCH_KEEP_STATS"]
cfg = JobConfig(input=inp, output=out, k=1, batch_size=batch_size, overwrite=True, device="cpu",
                unit_rows=int(os.environ["BENCH_UNIT_ROWS"]), max_units=int(os.environ["BENCH_MAX_UNITS"]))
if keep == "all":  # the baseline: Ray Data's own per-block stats, unbounded (ray#66016)
    pipeline.BLOCK_STATS_KEEP = None
base = rss()
for attempt in range(3):  # a raylet may miss Ray's fixed 30 s start-up wait on a machine this loaded
    try:
        pipeline.init_ray(cfg)
        break
    except Exception as e:
        import ray; ray.shutdown(); print('ray start-up failed, retrying:', e, file=sys.stderr)
ray_base, t0 = rss(), time.time()
trace, done = [], threading.Event()
def sample():  # RSS in MiB every 3 s: what is held at the start (read-ahead) vs what accumulates per unit
    while not done.wait(3):
        trace.append((round(time.time() - t0), rss() >> 20))
threading.Thread(target=sample, daemon=True).start()
pipeline.build = functools.partial(pipeline.build, grm_stage=FixedSampler)
s = pipeline.run(cfg)
done.set()
print(json.dumps({"base_rss": base, "after_ray_init_rss": ray_base, "peak_rss": peak(),
                  "seconds": round(time.time() - t0, 2), "rows": s["rows"], "parts": s["parts"],
                  "new_rows": s["new_rows"], "rss_trace_mib": trace[::max(1, len(trace) // 40)]}))
"""

BLOCKS = _PRELUDE + """
import gc, ray
from grm_ray import pipeline
keep, blocks = sys.argv[1], int(sys.argv[2])
ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
ray.data.DataContext.get_current().enable_progress_bars = False
pipeline.bound_block_stats(None if keep == "all" else int(keep))
ds = ray.data.range(blocks * 256, override_num_blocks=blocks)
for _ in range(3):
    ds = ds.map_batches(lambda b: b, batch_size=32)
n = 0
for _ in ds.iter_batches(batch_size=None):
    n += 1
    if n == 1000:
        gc.collect(); r0 = rss()
gc.collect()
print(json.dumps({"base_rss": r0, "peak_rss": peak(), "seconds": 0, "blocks": n,
                  "bytes_per_block": round((rss() - r0) / (n - 1000))}))
"""


def measure(code: str, args: list[str], pythonpath: Path, log: Path, **env_over: str) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": f"{pythonpath}:{ROOT}" if pythonpath != ROOT else str(ROOT), **env_over}
    with open(log, "w") as f:
        proc = subprocess.run([sys.executable, "-c", code, *args], cwd=pythonpath, env=env,
                              stdout=subprocess.PIPE, stderr=f, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"measurement failed (exit {proc.returncode}); see {log}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["load_avg"] = [round(x, 1) for x in os.getloadavg()]
    return out


class FixedSampler:
    """The bench's GRM stage: one fixed valid sample per row (scores 8 for the first response, 3 for the
    others), no engine, so a run measures the streaming machinery and the driver alone. Never used by the
    product."""

    needs, adds = GRMSampler.needs, GRMSampler.adds

    def __init__(self, cfg: Any):
        self.cfg = cfg

    async def acall(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return self(rows)

    def __call__(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        out = []
        for r in rows:
            if r["error"] is not None:
                out.append({"samples": None, "error": r["error"]})
                continue
            n = len(r["responses"])
            scores = [8] + [3] * (n - 1)
            out.append({"samples": [{"order": list(range(n)), "text": f"\\boxed{{{', '.join(map(str, scores))}}}",
                                     "scores": scores, "valid": True, "meta_score": None, "kept": False,
                                     "repaired": False, "hinted": False, "n_tokens": 8}],
                        "error": None})
        return out


# ---- fits and report ---------------------------------------------------------------------------------------

def slope(points: list[tuple[float, float]]) -> tuple[float, float] | None:
    """Least squares y = a + b x over the points: (a, b); None with fewer than two distinct x."""
    if len({x for x, _ in points}) < 2:
        return None
    n = len(points)
    mx, my = sum(x for x, _ in points) / n, sum(y for _, y in points) / n
    b = sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x, _ in points)
    return my - b * mx, b


def fits(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Per kind: bytes per row (fit over rows at each file count), bytes per file (over files at each row
    count), and the 10^8-row extrapolation from the per-row fit at the largest file count."""
    out: dict[str, Any] = {}
    for kind, cases in results.items():
        pts = [(parse_case(c), r["peak_rss"]) for c, r in cases.items() if "peak_rss" in r]
        by_files: dict[int, list] = {}
        by_rows: dict[int, list] = {}
        for (rows, files), y in pts:
            by_files.setdefault(files, []).append((rows, y))
            by_rows.setdefault(rows, []).append((files, y))
        per_row = {f: slope(p) for f, p in sorted(by_files.items()) if slope(p)}
        per_file = {r: slope(p) for r, p in sorted(by_rows.items()) if slope(p)}
        k: dict[str, Any] = {
            "bytes_per_row": {f"{f} files": round(b, 2) for f, (a, b) in per_row.items()},
            "bytes_per_file": {f"{r} rows": round(b, 1) for r, (a, b) in per_file.items()}}
        # 10^8 rows: the largest measured peak at each file count plus its per-row slope (if positive) times
        # the rows still to go; a fit's intercept alone would let allocator noise (tens of MiB) decide
        k["peak_rss_at_1e8_rows_GiB"] = {
            f"{f} files": round((max(y for _, y in by_files[f]) + max(0.0, b) * (1e8 - max(x for x, _ in by_files[f])))
                                / 2**30, 2) for f, (a, b) in per_row.items()}
        out[kind] = k
    return out


def markdown(res: dict[str, Any]) -> str:
    mib = lambda b: f"{b / 2**20:.0f}"  # noqa: E731
    lines = ["| what | rows | files | peak RSS MiB | over import baseline MiB | seconds | units | load (1 min) |",
             "|---|---|---|---|---|---|---|---|"]
    for kind, cases in res["results"].items():
        for c, r in cases.items():
            rows, files = parse_case(c)
            if "peak_rss" not in r:
                lines.append(f"| {kind} | {rows:.0e} | {files} | not measured: {r.get('skipped')} | | | | |")
                continue
            lines.append(f"| {kind} | {rows:.0e} | {files} | {mib(r['peak_rss'])} | "
                         f"{mib(r['peak_rss'] - r['base_rss'])} | {r['seconds']} | {r.get('units', '')} | "
                         f"{r['load_avg'][0]} |")
    lines += ["", "Fits of peak RSS (least squares): " + "; ".join(
        f"**{kind}**: {v['bytes_per_row']} bytes/row, {v['bytes_per_file']} bytes/file"
        + (f", extrapolated to 10^8 rows {v['peak_rss_at_1e8_rows_GiB']} GiB" if v.get("peak_rss_at_1e8_rows_GiB")
           else "") for kind, v in res["fits"].items())]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="/tmp/grm-driver-scale", help="where inputs and outputs are written (reused)")
    p.add_argument("--cases", nargs="*", default=DEFAULT_CASES,
                   help="ROWS:FILES[:GROUP_ROWS] cases for plan and resume (GROUP_ROWS: rows per row group, "
                        "default 100000; such cases are reported as their own kind, plan_groupsN)")
    p.add_argument("--src", default=None, metavar="DIR",
                   help="measure the --cases plans with the grm_ray of this checkout (a `git worktree` of an "
                        "earlier commit, from plan.py on), reported as kind@DIRNAME: a before/after pair")
    p.add_argument("--run", nargs="*", default=DEFAULT_RUN, help="ROWS:FILES cases for a whole run (FixedSampler)")
    p.add_argument("--run-batch-size", type=int, default=32, help="batch_size of the whole runs (the default)")
    p.add_argument("--run-unit-rows", type=int, default=JOB_DEFAULTS["unit_rows"],
                   help="unit_rows of the whole runs; small units give many blocks for few rows, so the "
                        "driver's bytes per unit show in a short run (default: the job's)")
    p.add_argument("--run-max-units", type=int, default=JOB_DEFAULTS["max_units"],
                   help="max_units of the whole runs (default: the job's)")
    p.add_argument("--run-ray-stats", action="store_true",
                   help="also run each --run case with Ray Data's per-block stats unbounded (before the cap)")
    p.add_argument("--block-stats", type=int, default=0, metavar="BLOCKS",
                   help="also measure the driver bytes Ray Data keeps per block, with and without the cap")
    p.add_argument("--old", nargs="*", default=DEFAULT_OLD, help="ROWS:FILES cases for the old code's plan")
    p.add_argument("--old-ref", default="9e34011", help="the commit before the change")
    p.add_argument("--old-checkout", default="/tmp/old-grm", help="a worktree of --old-ref (made if missing)")
    p.add_argument("--no-resume", action="store_true", help="skip the resume measurements")
    p.add_argument("--fresh", action="store_true", help="drop the figures saved by earlier runs")
    args = p.parse_args()
    data = Path(args.data)
    logs = data / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    old = Path(args.old_checkout)
    if args.old and not (old / "grm_ray").exists():
        subprocess.run(["git", "worktree", "add", "--detach", str(old), args.old_ref], cwd=ROOT, check=True)
    res: dict[str, Any] = {"machine": common.machine(), "command": "python -m bench.driver_scale " + " ".join(
        sys.argv[1:]), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "results": {}}
    if not args.fresh:  # a partial run (say --cases --old --run 1e6:100) adds to the figures already saved
        res["results"] = common.load_results().get("driver_scale", {}).get("results", {})

    def record(kind: str, case: str, code: str, inp: Path, out: Path, path: Path, **env: str) -> None:
        print(f"[driver_scale] {kind} {case} ...", flush=True)
        r = measure(code, [str(inp), str(out)], path, logs / f"{kind}-{case.replace(':', '-')}.log", **env)
        res["results"].setdefault(kind, {})[case] = r
        print(f"[driver_scale] {kind} {case}: peak RSS {r['peak_rss'] / 2**20:.0f} MiB, {r['seconds']} s, "
              f"load {r['load_avg'][0]}", flush=True)
        common.save_results("driver_scale", {**res, "fits": fits(res["results"])})

    import shutil

    src = Path(args.src) if args.src else ROOT
    at = f"@{src.name}" if args.src else ""
    for (fresh_kind, resume_kind), cases, code, path in [(("plan", "resume"), args.cases, PLAN_NEW, src),
                                                          (("old", "old_resume"), args.old, PLAN_OLD, old)]:
        for case in cases:
            rows, files = parse_case(case)
            g = group_rows(case)
            kinds = [k + ("" if g == ROWS_PER_GROUP else f"_groups{g}") + (at if code is PLAN_NEW else "")
                     for k in (fresh_kind, resume_kind)]
            inp = write_inputs(data, rows, files, g)
            fresh = data / f"out-{kinds[0]}-{rows}-{files}"
            shutil.rmtree(fresh, ignore_errors=True)
            record(kinds[0], case, code, inp, fresh, path)
            if not args.no_resume:
                record(kinds[1], case, code, inp, write_committed(data, rows, files, g), path)
    for case in args.run:
        rows, files = parse_case(case)
        units = ("" if args.run_unit_rows == JOB_DEFAULTS["unit_rows"] else f"_units{args.run_unit_rows}") + (
            "" if args.run_max_units == JOB_DEFAULTS["max_units"] else f"_max{args.run_max_units}")
        for kind, keep in [("run" + units, "bounded")] + ([("run_ray_stats" + units, "all")] if args.run_ray_stats
                                                           else []):
            record(kind, case, RUN_NEW, write_inputs(data, rows, files), data / f"out-run-{rows}-{files}", ROOT,
                   BENCH_BATCH_SIZE=str(args.run_batch_size), BENCH_KEEP_STATS=keep,
                   BENCH_UNIT_ROWS=str(args.run_unit_rows), BENCH_MAX_UNITS=str(args.run_max_units))
    if args.block_stats:  # Ray Data's per-block driver state alone: three map operators, 256-row blocks
        for keep in ("all", "1000"):
            r = measure(BLOCKS, [keep, str(args.block_stats)], ROOT, logs / f"blocks-{keep}.log")
            res.setdefault("block_stats", {})[keep] = r
            print(f"[driver_scale] {args.block_stats} blocks x 3 operators, block stats kept: {keep}: "
                  f"{r['bytes_per_block']} bytes per block retained on the driver", flush=True)
    res["fits"] = fits(res["results"])
    common.save_results("driver_scale", res)
    print(markdown(res))


if __name__ == "__main__":
    main()

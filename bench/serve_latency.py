"""6. Online scoring: p50 / p95 latency and throughput of `grm-ray serve` for 1, 4 and 16 concurrent clients,
this checkout against a baseline checkout of the code (e.g. main before the async engine), in one run.

Each side is `python -m grm_ray.cli serve` started from its own source tree (PYTHONPATH) with the same options
(the tiny GRM on CPU, no meta RM, free decoding); the same client load then runs against each: C clients
each sending requests back to back (distinct prompts, k samples) until R requests are answered.

    git -C /work/main archive main | (mkdir -p /tmp/grm-main && tar -x -C /tmp/grm-main)
    python -m bench.serve_latency --baseline-src /tmp/grm-main --clients 1 4 16 --k 4 --max-tokens 48
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import requests

from bench import common


def start(src: Path, model: str, port: int, args: argparse.Namespace, log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(src), "HF_HUB_OFFLINE": "1", "VLLM_LOGGING_LEVEL": "WARNING"}
    env.pop("GRM_RAY_TOKEN", None)
    kwargs = json.dumps({"enforce_eager": True, "kv_cache_memory_bytes": 256 << 20})
    cmd = [sys.executable, "-m", "grm_ray.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
           "--model", model, "--k", str(args.k), "--max-tokens", str(args.max_tokens), "--max-model-len", "1024",
           "--meta-mode", "none", "--gpus-per-actor", "0", "--gpu-memory-utilization", "0.1",
           "--engine-kwargs", kwargs, "--batch-size", "16"]
    out = open(log, "w")
    return subprocess.Popen(cmd, cwd=src, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def wait_up(url: str, proc: subprocess.Popen, log: Path, timeout: float = 900) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"serve exited: {log.read_text()[-2000:]}")
        try:
            if requests.get(url + "/healthz", timeout=2).ok:
                # one request end to end: the engine is warm before the clock starts
                requests.post(url + "/score", json={"prompt": "warm up", "responses": ["a", "b"]}, timeout=600)
                return
        except requests.RequestException:
            pass
        time.sleep(2)
    raise RuntimeError(f"serve did not come up in {timeout:.0f} s: {log.read_text()[-2000:]}")


def load(url: str, clients: int, total: int, tag: str) -> dict[str, Any]:
    """`clients` threads send requests back to back until `total` are answered; latency per request."""
    latencies: list[float] = []
    counter = iter(range(total))

    def client() -> None:
        for i in counter:
            body = {"prompt": f"{tag} question {i}: which answer is better?", "responses": ["Yes.", "No."]}
            t0 = time.perf_counter()
            r = requests.post(url + "/score", json=body, timeout=900)
            r.raise_for_status()
            latencies.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        for f in [pool.submit(client) for _ in range(clients)]:
            f.result()
    wall = time.perf_counter() - t0
    qs = statistics.quantiles(latencies, n=20, method="inclusive")
    return {"clients": clients, "requests": len(latencies), "p50_s": statistics.median(latencies),
            "p95_s": qs[18], "throughput_rps": len(latencies) / wall, "wall_s": wall}


def side(name: str, src: Path, model: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    port = common_free_port()
    log = Path(args.workdir) / "logs" / f"serve-{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    proc = start(src, model, port, args, log)
    url = f"http://127.0.0.1:{port}"
    try:
        t0 = time.monotonic()
        wait_up(url, proc, log)
        print(f"[serve] {name}: up in {time.monotonic() - t0:.0f} s", flush=True)
        out = []
        for c in args.clients:
            r = load(url, c, max(args.requests, 2 * c), name)
            out.append(r)
            print(f"[serve] {name} {c} clients: p50 {r['p50_s']:.2f} s, p95 {r['p95_s']:.2f} s, "
                  f"{r['throughput_rps']:.2f} req/s", flush=True)
        return out
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(120)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def common_free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--baseline-src", required=True, help="source tree of the code to compare against")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--requests", type=int, default=8, help="requests per level (at least 2 x clients)")
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--model", default="tiny")
    p.add_argument("--workdir", default="/tmp/grm-ray-bench")
    p.add_argument("--async-first", action="store_true", help="run this checkout first (load drift shows)")
    args = p.parse_args()
    model, _ = common.resolve_model(args.model, args.workdir)
    res = {"command": "python -m bench.serve_latency " + " ".join(sys.argv[1:]), "machine": common.machine(),
           "settings": {"k": args.k, "max_tokens": args.max_tokens, "model": args.model, "structured": False}}
    sides = {"baseline": Path(args.baseline_src).resolve(), "async": common.ROOT}
    for name in (["async", "baseline"] if args.async_first else ["baseline", "async"]):
        res[name] = side(name, sides[name], model, args)
    common.save_results("serve_latency", res)
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()

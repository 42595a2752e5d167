"""Reading Parquet through fsspec file objects: `storage.read_parquet` (the calling thread, no Arrow pools:
no abort at interpreter exit) against the `pq.read_table(f)` it replaced, on the same files, alternating.

    python -m bench.read_parquet --dir /tmp/grm-driver-scale/in-1000000-100 --rounds 3

Prints and saves (bench/results.json, `read_parquet`) seconds per pass and the ratio new / old.
"""
from __future__ import annotations

import argparse
import time

import fsspec
import pyarrow.parquet as pq

from bench import common
from grm_ray.storage import read_parquet


def one_pass(fs, files: list[str], read) -> float:
    t0 = time.perf_counter()
    for p in files:
        with fs.open(p, "rb") as f:
            read(f)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dir", required=True, help="a directory of Parquet files (e.g. bench.driver_scale's inputs)")
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    fs = fsspec.filesystem("file")
    files = sorted(fs.glob(f"{a.dir}/**/*.parquet"))
    sides = {"pq.read_table": lambda f: pq.read_table(f), "storage.read_parquet": read_parquet}
    times: dict[str, list[float]] = {k: [] for k in sides}
    one_pass(fs, files, read_parquet)  # warm the page cache
    for _ in range(a.rounds):
        for name, read in sides.items():
            times[name].append(round(one_pass(fs, files, read), 3))
    ratio = min(times["storage.read_parquet"]) / min(times["pq.read_table"])
    res = {"dir": a.dir, "files": len(files), "seconds": times, "new_over_old_best": round(ratio, 3),
           "machine": common.machine()}
    common.save_results("read_parquet", res)
    print(res)


if __name__ == "__main__":
    main()

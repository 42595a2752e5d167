"""One rejective fine-tuning round (SPCT stage 1) of the demo model, measured before and after.

Steps, each a `grm-ray` command run as a user would (a finished step is skipped on a rerun):
1. the shared HH-RLHF rows -> Parquet; rows [0, train) are training items, [eval_from, eval_from + held) held out;
2. the base model samples trajectories on the training items, half of them hinted (the paper's hinted sampling);
3. `export-rft` keeps the correct trajectories of items that are not too easy;
4. `train rft --lora` fine-tunes the base model on them (LoRA merged into a plain model directory);
5. the held-out pairs are scored by the base model and by the trained one: strict and tie-broken accuracy, ties.

    python -m bench.spct_rft --train 48 --held 48 --k 4 --workdir /tmp/spct-bench

The figures go to WORKDIR/results.json; the documented run is in bench/RESULTS_SPCT.md.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HH = Path(os.environ.get("GRM_RAY_SHARED", "/work/shared")) / "data" / "hh_rlhf_harmless_test_first300.jsonl"


def cli(*args: str, log: Path) -> float:
    """Run `grm-ray ARGS` from this checkout; returns the wall seconds; raises with the log's tail on failure."""
    t0 = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
           "VLLM_LOGGING_LEVEL": "WARNING", "HF_HUB_OFFLINE": "1"}
    with open(log, "a") as f:
        f.write(f"\n$ grm-ray {' '.join(args)}\n")
        f.flush()
        rc = subprocess.call([sys.executable, "-m", "grm_ray.cli", *args], stdout=f, stderr=subprocess.STDOUT,
                             env=env, cwd=ROOT)
    if rc:
        raise SystemExit(f"grm-ray {args[0]} failed ({rc}); see {log}")
    return time.perf_counter() - t0


def score_args(model: str, k: int, seed: int) -> list[str]:
    """The demo's engine settings (grm_ray/demo.py): structured output, Gemma turn markers, eager, 512 MiB KV."""
    return ["--model", model, "--k", str(k), "--structured", "--max-tokens", "160", "--max-model-len", "2048",
            "--chat-fallback", "gemma", "--batch-size", "8", "--rows-per-file", "16", "--seed", str(seed),
            "--engine-kwargs", json.dumps({"kv_cache_memory_bytes": 512 << 20, "enforce_eager": True})]


def accuracy(scored: Path, like: Path | None = None) -> dict:
    """Pairwise figures of a scored run; with `like`, only the rows (by source) that run also scored."""
    import pyarrow.compute as pc

    from grm_ray.evaluate import evaluate
    from grm_ray.storage import read_table

    table = read_table(str(scored))
    if like is not None:
        table = table.filter(pc.is_in(table.column("source"), read_table(str(like)).column("source")))
    report = evaluate(table)
    pw = report["pairwise"]
    return {"rows": report["rows"], "errors": report["errors"], "pairs": pw["n"], "accuracy": pw["accuracy"],
            "tie_break_accuracy": pw["tie_break_accuracy"], "ties": pw["ties"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--train", type=int, default=48, help="training items (rows 0..train-1; the first half hinted)")
    p.add_argument("--held", type=int, default=48, help="held-out pairs for the before/after evaluation")
    p.add_argument("--eval-from", type=int, default=200, help="first held-out row")
    p.add_argument("--k", type=int, default=4, help="samples per item, sampling and evaluation")
    p.add_argument("--epochs", type=float, default=1.0, help="RFT epochs")
    p.add_argument("--workdir", default="/tmp/spct-bench")
    p.add_argument("--stop-after", choices=["sample", "train"], default=None, help="stop after this step")
    a = p.parse_args()

    import pyarrow as pa
    import pyarrow.parquet as pq

    from grm_ray.devmodels import demo_model

    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    log = work / "log.txt"
    res_file = work / "results.json"
    res = json.loads(res_file.read_text()) if res_file.exists() else {}
    res["settings"] = vars(a)
    save = lambda: res_file.write_text(json.dumps(res, indent=2))  # noqa: E731

    base = str(demo_model())
    rows = [json.loads(line) for line in HH.read_text().splitlines()]
    inputs = {"train_hint": rows[: a.train // 2], "train_plain": rows[a.train // 2: a.train],
              "held": rows[a.eval_from: a.eval_from + a.held]}
    for name, part in inputs.items():
        if not (work / f"{name}.parquet").exists():
            pq.write_table(pa.Table.from_pylist(part), work / f"{name}.parquet")

    steps = res.setdefault("wall_seconds", {})
    for name, hint in (("train_hint", True), ("train_plain", False)):
        out = work / f"scored_{name}"
        if not (out / "_job.json").exists():
            steps[f"sample_{name}"] = cli("score", str(work / f"{name}.parquet"), str(out),
                                          *score_args(base, a.k, 1), *(["--hint"] if hint else []), log=log)
            save()
    if not (work / "held_before" / "_job.json").exists():
        steps["eval_before"] = cli("score", str(work / "held.parquet"), str(work / "held_before"),
                                   *score_args(base, a.k, 2), log=log)
    res["before"] = accuracy(work / "held_before")
    save()
    if a.stop_after == "sample":
        return

    rft = work / "rft"  # one export per scored run; `train rft` reads the whole directory
    for name in ("train_hint", "train_plain"):
        if not (rft / name / "data.parquet").exists():
            steps[f"export_{name}"] = cli("export-rft", str(work / f"scored_{name}"), str(rft / name), log=log)
    res["rft_rows"] = {n: pq.read_table(rft / n / "data.parquet").num_rows for n in ("train_hint", "train_plain")}
    trained = work / "grm-rft"
    if not (trained / "config.json").exists():
        steps["train_rft"] = cli("train", "rft", str(rft), str(trained), "--base", base, "--lora",
                                 "--chat-fallback", "gemma", "--epochs", str(a.epochs), "--max-length", "2048",
                                 "--learning-rate", "1e-4", "--grad-accum", "4", "--save-steps", "4",
                                 log=log)
    save()
    if a.stop_after == "train":
        return
    if not (work / "held_after" / "_job.json").exists():
        steps["eval_after"] = cli("score", str(work / "held.parquet"), str(work / "held_after"),
                                  *score_args(str(trained), a.k, 2), log=log)
    res["after"] = accuracy(work / "held_after")
    res["before_same_rows"] = accuracy(work / "held_before", like=work / "held_after")
    save()
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()

"""`grm-ray demo`: the full pipeline on one machine with packaged data and a model that needs no hub."""
from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

import typer
import pyarrow.parquet as pq

from .config import JobConfig
from .storage import read_table

GPU_COMMAND = """\
grm-ray score s3://my-bucket/prefs/ s3://my-bucket/prefs-scored/ \\
    --model BBQGOD/DeepSeek-GRM-27B --k 32 --grm-actors 4,16 \\
    --meta-mode classifier --meta-model BBQGOD/DeepSeek-GRM-27B-MetaRM --k-meta 16 --meta-actors 1,4"""


def demo_config(output: str, items: int, k: int) -> JobConfig:
    """The embedded default: local Ray, packaged HH-RLHF items, Gemma 3 270M as GRM and yes/no judge."""
    from .devmodels import demo_model

    model = str(demo_model())
    source = resources.files("grm_ray") / "data" / "hh_rlhf_harmless_demo.parquet"
    table = pq.read_table(str(source))
    if not 1 <= items <= table.num_rows:
        raise typer.BadParameter(f"--items must be 1..{table.num_rows}", param_hint="--items")
    input_dir = Path(os.environ.get("GRM_RAY_CACHE", Path.home() / ".cache" / "grm-ray")) / "demo-input"
    input_dir.mkdir(parents=True, exist_ok=True)
    input_path = input_dir / f"hh_rlhf_harmless_first{items}.parquet"
    pq.write_table(table.slice(0, items), input_path)
    return JobConfig(
        input=str(input_path), output=output, model=model, chat_fallback="gemma", structured=True, k=k,
        max_tokens=160, max_model_len=2048, meta_mode="judge", meta_model=model, k_meta=max(1, k // 2),
        batch_size=8, rows_per_file=12, overwrite=True,
        # A fixed 512 MiB KV cache (plenty for 2k-token prompts of a 270M model) instead of a share of RAM;
        # eager mode: torch.compile costs minutes of start-up on 2 cores and gains little at this size.
        engine_kwargs={"kv_cache_memory_bytes": 512 << 20, "enforce_eager": True},
    )


def run_demo(output: str, items: int = 24, k: int = 4) -> None:
    from .cli import run_job

    cfg = demo_config(output, items, k)
    summary = run_job(cfg)  # the progress display; the config and Ray / vLLM output go to the log file
    table = sorted(read_table(output).to_pylist(), key=lambda r: int(r["source"].rsplit("#", 1)[1]))
    correct = sum(r["best_index"] == r["label"] and not r["tie"] for r in table if r["error"] is None)
    scored = sum(r["error"] is None for r in table)
    typer.echo(f"\n{'row':<6}{'rewards':<14}{'best':<6}{'tie':<6}{'kept':<6}best-voted critique")
    for r in table:
        if r["error"]:
            typer.echo(f"{r['source'].split('#')[-1]:<6}error: {r['error']}")
            continue
        kept = [s for s in r["samples"] if s["kept"]]
        critique = " ".join(kept[0]["text"].split())[:70] if kept else ""
        rewards = ", ".join(f"{x:.1f}" for x in r["rewards"])
        typer.echo(f"{r['source'].split('#')[-1]:<6}{rewards:<14}{r['best_index']:<6}{str(r['tie']):<6}"
                   f"{r['n_kept']:<6}{critique}")
    typer.echo(
        f"\nScored {scored}/{len(table)} rows ({summary['generated_tokens']} tokens, "
        f"{summary['wall_seconds']:.0f} s). Output: {summary['output']} (Parquet parts + _job.json).\n"
        f"Chosen response ranked strictly first: {correct}/{scored}.\n\n"
        "Gemma 3 270M is a small base model, not a reward model: this run shows the pipeline (sampling,\n"
        "shuffled orders, meta-guided voting, exactly-once output), not judgment quality. For real labels,\n"
        f"run the DeepSeek-GRM on GPUs, e.g.:\n\n{GPU_COMMAND}\n"
    )

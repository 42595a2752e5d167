"""6. The paper's Reward Bench table from one stored run (the GPU recipe).

One run of k samples per item with meta scores gives every row of the paper's Table 2/3 Reward Bench column:
Voting@1, @k/4, @k and MetaRM@k/4, @k (k = 32: Voting@1/8/32, MetaRM@8/32), each section weighted as
RewardBench weighs it, with the figures of GRM_SPEC section 7 beside them (grm_ray.evaluate.paper_table).
The run is `grm-ray score` itself (resumable: a rerun only prints the table again).

Reward Bench as Parquet (prompt, chosen, rejected, subset, id; read as the dpo format, `subset` kept):
    python -c "from datasets import load_dataset as l; l('allenai/reward-bench', split='filtered').to_parquet('rb.parquet')"
Then, on GPUs (DeepSeek-GRM-27B + MetaRM, k=32, k_meta=16):
    python -m bench.paper --config jobs/configs/deepseek-grm-27b.yaml --input rb.parquet --output rb-scored/
The same table from any stored run: grm-ray eval rb-scored/ --paper
"""
from __future__ import annotations

import argparse
import json
from typing import Any, Sequence


def run_recipe(cfg: Any, seeds: int = 5) -> dict[str, Any]:
    """Score cfg.input into cfg.output (or resume it), then the paper table from the stored samples."""
    from grm_ray.evaluate import paper_table
    from grm_ray.pipeline import run
    from grm_ray.storage import read_table

    if cfg.meta_mode == "none":
        raise SystemExit("bench.paper: MetaRM rows need a meta RM (meta_mode classifier, meta_model ...)")
    summary = run(cfg)
    table = read_table(cfg.output, endpoint_url=cfg.s3_endpoint_url)
    return {"summary": summary, "table": paper_table(table, seeds=seeds, seed=cfg.seed)}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="YAML job config (jobs/configs/deepseek-grm-27b.yaml)")
    p.add_argument("--input", required=True, help="Reward Bench Parquet with a `subset` column")
    p.add_argument("--output", required=True, help="where the scored run is stored")
    p.add_argument("--seeds", type=int, default=5, help="subset draws averaged per Voting@j / MetaRM@j")
    p.add_argument("--json", dest="json_out", help="also write the table as JSON here")
    args = p.parse_args(argv)
    from grm_ray.config import load_config
    from grm_ray.evaluate import format_paper_table

    cfg = load_config(args.config, input=args.input, output=args.output)
    result = run_recipe(cfg, seeds=args.seeds)
    print(format_paper_table(result["table"]), flush=True)
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(result["table"], f, indent=2)
    return result


if __name__ == "__main__":
    main()

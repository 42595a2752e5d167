"""The GPU recipe (bench/paper.py) at tiny size on CPU: one stored run -> the paper's Reward Bench table."""
from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from grm_ray import storage
from grm_ray.evaluate import SECTIONS, paper_table

SUBSETS = ["alpacaeval-easy", "mt-bench-hard", "xstest-should-refuse", "hep-python"]  # one per section


def test_paper_recipe_runs_at_tiny_size(ray_local, tiny_cfg, tiny_models, tmp_path, capsys):
    from bench import paper

    rows = [{"id": f"rb{i}", "prompt": f"Question {i}: name a colour.", "chosen": "Blue.", "rejected": "Seven.",
             "subset": SUBSETS[i % 4]} for i in range(8)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "rb.parquet")
    cfg = tiny_cfg(meta_mode="classifier", meta_model=str(tiny_models["meta"]), k=4, k_meta=2)
    config = {k: v for k, v in cfg.public().items() if k not in ("input", "output")}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(config))
    out = tmp_path / "scored"
    result = paper.main(["--config", str(tmp_path / "job.yaml"), "--input", str(tmp_path / "rb.parquet"),
                         "--output", str(out), "--seeds", "2", "--json", str(tmp_path / "table.json")])
    table = result["table"]
    assert table["items"] == 8 and table["k"] == 4
    assert [(r["method"], r["j"]) for r in table["rows"]] == [("voting", 1), ("voting", 4), ("metarm", 4)]
    for r in table["rows"]:
        assert set(r["sections"]) == set(SECTIONS) and 0 <= r["reward_bench"] <= 1
    stored = storage.read_table(str(out))
    assert stored.column("subset").to_pylist().count("hep-python") == 2  # the input's subset column is kept
    assert paper_table(stored, seeds=2, seed=cfg.seed) == table  # the same table from the stored run alone
    text = capsys.readouterr().out
    assert "| Voting@1 |" in text and "| MetaRM@4 |" in text and "Chat Hard" in text
    assert (tmp_path / "table.json").stat().st_size > 100

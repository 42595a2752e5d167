"""Score the packaged HH-RLHF sample with the tiny models, then evaluate, plot and export from the CLI."""
from __future__ import annotations

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from grm_ray import storage
from grm_ray.cli import app
from grm_ray.pipeline import run

pytestmark = [pytest.mark.engine, pytest.mark.ray]


def test_score_eval_plot_export(ray_local, tiny_cfg, cli_json, tiny_models, tmp_path, hh_table):
    inp = tmp_path / "in"
    inp.mkdir()
    pq.write_table(hh_table.slice(0, 8), inp / "hh.parquet")
    cfg = tiny_cfg(input=str(inp), k=4, meta_mode="classifier", meta_model=str(tiny_models["meta"]), hint=True)
    run(cfg)
    scored = storage.read_table(cfg.output)
    assert scored.num_rows == 8
    assert all(s["hinted"] for r in scored.column("samples").to_pylist() for s in r)
    code, report = cli_json("eval", cfg.output, "--json", "--plot", str(tmp_path / "curves.png"))
    assert code == 0
    # a hinted run: its samples never count towards accuracy, and the report says so
    assert report["rows"] == 8 and report["hinted"] + report["input_errors"] == 8
    assert report["pairwise"] is None and report["curves"]["items"] == 0
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    cli = CliRunner()
    res = cli.invoke(app, ["eval", cfg.output, "--stability"])
    assert res.exit_code == 0 and "HINTED RUN: " in res.stdout and "Stability (winner of the first j" in res.stdout

    # a hinted run's votes repeat its labels: no DPO pair or best-of-n completion comes from it, and it is said
    hinted = sum(r["error"] is None for r in scored.to_pylist())
    for mode, cols in (("pairs", {"prompt", "chosen", "rejected", "margin"}), ("best-of-n", {"prompt", "completion"})):
        res = cli.invoke(app, ["export-dpo", cfg.output, str(tmp_path / mode), "--mode", mode])
        assert res.exit_code == 0, res.output
        assert f"{hinted} hinted rows (--hint showed the GRM the label)" in res.output
        assert pq.read_table(tmp_path / mode / "data.parquet").num_rows == 0
        assert cols <= set(pq.read_schema(tmp_path / mode / "data.parquet").names)

    res = cli.invoke(app, ["export-rft", cfg.output, str(tmp_path / "rft")])
    assert res.exit_code == 0, res.output
    rft = pq.read_table(tmp_path / "rft" / "data.parquet").to_pylist()
    for r in rft:  # a kept trajectory ranks the labelled best (response 0) strictly first, and was hinted
        assert "The best response is: Response" in r["prompt"] and r["completion"]

    res = cli.invoke(app, ["export-meta", cfg.output, str(tmp_path / "meta")])
    assert res.exit_code == 0, res.output
    meta = pq.read_table(tmp_path / "meta" / "data.parquet")
    valid = sum(s["valid"] for r in scored.column("samples").to_pylist() for s in r)
    assert meta.num_rows == valid and set(meta.column("label").to_pylist()) <= {0, 1}

    res = cli.invoke(app, ["eval", str(tmp_path / "nowhere")])
    assert res.exit_code == 2 and "cannot read scored output" in res.output

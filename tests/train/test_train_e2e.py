"""SPCT end to end on the tiny models: score with the real job, export, train each recipe, score again.

The data comes from the pipeline itself (hinted sampling, a classifier meta RM), as a user's would.
"""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from grm_ray import storage
from grm_ray.cli import app
from grm_ray.pipeline import run
from grm_ray.train import SUMMARY_FILE

pytestmark = [pytest.mark.engine, pytest.mark.ray]
pytest.importorskip("trl")
REPO = Path(__file__).resolve().parents[2]
cli = CliRunner()


def invoke(*args: str):
    res = cli.invoke(app, list(args))
    assert res.exit_code == 0, res.output
    return res


def summary(out: Path) -> dict:
    s = json.loads((out / SUMMARY_FILE).read_text())
    losses = [h["loss"] for h in s["log_history"] if "loss" in h]
    assert losses and all(math.isfinite(x) for x in losses), s["log_history"]
    return s


@pytest.fixture(scope="module")
def data(ray_local, tiny_config, tiny_models, tmp_path_factory, hh_table):
    """6 HH-RLHF rows scored by the tiny GRM (hinted, k=4) + tiny meta RM, and their rft / meta exports."""
    root = tmp_path_factory.mktemp("spct")
    (root / "in").mkdir()
    pq.write_table(hh_table.slice(0, 6), root / "in" / "hh.parquet")
    cfg = tiny_config(input=str(root / "in"), output=str(root / "scored"), k=4, max_tokens=48, max_model_len=1024,
                      structured=True, batch_size=8, rows_per_file=8, seed=1, hint=True,
                      meta_mode="classifier", meta_model=str(tiny_models["meta"]))
    run(cfg)
    invoke("export-rft", str(root / "scored"), str(root / "rft"))
    invoke("export-meta", str(root / "scored"), str(root / "meta"))
    assert pq.read_table(root / "rft" / "data.parquet").num_rows > 0
    meta = pq.read_table(root / "meta" / "data.parquet")
    assert set(meta.column("label").to_pylist()) == {0, 1}
    return {"root": root, "input": root / "in", "rft": root / "rft" / "data.parquet",
            "meta": root / "meta" / "data.parquet", "cfg": cfg}


TRAIN = ("--grad-accum", "1", "--max-length", "2048")


def test_rft_resumes_after_a_kill_and_refuses_other_options(data, tiny_models, tmp_path):
    """A run SIGKILLed mid-training resumes from its last complete checkpoint; changed options are refused."""
    out, ckpt = tmp_path / "grm", tmp_path / "grm-checkpoints"
    args = ["train", "rft", str(data["rft"]), str(out), "--base", str(tiny_models["grm"]), *TRAIN,
            "--save-steps", "1"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "grm_ray.cli", *args, "--max-steps", "10000"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 180
        while not list(ckpt.glob("checkpoint-*/trainer_state.json")):
            assert proc.poll() is None and time.time() < deadline, "no checkpoint written"
            time.sleep(0.5)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not (out / "config.json").exists()
    done = max(int(p.parent.name.split("-")[1]) for p in ckpt.glob("checkpoint-*/trainer_state.json"))

    invoke(*args, "--max-steps", str(done + 1))
    s = summary(out)
    assert s["resumed_from"].endswith(f"checkpoint-{done}") and s["global_step"] == done + 1
    assert (ckpt / f"checkpoint-{done + 1}" / "trainer_state.json").exists()
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in out.iterdir()}

    res = cli.invoke(app, [*args, "--max-steps", str(done + 2), "--lora"])
    assert res.exit_code == 2 and "lora: False -> True" in res.output


@pytest.fixture(scope="module")
def trained(data, tiny_models, tmp_path_factory):
    """A LoRA-merged RFT GRM and a LoRA meta RM, each a few steps."""
    root = tmp_path_factory.mktemp("trained")
    invoke("train", "rft", str(data["rft"]), str(root / "grm"), "--base", str(tiny_models["grm"]), *TRAIN,
           "--lora", "--max-steps", "2", "--learning-rate", "1e-3")
    invoke("train", "meta-rm", str(data["meta"]), str(root / "meta"), "--base", str(tiny_models["grm"]), *TRAIN,
           "--lora", "--max-steps", "2", "--batch-size", "2", "--learning-rate", "1e-3")
    return {"grm": root / "grm", "meta": root / "meta"}


def test_lora_is_merged_into_plain_models(trained, tiny_models):
    from safetensors import safe_open

    for name, base in (("grm", tiny_models["grm"]), ("meta", tiny_models["meta"])):
        s = summary(trained[name])
        assert s["global_step"] == 2 and s["resumed_from"] is None
        assert not (trained[name] / "adapter_config.json").exists()
        with safe_open(str(trained[name] / "model.safetensors"), "pt") as f:
            keys = set(f.keys())
        assert not any("lora" in k for k in keys)
        assert json.loads((trained[name] / "config.json").read_text())["dtype"] == "bfloat16"
    with safe_open(str(tiny_models["grm"] / "model.safetensors"), "pt") as f:  # the causal LM's weights, changed
        base_q = f.get_tensor("model.layers.0.self_attn.q_proj.weight")
    with safe_open(str(trained["grm"] / "model.safetensors"), "pt") as f:
        assert not f.get_tensor("model.layers.0.self_attn.q_proj.weight").equal(base_q)
    config = json.loads((trained["meta"] / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"] and len(config["id2label"]) == 1


def test_score_with_the_trained_grm_and_meta_rm(data, trained, tiny_config, tmp_path):
    """The loop closes: `grm-ray score` loads both outputs in vLLM as they are, and the meta RM's logits in the
    job equal the trained classifier's own on the rendering it was trained on (prompts.meta_input)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from grm_ray import prompts

    out = tmp_path / "rescored"
    invoke("score", str(data["input"]), str(out), "--model", str(trained["grm"]), "--k", "2", "--structured",
           "--max-tokens", "48", "--max-model-len", "1024", "--meta-mode", "classifier", "--meta-model",
           str(trained["meta"]), "--batch-size", "8", "--engine-kwargs",
           json.dumps(tiny_config().engine_kwargs))
    rows = storage.read_table(str(out)).to_pylist()
    assert len(rows) == 6 and all(r["error"] is None for r in rows)
    tok = AutoTokenizer.from_pretrained(trained["meta"])
    model = AutoModelForSequenceClassification.from_pretrained(trained["meta"], dtype=torch.float32).eval()
    checked = 0
    for r in rows[:3]:
        for s in r["samples"]:
            chat = prompts.meta_messages(r["messages"], [r["responses"][j] for j in s["order"]], s["text"])
            ids = tok(prompts.meta_input(tok, chat), add_special_tokens=prompts.special_tokens(tok),
                      return_tensors="pt")["input_ids"]
            with torch.no_grad():
                logit = model(input_ids=ids).logits[0, 0].item()
            assert s["meta_score"] == pytest.approx(logit, abs=0.05 + 0.02 * abs(logit)), (s["meta_score"], logit)
            checked += 1
    assert checked >= 6


def test_grpo_rule_reward_only(data, tiny_models, tmp_path):
    """GRPO on the labelled rows themselves (HH format): the rule reward is logged, the KL term is on."""
    out = tmp_path / "grpo"
    invoke("train", "grpo", str(data["input"]), str(out), "--base", str(tiny_models["grm"]), "--grad-accum", "1",
           "--max-steps", "1", "--num-generations", "2", "--max-completion-length", "16")
    s = summary(out)
    step = next(h for h in s["log_history"] if "loss" in h)
    assert -1 <= step["rewards/rule_reward/mean"] <= 1 and set(step) & {"reward", "reward_std"}
    assert "kl" in step and s["config"]["beta"] == 0.08
    assert (out / "config.json").exists()
    # fewer prompts than one step takes: said in grm-ray's words, not TRL's "max_steps must be set"
    res = cli.invoke(app, ["train", "grpo", str(data["input"]), str(tmp_path / "grpo8"), "--base",
                           str(tiny_models["grm"]), "--grad-accum", "8"])
    assert res.exit_code == 2 and "6 usable prompt(s), fewer than one GRPO step takes" in res.output, res.output


def test_meta_rm_on_ray_train_with_s3_checkpoints(data, tiny_models, tmp_path, s3_endpoint, ray_local):
    """Ray Train's TorchTrainer (1 worker) checkpoints to S3; a rerun resumes from Ray's last checkpoint."""
    fs, _ = storage.filesystem("s3://grm-train/x", s3_endpoint)
    fs.mkdir("grm-train")
    out = tmp_path / "meta-ray"
    args = ["train", "meta-rm", str(data["meta"]), str(out), "--base", str(tiny_models["meta"]), *TRAIN,
            "--workers", "1", "--checkpoint-dir", "s3://grm-train/ckpt", "--s3-endpoint-url", s3_endpoint,
            "--save-steps", "1", "--batch-size", "2"]
    invoke(*args, "--max-steps", "1")
    first = summary(out)
    assert first["global_step"] == 1 and first["resumed_from"] is None
    assert fs.find("grm-train/ckpt"), "no checkpoint reached S3"
    invoke(*args, "--max-steps", "2")
    second = summary(out)
    assert second["global_step"] == 2 and second["resumed_from"], second["resumed_from"]

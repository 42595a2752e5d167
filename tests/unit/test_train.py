"""SPCT training data and options, without training: the reward, the orders, the masks, the config."""
from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from grm_ray import prompts
from grm_ray.cli import app
from grm_ray.config import ConfigError
from grm_ray.train import (TrainConfig, encode, grpo_examples, load_train_config, meta_examples, rft_examples,
                           rule_reward_fn, user_prompt)


@pytest.fixture(scope="module")
def tok(tiny_models):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_models["grm"])


def cfg(**over) -> TrainConfig:
    return TrainConfig(**{"data": "d.parquet", "output": "out", "base": "m", **over})


def test_rule_reward_reads_the_shown_order_and_counts_ties_and_junk_as_wrong():
    reward = rule_reward_fn()
    # shown order [1, 0]: the box's first score belongs to response 1
    got = reward(["S: a\nScores: \\boxed{3, 9}", "\\boxed{9, 3}", "\\boxed{5, 5}", "no box", "\\boxed{9, 3}"],
                 label=[0, 0, 0, 0, 1], order=[[1, 0], [1, 0], [1, 0], [0, 1], [0, 1]], n_responses=[2] * 5)
    assert got == [1.0, -1.0, -1.0, -1.0, -1.0]
    conv = reward([[{"role": "assistant", "content": "\\boxed{2, 8, 1}"}]], label=[2], order=[[1, 2, 0]],
                  n_responses=[3])
    assert conv == [1.0]  # response 2 was shown second and scored 8, the strict maximum


def test_grpo_prompts_shuffle_orders_per_item_and_keep_the_label(tok):
    rows = [{"id": f"r{i}", "prompt": f"Question {i}?", "chosen": f"good {i}", "rejected": f"bad {i}"}
            for i in range(16)]
    ex = grpo_examples(rows, tok, cfg(recipe="grpo", max_length=4096, max_completion_length=64))
    assert len(ex) == 16 and {tuple(e["order"]) for e in ex} == {(0, 1), (1, 0)}
    for i, e in enumerate(ex):
        shown = [[f"good {i}", f"bad {i}"][j] for j in e["order"]]
        assert e["label"] == 0 and e["n_responses"] == 2
        assert e["prompt"] == user_prompt(tok, prompts.render_grm_prompt(f"Question {i}?", shown), "plain")
    again = grpo_examples(rows, tok, cfg(recipe="grpo", max_completion_length=64))
    assert [e["order"] for e in again] == [e["order"] for e in ex]  # seeded like scoring: reruns repeat
    with pytest.raises(ValueError, match="row 1"):
        grpo_examples([rows[0], {"prompt": "q", "chosen": None, "rejected": "b"}], tok,
                      cfg(recipe="grpo", max_completion_length=64))


def test_rft_examples_put_the_loss_on_the_trajectory_only(tok):
    rows = [{"prompt": "Judge these.", "completion": "Scores: \\boxed{8, 2}"},
            {"prompt": [{"role": "user", "content": "Judge."}],
             "completion": [{"role": "assistant", "content": "\\boxed{1, 9}"}]},
            {"prompt": "x " * 3000, "completion": "too long"}]
    ex = rft_examples(rows, tok, cfg(max_length=1024))
    assert len(ex) == 2  # the over-long row is skipped, not truncated
    for e, user, reply in zip(ex, ("Judge these.", "Judge."), ("Scores: \\boxed{8, 2}", "\\boxed{1, 9}")):
        prompt = encode(tok, user_prompt(tok, user, "plain"))
        assert e["input_ids"][: len(prompt)] == prompt and e["input_ids"][-1] == tok.eos_token_id
        assert e["completion_mask"] == [0] * len(prompt) + [1] * (len(e["input_ids"]) - len(prompt))
        assert tok.decode(e["input_ids"][len(prompt):-1]) == reply
    with pytest.raises(ValueError, match="export-rft"):
        rft_examples([{"text": "x"}], tok, cfg())


def test_meta_examples_render_as_the_meta_engine_does(tok):
    chat = prompts.meta_messages("Q?", ["a", "b"], "Scores: \\boxed{9, 1}")
    ex = meta_examples([{"messages": chat, "label": 1}, {"messages": chat, "label": 0}], tok, cfg(recipe="meta-rm"))
    assert [e["labels"] for e in ex] == [1.0, 0.0]
    assert ex[0]["input_ids"] == tok(prompts.meta_input(tok, chat), add_special_tokens=False)["input_ids"]


def test_config_rejects_misplaced_and_unknown_options(tmp_path):
    with pytest.raises(ValueError, match="beta: grpo option"):
        cfg(recipe="rft", beta=0.1)
    with pytest.raises(ValueError, match="s3:// checkpoints need workers"):
        cfg(checkpoint_dir="s3://b/ckpt")
    assert cfg(recipe="grpo").beta == 0.08 and cfg().checkpoints == "out-checkpoints"
    assert cfg(recipe="grpo").lr == 1e-6 and cfg(learning_rate=3e-4).lr == 3e-4
    (tmp_path / "t.yaml").write_text("recipe: rft\nbase: m\nlora: true\nepochs: 2\n")
    got = load_train_config(tmp_path / "t.yaml", epochs=3, data="d", output="o")
    assert got.lora and got.epochs == 3
    (tmp_path / "bad.yaml").write_text("recipe: rft\nlora_rank: 8\n")
    with pytest.raises(ConfigError, match="lora_rank: .*unknown key"):
        load_train_config(tmp_path / "bad.yaml")


def test_cli_needs_a_base_model_and_names_bad_data(tmp_path):
    cli = CliRunner()
    res = cli.invoke(app, ["train", "rft", "d.parquet", str(tmp_path / "o")])
    assert res.exit_code == 2 and "--base" in res.output
    res = cli.invoke(app, ["train", "meta-rm", str(tmp_path / "missing"), str(tmp_path / "o"), "--base", "m"])
    assert res.exit_code == 2 and "missing" in res.output
    data = tmp_path / "rft.parquet"
    pq.write_table(pa.table({"prompt": ["q"], "completion": ["c"]}), data)
    res = cli.invoke(app, ["train", "rft", str(data), str(tmp_path / "o"), "--base", str(tmp_path / "nomodel")])
    assert res.exit_code == 2 and "cannot load the base model" in res.output and "nomodel" in res.output
    res = cli.invoke(app, ["train", "rft", "d", "o", "--base", "m", "--beta", "0.1"])
    assert res.exit_code != 0  # grpo-only options are not offered by the other recipes


def test_read_rows_gives_every_row_of_every_file_in_file_order(tmp_path):
    from grm_ray.train import read_rows

    for i in range(5):  # files read on a thread pool; rows must still come back whole and in file order
        pq.write_table(pa.table({"prompt": [f"q{i}-{j}" for j in range(3)], "completion": ["c"] * 3}),
                       tmp_path / f"part-{i:02d}.parquet")
    (tmp_path / "_SUCCESS").write_text("")
    rows = read_rows(str(tmp_path))
    assert [r["prompt"] for r in rows] == [f"q{i}-{j}" for i in range(5) for j in range(3)]
    assert read_rows(str(tmp_path / "part-03.parquet"))[0] == {"prompt": "q3-0", "completion": "c"}


def test_a_missing_data_path_is_refused_before_the_checkpoint_directory_is_made(tmp_path):
    from grm_ray.train import train

    out = tmp_path / "out"
    with pytest.raises(FileNotFoundError, match="missing.parquet does not exist"):
        train(cfg(data=str(tmp_path / "missing.parquet"), output=str(out)))
    assert list(tmp_path.iterdir()) == []  # no OUTPUT-checkpoints/_run_config.json left behind

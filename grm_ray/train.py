"""Self-Principled Critique Tuning (GRM_SPEC section 8): train a GRM and a meta RM from the job's own output.

Three recipes, each on TRL / transformers, in this process or on Ray Train (`TorchTrainer`, N workers):
- rft:     SFT on `export-rft` trajectories: user turn = the GRM prompt, assistant turn = the trajectory,
           loss on the assistant turn only (TRL SFTTrainer on pre-tokenised ids + completion mask).
- grpo:    TRL GRPOTrainer on labelled preference rows shown in the GRM prompt; the only reward is
           export.rule_reward (+1 labelled best strictly highest, else -1: ties and unparseable included).
- meta-rm: a one-logit sequence classifier with binary cross-entropy on `export-meta` rows.

Prompts are rendered and tokenised exactly as the scoring engines do (prompts.apply_chat_template /
prompts.meta_input / prompts.special_tokens), so the output directory plugs into `grm-ray score --model DIR`
(or `--meta-mode classifier --meta-model DIR`) unchanged. LoRA is merged into a plain model by default.

Checkpoints: in this process (workers 0) under a local `checkpoint_dir`; on Ray Train in its storage
(local or s3://), persisted by Ray. A rerun of the same command resumes from the last checkpoint.
"""
from __future__ import annotations

import json
import logging
import math
import os
import posixpath
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator

from . import prompts
from .config import load_into

log = logging.getLogger(__name__)

RECIPES = ("rft", "grpo", "meta-rm")
SUMMARY_FILE = "_train.json"  # beside the weights: resolved config, resumed checkpoint, steps, loss log
INSTALL_HINT = 'training needs TRL and PEFT: pip install -e ".[train]"'
DEFAULT_LR = {"rft": 1e-5, "grpo": 1e-6, "meta-rm": 1e-5}
# DeepSeek-GRM's RL stage keeps the output format with a larger KL term instead of a format reward
# (GRM_SPEC 8). 0.08 is the coefficient we recall from the paper's implementation details (twice
# DeepSeekMath's GRPO 0.04; TRL's own default is 0, no KL and no reference model).
PAPER_BETA = 0.08


class TrainConfig(BaseModel):
    """Everything one `grm-ray train RECIPE` run needs; saved resolved beside the trained model."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    recipe: Literal["rft", "grpo", "meta-rm"] = Field("rft", description="What to train.")
    data: str = Field("", description="Parquet file, directory, glob or s3:// URI of training rows.")
    output: str = Field("", description="Directory (or s3:// URI) for the trained Hugging Face model.")
    base: str = Field("", description="Model to start from: a name or local path.")
    # model
    lora: bool = Field(False, description="Train LoRA adapters instead of every weight.")
    lora_r: int = Field(16, ge=1, description="LoRA rank.")
    lora_alpha: int = Field(32, ge=1, description="LoRA scaling alpha.")
    lora_dropout: float = Field(0.05, ge=0, lt=1, description="LoRA dropout.")
    lora_targets: str = Field("all-linear", description="LoRA target modules: all-linear or a comma list.")
    merge: bool = Field(True, description="Merge LoRA into a plain model dir that vLLM loads as is; --no-merge "
                        "saves only the PEFT adapter (`grm-ray score` needs the merged model).")
    chat_fallback: Literal["plain", "gemma"] = Field(
        "plain", description="Prompt rendering for a model without a chat template (as `score`'s).")
    max_length: int = Field(4096, ge=16, description="Token limit of a training row; longer rows are skipped.")
    # optimisation
    epochs: float = Field(1.0, gt=0, description="Passes over the data.")
    max_steps: int = Field(-1, description="Stop after this many optimiser steps (-1: epochs decide).")
    learning_rate: Optional[float] = Field(None, gt=0, description="Default 1e-5 rft / meta-rm, 1e-6 grpo.")
    batch_size: int = Field(1, ge=1, description="Rows per device per step (grpo: prompts, each with "
                            "num_generations completions).")
    grad_accum: int = Field(8, ge=1, description="Gradient accumulation steps.")
    seed: int = Field(0, description="Seed for data order, sampling and response orders.")
    save_steps: int = Field(50, ge=1, description="Checkpoint every this many steps.")
    logging_steps: int = Field(1, ge=1, description="Log the loss every this many steps.")
    # grpo
    beta: float = Field(PAPER_BETA, ge=0, description="grpo: KL coefficient; the paper keeps the format "
                        "with a larger KL term, no format reward.")
    num_generations: int = Field(4, ge=2, description="grpo: completions per prompt (the group).")
    max_completion_length: int = Field(1024, ge=8, description="grpo: token budget of one completion.")
    temperature: float = Field(1.0, gt=0, description="grpo: sampling temperature of the rollouts.")
    threshold: int = Field(6, ge=1, le=10, description="grpo: one-response rows, a score >= this means good.")
    # scale-out
    workers: int = Field(0, ge=0, description="0: train in this process; N: Ray Train with N workers.")
    gpus_per_worker: float = Field(0, ge=0, description="GPUs per Ray Train worker (0: CPU).")
    cpus_per_worker: float = Field(1, gt=0, description="CPUs per Ray Train worker.")
    checkpoint_dir: Optional[str] = Field(
        None, description="Checkpoints (s3:// with workers >= 1); default OUTPUT-checkpoints. Reruns resume.")
    max_failures: int = Field(2, ge=0, description="Ray Train: restarts from the last checkpoint after a failure.")
    ray_address: Optional[str] = Field(None, description="Ray cluster to join; default a local Ray.")
    s3_endpoint_url: Optional[str] = Field(None, description="S3-compatible endpoint (else AWS_ENDPOINT_URL).")

    @model_validator(mode="after")
    def _check(self) -> "TrainConfig":
        given = self.model_fields_set & set(GRPO_ONLY)
        if self.recipe != "grpo" and given:
            raise ValueError(f"{', '.join(sorted(given))}: grpo option(s), not for recipe {self.recipe}")
        if self.workers == 0 and self.checkpoints.startswith("s3://"):
            raise ValueError("checkpoint_dir: s3:// checkpoints need workers >= 1 (Ray Train persists them)")
        if self.workers == 0 and self.gpus_per_worker:
            raise ValueError("gpus_per_worker needs workers >= 1")
        return self

    @property
    def checkpoints(self) -> str:
        return self.checkpoint_dir or (self.output.rstrip("/") + "-checkpoints")

    @property
    def lr(self) -> float:
        return self.learning_rate or DEFAULT_LR[self.recipe]

    def public(self) -> dict[str, Any]:
        return json.loads(self.model_dump_json())


GRPO_ONLY = ("beta", "num_generations", "max_completion_length", "temperature", "threshold")
COMMON = tuple(n for n in TrainConfig.model_fields if n not in GRPO_ONLY and n != "recipe")


def load_train_config(path: str | Path | None = None, **overrides: Any) -> TrainConfig:
    """Config file (YAML) first, then overrides that are not None; errors name the key."""
    return load_into(TrainConfig, "train", path, overrides)


# ------------------------------------------------------------------------------------------- data


def _imports():
    try:
        import peft  # noqa: F401
        import trl  # noqa: F401
    except ImportError as e:
        raise ImportError(f"{INSTALL_HINT} ({e})") from e


def read_rows(uri: str, endpoint_url: str | None = None) -> list[dict[str, Any]]:
    """Every row of the Parquet file(s) at `uri` (file, directory, glob or s3://), files read in parallel."""
    from .plan import parallel
    from .storage import list_inputs, looks_parquet, read_parquet

    fs, _, files = list_inputs(uri, endpoint_url)

    def one(f: dict[str, Any]) -> list[dict[str, Any]]:
        if f.get("listed") and not looks_parquet(fs, f["name"]):  # a README beside the data: not rows
            return []
        with fs.open(f["name"], "rb") as fh:
            return read_parquet(fh).to_pylist()

    return [row for rows in parallel(one, files) for row in rows]


def _need(rows: list[dict[str, Any]], columns: tuple[str, ...], uri: str, made_by: str) -> None:
    if not rows:
        raise ValueError(f"{uri}: no training rows")
    missing = [c for c in columns if c not in rows[0]]
    if missing:
        raise ValueError(f"{uri}: missing column(s) {missing}; expected the output of `grm-ray {made_by}`")


def _text_of(value: Any, role: str) -> str:
    """A standard string, or the content of the conversational form's single `role` message."""
    if isinstance(value, str):
        return value
    return next(m["content"] for m in value if m["role"] == role)


def user_prompt(tokenizer: Any, user_text: str, fallback: str) -> str:
    """The GRM user turn as the scoring engine renders it (engines._Engine.render), ready to generate."""
    return prompts.apply_chat_template(tokenizer, [{"role": "user", "content": user_text}], fallback)


def encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids of rendered text, special tokens as the engines add them (prompts.special_tokens)."""
    return tokenizer(text, add_special_tokens=prompts.special_tokens(tokenizer))["input_ids"]


def rft_examples(rows: list[dict[str, Any]], tokenizer: Any, cfg: TrainConfig) -> list[dict[str, list[int]]]:
    """export-rft rows -> {input_ids, completion_mask}: rendered prompt, then trajectory + EOS (the loss)."""
    _need(rows, ("prompt", "completion"), cfg.data, "export-rft")
    out, skipped = [], 0
    for r in rows:
        prompt = encode(tokenizer, user_prompt(tokenizer, _text_of(r["prompt"], "user"), cfg.chat_fallback))
        reply = tokenizer(_text_of(r["completion"], "assistant"), add_special_tokens=False)["input_ids"]
        ids = prompt + reply + [tokenizer.eos_token_id]
        if len(ids) > cfg.max_length:
            skipped += 1
            continue
        out.append({"input_ids": ids, "completion_mask": [0] * len(prompt) + [1] * (len(ids) - len(prompt))})
    _report_skipped(skipped, len(rows), cfg)
    return out


def meta_examples(rows: list[dict[str, Any]], tokenizer: Any, cfg: TrainConfig) -> list[dict[str, Any]]:
    """export-meta rows -> {input_ids, labels}: the chat rendered as MetaEngine renders it, 0/1 as float."""
    _need(rows, ("messages", "label"), cfg.data, "export-meta")
    out, skipped = [], 0
    for r in rows:
        ids = encode(tokenizer, prompts.meta_input(tokenizer, r["messages"], cfg.chat_fallback))
        if len(ids) > cfg.max_length:
            skipped += 1
            continue
        out.append({"input_ids": ids, "labels": float(r["label"])})
    _report_skipped(skipped, len(rows), cfg)
    if len({e["labels"] for e in out}) < 2:
        log.warning("meta-rm: every usable row has the same label; the classifier learns a constant")
    return out


def grpo_examples(rows: list[dict[str, Any]], tokenizer: Any, cfg: TrainConfig) -> list[dict[str, Any]]:
    """Labelled preference rows (any `score` input format, or a scored output) -> GRM prompts.

    Responses are shown in the order scoring draws for the item's first sample: prompts.orderings seeded by
    the item (stages.item_seed), so the labelled best is not always first. Columns `label`, `order`, `n_responses` reach the
    reward function.
    """
    from .schema import RowError, detect_format, normalize
    from .stages import item_seed

    if not rows:
        raise ValueError(f"{cfg.data}: no training rows")
    try:
        fmt = detect_format(rows[0].keys())
    except RowError as e:
        raise ValueError(f"{cfg.data}: {e}") from None
    out, skipped = [], 0
    for i, raw in enumerate(rows):
        try:
            item = normalize(raw, fmt, 16)
        except RowError as e:
            raise ValueError(f"{cfg.data}, row {i}: {e}") from None
        if item["label"] is None:
            skipped += 1
            continue
        n = len(item["responses"])
        key = str(raw.get("id") if raw.get("id") is not None else i)
        order = prompts.orderings(n, 1, seed=item_seed(cfg.seed, key))[0][0]
        text = user_prompt(tokenizer, prompts.render_grm_prompt(
            item["messages"], [item["responses"][j] for j in order]), cfg.chat_fallback)
        if len(encode(tokenizer, text)) + cfg.max_completion_length > cfg.max_length:
            skipped += 1
            continue
        out.append({"prompt": _for_trl(tokenizer, text), "label": item["label"], "order": order, "n_responses": n})
    _report_skipped(skipped, len(rows), cfg, "unlabelled or too long")
    return out


def _for_trl(tokenizer: Any, text: str) -> str:
    """TRL encodes a string prompt with the tokenizer's special tokens; drop a BOS the template already
    rendered, so the ids are the engine's (which encodes template output without adding any)."""
    bos = tokenizer.bos_token
    if not prompts.special_tokens(tokenizer) and bos and text.startswith(bos):
        if tokenizer("", add_special_tokens=True)["input_ids"][:1] == [tokenizer.bos_token_id]:
            return text[len(bos):]
    return text


def _report_skipped(skipped: int, total: int, cfg: TrainConfig, why: str = "longer than max_length") -> None:
    if skipped:
        log.warning("%s: skipped %d of %d rows (%s %d)", cfg.recipe, skipped, total, why, cfg.max_length)
    if skipped == total:
        raise ValueError(f"{cfg.data}: every row was skipped ({why} {cfg.max_length})")


def rule_reward_fn(threshold: int = 6):
    """TRL reward function: parse the box (shown order), map back to input order, export.rule_reward."""
    from .export import rule_reward as judge
    from .parsing import parse_scores
    from .voting import unshuffle

    def rule_reward(completions, label, order, n_responses, **_: Any) -> list[float]:
        out = []
        for text, lab, o, k in zip(completions, label, order, n_responses):
            shown = parse_scores(_text_of(text, "assistant") if not isinstance(text, str) else text, k)
            out.append(float(judge(None if shown is None else unshuffle(shown, list(o)), lab, threshold)))
        return out

    return rule_reward


# ------------------------------------------------------------------------------------------- trainers


def _dtype(base_dtype: Any):
    """Train in float32 on CPU (bf16 matmuls there are slow and lossy), bf16 on GPU when the base is bf16."""
    import torch

    return base_dtype if torch.cuda.is_available() and base_dtype in (torch.bfloat16, torch.float16) \
        else torch.float32


def _lora(cfg: TrainConfig, task: str):
    from peft import LoraConfig

    targets = cfg.lora_targets if cfg.lora_targets == "all-linear" else cfg.lora_targets.split(",")
    return LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=targets, task_type=task,
                      modules_to_save=["score"] if task == "SEQ_CLS" else None)


def _common_args(cfg: TrainConfig, out_dir: str) -> dict[str, Any]:
    import torch

    return dict(output_dir=out_dir, num_train_epochs=cfg.epochs, max_steps=cfg.max_steps,
                learning_rate=cfg.lr, per_device_train_batch_size=cfg.batch_size,
                gradient_accumulation_steps=cfg.grad_accum, seed=cfg.seed, data_seed=cfg.seed,
                save_strategy="steps", save_steps=cfg.save_steps, save_total_limit=2,
                logging_steps=cfg.logging_steps, report_to=[], disable_tqdm=True,
                use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0)


def build_trainer(cfg: TrainConfig, out_dir: str, callbacks: list | None = None):
    """The TRL / transformers trainer of `cfg.recipe`, writing checkpoints to local `out_dir`; losses go to
    the grm_ray log instead of the trainer's own printer."""
    from transformers.trainer_callback import PrinterCallback

    trainer = _build(cfg, out_dir, [_log_callback(), *(callbacks or [])])
    trainer.remove_callback(PrinterCallback)
    return trainer


def _build(cfg: TrainConfig, out_dir: str, callbacks: list):
    _imports()
    import torch
    from datasets import Dataset
    from transformers import AutoConfig, AutoTokenizer

    rows = read_rows(cfg.data, cfg.s3_endpoint_url)  # a bad data path fails before any model loads
    try:
        tok = AutoTokenizer.from_pretrained(cfg.base)
        base_cfg = AutoConfig.from_pretrained(cfg.base)
    except OSError as e:
        raise ValueError(f"cannot load the base model {cfg.base!r}: {e}") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    dtype = _dtype(getattr(base_cfg, "dtype", None) or getattr(base_cfg, "torch_dtype", None))
    common = _common_args(cfg, out_dir)

    if cfg.recipe == "rft":
        from transformers import AutoModelForCausalLM
        from trl import SFTConfig, SFTTrainer

        data = Dataset.from_list(rft_examples(rows, tok, cfg))
        model = AutoModelForCausalLM.from_pretrained(cfg.base, dtype=dtype)
        args = SFTConfig(**common, completion_only_loss=True, max_length=cfg.max_length)
        return SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tok, callbacks=callbacks,
                          peft_config=_lora(cfg, "CAUSAL_LM") if cfg.lora else None)

    if cfg.recipe == "grpo":
        from transformers import AutoModelForCausalLM
        from trl import GRPOConfig, GRPOTrainer

        data = Dataset.from_list(grpo_examples(rows, tok, cfg))
        need = cfg.batch_size * cfg.grad_accum  # one generation batch: TRL's sampler makes no step from fewer
        if len(data) < need:
            raise ValueError(f"{cfg.data}: {len(data)} usable prompt(s), fewer than one GRPO step takes (batch_size "
                             f"x grad_accum = {cfg.batch_size} x {cfg.grad_accum}); lower --grad-accum or give "
                             "more rows")
        model = AutoModelForCausalLM.from_pretrained(cfg.base, dtype=dtype)
        common["per_device_train_batch_size"] = cfg.batch_size * cfg.num_generations
        args = GRPOConfig(**common, beta=cfg.beta, num_generations=cfg.num_generations,
                          max_completion_length=cfg.max_completion_length, temperature=cfg.temperature,
                          shuffle_dataset=True)
        return GRPOTrainer(model=model, reward_funcs=[rule_reward_fn(cfg.threshold)], args=args,
                           train_dataset=data, processing_class=tok, callbacks=callbacks,
                           peft_config=_lora(cfg, "CAUSAL_LM") if cfg.lora else None)

    from transformers import AutoModelForSequenceClassification, DataCollatorWithPadding, Trainer, TrainingArguments

    data = Dataset.from_list(meta_examples(rows, tok, cfg))
    model = AutoModelForSequenceClassification.from_pretrained(
        cfg.base, dtype=dtype, num_labels=1, id2label={0: "score"}, label2id={"score": 0})
    model.config.pad_token_id = tok.pad_token_id  # the head reads the last non-pad token, as vLLM's pooler does
    if cfg.lora:
        from peft import get_peft_model

        model = get_peft_model(model, _lora(cfg, "SEQ_CLS"))

    def bce(outputs, labels, num_items_in_batch=None):  # GRM_SPEC 5: binary cross-entropy on the raw logit
        return torch.nn.functional.binary_cross_entropy_with_logits(outputs.logits.squeeze(-1), labels.float())

    return Trainer(model=model, args=TrainingArguments(**common), train_dataset=data, processing_class=tok,
                   data_collator=DataCollatorWithPadding(tok), compute_loss_func=bce, callbacks=callbacks)


def last_checkpoint(out_dir: str) -> str | None:
    """The highest `checkpoint-N` under out_dir that was written to the end (trainer_state.json is last)."""
    if not os.path.isdir(out_dir):
        return None
    steps = [(int(m.group(1)), name) for name in os.listdir(out_dir)
             if (m := re.fullmatch(r"checkpoint-(\d+)", name))
             and os.path.isfile(os.path.join(out_dir, name, "trainer_state.json"))]
    return os.path.join(out_dir, max(steps)[1]) if steps else None


def _log_callback():
    from transformers import TrainerCallback

    class LogLoss(TrainerCallback):
        """Every logged loss goes to the grm_ray log (the trainer's own progress bars are off)."""

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and state.is_world_process_zero:
                shown = {k: float(f"{v:.5g}") if isinstance(v, float) else v for k, v in logs.items()}
                log.info("step %d/%d %s", state.global_step, state.max_steps, json.dumps(shown))

    return LogLoss()


def save_model(trainer: Any, cfg: TrainConfig, target: str) -> None:
    """Write a directory vLLM loads as is: LoRA merged (unless merge=False), the base's dtype, tokenizer."""
    from transformers import AutoConfig

    model = trainer.model
    model = getattr(trainer, "accelerator", None).unwrap_model(model) if hasattr(trainer, "accelerator") else model
    if cfg.lora and cfg.merge:
        model = model.merge_and_unload()
    base_dtype = getattr(AutoConfig.from_pretrained(cfg.base), "dtype", None)
    if base_dtype is not None and (not cfg.lora or cfg.merge):
        model = model.to(base_dtype)
    with tempfile.TemporaryDirectory() as tmp:
        local = target if not target.startswith("s3://") else tmp
        os.makedirs(local, exist_ok=True)
        model.save_pretrained(local, safe_serialization=True)
        trainer.processing_class.save_pretrained(local)
        summary = {"recipe": cfg.recipe, "config": cfg.public(), "global_step": trainer.state.global_step,
                   "resumed_from": getattr(trainer, "_grm_resumed_from", None),
                   "log_history": trainer.state.log_history}
        Path(local, SUMMARY_FILE).write_text(json.dumps(summary, indent=2, default=str))
        if local != target:
            from .storage import filesystem

            fs, path = filesystem(target, cfg.s3_endpoint_url)
            fs.put(local.rstrip("/") + "/", path, recursive=True)


def _fit(trainer: Any, resume: str | None, shown: str | None = None) -> None:
    """Train (from `resume` when given); `shown` names the checkpoint in the summary (default `resume`)."""
    trainer._grm_resumed_from = shown or resume
    if resume:
        log.info("resuming from %s", resume)
    trainer.train(resume_from_checkpoint=resume)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    if losses and not all(math.isfinite(x) for x in losses):
        raise RuntimeError(f"training diverged: non-finite loss in {losses}")


# Options a resumed run may change; any other difference means the checkpoints belong to another run.
RESUMABLE = ("epochs", "max_steps", "save_steps", "logging_steps", "workers", "cpus_per_worker", "gpus_per_worker",
             "max_failures", "ray_address", "s3_endpoint_url", "output")
RUN_FILE = "_run_config.json"


def check_resumable(cfg: TrainConfig, fs: Any, ckpt_dir: str) -> None:
    """Refuse to resume checkpoints made with different result-changing options; record the options while
    the directory holds no checkpoint yet (a run that failed before its first one locks nothing)."""
    record = posixpath.join(ckpt_dir, RUN_FILE)
    mine = {k: v for k, v in cfg.public().items() if k not in RESUMABLE}
    others = [p for p in (fs.ls(ckpt_dir, detail=False) if fs.isdir(ckpt_dir) else [])
              if posixpath.basename(p.rstrip("/")) not in (RUN_FILE, "README.md")]
    if others and fs.exists(record):
        theirs = {k: v for k, v in json.loads(fs.cat(record)).items() if k not in RESUMABLE}
        changed = sorted(k for k in mine.keys() | theirs.keys() if mine.get(k) != theirs.get(k))
        if changed:
            diff = ", ".join(f"{k}: {theirs.get(k)!r} -> {mine.get(k)!r}" for k in changed)
            raise ValueError(f"the checkpoints in {cfg.checkpoints} were made with other options ({diff}); "
                             "pass another --checkpoint-dir, or delete it to start afresh")
        return
    fs.makedirs(ckpt_dir, exist_ok=True)
    with fs.open(record, "w") as f:
        f.write(json.dumps(cfg.public(), indent=2))


def train_local(cfg: TrainConfig) -> dict[str, Any]:
    """Train in this process; checkpoints in cfg.checkpoints (local), resumed from the last one."""
    from .storage import filesystem

    t0 = time.perf_counter()
    check_resumable(cfg, *filesystem(cfg.checkpoints))
    trainer = build_trainer(cfg, cfg.checkpoints)
    _fit(trainer, last_checkpoint(cfg.checkpoints))
    save_model(trainer, cfg, cfg.output)
    return _summary(trainer, cfg, t0)


def _summary(trainer: Any, cfg: TrainConfig, t0: float) -> dict[str, Any]:
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"output": cfg.output, "global_step": trainer.state.global_step,
            "resumed_from": trainer._grm_resumed_from, "first_loss": losses[0] if losses else None,
            "last_loss": losses[-1] if losses else None, "wall_seconds": round(time.perf_counter() - t0, 1)}


def _ray_loop(config: dict[str, Any]) -> None:
    """One Ray Train worker: the same trainer, checkpoints reported to Ray, resumed from Ray's latest."""
    import ray.train
    from ray.train.huggingface.transformers import RayTrainReportCallback, prepare_trainer

    cfg = TrainConfig(**config)
    ctx = ray.train.get_context()
    local = tempfile.mkdtemp(prefix=f"grm-ray-train-{ctx.get_world_rank()}-")
    trainer = prepare_trainer(build_trainer(cfg, local, callbacks=[RayTrainReportCallback()]))
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            resume = os.path.join(local, "resumed-" + os.path.basename(d.rstrip("/")))
            shutil.copytree(os.path.join(d, RayTrainReportCallback.CHECKPOINT_NAME), resume)
        _fit(trainer, resume, shown=checkpoint.path)
    else:
        _fit(trainer, None)
    if ctx.get_world_rank() == 0:
        save_model(trainer, cfg, cfg.output)
        ray.train.report({"global_step": trainer.state.global_step, "resumed_from": trainer._grm_resumed_from})


def train_ray(cfg: TrainConfig) -> dict[str, Any]:
    """TorchTrainer with cfg.workers workers; a rerun with the same checkpoint_dir resumes (Ray's storage)."""
    import pyarrow.fs
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from .storage import filesystem

    t0 = time.perf_counter()
    if not ray.is_initialized():  # a cluster (ray_address / RAY_ADDRESS), else a local Ray of this machine
        local = not (cfg.ray_address or os.environ.get("RAY_ADDRESS"))
        ray.init(address=cfg.ray_address, **({"include_dashboard": False} if local else {}))
    fs, path = filesystem(cfg.checkpoints, cfg.s3_endpoint_url)
    check_resumable(cfg, fs, path)
    storage = pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))
    resources = {"CPU": cfg.cpus_per_worker, **({"GPU": cfg.gpus_per_worker} if cfg.gpus_per_worker else {})}
    trainer = TorchTrainer(
        _ray_loop, train_loop_config=cfg.model_dump(exclude_unset=True),
        scaling_config=ScalingConfig(num_workers=cfg.workers, use_gpu=cfg.gpus_per_worker > 0,
                                     resources_per_worker=resources),
        run_config=RunConfig(name=posixpath.basename(path.rstrip("/")), storage_path=posixpath.dirname(path.rstrip("/")),
                             storage_filesystem=storage, failure_config=FailureConfig(max_failures=cfg.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)))
    result = trainer.fit()
    metrics = result.metrics or {}
    return {"output": cfg.output, "global_step": metrics.get("global_step"),
            "resumed_from": metrics.get("resumed_from"), "checkpoint": result.checkpoint.path if result.checkpoint
            else None, "wall_seconds": round(time.perf_counter() - t0, 1)}


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run cfg.recipe in this process (workers 0) or on Ray Train; returns a short summary."""
    from .storage import input_exists

    if not input_exists(cfg.data, cfg.s3_endpoint_url):  # before the checkpoint directory is made
        raise FileNotFoundError(f"training data {cfg.data} does not exist")
    _imports()
    return train_ray(cfg) if cfg.workers else train_local(cfg)

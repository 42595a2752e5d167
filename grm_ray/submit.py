"""`grm-ray submit`: run `grm-ray score` as a Ray job on a cluster, through the Ray Jobs API.

    grm-ray submit --address http://HEAD:8265 --config job.yaml --wait -- s3://b/prefs/ s3://b/scored/ --k 16

1. The score options are checked here first (same parser and config as `grm-ray score`), so a typo fails
   in a second instead of after a cluster round trip.
2. A working_dir is staged: `job.yaml` (the config file, verbatim) and a copy of this `grm_ray` package,
   so the job runs the submitter's code; `--installed` leaves the package out and uses the cluster's own.
3. `JobSubmissionClient.submit_job(entrypoint="python -m grm_ray.cli score --config job.yaml IN OUT ...",
   runtime_env={"working_dir": ..., "pip": [...], "env_vars": {...}})`; the submission id is printed.
4. With `--wait`: follow the job's logs, then return its exit status (the driver's exit code when Ray has it).
"""
from __future__ import annotations

import asyncio
import logging
import os
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional, Sequence

from .config import ConfigError, load_config

log = logging.getLogger(__name__)
JOB_CONFIG_NAME = "job.yaml"  # the config file's name inside the staged working_dir
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


class SubmitError(RuntimeError):
    """The job cannot be submitted as asked; the message says what to change."""


def check_score_args(config: str | None, args: Sequence[str]) -> None:
    """Parse `args` exactly as `grm-ray score` would and validate the resulting config; raises SubmitError.

    >>> check_score_args(None, ["in/", "out/", "--k", "0"])  # doctest: +SKIP
    SubmitError: invalid job config: k: Input should be greater than or equal to 1
    """
    import typer
    import typer.main

    from . import cli

    command = typer.main.get_command(cli.app).get_command(None, "score")  # type: ignore[union-attr]
    try:
        ctx = command.make_context("score", list(args))
    except typer.Exit:  # e.g. `-- --help`: the help was printed; nothing to submit
        raise SubmitError("the score arguments asked for help; nothing was submitted") from None
    except typer.TyperException as e:  # typer's click: unknown option, bad type, missing value
        raise SubmitError(f"score arguments: {e.format_message()}") from None
    params = {k: v for k, v in ctx.params.items() if k != "config"}
    if ctx.params.get("config"):
        raise SubmitError("give the config file to `submit --config`, not after `--` (it is uploaded with the job)")
    try:
        cfg = load_config(config, **params)
    except ConfigError as e:
        raise SubmitError(str(e)) from None
    if not cfg.input or not cfg.output:
        raise SubmitError("score needs INPUT and OUTPUT (after `--`, or `input:`/`output:` in --config)")
    for name, value in (("input", cfg.input), ("output", cfg.output)):
        if not value.startswith("s3://") and not os.path.isabs(value):
            log.warning("%s %r is a relative path: the job resolves it in its working_dir on the cluster, "
                        "which is deleted with the job; use an absolute path or s3:// URI", name, value)


def stage_working_dir(config: str | None, include_package: bool = True) -> Path:
    """A temporary dir to upload as the job's working_dir: job.yaml (+ a copy of the grm_ray package)."""
    staged = Path(tempfile.mkdtemp(prefix="grm-ray-job-"))
    if config:
        try:
            shutil.copyfile(config, staged / JOB_CONFIG_NAME)
        except OSError as e:
            shutil.rmtree(staged, ignore_errors=True)
            raise SubmitError(f"cannot read config file {config}: {e}") from None
    if include_package:
        package = Path(__file__).resolve().parent
        shutil.copytree(package, staged / package.name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    if not any(staged.iterdir()):  # Ray refuses an empty working_dir; a marker keeps the layout uniform
        (staged / "README").write_text("grm-ray job working_dir\n")
    return staged


def entrypoint(args: Sequence[str], with_config: bool) -> str:
    """The job's shell command: `python -m grm_ray.cli score [--config job.yaml] ARGS...` (quoted)."""
    cmd = ["python", "-m", "grm_ray.cli", "score"]
    if with_config:
        cmd += ["--config", JOB_CONFIG_NAME]
    return shlex.join([*cmd, *args])


def runtime_env(working_dir: Path, pip: Sequence[str] = (), env: Sequence[str] = ()) -> dict[str, Any]:
    """{"working_dir", "pip"?, "env_vars"?}; env entries are KEY=VALUE."""
    out: dict[str, Any] = {"working_dir": str(working_dir)}
    if pip:
        out["pip"] = list(pip)
    env_vars = {}
    for item in env:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SubmitError(f"--env {item!r}: expected KEY=VALUE")
        env_vars[key] = value
    if env_vars:
        out["env_vars"] = env_vars
    return out


def _client(address: str | None):
    from ray.job_submission import JobSubmissionClient

    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        raise SubmitError("no cluster to submit to: pass --address http://HEAD:8265 or set RAY_ADDRESS")
    try:
        return JobSubmissionClient(address)
    except Exception as e:  # noqa: BLE001 - connection errors come in many types; the address is the fix
        raise SubmitError(f"cannot reach the Ray dashboard at {address}: {e} "
                          "(is the cluster up, and is this its dashboard address, usually port 8265?)") from None


def follow(client: Any, job_id: str, out: Any = None) -> int:
    """Stream the job's logs until it ends; return 0 on success, else the driver's exit code (or 1)."""
    out = out or sys.stdout

    async def tail() -> None:
        async for lines in client.tail_job_logs(job_id):
            out.write(lines)
            out.flush()

    try:
        asyncio.run(tail())
    except Exception as e:  # noqa: BLE001 - a dropped log stream must not hide the job's status
        log.warning("log stream ended early (%s); polling the job status", e)
    while True:
        info = client.get_job_info(job_id)
        status = str(getattr(info.status, "value", info.status))
        if status in TERMINAL:
            break
        time.sleep(1)
    if status == "SUCCEEDED":
        return 0
    code = getattr(info, "driver_exit_code", None)
    reason = (info.message or "").split(",")[0]  # Ray appends the log tail, already streamed above
    print(f"job {job_id} {status}: {reason}".rstrip(": "), file=sys.stderr)
    return code if isinstance(code, int) and code != 0 else 1


def submit_command(args: Sequence[str], address: Optional[str] = None, config: Optional[str] = None,
                   wait: bool = False, installed: bool = False, pip: Sequence[str] = (),
                   env: Sequence[str] = (), submission_id: Optional[str] = None) -> int:
    """What `grm-ray submit` does; returns the process exit code (0, the job's status with --wait, 2 on usage)."""
    try:
        check_score_args(config, args)
        client = _client(address)
        staged = stage_working_dir(config, include_package=not installed)
        try:
            job_id = client.submit_job(
                entrypoint=entrypoint(args, with_config=bool(config)),
                runtime_env=runtime_env(staged, pip, env),
                submission_id=submission_id,
                metadata={"job_name": "grm-ray score", "config": Path(config).name if config else ""},
            )
        except SubmitError:
            raise
        except Exception as e:  # noqa: BLE001 - e.g. a duplicate submission id; Ray's message says which
            raise SubmitError(f"the cluster refused the job: {e}") from None
        finally:
            shutil.rmtree(staged, ignore_errors=True)  # uploaded during submit_job
    except SubmitError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(job_id)
    where = address or os.environ.get("RAY_ADDRESS")
    if not wait:
        print(f"follow it with: ray job logs --address {where} --follow {job_id}", file=sys.stderr)
        return 0
    try:
        return follow(client, job_id)
    except KeyboardInterrupt:
        print(f"\nstopped following; the job goes on. Stop it with: ray job stop --address {where} {job_id}",
              file=sys.stderr)
        return 130

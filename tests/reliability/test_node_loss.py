"""Node loss: the GRM actor's whole node is SIGKILLed in the middle of a real `grm-ray score` run.

A local two-node Ray on 127.0.0.1: a head (`ray start --head`, 2 CPUs: the driver's read, vote and commit
tasks) and a worker node (`ray start --address`, 1 CPU and the custom resource `grm_node`), which the job's
`--actor-resources '{"grm_node": 0.5}'` makes the only place its GRM actor (tiny model, `--device cpu`) can
run. Once parts are committed and the GRM stage's third call has begun (held there at a gate file, so that
work is left: the tiny engine would otherwise finish 40 rows in about a second), every process of the
worker node (its `ray start`, raylet, agents, workers, the engine actor) is SIGKILLed at once, as when a
machine is lost, and a replacement worker node with the same resource is started, as an autoscaler would. Either the job completes, or it stops with a
clear error and the same command resumes; either way every input row ends up committed exactly once
(read back here, and by `grm-ray verify OUTPUT --input INPUT`). The test records which of the two happened.

Run it alone (`make test` leaves it out): `python -m pytest -m node_loss tests/reliability/test_node_loss.py -q -s`.
"""
from __future__ import annotations

import json
import sys
import time
import urllib.request
from pathlib import Path

import pyarrow.parquet as pq
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "cluster"))
from cluster_util import RayHead  # noqa: E402
from rel_util import Job, assert_exactly_once, assert_scored, cli_env, committed, job_args, wait_for  # noqa: E402

from grm_ray import storage  # noqa: E402

HERE = Path(__file__).resolve().parent
pytestmark = [pytest.mark.engine, pytest.mark.ray, pytest.mark.node_loss, pytest.mark.timeout(1500)]
ROWS = 40
GRM_NODE = {"grm_node": 1}


def grm_nodes(head: RayHead, resource: str = "grm_node") -> set[str]:
    """Ids of the head's alive nodes that offer `resource` (the dashboard's state API)."""
    try:
        with urllib.request.urlopen(head.address + "/api/v0/nodes?detail=true", timeout=10) as r:
            nodes = json.load(r)["data"]["result"]["result"]
    except (OSError, ValueError, KeyError):
        return set()
    return {n["node_id"] for n in nodes if n["state"] == "ALIVE" and resource in (n.get("resources_total") or {})}


def start_head(env: dict[str, str]) -> RayHead:
    """A head whose own node has registered (its raylet may take up to 180 s to, on a loaded machine; a
    failed start is retried)."""
    for _ in range(4):
        head = RayHead(num_cpus=2, env=env, start_wait=60, nice=-10)
        try:
            head.wait_ready(240)
            wait_for(lambda: head.proc.poll() is not None or grm_nodes(head, "CPU"), 120, "the head's node",
                     interval=1)
            time.sleep(5)
            if head.proc.poll() is None and grm_nodes(head, "CPU"):
                head.renice(0)
                return head
        except (RuntimeError, TimeoutError):
            pass
        except BaseException:
            head.stop()
            raise
        why = head.tail()
        head.stop()
    raise RuntimeError(f"the Ray head did not start after 4 tries; the last one's log: {why}")


def add_grm_node(head: RayHead, env: dict[str, str], known: set[str]) -> RayHead:
    """Start a worker node offering `grm_node` and wait until the head sees it (a failed start is retried)."""
    for _ in range(4):
        node = RayHead(num_cpus=1, join=head.gcs_address, resources=GRM_NODE, env=env, start_wait=60, nice=-10)
        try:
            wait_for(lambda: node.proc.poll() is not None or grm_nodes(head) - known, 240,
                     "the worker node to join", interval=1)
        except TimeoutError:
            pass
        except BaseException:
            node.stop()
            raise
        if node.proc.poll() is None and grm_nodes(head) - known:
            node.renice(0)
            return node
        why = node.tail()
        node.stop()
    raise RuntimeError(f"no worker node could join the head after 4 starts; the last one's log: {why}")


def test_worker_node_killed_mid_run(tiny_models, hh_table, tmp_path):
    t0 = time.monotonic()
    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    pq.write_table(hh_table.slice(0, ROWS), inp / "hh.parquet", row_group_size=4)
    expected = {f"hh.parquet#{i}" for i in range(ROWS)}
    env = cli_env(RAY_AUTH_MODE="disabled")
    # Nodes start at niceness -10 and are set back to 0 once up: a raylet aborts when its agents take more
    # than about 15 s to start, which a machine loaded by other jobs misses (the test would see `ray start`
    # fail, not a node loss). Ray's memory monitor is off: on a shared machine it kills this job's tasks for
    # memory that other jobs use.
    node_env = {"PYTHONPATH": env["PYTHONPATH"], "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
                "RAY_memory_monitor_refresh_ms": "0"}
    nodes: list[RayHead] = []
    jobs: list[Job] = []
    try:
        head = start_head(node_env)
        nodes.append(head)
        first = add_grm_node(head, node_env, set())
        nodes.append(first)
        first_ids = grm_nodes(head)
        args = job_args(str(inp), str(out), str(tiny_models["grm"])) + [
            "--device", "cpu", "--ray-address", head.gcs_address, "--actor-resources", '{"grm_node": 0.5}']

        # The tiny engine scores 40 rows in about a second: the GRM stage holds its third call at a gate
        # (hooked_cli.py: the real CLI with rel_stages.hooked on the GRM stage), so the kill comes with two
        # batches sampled and work still left, not after the end.
        tags = tmp_path / "tags"
        tags.mkdir()
        (tags / "gate").touch()
        hooks = json.dumps({"tag_dir": str(tags), "tag": "grm", "hold_before_call": 3})
        run1 = Job([hooks, *args], tmp_path / "logs", env, name="run1", script=HERE / "hooked_cli.py")
        jobs.append(run1)
        wait_for(lambda: (storage.committed_parts(*storage.filesystem(str(out))) and list(tags.glob("call-grm-*-3")))
                 or run1.proc.poll() is not None, 600, "the first commit and the held third call of run 1",
                 interval=0.2)
        assert run1.proc.poll() is None, f"run 1 ended before the kill: {run1.stderr[-3000:]}"
        actor_pid = int(next(tags.glob("grm-*")).name.split("-")[1])
        assert actor_pid in {p.pid for p in first.family()}, "the GRM actor is not on the worker node"
        at_kill = committed(str(out), columns=["source"]).num_rows
        killed = first.kill()
        (tags / "gate").unlink()  # the restarted actor's calls go straight through
        nodes.append(add_grm_node(head, node_env, first_ids))  # the head may list the dead node a while
        rc1 = run1.proc.wait(900)
        outcome, rc2, stopped_with = "completed", None, None
        if rc1 != 0:
            outcome = "stopped, then resumed"
            stopped_with = next((ln for ln in run1.stderr.splitlines() if ln.startswith("error:")), None)
            assert stopped_with and "rerun the same command to resume" in stopped_with, run1.stderr[-3000:]
            run2 = Job(args, tmp_path / "logs", env, name="run2")  # the same command, without the hooks
            jobs.append(run2)
            rc2 = run2.proc.wait(900)
            assert rc2 == 0, run2.stderr[-3000:]
        table = assert_exactly_once(str(out), expected)
        assert_scored(table.to_pylist())
        verify = Job(["verify", str(out), "--input", str(inp), "--ray-address", head.gcs_address],
                     tmp_path / "logs", env, name="verify")
        jobs.append(verify)
        assert verify.proc.wait(600) == 0, verify.stderr[-3000:]
        report = json.loads(verify.stdout)
        assert report["ok"] and report["rows"] == ROWS and report["input_rows"] == ROWS, report
        assert not (report["duplicated_rows"] or report["missing_rows"] or report["orphaned_rows"]), report
        restarted = sorted({p.name.split("-")[1] for p in tags.glob("grm-*")} - {str(actor_pid)})
        print(f"RESULT node loss: GRM actor (pid {actor_pid}) on the worker node; killed {killed} processes of "
              f"that node with {at_kill}/{ROWS} rows committed; replacement "
              f"node started; GRM engines built after the kill: {len(restarted)}; outcome: {outcome} (run 1 exit {rc1}{', ' + stopped_with if stopped_with else ''}"
              f"{f'; run 2 exit {rc2}' if rc2 is not None else ''}); {table.num_rows}/{ROWS} rows exactly once; "
              f"verify ok ({report['rows']} rows, {report['parts']} parts); {time.monotonic() - t0:.0f} s")
    finally:
        for j in jobs:
            j.cleanup()
        for n in reversed(nodes):
            n.stop()



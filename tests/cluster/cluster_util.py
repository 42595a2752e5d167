"""Helpers shared by tests/cluster (imported by name: the test dirs are not packages)."""
from __future__ import annotations

import importlib.util
import socket
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load_relabel():
    """jobs/relabel.py as a module (it is a script, not part of the package)."""
    spec = importlib.util.spec_from_file_location("grm_ray_jobs_relabel", REPO / "jobs" / "relabel.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# `ray ARGS...` whose node start-up waits up to {} s for its raylet to register with the GCS, instead of
# Ray's fixed 30 s: Node.__init__ polls services.get_node, which raises until the raylet has registered.
PATIENT_RAY = """
import sys, time
import ray._private.services as services
get_node = services.get_node
def patient(*a, **k):
    end = time.monotonic() + {}
    while True:
        try:
            return get_node(*a, **k)
        except RuntimeError:
            if time.monotonic() > end:
                raise
            time.sleep(0.5)
services.get_node = patient
from ray.scripts.scripts import main
sys.argv[0] = "ray"
sys.exit(main())
"""


class RayHead:
    """A real `ray start --head --block` (or a worker node joining one) on 127.0.0.1 with its own temp dir
    and ports; always stopped.

    Not `ray stop`: that stops every Ray on the machine (the test session's own, other users'). This stops
    only the processes this head started: its process group, then any descendant that left the group.
    """

    def __init__(self, num_cpus: int = 2, join: str | None = None, resources: dict | None = None,
                 env: dict[str, str] | None = None, start_wait: float | None = None, nice: int | None = None):
        """A head, or with `join` (the head's gcs_address) a worker node of it; `resources`: custom resources
        of the node (e.g. {"grm_node": 1}); `env`: extra environment of its processes (RAY_* settings);
        `start_wait`: seconds its raylet may take to register (Ray's own wait is a fixed 30 s, which a
        raylet on a heavily loaded machine misses, and `ray start` then gives up); `nice`: start the node's
        processes at this niceness (negative: ahead of other load; its raylet aborts when its agents take
        more than about 15 s to come up, a limit no setting changes)."""
        import json
        import os
        import subprocess
        import tempfile

        self.temp_dir = tempfile.mkdtemp(prefix="grmray-", dir="/tmp")  # short: Ray's socket paths are < 108 chars
        ports = {name: free_port() for name in ("gcs", "dashboard", "client", "agent", "agent_grpc", "metrics",
                                                "runtime_env", "node_manager", "object_manager")}
        self.address = f"http://127.0.0.1:{ports['dashboard']}"
        self.gcs_address = join or f"127.0.0.1:{ports['gcs']}"  # what ray.init / --ray-address takes
        common = ["--block", "--node-ip-address=127.0.0.1", f"--dashboard-agent-listen-port={ports['agent']}",
                  f"--dashboard-agent-grpc-port={ports['agent_grpc']}", f"--metrics-export-port={ports['metrics']}",
                  f"--runtime-env-agent-port={ports['runtime_env']}", f"--num-cpus={num_cpus}", "--num-gpus=0",
                  "--disable-usage-stats"] + ([f"--resources={json.dumps(resources)}"] if resources else [])
        if join:  # a worker node: the head's temp dir and session; its own ports
            cmd = ["ray", "start", f"--address={join}", f"--node-manager-port={ports['node_manager']}",
                   f"--object-manager-port={ports['object_manager']}", "--object-store-memory=200000000", *common]
        else:
            cmd = ["ray", "start", "--head", f"--port={ports['gcs']}", "--dashboard-host=127.0.0.1",
                   f"--dashboard-port={ports['dashboard']}", "--include-dashboard=true",
                   f"--ray-client-server-port={ports['client']}", "--object-store-memory=400000000",
                   f"--temp-dir={self.temp_dir}", *common]
        if start_wait:
            import sys

            cmd = [sys.executable, "-c", PATIENT_RAY.format(start_wait), *cmd[1:]]
        if nice is not None:
            cmd = ["nice", "-n", str(nice), *cmd]
        env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, **(env or {})}
        # Ray 2.60 turns token auth on for a new cluster once ~/.ray/auth_token exists (any earlier ray.init
        # makes one). This test cluster is on 127.0.0.1 only; with auth off the client needs no token setup.
        env["RAY_AUTH_MODE"] = "disabled"
        self.log_path = os.path.join(self.temp_dir, "ray-start.log")
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)

    def wait_ready(self, timeout: float = 120) -> None:
        import time
        import urllib.error
        import urllib.request

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray start exited with {self.proc.returncode}: {self.tail()}")
            try:
                urllib.request.urlopen(self.address + "/api/version", timeout=2)
                return
            except urllib.error.HTTPError as e:
                raise RuntimeError(f"Ray head answered {e.code} on /api/version: {self.tail()}") from None
            except OSError:
                time.sleep(1)
        raise TimeoutError(f"Ray head not ready after {timeout} s: {self.tail()}")

    def tail(self, n: int = 3000) -> str:
        with open(self.log_path) as f:
            return f.read()[-n:]

    def family(self) -> list:
        """This node's processes: `ray start`, then its raylet, GCS, agents and workers (psutil.Process)."""
        import psutil

        try:
            me = psutil.Process(self.proc.pid)
            return [me, *me.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def renice(self, nice: int = 0) -> None:
        """Set the niceness of this node's processes (and so of the workers its raylet starts later)."""
        import psutil

        for p in self.family():
            try:
                p.nice(nice)
            except psutil.Error:
                pass

    def kill(self) -> int:
        """SIGKILL every process of this node at once, as when its machine is lost; returns how many."""
        import psutil

        family = self.family()
        for p in family:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(family, timeout=10)
        return len(family)

    def stop(self) -> None:
        import os
        import shutil
        import signal
        import subprocess

        import psutil

        family = self.family()[1:]
        self.proc.terminate()
        try:
            self.proc.wait(timeout=5)  # `ray start --block` cleans up on SIGTERM but may not exit
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the group is ours: start_new_session=True
        except (ProcessLookupError, PermissionError):
            pass
        for p in family:  # descendants that left the group (e.g. by setsid)
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(family, timeout=10)
        self.proc.wait(timeout=10)
        self._log.close()
        shutil.rmtree(self.temp_dir, ignore_errors=True)

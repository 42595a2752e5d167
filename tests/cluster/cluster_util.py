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


class RayHead:
    """A real `ray start --head --block` on 127.0.0.1 with its own temp dir and ports; always stopped.

    Not `ray stop`: that stops every Ray on the machine (the test session's own, other users'). This stops
    only the processes this head started: its process group, then any descendant that left the group.
    """

    def __init__(self, num_cpus: int = 2):
        import os
        import subprocess
        import tempfile

        self.temp_dir = tempfile.mkdtemp(prefix="grmray-", dir="/tmp")  # short: Ray's socket paths are < 108 chars
        ports = {name: free_port() for name in ("gcs", "dashboard", "client", "agent", "agent_grpc", "metrics",
                                                "runtime_env")}
        self.address = f"http://127.0.0.1:{ports['dashboard']}"
        cmd = ["ray", "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={ports['gcs']}",
               "--dashboard-host=127.0.0.1", f"--dashboard-port={ports['dashboard']}", "--include-dashboard=true",
               f"--ray-client-server-port={ports['client']}", f"--dashboard-agent-listen-port={ports['agent']}",
               f"--dashboard-agent-grpc-port={ports['agent_grpc']}", f"--metrics-export-port={ports['metrics']}",
               f"--runtime-env-agent-port={ports['runtime_env']}", f"--num-cpus={num_cpus}", "--num-gpus=0",
               "--object-store-memory=400000000", f"--temp-dir={self.temp_dir}", "--disable-usage-stats"]
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
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

    def stop(self) -> None:
        import os
        import shutil
        import signal
        import subprocess

        import psutil

        try:
            family = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            family = []
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

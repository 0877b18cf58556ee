"""Start a launch script as a user would, and clean up every process it started by PID."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai

from epdserve.config import RuntimeConfig
from epdserve.tools.procs import pid_with_arg, tagged_pids
from epdserve.tools.stats import worker_stats
from helpers import free_port

ROOT = Path(__file__).resolve().parents[1]


TAG_VAR = "EPDSERVE_TEST_TAG"


def pid_of(tag: str, arg: str) -> int:
    """The PID of the cluster process (tagged `tag`) whose command line has `arg`."""
    return pid_with_arg(TAG_VAR, tag, arg)


@dataclass
class Cluster:
    proc: subprocess.Popen
    tag: str
    base_url: str
    model: str
    log: Path
    namespace: str

    def client(self, **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base_url + "/v1", api_key="none", max_retries=0, timeout=120, **kw)

    def async_client(self) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=self.base_url + "/v1", api_key="none", max_retries=0, timeout=300)

    def models(self) -> list[str]:
        return [m["id"] for m in httpx.get(self.base_url + "/v1/models", timeout=5).json()["data"]]

    def worker_stats(self, infra) -> dict[str, dict[str, int]]:
        """Every worker's counters ("<component>/<instance id>" -> counters)."""
        config = RuntimeConfig(infra.etcd_endpoints, infra.nats_server, self.namespace)
        return asyncio.run(worker_stats(config))

    def wait_for_workers(self, infra, timeout: float = 120, **counts: int) -> None:
        """Wait until `counts[component]` workers of each component (e.g. prefill=1) are
        registered: the model is served once any worker can run a request, maybe before all
        are up."""
        deadline = time.monotonic() + timeout
        while True:
            names = self.worker_stats(infra)
            if all(sum(k.startswith(c + "/") for k in names) >= n for c, n in counts.items()):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"workers {counts} not registered in {timeout} s")
            time.sleep(0.5)

    def pids(self, arg: str) -> list[int]:
        """The PIDs of this cluster's processes whose command line has the argument `arg`."""
        pids = []
        for pid in tagged_pids(TAG_VAR, self.tag):
            try:
                if arg.encode() in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0"):
                    pids.append(pid)
            except OSError:   # exited meanwhile
                continue
        return pids

    def stop(self) -> None:
        """SIGTERM the script (it stops its children), then kill anything tagged that is left."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                pass
        for pid in tagged_pids(TAG_VAR, self.tag):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait()


def launch(script: str, infra, log_dir: Path, *args: str, model_dir: Path | None = None,
           served_name: str = "test-model", timeout: float = 240) -> Cluster:
    """Run `launch/<script>` against the test etcd/NATS, in its own namespace and port,
    and wait until `/v1/models` lists `served_name`."""
    def command(port: int, namespace: str) -> list[str]:
        cmd = ["bash", str(ROOT / "launch" / script), "--http-port", str(port), "--namespace", namespace,
               "--served-model-name", served_name, *args]
        return cmd + (["--model", str(model_dir)] if model_dir is not None else [])
    return start(command, infra, log_dir / f"{script}.log", served_name, timeout)


def start(command: Callable[[int, str], list[str]], infra, log: Path, served_name: str,
          timeout: float = 240) -> Cluster:
    """Run `command(http_port, namespace)` (one process that starts the cluster) with the test
    etcd/NATS and a tag in its environment; wait until `served_name` is listed."""
    tag = uuid.uuid4().hex
    port = free_port()
    namespace = f"t{tag[:8]}"
    env = os.environ | {"ETCD_ENDPOINTS": infra.etcd_endpoints, "NATS_SERVER": infra.nats_server,
                        "HTTP_HOST": "127.0.0.1", TAG_VAR: tag, "PYTHON": sys.executable}
    log = log.with_name(f"{log.stem}-{tag[:8]}.log")
    with open(log, "wb") as out:
        proc = subprocess.Popen(command(port, namespace), stdout=out, stderr=subprocess.STDOUT,
                                env=env, cwd=ROOT)
    cluster = Cluster(proc, tag, f"http://127.0.0.1:{port}", served_name, log, namespace)
    deadline = time.monotonic() + timeout
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{log.name}: exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
            try:
                if served_name in cluster.models():
                    return cluster
            except (httpx.HTTPError, ValueError):
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{log.name}: not ready after {timeout} s:\n{log.read_text()[-4000:]}")
            time.sleep(0.5)
    except BaseException:
        cluster.stop()
        raise


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")   # utime + stime


def assert_idle(cluster: Cluster, seconds: float = 5) -> None:
    """Idle, every worker and frontend process of `cluster` uses under 5% of a core."""
    pids = cluster.pids("epdserve.worker") + cluster.pids("epdserve.frontend")
    assert len(pids) >= 3
    time.sleep(2)   # let earlier requests wind down
    before = {pid: _cpu_seconds(pid) for pid in pids}
    time.sleep(seconds)
    used = {pid: _cpu_seconds(pid) - before[pid] for pid in pids}
    assert all(s < 0.05 * seconds for s in used.values()), used

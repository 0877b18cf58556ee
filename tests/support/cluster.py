"""The one cluster harness of the tests and the benchmarks: etcd and NATS on free ports, a launch
script run as a user would run it, and every process it started cleaned up by PID.

Every process of a cluster carries `TAG_VAR=<tag>` in its environment; `Cluster.stop()` SIGTERMs
the script (it stops its children) and then SIGKILLs whatever still carries the tag. Traffic goes
to 127.0.0.1 only. The benchmarks import this module with `tests/` on `sys.path`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai

from epdserve.config import RuntimeConfig
from epdserve.runtime import services
from epdserve.tools.procs import pid_with_arg, tagged_pids
from epdserve.tools.stats import worker_stats

ROOT = Path(__file__).resolve().parents[2]
TAG_VAR = "EPDSERVE_CLUSTER_TAG"
READY_TIMEOUT_S = 240

Command = Callable[[int, str], list[str]]   # (HTTP port, namespace) -> the command starting a cluster


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (good enough for starting test servers)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def kill_tagged(tag: str) -> None:
    """SIGKILL every process carrying `TAG_VAR=tag`."""
    for pid in tagged_pids(TAG_VAR, tag):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def stop_tagged(proc: subprocess.Popen, tag: str) -> None:
    """SIGTERM the launch script (it stops its children), then kill whatever is left by PID."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=60)
    kill_tagged(tag)
    proc.wait()


@dataclass
class Infra:
    etcd_endpoints: str   # http://127.0.0.1:<port>
    nats_server: str      # nats://127.0.0.1:<port>
    workdir: Path


@contextmanager
def infra_servers(workdir: Path) -> Iterator[Infra]:
    """A real etcd and a real NATS (max_payload 8MB) on free ports; stopped by PID on exit."""
    started: list[subprocess.Popen] = []
    try:
        etcd_url = f"http://127.0.0.1:{free_port()}"
        started.append(services.start_etcd(etcd_url, workdir / "etcd"))
        nats_url = f"nats://127.0.0.1:{free_port()}"
        started.append(services.start_nats(nats_url, workdir / "nats"))
        yield Infra(etcd_url, nats_url, workdir)
    finally:
        for proc in reversed(started):
            services.stop(proc)


@dataclass
class Cluster:
    proc: subprocess.Popen
    tag: str           # TAG_VAR's value in every process of this cluster
    base_url: str
    model: str         # the served model name
    log: Path
    runtime: RuntimeConfig   # its etcd, NATS and namespace

    @property
    def namespace(self) -> str:
        return self.runtime.namespace

    def client(self, **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base_url + "/v1", api_key="none", max_retries=0, timeout=120, **kw)

    def async_client(self, timeout: float = 300) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=self.base_url + "/v1", api_key="none", max_retries=0, timeout=timeout)

    def models(self) -> list[str]:
        return [m["id"] for m in httpx.get(self.base_url + "/v1/models", timeout=5).json()["data"]]

    def worker_stats(self) -> dict[str, dict[str, int]]:
        """Every worker's counters ("<component>/<instance id>" -> counters)."""
        return asyncio.run(worker_stats(self.runtime))

    def wait_for_workers(self, timeout: float = 120, **counts: int) -> None:
        """Wait until `counts[component]` workers of each component (e.g. prefill=1) are
        registered: the model is served once any worker can run a request, maybe before all
        are up."""
        deadline = time.monotonic() + timeout
        while True:
            names = self.worker_stats()
            if all(sum(k.startswith(c + "/") for k in names) >= n for c, n in counts.items()):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"workers {counts} not registered in {timeout} s")
            time.sleep(0.5)

    def pid(self, arg: str) -> int:
        """The PID of the cluster process whose command line has the argument `arg`."""
        return pid_with_arg(TAG_VAR, self.tag, arg)

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
        stop_tagged(self.proc, self.tag)


def pid_of(tag: str, arg: str) -> int:
    """The PID of the cluster process (tagged `tag`) whose command line has `arg`."""
    return pid_with_arg(TAG_VAR, tag, arg)


def script_command(script: str, *args: str, model_dir: Path | str | None = None,
                   served_name: str = "test-model") -> Command:
    """`launch/<script>` on the given port and namespace, serving `served_name`."""
    def command(port: int, namespace: str) -> list[str]:
        cmd = ["bash", str(ROOT / "launch" / script), "--http-port", str(port), "--namespace", namespace,
               "--served-model-name", served_name, *args]
        return cmd + (["--model", str(model_dir)] if model_dir is not None else [])
    return command


def two_nodes_command(script: str, *args: str, model_dir: Path | str, served_name: str = "test-model") -> Command:
    """A two-node launch script (`--head-node` on one node, workers on the other) on one machine:
    the worker node in the background, the head node in front; a SIGTERM stops both."""
    def command(port: int, namespace: str) -> list[str]:
        common = ["--namespace", namespace, "--served-model-name", served_name, "--model", str(model_dir), *args]
        return ["bash", "-c", 'bash "$0" "${@:2}" & worker=$!; '
                'bash "$0" --head-node --http-port "$1" "${@:2}" & head=$!; '
                'trap "kill -TERM $worker $head" TERM; wait $head; kill -TERM $worker; wait',
                str(ROOT / "launch" / script), str(port), *common]
    return command


def launch(script: str, infra: Infra, log_dir: Path, *args: str, model_dir: Path | str | None = None,
           served_name: str = "test-model", timeout: float = READY_TIMEOUT_S) -> Cluster:
    """Run `launch/<script>` against `infra`, in its own namespace and port, and wait until
    `/v1/models` lists `served_name`."""
    command = script_command(script, *args, model_dir=model_dir, served_name=served_name)
    return start(command, infra, log_dir / f"{script}.log", served_name, timeout)


def start(command: Command, infra: Infra, log: Path, served_name: str, timeout: float = READY_TIMEOUT_S) -> Cluster:
    """Run `command(http_port, namespace)` (one process that starts the cluster) with `infra`'s
    etcd/NATS and a tag in its environment; wait until `served_name` is listed. On failure,
    everything it started is stopped before the error propagates."""
    tag = uuid.uuid4().hex
    port = free_port()
    runtime = RuntimeConfig(infra.etcd_endpoints, infra.nats_server, f"t{tag[:8]}")
    env = os.environ | {"ETCD_ENDPOINTS": infra.etcd_endpoints, "NATS_SERVER": infra.nats_server,
                        "HTTP_HOST": "127.0.0.1", TAG_VAR: tag, "PYTHON": sys.executable}
    log = log.with_name(f"{log.stem}-{tag[:8]}.log")
    with open(log, "wb") as out:
        proc = subprocess.Popen(command(port, runtime.namespace), stdout=out, stderr=subprocess.STDOUT,
                                env=env, cwd=ROOT)
    cluster = Cluster(proc, tag, f"http://127.0.0.1:{port}", served_name, log, runtime)
    deadline = time.monotonic() + timeout
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{log.name}: exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
            try:
                if served_name in cluster.models():
                    return cluster
            except (httpx.HTTPError, ValueError, KeyError):
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{log.name}: not ready after {timeout} s:\n{log.read_text()[-4000:]}")
            time.sleep(0.5)
    except BaseException:
        cluster.stop()
        raise


@contextmanager
def running(cluster: Cluster) -> Iterator[Cluster]:
    """`cluster`, stopped on exit whatever happens."""
    try:
        yield cluster
    finally:
        cluster.stop()


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

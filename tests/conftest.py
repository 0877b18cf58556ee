"""Shared fixtures: real etcd and NATS servers for the whole test session."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from epdserve.runtime import services
from helpers import free_port


@dataclass
class Infra:
    etcd_endpoints: str  # http://127.0.0.1:<port>
    nats_server: str  # nats://127.0.0.1:<port>
    workdir: Path


@pytest.fixture(scope="session")
def infra(tmp_path_factory) -> Iterator[Infra]:
    """A real etcd and a real NATS (max_payload 8MB) on free ports; stopped by PID at the end."""
    workdir = tmp_path_factory.mktemp("infra")
    started: list[subprocess.Popen] = []
    try:
        etcd_url = f"http://127.0.0.1:{free_port()}"
        started.append(services.start_etcd(etcd_url, workdir / "etcd"))
        nats_url = f"nats://127.0.0.1:{free_port()}"
        started.append(services.start_nats(nats_url, workdir / "nats"))
        yield Infra(etcd_url, nats_url, workdir)
    finally:
        for proc in started:
            services.stop(proc)


@pytest.fixture(scope="session")
def tiny_llava(tmp_path_factory) -> Path:
    """The builder's default tiny LLaVA, built once per session."""
    from epdserve.tools.tiny_model import build_tiny_model
    return build_tiny_model("llava", tmp_path_factory.mktemp("tiny-llava") / "model")


@pytest.fixture(scope="session")
def tiny_llama4(tmp_path_factory) -> Path:
    """The builder's default tiny Llama 4, built once per session."""
    from epdserve.tools.tiny_model import build_tiny_model
    return build_tiny_model("llama4", tmp_path_factory.mktemp("tiny-llama4") / "model")


@pytest.fixture(scope="session")
def tiny_runner(tiny_llava, tmp_path_factory):
    """The worker-side model of `tiny_llava` on the CPU, loaded once per session, with the CPU
    kernels as a worker loads it (torch's ops where they cannot run)."""
    import torch

    from epdserve.kernels.cpu import load_cpu_kernels
    from epdserve.models.registry import load_family
    kernels = load_cpu_kernels(tmp_path_factory.mktemp("kernels"))
    return load_family(tiny_llava).load_runner(None, torch.device("cpu"), kernels)

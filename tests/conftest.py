"""Session fixtures shared by every test: real etcd and NATS servers, the tiny models (built
once per session) and the CPU kernels. Plain helper functions live in the `support` package,
importable because this file puts `tests/` on `sys.path`.

Tests under `tests/cluster/` (they start etcd, NATS or worker processes) get the `cluster`
marker: `pytest -m "not cluster"` runs the unit tests only."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

from support.cluster import Infra, infra_servers  # noqa: E402
from support.lint import LINT_RUNS, LintRuns  # noqa: E402


@pytest.hookimpl(tryfirst=True)   # before `-m` deselects
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    cluster_dir = TESTS / "cluster"
    for item in items:
        if item.path.is_relative_to(cluster_dir):
            item.add_marker(pytest.mark.cluster)


def pytest_collection_finish(session: pytest.Session) -> None:
    """Start the lint and type gate's commands now if its tests run: mypy's ~20 s overlap the suite."""
    if any(item.path.name == "test_lint.py" for item in session.items):
        session.config.stash[LINT_RUNS] = LintRuns()


def pytest_sessionfinish(session: pytest.Session) -> None:
    if (runs := session.config.stash.get(LINT_RUNS, None)) is not None:
        runs.close()


@pytest.fixture(scope="session")
def infra(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Infra]:
    """A real etcd and a real NATS (max_payload 8MB) on free ports; stopped by PID at the end."""
    with infra_servers(tmp_path_factory.mktemp("infra")) as servers:
        yield servers


def _tiny_model(tmp_path_factory: pytest.TempPathFactory, family: str) -> Path:
    from epdserve.tools.tiny_model import build_tiny_model
    return build_tiny_model(family, tmp_path_factory.mktemp(f"tiny-{family}") / "model")


@pytest.fixture(scope="session")
def tiny_llava(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The builder's default tiny LLaVA, built once per session."""
    return _tiny_model(tmp_path_factory, "llava")


@pytest.fixture(scope="session")
def tiny_llama4(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The builder's default tiny Llama 4, built once per session."""
    return _tiny_model(tmp_path_factory, "llama4")


@pytest.fixture(scope="session")
def tiny_qwen2_5_vl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The builder's default tiny Qwen2.5-VL, built once per session."""
    return _tiny_model(tmp_path_factory, "qwen2_5_vl")


@pytest.fixture(scope="session")
def tiny_qwen3_vl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The builder's default tiny Qwen3-VL, built once per session."""
    return _tiny_model(tmp_path_factory, "qwen3_vl")


@pytest.fixture(scope="session")
def cpu_kernels(tmp_path_factory: pytest.TempPathFactory):
    """epdserve's CPU kernels, compiled once per session; None where they cannot run here."""
    from epdserve.kernels.cpu import load_cpu_kernels
    return load_cpu_kernels(tmp_path_factory.mktemp("kernels"))


@pytest.fixture(scope="session")
def tiny_runner(tiny_llava: Path, cpu_kernels):
    """The worker-side model of `tiny_llava` on the CPU, loaded once per session, with the CPU
    kernels as a worker loads it (torch's ops where they cannot run)."""
    import torch

    from epdserve.models.registry import load_family
    return load_family(tiny_llava).load_runner(None, torch.device("cpu"), cpu_kernels)


@pytest.fixture(scope="session")
def tiny_llama4_runner(tiny_llama4: Path, cpu_kernels):
    """The worker-side model of `tiny_llama4`, loaded once per session like `tiny_runner`."""
    import torch

    from epdserve.models.registry import load_family
    return load_family(tiny_llama4).load_runner(None, torch.device("cpu"), cpu_kernels)


@pytest.fixture(scope="session")
def llava_hf_style(tmp_path_factory: pytest.TempPathFactory):
    """`llava_hf_style(dtype)`: the LLaVA directory laid out like llava-hf's, built once per dtype
    per session. float16 is saved sharded (model-0000i-of-00003.safetensors + index) like the
    published checkpoint; float32 as one model.safetensors."""
    from support.llava_hf_style import build_llava_hf_style
    built: dict[str, Path] = {}

    def get(dtype: str) -> Path:
        if dtype not in built:
            built[dtype] = build_llava_hf_style(tmp_path_factory.mktemp(f"llava-hf-{dtype}") / "m", dtype,
                                                num_shards=3 if dtype == "float16" else 1)
        return built[dtype]
    return get

"""The matrix clusters: one per '<family>/<script>' of `support.topologies`, started once.

A test that takes the `topology` argument runs on the shared cluster(s) named by its
`@pytest.mark.topology(...)` marker (or its own parametrization, as the matrix does) and gets
that cluster as `cluster` and its model as `model_dir`. Tests are reordered so that all the
tests of one topology run together: each cluster starts once, and is stopped (by PID) as soon
as the last test that uses it is done, so only one matrix cluster runs at a time.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from support.cluster import Cluster, Infra, script_command, start, two_nodes_command
from support.topologies import TOPOLOGIES, split

POOL = pytest.StashKey["ClusterPool"]()


class ClusterPool:
    """At most one matrix cluster serving; a cluster that failed to start fails its tests at once.

    A cluster no longer needed is stopped in the background (its processes wind down while the
    next one starts); `close(wait=True)` at the end of the session waits for every stop."""

    def __init__(self, infra: Infra, logs: Path):
        self.infra, self.logs = infra, logs
        self.name: str | None = None
        self.cluster: Cluster | None = None
        self.error: BaseException | None = None
        self.stopping: list[threading.Thread] = []

    def get(self, topology: str, model_dir: Path) -> Cluster:
        if topology != self.name:
            self.close()
            self.name = topology
            try:
                self.cluster = start_topology(topology, self.infra, self.logs, model_dir)
            except Exception as exc:
                self.error = exc
        if self.error is not None:
            raise RuntimeError(f"{topology}: the cluster did not start") from self.error
        assert self.cluster is not None
        return self.cluster

    def close(self, wait: bool = False) -> None:
        cluster, self.cluster, self.name, self.error = self.cluster, None, None, None
        if cluster is not None:
            stop = threading.Thread(target=cluster.stop, name=f"stop {cluster.log.name}")
            stop.start()
            self.stopping.append(stop)
        if wait:
            for stop in self.stopping:
                stop.join()
            self.stopping.clear()


def start_topology(topology: str, infra: Infra, logs: Path, model_dir: Path) -> Cluster:
    """Start the launch script of `topology` serving `model_dir`; wait for its workers."""
    _, spec = split(topology)
    build = two_nodes_command if spec.two_nodes else script_command
    command = build(spec.script, *spec.args, model_dir=model_dir, served_name="test-model")
    cluster = start(command, infra, logs / f"{topology.replace('/', '-')}.log", "test-model")
    try:
        cluster.wait_for_workers(**spec.workers)
    except BaseException:
        cluster.stop()
        raise
    return cluster


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    marker = metafunc.definition.get_closest_marker("topology")
    if "topology" in metafunc.fixturenames and marker is not None:
        unknown = set(marker.args) - set(TOPOLOGIES)
        assert not unknown, f"{metafunc.definition.nodeid}: no topology {sorted(unknown)} in {TOPOLOGIES}"
        metafunc.parametrize("topology", marker.args, ids=list(marker.args))


def _topology_of(item: pytest.Item) -> str | None:
    callspec = getattr(item, "callspec", None)
    return callspec.params.get("topology") if callspec is not None else None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Group the tests of each topology where its first test was (the others keep their order)."""
    groups: dict[object, list[pytest.Item]] = {}
    for i, item in enumerate(items):
        groups.setdefault(_topology_of(item) or i, []).append(item)
    items[:] = [item for group in groups.values() for item in group]


def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> None:
    """Stop a matrix cluster once the next test does not use it."""
    pool = item.config.stash.get(POOL, None)
    if pool is not None and pool.name is not None and (nextitem is None or _topology_of(nextitem) != pool.name):
        pool.close()


@pytest.fixture(scope="session")
def cluster_pool(request: pytest.FixtureRequest, infra: Infra,
                 tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterPool]:
    pool = ClusterPool(infra, tmp_path_factory.mktemp("matrix-logs"))
    request.config.stash[POOL] = pool
    try:
        yield pool
    finally:
        pool.close(wait=True)
        del request.config.stash[POOL]


@pytest.fixture
def model_dir(request: pytest.FixtureRequest, topology: str) -> Path:
    """The tiny model of `topology`'s family (a session fixture)."""
    family, _ = split(topology)
    return request.getfixturevalue(family.model)


@pytest.fixture
def cluster(cluster_pool: ClusterPool, topology: str, model_dir: Path) -> Cluster:
    """The running cluster of `topology`, shared with every other test of that topology."""
    return cluster_pool.get(topology, model_dir)

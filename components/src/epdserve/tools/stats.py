"""`python -m epdserve.tools.stats`: every worker's counters in a namespace, as JSON.

Workers serve `WorkerStats` on their `stats` endpoint: KV blocks, NIXL registrations and live
transfers, embedding cache entries and pins; tests use it to check that nothing leaked.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys

from epdserve.config import RuntimeConfig, parse_stats_args
from epdserve.protocol import epdserve_pb2 as pb
from epdserve.runtime.discovery import Discovery
from epdserve.runtime.request_plane import RequestPlane


class StatsReader:
    """Reads every worker's counters over connections it keeps open (`async with`)."""

    def __init__(self, discovery: Discovery, plane: RequestPlane):
        self.discovery = discovery
        self.plane = plane

    @classmethod
    async def connect(cls, config: RuntimeConfig) -> StatsReader:
        discovery = await Discovery.connect(config.etcd_endpoints, config.namespace, config.lease_ttl)
        try:
            return cls(discovery, await RequestPlane.connect(config.nats_server, config.plane))
        except BaseException:
            await discovery.close()
            raise

    async def __aenter__(self) -> StatsReader:
        return self

    async def __aexit__(self, *exc: object) -> None:
        try:
            await self.plane.close()
        finally:
            await self.discovery.close()

    async def read(self) -> dict[str, dict[str, int]]:
        """ "<component>/<instance id>" -> counters, for every live instance serving `stats`."""
        watch = await self.discovery.watch(self.discovery.key("instances", ""))
        infos = [pb.InstanceInfo.FromString(v) for v in watch.items().values()]
        await watch.close()
        out = {}
        for info in sorted((i for i in infos if i.endpoint == "stats"), key=lambda i: i.subject):
            async for data in self.plane.stream(info.subject, b"", f"stats-{info.instance_id}"):
                out[f"{info.component}/{info.instance_id}"] = dict(pb.WorkerStats.FromString(data).counters)
        return out


async def worker_stats(config: RuntimeConfig) -> dict[str, dict[str, int]]:
    """`StatsReader.read` over connections of its own."""
    async with await StatsReader.connect(config) as reader:
        return await reader.read()


def main() -> None:
    config = parse_stats_args(sys.argv[1:], os.environ)
    print(json.dumps(asyncio.run(worker_stats(config)), indent=1, sort_keys=True))


if __name__ == "__main__":
    main()

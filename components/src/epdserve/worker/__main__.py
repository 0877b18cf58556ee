"""`python -m epdserve.worker`: run the worker role(s) chosen by the flags until SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys

import uvloop

from epdserve.config import Role, WorkerConfig, parse_worker_args
from epdserve.models.registry import load_family
from epdserve.processor.service import ProcessorService
from epdserve.runtime.component import Runtime
from epdserve.runtime.service import Service
from epdserve.utils.memory import keep_freed_memory
from epdserve.worker.roles import ROLES
from epdserve.worker.services import EncodeService, PDService

log = logging.getLogger("epdserve.worker")


def services_of(role: Role) -> tuple[type[Service], ...]:
    """The role's services, in start order: its worker part as `ROLES` wires it (the language
    model's or the encoder's), then the processor where the spec runs one."""
    spec = ROLES[role]
    worker: tuple[type[Service], ...] = (PDService,) if spec.generate else (EncodeService,) if spec.encode else ()
    return (*worker, *((ProcessorService,) if spec.processor else ()))


async def run(config: WorkerConfig) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    family = load_family(config.model)
    runtime = await Runtime.connect(config.runtime)
    services: list[Service] = []
    try:
        for cls in services_of(config.role):
            service = cls(config, runtime, family)
            await service.start()
            services.append(service)
        log.info("%s ready: model %r, instance %s", config.role.value, config.served_model_name, runtime.instance_id)
        await stop.wait()
        log.info("shutting down: deregistering, draining in-flight requests")
    finally:
        await runtime.shutdown()
        for service in reversed(services):
            await service.stop()


def main() -> None:
    config = parse_worker_args(sys.argv[1:], os.environ)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    keep_freed_memory()
    try:
        uvloop.run(run(config))
    except (ValueError, OSError) as exc:  # unusable model directory, unreachable etcd/NATS
        log.error("cannot start: %s", exc)
        sys.exit(f"epdserve.worker: {exc}")


if __name__ == "__main__":
    main()

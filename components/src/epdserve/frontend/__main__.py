"""`python -m epdserve.frontend`: the OpenAI HTTP server."""

from __future__ import annotations

import logging
import os
import sys

import uvicorn
import uvloop

from epdserve.config import FrontendConfig, parse_frontend_args
from epdserve.frontend.app import create_app
from epdserve.frontend.models import ModelDirectory
from epdserve.runtime.component import Runtime
from epdserve.utils.memory import keep_freed_memory

log = logging.getLogger("epdserve.frontend")


async def run(config: FrontendConfig) -> None:
    runtime = await Runtime.connect(config.runtime)
    app = create_app(ModelDirectory(await runtime.watch_cards()), runtime.plane)
    server = uvicorn.Server(
        uvicorn.Config(app, host=config.http_host, port=config.http_port, log_level="warning", loop="none")
    )
    log.info("frontend on http://%s:%d (namespace %s)", config.http_host, config.http_port, config.runtime.namespace)
    try:
        await server.serve()  # returns on SIGINT/SIGTERM after finishing open requests
    finally:
        await runtime.shutdown()


def main() -> None:
    config = parse_frontend_args(sys.argv[1:], os.environ)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    keep_freed_memory()
    uvloop.run(run(config))


if __name__ == "__main__":
    main()

"""OpenAI-compatible HTTP frontend: validates, finds a processor in etcd, relays its stream."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections.abc import AsyncGenerator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest
from starlette.exceptions import HTTPException

from epdserve.frontend.formatting import ResponseBuilder, sse
from epdserve.frontend.models import ModelDirectory
from epdserve.protocol import epdserve_pb2 as pb
from epdserve.protocol.errors import EpdError
from epdserve.protocol.openai import parse_request
from epdserve.runtime.request_plane import RequestPlane

log = logging.getLogger(__name__)


def _error(err: EpdError) -> JSONResponse:
    return JSONResponse(err.to_openai(), status_code=err.code)


def create_app(models: ModelDirectory, plane: RequestPlane) -> FastAPI:
    app = FastAPI(title="epdserve")
    registry = CollectorRegistry()
    requests_total = Counter(
        "epdserve_http_requests", "HTTP requests by endpoint and status", ["endpoint", "status"], registry=registry
    )

    @app.exception_handler(EpdError)
    async def _on_error(request: Request, err: EpdError) -> JSONResponse:
        return _error(err)

    @app.exception_handler(HTTPException)
    async def _on_http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return _error(EpdError(exc.status_code, str(exc.detail)))  # unknown route, wrong method

    @app.exception_handler(RequestValidationError)
    async def _on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _error(EpdError.bad_request(str(exc)))

    @app.get("/health")
    async def health() -> dict:
        return {"status": "healthy", "models": [m["id"] for m in models.list()]}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def list_models() -> dict:
        return {"object": "list", "data": models.list()}

    async def complete(request: Request, endpoint: str) -> Response:
        # Our own id keys the request everywhere; a client's X-Request-Id may repeat.
        rid = uuid.uuid4().hex
        if client_rid := request.headers.get("x-request-id"):
            log.info("[%s] client request id %s", rid, client_rid)
        body = await request.body()
        try:
            req = parse_request(endpoint, body)
            card = models.pick(req.model)
            payload = pb.ProcessorRequest(request_id=rid, endpoint=endpoint, body=body).SerializeToString()
            stream = _deltas(plane.stream(card.subject, payload, rid))
            builder = ResponseBuilder(
                endpoint, req.model, rid, return_token_ids=req.return_token_ids, logprobs=req.num_logprobs is not None
            )
            if not req.stream:
                deltas = await _collect_unless_disconnected(request, stream)
                if deltas is None:
                    log.info("[%s] client disconnected; request cancelled", rid)
                    return Response(status_code=499)
                requests_total.labels(endpoint, 200).inc()
                return JSONResponse(builder.response(deltas))
            # Wait for the first delta so request errors still get their HTTP status.
            first = await anext(stream)
        except EpdError as err:
            log.info("[%s] %s %d: %s", rid, endpoint, err.code, err.message)
            requests_total.labels(endpoint, err.code).inc()
            return _error(err)
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        requests_total.labels(endpoint, 200).inc()
        return StreamingResponse(_sse(builder, first, stream, include_usage, rid), media_type="text/event-stream")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await complete(request, "chat")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await complete(request, "completions")

    return app


async def _collect_unless_disconnected(
    request: Request, stream: AsyncGenerator[pb.TextDelta, None]
) -> list[pb.TextDelta] | None:
    """All deltas of a non-streaming request, or None when the client left first (then the
    stream is closed, which cancels the request upstream)."""

    async def collect() -> list[pb.TextDelta]:
        async with contextlib.aclosing(stream):
            return [d async for d in stream]

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    work, watch = asyncio.create_task(collect()), asyncio.create_task(disconnected())
    try:
        await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not work.done():
            work.cancel()
            await asyncio.gather(work, return_exceptions=True)
    return None if work.cancelled() else work.result()


async def _deltas(frames: AsyncGenerator[bytes, None]) -> AsyncGenerator[pb.TextDelta, None]:
    async with contextlib.aclosing(frames):
        async for data in frames:
            yield pb.TextDelta.FromString(data)


async def _sse(
    builder: ResponseBuilder,
    first: pb.TextDelta,
    rest: AsyncGenerator[pb.TextDelta, None],
    include_usage: bool,
    rid: str,
) -> AsyncGenerator[bytes, None]:
    """SSE body; a client that disconnects closes `rest`, which cancels the request upstream."""
    streamed: dict[int, int] = {}  # choice index -> characters sent (completions' text_offset)
    usage = None
    async with contextlib.aclosing(rest):
        try:
            delta = first
            while True:
                yield sse(
                    builder.chunk(delta, delta.index not in streamed, include_usage, streamed.get(delta.index, 0))
                )
                streamed[delta.index] = streamed.get(delta.index, 0) + len(delta.text)
                if delta.HasField("usage"):
                    usage = delta.usage
                delta = await anext(rest)
        except StopAsyncIteration:
            if include_usage and usage is not None:
                yield sse(builder.usage_chunk(usage))
        except EpdError as err:
            log.warning("[%s] stream failed: %s", rid, err.message)
            yield sse(json.dumps(err.to_openai()))
    yield sse("[DONE]")

"""`build_app()`: the FastAPI app, its lifespan (load, warm up, drain) and its error handling.

Lifespan: startup launches a task that loads the checkpoint (off the event loop), starts the
batching engine and runs one warm-up request; only then does /readyz say ready, while /healthz
answers from the first moment. Shutdown stops accepting work and lets queued requests finish.

Errors: every refusal is JSON `{"error": {"type", "message", "limit", "request_id"}}`, on the
OpenAI-compatible paths OpenAI's `{"error": {"message", "type", "param", "code"}}` (same status
codes); anything unexpected is logged with its traceback and answered as a plain 500 message, never
a trace.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from PIL import Image
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ofa_unified.inference import Request as PredictRequest
from serving.config import ServeConfig, resolve_device
from serving.demo import router as demo_router
from serving.engine import BatchingEngine, PredictorLike
from serving.handlers import Handlers, ServerState, ServingError, limit_error, validation_error
from serving.routes import router
from serving.telemetry import ServeMetrics, make_request_id, request_id_var

logger = logging.getLogger("serving")
access_logger = logging.getLogger("serving.access")
QUIET_PATHS = ("/healthz", "/readyz", "/metrics")
DOC_PATHS = ("/openapi.json", "/docs", "/redoc", "/docs/oauth2-redirect")  # served outside the router
OPENAI_PATHS = ("/v1/chat/", "/v1/models")  # errors in OpenAI's shape, so its clients parse them


def error_body(path: str, error: ServingError) -> dict[str, Any]:
    """The error body for a request to `path`: this server's, or OpenAI's (our type as its `code`)."""
    if path.startswith(OPENAI_PATHS):
        kind = "invalid_request_error" if error.status < 500 else "server_error"
        return {"error": {"message": error.message, "type": kind, "param": error.param, "code": error.type}}
    return {
        "error": {
            "type": error.type,
            "message": error.message,
            "limit": error.limit,
            "request_id": request_id_var.get(),
        }
    }


def error_response(request: Request, error: ServingError) -> JSONResponse:
    return JSONResponse(error_body(request.url.path, error), error.status, headers=error.headers)


def build_app(config: ServeConfig | None = None, predictor: PredictorLike | None = None) -> FastAPI:
    """The server app. With `predictor` given (tests), the checkpoint in `config` is not loaded."""
    config = config or ServeConfig.from_env()
    state = ServerState(config, ServeMetrics())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.restart()
        state.startup_task = asyncio.create_task(_startup(state, predictor), name="ofa-startup")
        try:
            yield
        finally:
            await _shutdown(state)

    app = FastAPI(
        title="ofa-unified",
        summary="One vision-language model, every task an instruction, every answer tokens.",
        description=(
            "Image endpoints take JSON (image as base64 or a data: URI) or multipart/form-data (image "
            "as a file). Boxes are [x0, y0, x1, y1] (x first) in pixels of the uploaded image after "
            "its EXIF rotation. Errors are JSON objects naming the limit that was hit."
        ),
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.serving = state
    app.state.handlers = Handlers(state)
    app.include_router(router)
    app.include_router(demo_router)
    app.add_exception_handler(ServingError, _serving_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_middleware(RequestContextMiddleware, state=state)
    return app


def warmup_request(image_size: int) -> PredictRequest:
    """A short caption of a grey image: runs the encoder, the decoder and beam search once."""
    image = Image.new("RGB", (image_size, image_size), (128, 128, 128))
    return PredictRequest(image, task="caption", options={"max_new_tokens": 4})


async def _startup(state: ServerState, predictor: PredictorLike | None) -> None:
    cfg = state.config
    try:
        if predictor is None:
            device = resolve_device(cfg.device, cpu_only=cfg.quantize != "none")
            logger.info(
                "loading checkpoint",
                extra={"checkpoint": cfg.checkpoint, "device": device, "quantize": cfg.quantize},
            )
            from ofa_unified.inference import Predictor

            predictor = await asyncio.to_thread(
                Predictor.from_checkpoint, cfg.checkpoint, device, quantize=cfg.quantize
            )
        engine = BatchingEngine(predictor, cfg, state.metrics)
        await engine.start()
        state.engine = engine
        if cfg.warmup:
            start = time.perf_counter()
            await engine.warmup(warmup_request(predictor.image_size))
            logger.info("warm-up done", extra={"seconds": round(time.perf_counter() - start, 3)})
        state.ready = True
        logger.info(
            "ready",
            extra={"max_batch_size": cfg.max_batch_size, "vq": predictor.vq is not None},
        )
    except Exception as e:
        state.error = f"{type(e).__name__}: {e}"
        logger.exception("startup failed")


async def _shutdown(state: ServerState) -> None:
    state.ready = False
    state.draining = True
    task = state.startup_task
    if task is not None and not task.done():
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    if state.engine is not None:
        waiting = state.engine.queue_depth
        await state.engine.stop(state.config.shutdown_timeout_s)
        logger.info("engine stopped", extra={"drained": waiting})


# ---------------------------------------------------------------------------------------------------
# Error handlers


async def _serving_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ServingError)
    return error_response(request, exc)


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return error_response(request, validation_error(list(exc.errors())))


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    return error_response(
        request, ServingError(exc.status_code, str(exc.detail), type=kind, headers=dict(exc.headers or {}))
    )


# ---------------------------------------------------------------------------------------------------
# Request context: id, body limit, metrics, access log, last-resort 500


class RequestContextMiddleware:
    """Pure ASGI middleware (no extra task per request) around every HTTP request."""

    def __init__(self, app: ASGIApp, state: ServerState) -> None:
        self.app = app
        self.state = state
        # Base64 inflates by 4/3; the rest is headroom for the other form/JSON fields.
        self.max_body = state.config.max_upload_bytes * 4 // 3 + 1024 * 1024

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        rid = make_request_id(headers.get(b"x-request-id", b"").decode("latin-1") or None)
        token = request_id_var.set(rid)
        start = time.perf_counter()
        status = 500
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                started = True
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", rid.encode("latin-1"))]
            await send(message)

        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body:
                    raise self._too_large(received)
            return message

        try:
            length = headers.get(b"content-length")
            if length is not None and length.isdigit() and int(length) > self.max_body:
                await _send_json(send_with_id, scope, self._too_large(int(length)))
            else:
                await self.app(scope, limited_receive, send_with_id)
        except Exception:
            logger.exception("unhandled error")
            if not started:
                await _send_json(
                    send_with_id,
                    scope,
                    ServingError(500, "internal server error; see the server log", type="internal_error"),
                )
        finally:
            self._record(scope, status, time.perf_counter() - start)
            request_id_var.reset(token)

    def _too_large(self, size: int) -> ServingError:
        return limit_error(
            413,
            "max_upload_bytes",
            f"request body is {size} bytes; the image may be at most "
            f"{self.state.config.max_upload_bytes} bytes (body at most {self.max_body})",
        )

    def _record(self, scope: Scope, status: int, seconds: float) -> None:
        path = scope.get("path", "")
        endpoint = getattr(scope.get("route"), "path", None) or (path if path in DOC_PATHS else "unmatched")
        metrics = self.state.metrics
        metrics.requests.labels(endpoint, str(status)).inc()
        metrics.latency.labels(endpoint).observe(seconds)
        access_logger.log(
            logging.DEBUG if path in QUIET_PATHS else logging.INFO,
            "request",
            extra={
                "method": scope.get("method"),
                "path": path,
                "status": status,
                "duration_ms": round(seconds * 1000, 2),
            },
        )


async def _send_json(send: Send, scope: Scope, error: ServingError) -> None:
    body = json.dumps(error_body(scope.get("path", ""), error)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in error.headers.items()]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})

"""Request handling: validate against the limits, decode the image, build a `Request`, run it through
the engine client and shape the result. Knows nothing about HTTP beyond the status codes in
`ServingError`; routes.py does the wiring.

Error mapping (every refusal is a `ServingError` with a JSON body naming the limit):
413 too many bytes / pixels; 415 not an image or an unsupported one; 422 invalid input (empty
instruction, unknown task, missing field, bad box, too many candidates, options over a limit,
truncated or corrupt image, embeddings or retrieval on a model without a retrieval head); 501 image
output without a VQ tokenizer; 503 (+ Retry-After) not ready, queue full or shutting down; 504
timeout. The chat API (serving/chat.py) adds 404 for a model id that is not served, and refuses
http(s) image URLs unless `fetch_image_urls` is on.

A streamed request (`stream`) passes the same checks and the same queue, and is answered with a
status only once its first token (or, for beam search, its whole answer) is there, so every refusal
above is still a status; an error after that (a timeout mid-way) ends the stream.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import http.client
import io
import logging
import math
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from PIL import Image
from pydantic import BaseModel

from ofa_unified.data.preprocess import (
    ImageDecodeError,
    ImageTooLargeError,
    UnsupportedImageError,
    load_image,
)
from ofa_unified.generate import GenerationConfig
from ofa_unified.inference import FREE_DEFAULTS, NO_RETRIEVAL_HEAD, VQ_DIR, Request, split_options
from ofa_unified.tasks import Task, UnknownTaskError, get_task, instruction_source, list_tasks, load_templates
from ofa_unified.vocab import TokenizerMissingError
from serving import protocol as p
from serving.config import ServeConfig
from serving.engine import (
    BatchingEngine,
    EngineClient,
    EngineStream,
    EngineTimeoutError,
    Progress,
    QueueFullError,
    ShuttingDownError,
)
from serving.streaming import TextDeltas
from serving.telemetry import ServeMetrics

logger = logging.getLogger("serving.handlers")

# Task name -> its endpoint; tasks without one run on /v1/generate. itc decodes nothing: its pairs
# are what /v1/retrieval ranks (and it is refused on /v1/generate).
TASK_ENDPOINTS = {
    "caption": "/v1/caption",
    "vqa": "/v1/vqa",
    "grounding": "/v1/grounding",
    "grounded_caption": "/v1/grounded-caption",
    "itm": "/v1/itm",
    "detection": "/v1/detection",
    "text_infilling": "/v1/text-infilling",
    "image_infilling": "/v1/image-infilling",
    "text_to_image": "/v1/image-generation",
    "visual_entailment": "/v1/visual-entailment",
    "itc": "/v1/retrieval",
}
# Record fields a client may give on /v1/generate beyond the task's template fields.
OPTIONAL_FIELDS = {"text_infilling": ("masked_text",)}
NO_IMAGE_TASKS = ("text_to_image",)
FETCH_CHUNK = 64 * 1024


def needs_image(task: Task | None) -> bool:
    """Free instructions and every task but text_to_image read an image."""
    return task is None or task.name not in NO_IMAGE_TASKS


class ServingError(Exception):
    """A refusal with its HTTP status; `limit` names the ServeConfig field that was hit, `param` the
    request field at fault (OpenAI's error body carries it)."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request",
        limit: str | None = None,
        headers: dict[str, str] | None = None,
        param: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.limit = status, message, type, limit
        self.headers = headers or {}
        self.param = param


def limit_error(
    status: int, limit: str, message: str, type: str = "limit_exceeded", **kw: Any
) -> ServingError:
    """An error whose message ends by naming the setting and its environment variable."""
    return ServingError(
        status, f"{message} (limit: {limit}, env {ServeConfig.env_name(limit)})", type=type, limit=limit, **kw
    )


def _loc(err: dict[str, Any]) -> str:
    return ".".join(str(x) for x in err.get("loc", ()) if x not in ("body", "query"))


def validation_message(errors: list[dict[str, Any]]) -> str:
    """'field: problem; field: problem' from pydantic errors (no input echo, no internals)."""
    parts = []
    for err in errors:
        loc = _loc(err)
        msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts) or "invalid request"


def validation_error(errors: list[dict[str, Any]]) -> ServingError:
    """A 422 from pydantic errors; `param` is the first error's field."""
    return ServingError(422, validation_message(errors), param=(_loc(errors[0]) or None) if errors else None)


@dataclass
class ServerState:
    """Mutable per-app state: set up by the lifespan, read by handlers and health endpoints."""

    config: ServeConfig
    metrics: ServeMetrics
    engine: BatchingEngine | None = None
    ready: bool = False
    draining: bool = False
    error: str | None = None
    startup_task: asyncio.Task | None = field(default=None, repr=False)
    started_at: float = field(default_factory=time.time)

    def restart(self) -> None:
        """Back to 'loading' for a lifespan that runs again (a test client entered twice, an ASGI
        harness that ends the lifespan after each test): else it would stay 'shutting down' (503)."""
        self.engine, self.ready, self.draining, self.error = None, False, False, None


@dataclass
class Outcome:
    """A finished request: the predictor's result (PIL image removed), the PNG, the image frame."""

    result: dict[str, Any]
    image_size: tuple[int, int] | None
    png: bytes | None = None
    png_size: tuple[int, int] | None = None


@dataclass
class Admitted:
    """A request that passed every check, ready for the engine (`Handlers.answer` or `.stream`)."""

    engine: EngineClient
    request: Request
    image_size: tuple[int, int] | None  # of the uploaded image as decoded
    candidates: list[str] | None


class ResultStream:
    """A streamed request whose first event has arrived. `text()` yields the answer's text as the
    model writes it; when it ends, `outcome` is what `Handlers.answer` would have returned."""

    def __init__(self, handlers: Handlers, admitted: Admitted, stream: EngineStream) -> None:
        self._handlers, self._admitted, self._stream = handlers, admitted, stream
        self._first: Progress | None = None
        self.outcome: Outcome | None = None

    async def start(self) -> None:
        """Wait for the first tokens (or the answer); refusals and timeouts raise ServingError."""
        try:
            self._first = await self._next()
        except BaseException:
            self.close()
            raise

    async def _next(self) -> Progress | None:
        with self._handlers.engine_errors():
            return await anext(self._stream, None)

    async def text(self, stop: Sequence[str] = ()) -> AsyncIterator[str]:
        """Text deltas (never empty) that add up to the answer's text cut at the first stop string."""
        deltas = TextDeltas(stop)
        try:
            progress = self._first
            while progress is not None:
                if delta := deltas.push(progress.text):
                    yield delta
                progress = await self._next()
            a = self._admitted
            assert self._stream.result is not None
            self.outcome = await self._handlers._outcome(self._stream.result, a.image_size, a.candidates)
            if delta := deltas.finish(self.outcome.result.get("text", "")):
                yield delta
        finally:
            self.close()

    def close(self) -> None:
        """The reader is gone (or done): a request still decoding leaves its batch."""
        self._stream.close()


class Handlers:
    """The serving logic over an engine client; one instance per app."""

    def __init__(self, state: ServerState) -> None:
        self.state = state
        self.config = state.config

    # -- readiness ---------------------------------------------------------------------------------

    def engine(self) -> EngineClient:
        s = self.state
        retry = {"Retry-After": str(self.config.retry_after_s)}
        if s.draining:
            raise ServingError(503, "the server is shutting down", type="unavailable", headers=retry)
        if not s.ready or s.engine is None:
            why = f"the model failed to load: {s.error}" if s.error else "the model is loading or warming up"
            raise ServingError(503, f"not ready: {why}", type="unavailable", headers=retry)
        return s.engine

    # -- the one path every endpoint takes ---------------------------------------------------------

    async def admit(
        self,
        task_name: str | None,
        body: p.GenerationOptions,
        image: bytes | str | None,
        instruction: str | None = None,
        candidates: list[str] | None = None,
        check_fields: bool = False,
    ) -> Admitted:
        """Validate and decode the image. `check_fields` refuses record fields the task does not
        take (for /v1/generate, where clients name fields themselves)."""
        engine = self.engine()
        predictor = engine.predictor
        fields = body.task_fields()
        options = body.options()
        task = self.lookup_task(task_name)
        if task is not None and task.output == "codes" and predictor.vq is None:
            raise ServingError(
                501,
                f"task {task.name} writes an image, but this checkpoint has no VQ tokenizer "
                f"('{VQ_DIR}/' inside the checkpoint directory)",
                type="not_implemented",
            )
        if task is not None and task.output == "embedding":
            raise ServingError(
                422,
                f"task {task.name} embeds an image and a text and decodes nothing: "
                f"POST {TASK_ENDPOINTS[task.name]} (or /v1/embeddings)",
            )
        if task is not None and check_fields:
            allowed = (*task.fields, *OPTIONAL_FIELDS.get(task.name, ()))
            unknown = sorted(set(fields) - set(allowed))
            if unknown:
                raise ServingError(422, f"task {task.name} takes fields {list(allowed)}; unknown: {unknown}")
        self._check_texts(instruction, fields, candidates)
        self._check_options(task, options)

        pil = None
        if needs_image(task):
            if image is None:
                raise ServingError(
                    422, f"{task.name if task else 'an instruction'} needs an image ('image' field)"
                )
            pil = await asyncio.to_thread(self._decode, self._image_bytes(image))
        size = pil.size if pil is not None else (predictor.image_size, predictor.image_size)
        if "box" in fields:
            fields["box"] = self._check_box(fields["box"], size)
        if task is not None and task.output == "codes":
            fields["code_grid"] = predictor.code_grid(task.name)
        self._check_source(task, fields, instruction, size, predictor)
        defaults = task.generation_kwargs({**fields, "task": task.name}) if task else dict(FREE_DEFAULTS)
        cap = options.get("max_new_tokens")
        if cap is not None and defaults.get("min_new_tokens", 0) > cap:
            options["min_new_tokens"] = cap  # the client's cap wins over the task's default floor
        try:
            GenerationConfig(**{**defaults, **split_options(task, options)[1]})
        except ValueError as e:
            raise ServingError(422, str(e)) from None

        request = Request(pil, task_name, fields, instruction, candidates, options)
        return Admitted(engine, request, pil.size if pil is not None else None, candidates)

    async def answer(self, admitted: Admitted) -> Outcome:
        """Queue and wait for the whole answer."""
        with self.engine_errors():
            result = await admitted.engine.generate(admitted.request, self.config.request_timeout_s)
        return await self._outcome(result, admitted.image_size, admitted.candidates)

    async def stream(self, admitted: Admitted) -> ResultStream:
        """Queue and wait for the first tokens; the rest comes from the returned stream."""
        with self.engine_errors():
            stream = admitted.engine.stream(admitted.request, self.config.request_timeout_s)
        result = ResultStream(self, admitted, stream)
        await result.start()
        return result

    async def admit_task(self, task: str, body: p.GenerationOptions, image: bytes | str | None) -> Admitted:
        """What a task's own endpoint runs."""
        return await self.admit(task, body, image, candidates=getattr(body, "candidates", None))

    async def admit_generate(self, body: p.GenerateRequest, image: bytes | str | None) -> Admitted:
        """What /v1/generate runs: a task by name with its fields, or a free instruction."""
        return await self.admit(
            body.task,
            body,
            image,
            instruction=body.instruction,
            candidates=body.candidates,
            check_fields=True,
        )

    async def run_task(self, task: str, body: p.GenerationOptions, image: bytes | str | None) -> Outcome:
        return await self.answer(await self.admit_task(task, body, image))

    async def generate(self, body: p.GenerateRequest, image: bytes | str | None) -> Outcome:
        return await self.answer(await self.admit_generate(body, image))

    def lookup_task(self, name: str | None) -> Task | None:
        if name is None:
            return None
        try:
            return get_task(name)
        except UnknownTaskError as e:
            raise ServingError(422, str(e), type="unknown_task") from None

    def _check_texts(self, instruction: str | None, fields: dict, candidates: list[str] | None) -> None:
        cfg = self.config
        texts = {"instruction": instruction} if instruction is not None else {}
        texts.update({k: v for k, v in fields.items() if isinstance(v, str)})
        texts.update(
            {
                f"{k}[{i}]": s
                for k, v in fields.items()
                if isinstance(v, list)
                for i, s in enumerate(v)
                if isinstance(s, str)
            }
        )
        if candidates is not None:
            if len(candidates) > cfg.max_candidates:
                raise limit_error(
                    422, "max_candidates", f"{len(candidates)} candidates; at most {cfg.max_candidates}"
                )
            if not candidates:
                raise ServingError(422, "candidates is an empty list; leave it out for free decoding")
            for i, c in enumerate(candidates):
                if not c.strip():
                    raise ServingError(422, f"candidates[{i}] is empty")
                texts[f"candidates[{i}]"] = c
        for name, text in texts.items():
            if len(text) > cfg.max_instruction_chars:
                raise limit_error(
                    422,
                    "max_instruction_chars",
                    f"{name} is {len(text)} characters; at most {cfg.max_instruction_chars}",
                )

    def _check_options(self, task: Task | None, options: dict[str, Any]) -> None:
        cfg = self.config
        n = options.get("max_new_tokens")
        if n is not None:
            if task is not None and task.output == "codes":
                raise ServingError(
                    422,
                    f"max_new_tokens does not apply to {task.name}: its code grid fixes the output length",
                )
            if n > cfg.max_new_tokens:
                raise limit_error(422, "max_new_tokens", f"max_new_tokens={n} is above {cfg.max_new_tokens}")
        beams = options.get("beam_size")
        if beams is not None and beams > cfg.max_beam_size:
            raise limit_error(422, "max_beam_size", f"beam_size={beams} is above {cfg.max_beam_size}")

    def _image_bytes(self, image: bytes | str) -> bytes:
        """Raw bytes of an upload, or of a base64 string / data: URI, within max_upload_bytes."""
        limit = self.config.max_upload_bytes
        if isinstance(image, str):
            text = image.strip()
            if text.startswith("data:"):
                header, sep, text = text.partition(",")
                if not sep or not header.endswith(";base64"):
                    raise ServingError(422, "a data: URI image must be base64 ('data:image/png;base64,...')")
            if len(text) * 3 // 4 > limit + 3:
                raise limit_error(
                    413, "max_upload_bytes", f"image is about {len(text) * 3 // 4} bytes; at most {limit}"
                )
            try:
                image = base64.b64decode("".join(text.split()), validate=True)
            except (binascii.Error, ValueError):
                raise ServingError(422, "image is not valid base64 (nor a base64 data: URI)") from None
        if len(image) > limit:
            raise limit_error(413, "max_upload_bytes", f"image is {len(image)} bytes; at most {limit}")
        if not image:
            raise ServingError(422, "image is empty (0 bytes)")
        return image

    async def image_from_url(self, url: str) -> bytes | str:
        """An OpenAI `image_url`: a data: URI as it is (`run` decodes it like any upload), an http(s)
        URL fetched (only with `fetch_image_urls`: the server would reach any host a client names)."""
        scheme = urllib.parse.urlsplit(url.strip()).scheme.lower()
        if scheme == "data":
            return url
        if scheme not in ("http", "https"):
            raise ServingError(
                422,
                "image_url.url must be a data: URI ('data:image/png;base64,...') or an http(s) URL",
                type="invalid_image_url",
                param="messages",
            )
        if not self.config.fetch_image_urls:
            raise limit_error(
                422,
                "fetch_image_urls",
                "this server does not fetch image URLs: send the image as a data: URI, or start the "
                "server with --fetch-image-urls",
                type="image_url_fetching_off",
                param="messages",
            )
        return await asyncio.to_thread(self._fetch, url.strip())

    def _fetch(self, url: str) -> bytes:
        """GET the image within `image_fetch_timeout_s` (in all, not per read) and the upload limit."""
        cfg = self.config
        limit, timeout = cfg.max_upload_bytes, cfg.image_fetch_timeout_s
        host = urllib.parse.urlsplit(url).netloc
        deadline = time.monotonic() + timeout
        chunks: list[bytes] = []
        received = 0
        try:
            request = urllib.request.Request(url, headers={"User-Agent": "ofa-unified-serving"})
            with _URL_OPENER.open(request, timeout=timeout) as response:
                length = response.headers.get("Content-Length", "")
                if length.isdigit() and int(length) > limit:
                    raise limit_error(
                        413, "max_upload_bytes", f"the image at {host} is {length} bytes; at most {limit}"
                    )
                while chunk := response.read(FETCH_CHUNK):
                    received += len(chunk)
                    if received > limit:
                        raise limit_error(
                            413, "max_upload_bytes", f"the image at {host} is over {limit} bytes"
                        )
                    if time.monotonic() > deadline:
                        raise TimeoutError
                    chunks.append(chunk)
        except urllib.error.HTTPError as e:
            why: Any = f"HTTP {e.code}"
        except (urllib.error.URLError, OSError, http.client.HTTPException, ValueError) as e:
            why = getattr(e, "reason", None) or e  # URLError wraps the socket's error
        else:
            return b"".join(chunks)
        if isinstance(why, TimeoutError):
            raise limit_error(
                422,
                "image_fetch_timeout_s",
                f"the image at {host} did not arrive within {timeout:g} s",
                type="image_fetch_failed",
                param="messages",
            )
        raise ServingError(
            422, f"fetching the image from {host} failed: {why}", type="image_fetch_failed", param="messages"
        )

    def _decode(self, data: bytes, max_pixels: int | None = None) -> Image.Image:
        limit = self.config.max_image_pixels if max_pixels is None else max_pixels
        try:
            return load_image(data, max_pixels=limit)
        except ImageTooLargeError as e:
            raise limit_error(413, "max_image_pixels", str(e)) from None
        except UnsupportedImageError as e:
            raise ServingError(415, f"unsupported image: {e}", type="unsupported_media_type") from None
        except ImageDecodeError as e:
            raise ServingError(422, f"cannot decode the image: {e}", type="invalid_image") from None

    def _decode_all(self, images: Sequence[bytes | str]) -> list[Image.Image]:
        """Candidate images, decoded; together within max_image_pixels (one upload's budget, so that
        many small files cannot decode into gigabytes). Errors name the image at fault."""
        budget = self.config.max_image_pixels
        out = []
        for i, image in enumerate(images):
            try:
                pil = self._decode(self._image_bytes(image), max_pixels=budget)
            except ServingError as e:
                e.message, e.param = f"images[{i}]: {e.message}", f"images[{i}]"
                raise
            budget -= pil.width * pil.height
            out.append(pil)
        return out

    @staticmethod
    def _check_box(box: Any, size: tuple[int, int]) -> list[float]:
        w, h = size
        if not isinstance(box, list) or len(box) != 4 or not all(isinstance(v, (int, float)) for v in box):
            raise ServingError(422, f"box must be [x0, y0, x1, y1] (4 numbers), got {box!r}")
        x0, y0, x1, y1 = (float(v) for v in box)
        if not all(math.isfinite(v) for v in (x0, y0, x1, y1)):
            raise ServingError(422, f"box has a non-finite coordinate: {box!r}")
        if not (0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h):
            raise ServingError(
                422,
                f"box {box!r} must satisfy 0 <= x0 < x1 <= {w} and 0 <= y0 < y1 <= {h} "
                f"(pixels of the {w}x{h} uploaded image, after EXIF rotation)",
            )
        return [x0, y0, x1, y1]

    def _check_source(
        self, task: Task | None, fields: dict, instruction: str | None, size: tuple[int, int], predictor: Any
    ) -> None:
        """Build the encoder source as the predictor will, to refuse missing fields and long inputs early."""
        if task is not None:
            missing = [f for f in task.fields if fields.get(f) is None]
            if missing:
                raise ServingError(
                    422, f"task {task.name} needs field(s) {missing}; GET /v1/tasks lists each task's fields"
                )
        try:
            if task is not None:
                source = task.source({**fields, "task": task.name}, size, predictor.vocab)
            else:
                source = instruction_source(instruction or "")
        except (KeyError, ValueError) as e:
            raise ServingError(422, str(e).strip("'\"")) from None
        self._check_tokens(predictor, source, "the instruction")

    def _check_tokens(self, predictor: Any, text: str, name: str) -> None:
        """Refuse a text that encodes to more than max_instruction_tokens."""
        try:
            n = len(predictor.vocab.encode(text))
        except TokenizerMissingError as e:  # official weights loaded without their tokenizer files
            raise ServingError(501, str(e)) from None
        limit = self.config.max_instruction_tokens
        if n > limit:
            raise limit_error(422, "max_instruction_tokens", f"{name} is {n} tokens; at most {limit}")

    @contextlib.contextmanager
    def engine_errors(self) -> Iterator[None]:
        """The engine's refusals and the predictor's errors as ServingErrors."""
        cfg = self.config
        retry = {"Retry-After": str(cfg.retry_after_s)}
        try:
            yield
        except QueueFullError as e:
            raise limit_error(
                503,
                "max_queue_depth",
                f"the queue is full ({e}); retry later",
                type="unavailable",
                headers=retry,
            ) from None
        except EngineTimeoutError:
            raise limit_error(
                504, "request_timeout_s", f"no answer within {cfg.request_timeout_s:g} s", type="timeout"
            ) from None
        except ShuttingDownError as e:
            raise ServingError(503, str(e), type="unavailable", headers=retry) from None
        except ValueError as e:  # the predictor's own input checks
            raise ServingError(422, str(e)) from None
        except Exception:
            logger.exception("the model failed on a request")
            raise ServingError(
                500, "the model failed on this request; see the server log", type="internal_error"
            ) from None

    async def _outcome(
        self, result: dict, size: tuple[int, int] | None, candidates: list[str] | None
    ) -> Outcome:
        result = dict(result)
        image = result.pop("image", None)
        if image is None:
            return Outcome(result, size)
        return Outcome(result, size, await asyncio.to_thread(png_bytes, image), image.size)

    # -- /v1/embeddings and /v1/retrieval ---------------------------------------------------------

    def retrieval_engine(self) -> EngineClient:
        """The engine, if its model has a retrieval head (422 otherwise: no checkpoint change helps
        the request itself, as with any other input the model cannot take)."""
        engine = self.engine()
        if not engine.predictor.has_retrieval:
            raise ServingError(
                422,
                f"{NO_RETRIEVAL_HEAD}: embeddings and retrieval need a checkpoint trained with one",
                type="no_retrieval_head",
            )
        return engine

    async def embed(self, body: p.EmbeddingRequest, image: bytes | str | None) -> p.EmbeddingResponse:
        engine = self.retrieval_engine()
        predictor = engine.predictor
        if (image is None) == (body.text is None):
            raise ServingError(422, "give exactly one of 'image' and 'text' to embed")
        if body.text is not None:
            self._check_texts(None, {"text": body.text}, None)
            self._check_tokens(predictor, body.text, "text")
            job = partial(predictor.embed_texts, [body.text])
        else:
            pil = await asyncio.to_thread(self._decode, self._image_bytes(image))
            job = partial(predictor.embed_images, [pil])
        with self.engine_errors():
            vectors = await engine.call(job, self.config.request_timeout_s)
        vector = vectors[0].tolist()
        return p.EmbeddingResponse(
            input="text" if image is None else "image", embedding=vector, dim=len(vector)
        )

    async def retrieve(
        self, body: p.RetrievalRequest, image: bytes | str | None, images: list[bytes | str] | None
    ) -> p.RetrievalResponse:
        """An image query ranks `texts`, a text query ranks `images`; see RetrievalRequest."""
        engine = self.retrieval_engine()
        predictor, cfg = engine.predictor, self.config
        if (image is None) == (body.text is None):
            raise ServingError(
                422, "give exactly one query: 'image' (ranks 'texts') or 'text' (ranks 'images')"
            )
        image_query = image is not None
        given: dict[str, Sequence[Any] | None] = {"texts": body.texts, "images": images}
        wanted, other = ("texts", "images") if image_query else ("images", "texts")
        if given[other] is not None:
            raise ServingError(
                422, f"an {'image' if image_query else 'text'} query ranks '{wanted}', not '{other}'"
            )
        candidates = given[wanted]
        if not candidates:
            raise ServingError(422, f"no candidates: give a non-empty '{wanted}' list")
        limit = "max_retrieval_texts" if image_query else "max_retrieval_images"
        most = getattr(cfg, limit)
        if len(candidates) > most:
            raise limit_error(422, limit, f"{len(candidates)} candidate {wanted}; at most {most}")
        if body.rerank > cfg.max_rerank:
            raise limit_error(422, "max_rerank", f"rerank={body.rerank} is above {cfg.max_rerank}")
        texts = {"text": body.text} if body.text is not None else {}
        texts.update({f"texts[{i}]": t for i, t in enumerate(body.texts or ())})
        self._check_texts(None, texts, None)
        for name, text in texts.items():
            self._check_tokens(predictor, text, name)
        if image_query:
            query: Any = await asyncio.to_thread(self._decode, self._image_bytes(image))
            pool: list[Any] = list(candidates)
        else:
            query, pool = body.text, await asyncio.to_thread(self._decode_all, candidates)
        with self.engine_errors():
            ranked = await engine.call(
                partial(predictor.rank, query, pool, body.rerank), cfg.request_timeout_s
            )
        return p.RetrievalResponse(
            query="image" if image_query else "text",
            reranked=min(body.rerank, len(pool)),
            results=[p.RankedCandidate(**r) for r in ranked],
        )

    # -- /v1/models --------------------------------------------------------------------------------

    def model_id(self) -> str:
        """The id clients name the checkpoint by: `model_name`, else the checkpoint directory's name."""
        return self.config.model_name or Path(self.config.checkpoint).name or "ofa-unified"

    def models(self) -> p.ModelList:
        try:
            created = os.path.getmtime(self.config.checkpoint)
        except OSError:  # an injected predictor (tests) or a vanished directory
            created = self.state.started_at
        return p.ModelList(data=[p.ModelCard(id=self.model_id(), created=int(created))])

    # -- /v1/tasks ---------------------------------------------------------------------------------

    def tasks(self) -> p.TaskList:
        engine = self.state.engine
        has_vq = engine is not None and engine.predictor.vq is not None
        has_retrieval = engine is not None and engine.predictor.has_retrieval
        templates = load_templates()
        out = []
        for name in list_tasks():
            spec = templates[name]
            out.append(
                p.TaskInfo(
                    name=name,
                    endpoint=TASK_ENDPOINTS.get(name),
                    fields=list(spec["fields"]),
                    output=spec["output"],
                    labels=list(spec["labels"]) if "labels" in spec else None,
                    template=spec["template"],
                    needs_image=needs_image(get_task(name)),
                    available={"codes": has_vq, "embedding": has_retrieval}.get(spec["output"], True),
                )
            )
        return p.TaskList(tasks=out)


class _HTTPOnlyRedirects(urllib.request.HTTPRedirectHandler):
    """Follow redirects to http(s) only (urllib's own handler would also follow ftp)."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # type: ignore[no-untyped-def]
        if urllib.parse.urlsplit(newurl).scheme.lower() not in ("http", "https"):
            raise urllib.error.HTTPError(newurl, code, "redirect to a non-http(s) URL", headers, fp)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


_URL_OPENER = urllib.request.build_opener(_HTTPOnlyRedirects)


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------------
# Result -> task-shaped response


def _common(o: Outcome) -> dict[str, Any]:
    r = o.result
    return {
        "text": r.get("text", ""),
        "tokens": list(r.get("tokens", [])),
        "score": r.get("score"),
        "parse_error": r.get("parse_error"),
        "image_size": list(o.image_size) if o.image_size else None,
    }


def _closed(o: Outcome) -> dict[str, Any]:
    return {"probability": o.result.get("probability"), "probabilities": o.result.get("probabilities")}


def caption_response(o: Outcome) -> p.CaptionResponse:
    return p.CaptionResponse(
        **_common(o), caption=None if "parse_error" in o.result else o.result.get("text")
    )


def vqa_response(o: Outcome) -> p.VQAResponse:
    return p.VQAResponse(**_common(o), **_closed(o), answer=o.result.get("answer"))


def grounding_response(o: Outcome) -> p.GroundingResponse:
    return p.GroundingResponse(**_common(o), box=o.result.get("box"))


def grounded_caption_response(o: Outcome) -> p.GroundedCaptionResponse:
    return p.GroundedCaptionResponse(
        **_common(o), caption=None if "parse_error" in o.result else o.result.get("text")
    )


def itm_response(o: Outcome) -> p.ITMResponse:
    answer = o.result.get("answer")
    return p.ITMResponse(
        **_common(o), **_closed(o), answer=answer, match=None if answer is None else answer == "yes"
    )


def detection_response(o: Outcome) -> p.DetectionResponse:
    objects = o.result.get("objects")
    return p.DetectionResponse(
        **_common(o), objects=None if objects is None else [p.DetectedObject(**obj) for obj in objects]
    )


def text_infilling_response(o: Outcome) -> p.TextInfillingResponse:
    return p.TextInfillingResponse(
        **_common(o), filled_text=None if "parse_error" in o.result else o.result.get("text")
    )


def visual_entailment_response(o: Outcome) -> p.VisualEntailmentResponse:
    return p.VisualEntailmentResponse(**_common(o), **_closed(o), answer=o.result.get("answer"))


def image_response(o: Outcome) -> p.ImageOutput:
    width, height = o.png_size or (None, None)
    return p.ImageOutput(
        **_common(o),
        image=base64.b64encode(o.png).decode("ascii") if o.png is not None else None,
        width=width,
        height=height,
        codes=o.result.get("codes"),
        images_averaged=o.result.get("images_averaged"),
    )


# Predictor result keys that /v1/generate shows beside `result`, or not at all (usage: the chat API).
_NOT_IN_RESULT = frozenset(
    ("text", "tokens", "score", "parse_error", "probability", "probabilities", "task")
    + ("usage", "hit_max_new_tokens")
)


def generate_response(o: Outcome) -> p.GenerateResponse:
    return p.GenerateResponse(
        **_common(o),
        **_closed(o),
        task=o.result.get("task"),
        result={k: v for k, v in o.result.items() if k not in _NOT_IN_RESULT},
        image=base64.b64encode(o.png).decode("ascii") if o.png is not None else None,
    )


# Task -> its endpoint's request model and response builder: routes.py mounts them, and the chat API
# validates and answers a named task exactly as that endpoint does.
TASK_API: dict[str, tuple[type[p.GenerationOptions], Callable[[Outcome], BaseModel]]] = {
    "caption": (p.CaptionRequest, caption_response),
    "vqa": (p.VQARequest, vqa_response),
    "grounding": (p.GroundingRequest, grounding_response),
    "grounded_caption": (p.GroundedCaptionRequest, grounded_caption_response),
    "itm": (p.ITMRequest, itm_response),
    "detection": (p.DetectionRequest, detection_response),
    "text_infilling": (p.TextInfillingRequest, text_infilling_response),
    "image_infilling": (p.ImageInfillingRequest, image_response),
    "text_to_image": (p.ImageGenerationRequest, image_response),
    "visual_entailment": (p.VisualEntailmentRequest, visual_entailment_response),
}

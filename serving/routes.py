"""HTTP wiring only: read the body (JSON or multipart), call a handler, return its model.

Every image endpoint accepts `application/json` (image as base64 or a data: URI) and
`multipart/form-data` (image as a file; /v1/retrieval's candidate `images` as repeated files), so
the body is read by hand and documented through `openapi_extra`; the logic lives in handlers.py.
The OpenAI-compatible routes (/v1/chat/completions, /v1/models) take JSON only, as OpenAI's API
does; their logic lives in chat.py.
"""

from __future__ import annotations

import copy
import json
import types
import typing
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Any, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ValidationError
from starlette.datastructures import UploadFile

from serving import chat
from serving import handlers as h
from serving import protocol as p
from serving.streaming import SSE_DONE, SSE_HEADERS, sse_data

router = APIRouter()
OutputFormat = Literal["json", "png"]
UPLOAD_FIELDS = ("image", "images")  # files in multipart, base64 / data: URIs in JSON

ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": p.ErrorResponse, "description": "the body cannot be parsed (malformed multipart or JSON)"},
    413: {"model": p.ErrorResponse, "description": "image bytes or pixels over the limit"},
    415: {"model": p.ErrorResponse, "description": "not an image, or an unsupported one"},
    422: {"model": p.ErrorResponse, "description": "invalid request (the message names the field or limit)"},
    503: {
        "model": p.ErrorResponse,
        "description": "not ready, queue full or shutting down (see Retry-After)",
    },
    504: {"model": p.ErrorResponse, "description": "no answer within request_timeout_s"},
}
IMAGE_ERRORS = {**ERRORS, 501: {"model": p.ErrorResponse, "description": "checkpoint has no VQ tokenizer"}}


def _handlers(request: Request) -> h.Handlers:
    return request.app.state.handlers


# ---------------------------------------------------------------------------------------------------
# Body parsing


def _kind(annotation: Any) -> str:
    """'list', 'dict', 'str' or 'scalar': how a form field's text becomes a value."""
    args = (
        typing.get_args(annotation)
        if typing.get_origin(annotation) in (typing.Union, types.UnionType)
        else (annotation,)
    )
    args = tuple(typing.get_args(a)[0] if typing.get_origin(a) is typing.Annotated else a for a in args)
    origins = {typing.get_origin(a) or a for a in args}
    if list in origins:
        return "list"
    if dict in origins:
        return "dict"
    return "str" if str in origins else "scalar"


def _form_value(model: type[BaseModel], key: str, values: list[Any]) -> Any:
    info = model.model_fields.get(key)
    kind = _kind(info.annotation) if info is not None else "str"
    texts = [v for v in values if isinstance(v, str)]
    if len(texts) != len(values):
        raise h.ServingError(422, f"{key}: expected a form value, got a file")
    try:
        if kind == "list":
            if len(texts) == 1 and texts[0].lstrip().startswith("["):
                return json.loads(texts[0])
            return texts
        if kind == "dict":
            return json.loads(texts[0]) if texts[0].strip() else {}
    except json.JSONDecodeError as e:
        raise h.ServingError(422, f"{key}: not valid JSON ({e.msg})") from None
    if len(texts) > 1:
        raise h.ServingError(422, f"{key}: given {len(texts)} times, expected once")
    return texts[0]


async def read_body(request: Request, model: type[BaseModel]) -> tuple[Any, bytes | str | None]:
    """The validated request model and the raw image (upload bytes, or the JSON base64 string)."""
    body, uploads = await read_uploads(request, model)
    return body, uploads.get("image")


async def read_uploads(request: Request, model: type[BaseModel]) -> tuple[Any, dict[str, Any]]:
    """The validated request model and its raw images by field, for the fields `model` has: `image`
    (upload bytes, or the JSON base64 string) and `images` (a list of those)."""
    ctype = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
    if ctype in ("multipart/form-data", "application/x-www-form-urlencoded"):
        form = await request.form()
        try:
            data: dict[str, Any] = {}
            uploads: dict[str, Any] = {}
            for key in dict.fromkeys(form.keys()):
                values = form.getlist(key)
                if key in UPLOAD_FIELDS and key in model.model_fields:
                    read = [await v.read() if isinstance(v, UploadFile) else v for v in values]
                    uploads[key] = read if key == "images" else read[0]
                    continue
                # a file field the model does not take is refused as an extra field
                value = "<file>" if key in UPLOAD_FIELDS else _form_value(model, key, values)
                info = model.model_fields.get(key)
                if value == "" and info is not None and _kind(info.annotation) == "scalar":
                    continue  # an empty optional form field (as HTML forms send) means unset
                data[key] = value
        finally:
            await form.close()
        try:
            return model.model_validate(data), uploads
        except ValidationError as e:
            raise h.validation_error(e.errors()) from None
    if ctype == "application/json" or ctype.endswith("+json"):
        raw = await request.body()
        if not raw.strip():
            raise h.ServingError(422, "empty body: send a JSON object or multipart/form-data")
        try:
            body = model.model_validate_json(raw)
        except ValidationError as e:
            raise h.validation_error(e.errors()) from None
        return body, {k: getattr(body, k) for k in UPLOAD_FIELDS if k in model.model_fields}
    raise h.ServingError(
        415,
        f"unsupported Content-Type {ctype!r}: send application/json or multipart/form-data",
        type="unsupported_media_type",
    )


def _form_field(prop: dict[str, Any]) -> dict[str, Any]:
    """A property as a form field: without JSON's null, which a form cannot send (a field left out,
    or an empty non-text one, is unset; the text 'null' is a string)."""
    options = [o for o in prop.get("anyOf", ()) if o != {"type": "null"}]
    if len(options) == len(prop.get("anyOf", ())):
        return prop
    rest = {k: v for k, v in prop.items() if k != "anyOf"}
    return {**rest, **options[0]} if len(options) == 1 else {**rest, "anyOf": options}


def body_doc(model: type[BaseModel]) -> dict[str, Any]:
    """OpenAPI requestBody listing both encodings (the image is a file in multipart)."""
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    content: dict[str, Any] = {"application/json": {"schema": schema}}
    if "image" in schema.get("properties", {}):
        form = copy.deepcopy(schema)
        form["properties"] = {k: _form_field(v) for k, v in form["properties"].items()}
        form["properties"]["image"] = {"type": "string", "format": "binary", "description": "the image file"}
        if "images" in form["properties"]:
            form["properties"]["images"] = {
                "type": "array",
                "items": {"type": "string", "format": "binary"},
                "description": "the candidate image files (the field repeated)",
            }
        content["multipart/form-data"] = {"schema": form}
    return {"requestBody": {"required": True, "content": content}}


# ---------------------------------------------------------------------------------------------------
# Task endpoints


def png_response(o: h.Outcome) -> Response:
    if o.png is None:
        raise h.ServingError(
            500,
            f"the model's output is not a valid image: {o.result.get('parse_error')}",
            type="model_output_error",
        )
    headers = {} if o.result.get("score") is None else {"X-Score": f"{o.result['score']:.6g}"}
    return Response(o.png, media_type="image/png", headers=headers)


def _task_route(task: str, summary: str, image_output: bool = False) -> None:
    path = h.TASK_ENDPOINTS[task]
    model, build = h.TASK_API[task]

    async def run(request: Request) -> h.Outcome:
        body, image = await read_body(request, model)
        return await _handlers(request).run_task(task, body, image)

    endpoint: Callable[..., Awaitable[Any]]
    if image_output:

        async def endpoint(
            request: Request,
            format: OutputFormat = Query("json", description="'png' returns the image itself (image/png)"),
        ) -> Any:
            outcome = await run(request)
            return png_response(outcome) if format == "png" else build(outcome)

    else:

        async def endpoint(request: Request) -> Any:
            return build(await run(request))

    endpoint.__name__ = task
    responses = {**IMAGE_ERRORS, 200: {"content": {"image/png": {}}}} if image_output else ERRORS
    router.add_api_route(
        path,
        endpoint,
        methods=["POST"],
        response_model=typing.get_type_hints(build)["return"],
        summary=summary,
        description=(model.__doc__ or "").strip() or summary,
        responses=responses,
        openapi_extra=body_doc(model),
        tags=["tasks"],
    )


_task_route("caption", "Caption the image")
_task_route("vqa", "Answer a question about the image")
_task_route("grounding", "Find the region a text describes")
_task_route("grounded_caption", "Describe a region of the image")
_task_route("itm", "Does the text match the image? (yes/no)")
_task_route("detection", "Detect the objects")
_task_route("text_infilling", "Fill in <mask> spans")
_task_route("image_infilling", "Redraw the middle of the image", image_output=True)
_task_route("text_to_image", "Draw an image from a caption", image_output=True)
_task_route("visual_entailment", "Does the image and text1 imply text2? (yes/no/maybe)")


def _error_body(path: str, error: h.ServingError) -> dict[str, Any]:
    from serving.app import error_body  # app.py imports this module: look it up when needed

    return error_body(path, error)


def sse_response(
    request: Request,
    events: AsyncGenerator[BaseModel, None],
    error_event: Callable[[dict[str, Any]], dict[str, Any]] = lambda body: body,
) -> StreamingResponse:
    """Server-sent events: one `data:` line of JSON per event, then `data: [DONE]`. An error after
    the stream started becomes an event (`error_event` of the endpoint's error body) before [DONE];
    a client that disconnects cancels the iteration, which lets go of the request's decoding."""
    path = request.url.path

    async def frames() -> AsyncIterator[str]:
        try:
            async for event in events:
                yield sse_data(event.model_dump_json())
        except h.ServingError as e:
            yield sse_data(json.dumps(error_event(_error_body(path, e))))
        finally:
            await events.aclose()
        yield SSE_DONE

    return StreamingResponse(frames(), media_type="text/event-stream", headers=SSE_HEADERS)


async def _generate_events(results: h.ResultStream) -> AsyncGenerator[BaseModel, None]:
    async for text in results.text():
        yield p.GenerateDelta(text=text)
    assert results.outcome is not None
    yield p.GenerateResult(response=h.generate_response(results.outcome))


@router.post(
    "/v1/generate",
    response_model=p.GenerateResponse,
    responses={
        **IMAGE_ERRORS,
        200: {"content": {"text/event-stream": {"description": "with stream: delta and result events"}}},
    },
    openapi_extra=body_doc(p.GenerateRequest),
    tags=["generate"],
)
async def generate(request: Request) -> Any:
    """Any task by name with its fields, or a free instruction; `candidates` switches on trie decoding.

    `stream: true` answers as server-sent events, each a `data:` line of JSON: `{"type": "delta",
    "text": ...}` for each piece of text as the model writes it, then `{"type": "result",
    "response": {...}}` with the body the call returns without `stream`, then `data: [DONE]`. The
    deltas add up to `response.text`. Greedy decoding and single samples stream token by token; beam
    search (the tasks' default, and a free instruction's) and several samples send their text as one
    delta at the end. Refusals (4xx, 503, 504 before the first token) are ordinary error responses;
    an error once the stream has begun is an event `{"type": "error", "error": {...}}` before
    [DONE]. A client that closes the connection stops its decoding."""
    body, image = await read_body(request, p.GenerateRequest)
    handlers = _handlers(request)
    admitted = await handlers.admit_generate(body, image)
    if not body.stream:
        return h.generate_response(await handlers.answer(admitted))
    results = await handlers.stream(admitted)
    return sse_response(request, _generate_events(results), lambda error: {"type": "error", **error})


# ---------------------------------------------------------------------------------------------------
# Retrieval (a model with a contrastive head, itc_dim > 0)


@router.post(
    "/v1/embeddings",
    response_model=p.EmbeddingResponse,
    responses=ERRORS,
    openapi_extra=body_doc(p.EmbeddingRequest),
    tags=["retrieval"],
)
async def embeddings(request: Request) -> p.EmbeddingResponse:
    """The unit vector of one image or one text in the model's joint space (the dot product of two is
    their cosine similarity). 422 on a model without a retrieval head (itc_dim=0)."""
    body, image = await read_body(request, p.EmbeddingRequest)
    return await _handlers(request).embed(body, image)


@router.post(
    "/v1/retrieval",
    response_model=p.RetrievalResponse,
    responses=ERRORS,
    openapi_extra=body_doc(p.RetrievalRequest),
    tags=["retrieval"],
)
async def retrieval(request: Request) -> p.RetrievalResponse:
    """Rank candidates against one query by embedding similarity: an `image` and candidate `texts`
    (at most max_retrieval_texts), or a `text` and candidate `images` (at most max_retrieval_images;
    all images of one request within max_image_pixels together, and the body within the upload limit).
    `rerank: k` re-scores the top k with the fusion model's image-text matching (ITM P('yes'), at most
    max_rerank) and puts them first in that order. 422 on a model without a retrieval head."""
    body, uploads = await read_uploads(request, p.RetrievalRequest)
    return await _handlers(request).retrieve(body, uploads.get("image"), uploads.get("images"))


@router.get("/v1/tasks", response_model=p.TaskList, tags=["generate"])
async def tasks(request: Request) -> p.TaskList:
    """Every task, its fields (from instructions/templates.json) and its endpoint."""
    return _handlers(request).tasks()


# ---------------------------------------------------------------------------------------------------
# OpenAI-compatible chat API

OPENAI_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {**info, "model": p.OpenAIErrorResponse}
    for status, info in {
        **IMAGE_ERRORS,
        404: {"description": "the model id is not served here (GET /v1/models)"},
    }.items()
}


@router.post(
    "/v1/chat/completions",
    response_model=p.ChatCompletion,
    responses={
        **OPENAI_ERRORS,
        200: {"content": {"text/event-stream": {"description": "with stream: chat.completion.chunk events"}}},
    },
    tags=["openai"],
)
async def chat_completions(request: Request, body: p.ChatCompletionRequest) -> Any:
    """OpenAI's chat completions, for the official clients unchanged. **Single turn**: the model
    answers the last user message (its text is the instruction) about exactly one image, an
    `image_url` part holding a data: URI (http(s) URLs only when the server runs with
    `fetch_image_urls`); an image-less request runs only for a task that reads none (text_to_image).
    System messages are ignored; earlier user or assistant turns are refused.

    Extension fields (`extra_body` in the OpenAI client): `task` (GET /v1/tasks; the user text fills
    its text field: vqa's question, grounding's text, ...), the task's other fields (`candidates`,
    `box`, `text1`, ...) and `beam_size`, `top_k`, `mean_image`. The response's `ofa` field is the
    body the task's own endpoint returns (without `task`: /v1/generate's for the free instruction);
    `content` is the decoded output text.

    `temperature` unset: the task's decoding (beam search); 0: greedy; > 0 or `top_p`: sampling.
    `n` must be 1; `stop` cuts the content (a streamed one too: text that may begin a stop string
    waits until it is known not to). `stream: true` answers as server-sent events: a role chunk, a
    content chunk per text delta as the tokens are decoded, a chunk with finish_reason (and `ofa`),
    a usage chunk with `stream_options.include_usage`, `data: [DONE]`. Greedy (temperature 0) and
    sampled (> 0) answers stream token by token; with temperature unset the task's beam search
    sends its content in one chunk at the end. Refusals come before the stream; an error once it
    has begun is a `data: {"error": {...}}` event before [DONE]. Closing the connection stops the
    request's decoding. Errors use OpenAI's body `{"error": {"message", "type", "param", "code"}}`.
    """
    if not body.stream:
        return await chat.complete(_handlers(request), body)
    return sse_response(request, await chat.stream(_handlers(request), body))


@router.get("/v1/models", response_model=p.ModelList, tags=["openai"])
async def models(request: Request) -> p.ModelList:
    """The served checkpoint, in OpenAI's list format (its id is what chat requests name as `model`)."""
    return _handlers(request).models()


# ---------------------------------------------------------------------------------------------------
# Operations


@router.get("/healthz", response_model=p.Status, tags=["ops"])
async def healthz(request: Request) -> Any:
    """The process is up (503 only if the model failed to load)."""
    state: h.ServerState = request.app.state.serving
    if state.error:
        return JSONResponse(p.Status(status="failed", detail=state.error).model_dump(), status_code=503)
    return p.Status(status="ok")


@router.get("/readyz", response_model=p.Status, responses={503: {"model": p.Status}}, tags=["ops"])
async def readyz(request: Request) -> Any:
    """The model is loaded and warmed up, and the server is not shutting down."""
    state: h.ServerState = request.app.state.serving
    if state.ready and not state.draining:
        return p.Status(status="ready")
    status = "draining" if state.draining else "failed" if state.error else "loading"
    return JSONResponse(
        p.Status(status=status, detail=state.error).model_dump(),
        status_code=503,
        headers={"Retry-After": str(state.config.retry_after_s)},
    )


@router.get("/metrics", tags=["ops"], response_class=Response)
async def metrics(request: Request) -> Response:
    """Prometheus text format."""
    state: h.ServerState = request.app.state.serving
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

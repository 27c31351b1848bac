"""OpenAI's chat/completions over the handlers' one path: a chat request becomes the request model of
the named task's own endpoint (or of /v1/generate), runs through `Handlers.run` with its limits and
image decoding, and its answer comes back OpenAI-shaped, with the endpoint's body in `ofa`.

The model answers one instruction about one image, so a conversation is refused rather than
flattened: system (and developer) messages are ignored, any other turn before the last user message
is an error. Sampling maps as: temperature unset = the task's decoding (beam search), 0 = greedy,
> 0 (or top_p) = one sample (image tasks keep their sample count, which `mean_image` averages).

Streaming sends a content chunk per text delta as the tokens are decoded (greedy or one sample);
beam search and several samples know their answer only at the end, so it comes as one chunk then.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncGenerator, Callable, Iterator
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError

from ofa_unified.tasks import Task, text_field
from serving import handlers as h
from serving import protocol as p
from serving.streaming import cut_at_stop
from serving.telemetry import request_id_var

# Extension keys that OpenAI spells otherwise, or that the chat shape carries elsewhere.
RESERVED = {
    "max_new_tokens": "use max_tokens (or max_completion_tokens)",
    "do_sample": "use temperature (0: greedy, > 0: sampling)",
    "image": "send the image as an image_url part of the user message",
    "instruction": "the instruction is the user message's text",
    "fields": "give the task's fields as top-level (extra_body) fields, e.g. 'box' or 'candidates'",
}
# ServeConfig limits -> the chat request field that ran into them.
LIMIT_PARAMS = {
    "max_candidates": "candidates",
    "max_beam_size": "beam_size",
    "max_upload_bytes": "messages",
    "max_image_pixels": "messages",
    "max_instruction_chars": "messages",
    "max_instruction_tokens": "messages",
}
IGNORED_ROLES = ("system", "developer")


@dataclass
class UserTurn:
    text: str
    image_url: str | None
    index: int  # position in `messages`, for error messages


def user_turn(messages: list[p.ChatMessage]) -> UserTurn:
    """The one user message, its text parts joined and its (at most one) image."""
    turns = [(i, m) for i, m in enumerate(messages) if m.role not in IGNORED_ROLES]
    if not turns or turns[-1][1].role != "user":
        raise h.ServingError(
            422, "the last message must be the user's (role 'user'): the model answers it", param="messages"
        )
    if len(turns) > 1:
        i, m = turns[0]
        raise h.ServingError(
            422,
            f"messages[{i}] is a {m.role!r} turn: this model is single-turn and reads one user message "
            "(system messages are ignored); send the instruction as the only user message",
            param="messages",
        )
    index, message = turns[0]
    parts = message.content or []
    images = [part.image_url.url for part in parts if part.image_url is not None]
    if len(images) > 1:
        raise h.ServingError(
            422,
            f"messages[{index}] has {len(images)} images; the model reads exactly one",
            param="messages",
        )
    text = " ".join(part.text.strip() for part in parts if part.type == "text" and part.text.strip())
    return UserTurn(text, images[0] if images else None, index)


def decoding(body: p.ChatCompletionRequest, task: Task | None) -> dict[str, Any]:
    """OpenAI's sampling fields as GenerationOptions fields."""
    out: dict[str, Any] = {}
    caps = {v for v in (body.max_tokens, body.max_completion_tokens) if v is not None}
    if len(caps) > 1:
        raise h.ServingError(
            422, "max_tokens and max_completion_tokens differ: give one", param="max_completion_tokens"
        )
    if caps:
        out["max_new_tokens"] = caps.pop()
    if body.temperature == 0:
        out.update(do_sample=False, beam_size=1)
    elif body.temperature is not None or body.top_p is not None:
        out["do_sample"] = True
        out.update({k: v for k in ("temperature", "top_p") if (v := getattr(body, k)) is not None})
        if task is None or task.output != "codes":
            out["beam_size"] = 1  # one sample, as OpenAI's sampling draws
    if body.seed is not None:
        out["seed"] = body.seed
    return out


def build_request(body: p.ChatCompletionRequest, task: Task | None, text: str) -> BaseModel:
    """The request model the task's own endpoint validates (/v1/generate's for a free instruction or
    a task without an endpoint), from the user text, the sampling fields and the extension fields."""
    extras = dict(body.model_extra or {})
    for key, hint in RESERVED.items():
        if key in extras:
            raise h.ServingError(422, f"{key}: not a chat field here; {hint}", param=key)
    data: dict[str, Any] = {**decoding(body, task), **extras}
    if task is None:
        if not text:
            raise h.ServingError(
                422,
                "the user message has no text: write an instruction, or name a task (extension "
                "field 'task', GET /v1/tasks)",
                param="messages",
            )
        data["instruction"] = text
        return _validate(p.GenerateRequest, data)
    field = text_field(task)
    if field is None and text:
        raise h.ServingError(
            422,
            f"task {task.name} takes no text (its instruction is fixed: {task.template.strip()!r}); send "
            "only the image, or leave out 'task' to ask a free instruction",
            param="messages",
        )
    if field is not None and text:
        if field in data:
            raise h.ServingError(
                422, f"{field}: given twice (the user message's text is the {field})", param=field
            )
        data[field] = text
    elif field is not None and field not in data:
        raise h.ServingError(
            422,
            f"task {task.name} reads its {field!r} from the user message's text, which is empty",
            param=field,
        )
    if task.name in h.TASK_API:
        return _validate(h.TASK_API[task.name][0], data)
    options = set(p.GenerationOptions.model_fields) | {"candidates"}
    fields = {k: data.pop(k) for k in list(data) if k not in options}
    return _validate(p.GenerateRequest, {**data, "task": task.name, "fields": fields})


def _validate(model: type[BaseModel], data: dict[str, Any]) -> BaseModel:
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise h.validation_error(e.errors()) from None


@dataclass
class Call:
    """A chat request admitted by the handlers, with what shapes its answer."""

    admitted: h.Admitted
    respond: Callable[[h.Outcome], BaseModel]  # the endpoint's response builder: the `ofa` body
    model: str
    token_param: str  # the field that set max_new_tokens, for errors naming that limit


@contextlib.contextmanager
def _params(token_param: str) -> Iterator[None]:
    """Name the chat field at fault in an error that names a server limit."""
    try:
        yield
    except h.ServingError as e:
        if e.param is None and e.limit is not None:
            e.param = token_param if e.limit == "max_new_tokens" else LIMIT_PARAMS.get(e.limit)
        raise


async def admit(handlers: h.Handlers, body: p.ChatCompletionRequest) -> Call:
    """Validate, fetch or decode the image, and pass the handlers' checks."""
    served = handlers.model_id()
    if body.model != served:
        raise h.ServingError(
            404,
            f"model {body.model!r} is not served here; GET /v1/models lists {served!r}",
            type="model_not_found",
            param="model",
        )
    if body.n is not None and body.n > 1:
        raise h.ServingError(
            422,
            f"n={body.n}: this server returns one choice per request; send {body.n} requests (with "
            "different seeds) for several answers",
            type="unsupported_parameter",
            param="n",
        )
    turn = user_turn(body.messages)
    task = handlers.lookup_task(body.task)  # an unknown task fails before any image is fetched
    request = build_request(body, task, turn.text)
    if h.needs_image(task) and turn.image_url is None:
        what = f"task {task.name}" if task else "a free instruction"
        raise h.ServingError(
            422,
            f"{what} needs exactly one image: add an image_url part ({{'type': 'image_url', "
            f"'image_url': {{'url': 'data:image/png;base64,...'}}}}) to messages[{turn.index}]",
            param="messages",
        )
    if not h.needs_image(task) and turn.image_url is not None:
        raise h.ServingError(422, f"task {task.name} takes no image; leave it out", param="messages")
    token_param = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
    with _params(token_param):
        image = await handlers.image_from_url(turn.image_url) if turn.image_url else None
        if task is not None and task.name in h.TASK_API:
            admitted = await handlers.admit_task(task.name, request, image)
            respond = h.TASK_API[task.name][1]
        else:
            admitted = await handlers.admit_generate(request, image)
            respond = h.generate_response
    return Call(admitted, respond, served, token_param)


async def complete(handlers: h.Handlers, body: p.ChatCompletionRequest) -> p.ChatCompletion:
    """Validate, fetch or decode the image, run, and shape the answer."""
    call = await admit(handlers, body)
    with _params(call.token_param):
        outcome = await handlers.answer(call.admitted)
    return completion(outcome, call.respond(outcome), call.model, body.stop)


async def stream(
    handlers: h.Handlers, body: p.ChatCompletionRequest
) -> AsyncGenerator[p.ChatCompletionChunk, None]:
    """`complete` as OpenAI's stream. Refusals, and errors before the first token, raise here (an
    ordinary error response); the chunks come from iterating the returned iterator."""
    call = await admit(handlers, body)
    with _params(call.token_param):
        results = await handlers.stream(call.admitted)
    include_usage = body.stream_options is not None and body.stream_options.include_usage
    head = {"id": completion_id(), "created": int(time.time()), "model": call.model}
    return _chunks(call, results, head, body.stop, include_usage)


async def _chunks(
    call: Call, results: h.ResultStream, head: dict[str, Any], stop: list[str] | None, include_usage: bool
) -> AsyncGenerator[p.ChatCompletionChunk, None]:
    """Role chunk, a content chunk per text delta, then `closing_chunks`."""
    try:
        yield p.ChatCompletionChunk(
            **head, choices=[p.ChunkChoice(delta=p.ChunkDelta(role="assistant", content=""))]
        )
        with _params(call.token_param):
            async for delta in results.text(stop or ()):
                yield p.ChatCompletionChunk(
                    **head, choices=[p.ChunkChoice(delta=p.ChunkDelta(content=delta))]
                )
    finally:
        results.close()
    assert results.outcome is not None
    finished = completion(results.outcome, call.respond(results.outcome), call.model, stop)
    for chunk in closing_chunks(finished.model_copy(update=head), include_usage):
        yield chunk


def completion_id() -> str:
    return f"chatcmpl-{request_id_var.get() or 'unknown'}"


def completion(outcome: h.Outcome, answer: BaseModel, model: str, stop: list[str] | None) -> p.ChatCompletion:
    """`content` is the decoded output (the endpoints' `text`), cut before the first stop string."""
    content, stopped = cut_at_stop(outcome.result.get("text", ""), stop or ())
    usage = outcome.result.get("usage", {})
    prompt, written = usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0)
    length = outcome.result.get("hit_max_new_tokens", False) and not stopped
    return p.ChatCompletion(
        id=completion_id(),
        created=int(time.time()),
        model=model,
        choices=[
            p.ChatChoice(
                message=p.AssistantMessage(content=content), finish_reason="length" if length else "stop"
            )
        ],
        usage=p.Usage(prompt_tokens=prompt, completion_tokens=written, total_tokens=prompt + written),
        ofa=answer.model_dump(mode="json"),
    )


def closing_chunks(c: p.ChatCompletion, include_usage: bool) -> list[p.ChatCompletionChunk]:
    """The chunks after the content: finish_reason (with `ofa`), and with `include_usage` a last
    chunk carrying usage and no choices."""
    head = {"id": c.id, "created": c.created, "model": c.model}
    out = [
        p.ChatCompletionChunk(
            **head,
            choices=[p.ChunkChoice(delta=p.ChunkDelta(), finish_reason=c.choices[0].finish_reason)],
            ofa=c.ofa,
        )
    ]
    if include_usage:
        out.append(p.ChatCompletionChunk(**head, choices=[], usage=c.usage))
    return out

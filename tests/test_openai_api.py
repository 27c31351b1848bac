"""The OpenAI-compatible chat API: the official `openai` client, unchanged, against a real
`python -m serving` process (streaming, and a client that leaves mid-stream), and in-process
TestClient checks of the SSE framing, the single-turn rules, the extension fields, image URL
fetching and OpenAI's error body."""

from __future__ import annotations

import base64
import copy
import http.server
import io
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from ofa_unified.inference import Predictor
from ofa_unified.tasks import instruction_source
from tests.test_serving import H, W, b64, build_micro_checkpoint, encode, scene, serve, sse_json
from tests.test_serving_process import server_process

MAX_NEW_TOKENS = 16  # the in-process server's limit in these tests
PROCESS_MAX_NEW_TOKENS = 256  # the real process's: long enough to leave a stream mid-way


# ---------------------------------------------------------------------------------------------------
# Fixtures and helpers


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_micro_checkpoint(tmp_path_factory.mktemp("openai"))  # directory "micro", with VQ


@pytest.fixture(scope="module")
def predictor(checkpoint: Path) -> Predictor:
    return Predictor.from_checkpoint(checkpoint)


@pytest.fixture(scope="module")
def png() -> bytes:
    return encode(scene())


@pytest.fixture(scope="module")
def server(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    log = tmp_path_factory.mktemp("openai-log") / "server.log"
    with server_process(checkpoint, log, "--max-new-tokens", str(PROCESS_MAX_NEW_TOKENS)) as (base, _):
        yield base


@pytest.fixture(scope="module")
def oai(server: str) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def client(predictor: Predictor) -> Iterator[TestClient]:
    with serve(predictor, model_name="micro", max_new_tokens=MAX_NEW_TOKENS) as c:
        yield c


def data_uri(data: bytes) -> str:
    return "data:image/png;base64," + b64(data)


def user(text: str | None = None, image_url: str | None = None) -> dict[str, Any]:
    """A user message as OpenAI's content parts."""
    parts: list[dict[str, Any]] = [{"type": "text", "text": text}] if text is not None else []
    if image_url is not None:
        parts.append({"type": "image_url", "image_url": {"url": image_url}})
    return {"role": "user", "content": parts}


def chat(client: TestClient, *messages: dict[str, Any], **fields: Any):
    return client.post("/v1/chat/completions", json={"model": "micro", "messages": list(messages), **fields})


def openai_error(response, status: int, param: str | None = None, code: str | None = None) -> str:
    """Assert OpenAI's error body with this status (and param, code); return its message."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    error = body["error"]
    assert error["type"] == ("invalid_request_error" if status < 500 else "server_error")
    if param is not None:
        assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error
    return error["message"]


# ---------------------------------------------------------------------------------------------------
# The official client against a real server process


def test_models_list(oai: openai.OpenAI) -> None:
    models = oai.models.list()
    assert [m.id for m in models.data] == ["micro"]
    assert models.data[0].object == "model" and models.data[0].owned_by == "ofa-unified"
    assert models.data[0].created > 0


def test_chat_plain_and_stream_give_the_same_greedy_answer(oai: openai.OpenAI, png: bytes) -> None:
    messages = [
        {"role": "system", "content": "You are helpful."},  # ignored
        user("what does the image describe?", data_uri(png)),
    ]
    plain = oai.chat.completions.create(model="micro", messages=messages, temperature=0, max_tokens=6)
    assert plain.object == "chat.completion" and plain.model == "micro" and plain.id.startswith("chatcmpl-")
    choice = plain.choices[0]
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    ofa = plain.model_extra["ofa"]
    assert ofa["text"] == choice.message.content and ofa["image_size"] == [W, H]
    assert choice.finish_reason == ("length" if len(ofa["tokens"]) == 6 else "stop")
    usage = plain.usage
    assert usage.completion_tokens == len(ofa["tokens"])
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens

    stream = oai.chat.completions.create(
        model="micro",
        messages=messages,
        temperature=0,
        max_tokens=6,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    deltas = [c.choices[0].delta.content for c in chunks[1:] if c.choices and c.choices[0].delta.content]
    assert "".join(deltas) == choice.message.content
    assert len(ofa["tokens"]) > 1 and len(deltas) > 1, "greedy tokens not streamed as they came"
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [choice.finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage == usage


def _process_metrics(http: httpx.Client) -> dict[tuple[str, tuple], float]:
    out = {}
    for family in text_string_to_metric_families(http.get("/metrics").text):
        for s in family.samples:
            out[s.name, tuple(sorted(s.labels.items()))] = s.value
    return out


def test_leaving_mid_stream_frees_the_slot(server: str, png: bytes) -> None:
    """A client that closes the connection after the first content chunk: the server drops its row
    (the batch, alone, ends early), nothing runs any more, and the next request is answered."""
    body = {
        "model": "micro",
        "messages": [user("what does the image describe?", data_uri(png))],
        "temperature": 0,
        "max_tokens": PROCESS_MAX_NEW_TOKENS,
    }
    dropped = ("ofa_cancelled_requests_total", (("stage", "decoding"),))
    running = ("ofa_running_requests", ())
    with httpx.Client(base_url=server, trust_env=False, timeout=60) as http:
        written = http.post("/v1/chat/completions", json=body).json()["usage"]["completion_tokens"]
        if written < PROCESS_MAX_NEW_TOKENS // 2:
            pytest.skip(f"the random model's greedy answer is {written} tokens: too short to leave mid-way")
        before = _process_metrics(http).get(dropped, 0.0)
        with http.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as response:
            assert response.status_code == 200
            for line in response.iter_lines():
                chunk = json.loads(line.removeprefix("data: ")) if line.startswith("data: {") else None
                if chunk and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                    break  # the first content chunk; leaving the block closes the connection
        deadline = time.monotonic() + 30
        while True:
            metrics = _process_metrics(http)
            if metrics.get(dropped, 0.0) == before + 1 and metrics[running] == 0:
                break
            assert time.monotonic() < deadline, {k: v for k, v in metrics.items() if k[0].startswith("ofa_")}
            time.sleep(0.05)
        after = http.post("/v1/chat/completions", json={**body, "max_tokens": 3})
        assert after.status_code == 200 and after.json()["usage"]["completion_tokens"] <= 3


def test_task_in_extra_body(oai: openai.OpenAI, png: bytes) -> None:
    grounding = oai.chat.completions.create(
        model="micro", messages=[user("the red circle", data_uri(png))], extra_body={"task": "grounding"}
    )
    box = grounding.model_extra["ofa"]["box"]
    assert box is not None and 0 <= box[0] <= box[2] <= W and 0 <= box[1] <= box[3] <= H
    vqa = oai.chat.completions.create(
        model="micro",
        messages=[user("what color is the circle?", data_uri(png))],
        extra_body={"task": "vqa", "candidates": ["red", "blue"]},
    )
    ofa = vqa.model_extra["ofa"]
    assert ofa["answer"] in ("red", "blue") and set(ofa["probabilities"]) == {"red", "blue"}
    assert vqa.choices[0].message.content == ofa["text"] and vqa.choices[0].finish_reason == "stop"


def _truncated_png() -> str:
    data = encode(scene())
    return data_uri(data[: len(data) // 2])


@pytest.mark.parametrize(
    ("message", "extra", "status", "param", "code", "needle"),
    [
        (user("what is this?"), {}, 422, "messages", None, "image"),
        (user("what is this?", _truncated_png()), {}, 422, None, "invalid_image", "truncated"),
        (user("x", "data:,"), {"extra_body": {"task": "segmentation"}}, 422, None, "unknown_task", "known"),
        (user("what is this?", "http://127.0.0.1:9/a.png"), {}, 422, "messages", None, "fetch_image_urls"),
        (user("what is this?", "IMAGE"), {"n": 2}, 422, "n", "unsupported_parameter", "one choice"),
        (
            user("what is this?", "IMAGE"),
            {"max_tokens": PROCESS_MAX_NEW_TOKENS + 1},
            422,
            "max_tokens",
            "limit_exceeded",
            "max_new_tokens",
        ),
        (user("what is this?", "IMAGE"), {"model": "gpt-4o"}, 404, "model", "model_not_found", "micro"),
    ],
    ids=["no-image", "corrupt-image", "unknown-task", "http-url-off", "n=2", "max-tokens", "model"],
)
def test_openai_error_bodies(
    oai: openai.OpenAI,
    png: bytes,
    message: dict,
    extra: dict,
    status: int,
    param: str | None,
    code: str | None,
    needle: str,
) -> None:
    message = copy.deepcopy(message)
    for part in message["content"]:
        if part.get("image_url", {}).get("url") == "IMAGE":
            part["image_url"]["url"] = data_uri(png)
    with pytest.raises(openai.APIStatusError) as info:
        oai.chat.completions.create(**{"model": "micro", "messages": [message], **extra})
    e = info.value
    assert e.status_code == status
    assert isinstance(e.body, dict) and set(e.body) == {"message", "type", "param", "code"}, e.body
    assert e.type == "invalid_request_error" and needle in e.body["message"], e.body
    if param is not None:
        assert e.param == param
    if code is not None:
        assert e.code == code


# ---------------------------------------------------------------------------------------------------
# In-process: SSE framing, the request rules, the extension fields


def test_sse_framing(client: TestClient, png: bytes) -> None:
    """Role chunk, a content chunk per delta as the greedy tokens come, the closing chunk."""
    message = user("what is this?", data_uri(png))
    events = sse_json(chat(client, message, stream=True, temperature=0, max_tokens=MAX_NEW_TOKENS))
    assert {e["object"] for e in events} == {"chat.completion.chunk"}
    assert len({e["id"] for e in events}) == 1 and all(e["model"] == "micro" for e in events)
    role, *contents, final = (e["choices"][0] for e in events)
    assert role["delta"] == {"role": "assistant", "content": ""} and role["finish_reason"] is None
    assert all(c["finish_reason"] is None and c["delta"]["role"] is None for c in contents)
    assert all(isinstance(c["delta"]["content"], str) and c["delta"]["content"] for c in contents)
    assert final["delta"] == {"role": None, "content": None} and final["finish_reason"] in ("stop", "length")
    assert all(e["ofa"] is None for e in events[:-1]) and events[-1]["ofa"] is not None
    plain = chat(client, message, temperature=0, max_tokens=MAX_NEW_TOKENS).json()
    streamed = "".join(c["delta"]["content"] for c in contents)
    assert streamed == plain["choices"][0]["message"]["content"] == events[-1]["ofa"]["text"]
    assert (
        events[-1]["ofa"] == plain["ofa"] and final["finish_reason"] == plain["choices"][0]["finish_reason"]
    )
    assert len(plain["ofa"]["tokens"]) > 1 and len(contents) > 1, "not streamed token by token"

    sampled = {"temperature": 0.8, "seed": 2, "max_tokens": 8}
    with_usage = sse_json(
        chat(client, message, stream=True, stream_options={"include_usage": True}, **sampled)
    )
    sampled_plain = chat(client, message, **sampled).json()
    assert with_usage[-1]["choices"] == [] and with_usage[-1]["usage"] == sampled_plain["usage"]
    contents = [e["choices"][0]["delta"]["content"] for e in with_usage[1:-2]]
    assert "".join(contents) == sampled_plain["choices"][0]["message"]["content"] and len(contents) > 1
    # the task's beam search (temperature unset): the content in one chunk at the end
    beam = sse_json(chat(client, message, stream=True, max_tokens=4))
    beam_plain = chat(client, message, max_tokens=4).json()["choices"][0]["message"]["content"]
    assert [e["choices"][0]["delta"]["content"] for e in beam[1:-1]] == ([beam_plain] if beam_plain else [])
    # an error comes before any event, as a normal JSON error response
    openai_error(chat(client, user("what is this?"), stream=True), 422, "messages")


def test_usage_counts_what_the_model_read_and_wrote(
    client: TestClient, predictor: Predictor, png: bytes
) -> None:
    text = "what is in the picture?"
    body = chat(client, user(text, data_uri(png)), max_tokens=5).json()
    patches = (predictor.image_size // 16) ** 2
    expected_prompt = len(predictor.vocab.encode(instruction_source(text))) + patches
    assert body["usage"]["prompt_tokens"] == expected_prompt
    assert body["usage"]["completion_tokens"] == len(body["ofa"]["tokens"]) <= 5
    assert body["choices"][0]["finish_reason"] == ("length" if len(body["ofa"]["tokens"]) == 5 else "stop")
    assert "usage" not in body["ofa"]["result"]  # /v1/generate's result stays as it was


def test_content_string_and_parts_agree_and_system_is_ignored(client: TestClient, png: bytes) -> None:
    parts = chat(client, user("is it red?", data_uri(png)), temperature=0, max_tokens=4).json()
    two_texts = chat(
        client,
        {"role": "system", "content": "be brief"},
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": data_uri(png), "detail": "low"}},
                {"type": "text", "text": "is it"},
                {"type": "text", "text": "red?"},
            ],
        },
        temperature=0,
        max_tokens=4,
    ).json()
    assert two_texts["choices"][0]["message"] == parts["choices"][0]["message"]
    assert parts["ofa"]["task"] is None and set(parts["ofa"]["result"]) >= {"boxes", "codes"}


@pytest.mark.parametrize(
    ("messages", "needle"),
    [
        (
            [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}, "USER"],
            "messages[0] is a 'user' turn",
        ),
        ([{"role": "assistant", "content": "hello"}, "USER"], "single-turn"),
        (["USER", {"role": "assistant", "content": "hello"}], "last message must be the user's"),
        ([{"role": "system", "content": "only a system message"}], "last message must be the user's"),
        (["USER", "USER"], "single-turn"),
    ],
)
def test_single_turn_only(client: TestClient, png: bytes, messages: list, needle: str) -> None:
    messages = [user("what is it?", data_uri(png)) if m == "USER" else m for m in messages]
    assert needle in openai_error(chat(client, *messages), 422, "messages")


@pytest.mark.parametrize(
    ("message", "fields", "status", "param", "needle"),
    [
        ("TWO_IMAGES", {}, 422, "messages", "exactly one"),
        (user("hi", "file:///etc/passwd"), {}, 422, "messages", "data: URI"),
        (user("hi", "data:image/png,abc"), {}, 422, None, "base64"),
        (user(None, "IMAGE"), {}, 422, "messages", "no text"),
        (user("caption it", "IMAGE"), {"task": "caption"}, 422, "messages", "takes no text"),
        (user(None, "IMAGE"), {"task": "vqa"}, 422, "question", "empty"),
        (user("q?", "IMAGE"), {"task": "vqa", "question": "q?"}, 422, "question", "given twice"),
        (user("red", "IMAGE"), {"task": "grounding", "candidates": ["a"]}, 422, "candidates", "Extra"),
        (user("hi", "IMAGE"), {"frequency_penalty": 0.5}, 422, "frequency_penalty", "Extra"),
        (user("hi", "IMAGE"), {"max_new_tokens": 3}, 422, "max_new_tokens", "max_tokens"),
        (user("hi", "IMAGE"), {"do_sample": True}, 422, "do_sample", "temperature"),
        (user("hi", "IMAGE"), {"max_tokens": 3, "max_completion_tokens": 4}, 422, None, "differ"),
        (user("hi", "IMAGE"), {"temperature": 3}, 422, "temperature", "less than or equal to 2"),
        (user("hi", "IMAGE"), {"stop": ["a", "b", "c", "d", "e"]}, 422, "stop", "at most 4"),
        (user("hi", "IMAGE"), {"candidates": [str(i) for i in range(101)]}, 422, "candidates", None),
        (user("a star", "IMAGE"), {"task": "text_to_image"}, 422, "messages", "takes no image"),
        ({"role": "user", "content": [{"type": "input_audio"}]}, {}, 422, None, "'text' or 'image_url'"),
    ],
)
def test_request_refusals(
    client: TestClient,
    png: bytes,
    message: Any,
    fields: dict,
    status: int,
    param: str | None,
    needle: str | None,
) -> None:
    if message == "TWO_IMAGES":
        message = user("hi", data_uri(png))
        message["content"].append(dict(message["content"][1]))
    message = copy.deepcopy(message)
    for part in message["content"]:
        if isinstance(part, dict) and part.get("image_url", {}).get("url") == "IMAGE":
            part["image_url"] = {"url": data_uri(png)}
    msg = openai_error(chat(client, message, **fields), status, param)
    assert needle is None or needle in msg, msg


def test_tasks_with_extension_fields(client: TestClient, png: bytes) -> None:
    image = data_uri(png)
    caption = chat(client, user(None, image), task="caption", max_tokens=3).json()
    assert "caption" in caption["ofa"] and caption["ofa"]["image_size"] == [W, H]
    entail = chat(
        client, user("there is a shape", image), task="visual_entailment", text1="a red circle"
    ).json()
    assert entail["ofa"]["answer"] in ("yes", "no", "maybe")
    assert set(entail["ofa"]["probabilities"]) == {"yes", "no", "maybe"}
    region = chat(client, user(None, image), task="grounded_caption", box=[5, 5, 50, 40], max_tokens=3).json()
    assert "caption" in region["ofa"], region
    matching = chat(client, user("what color?", image), task="qa_matching", answer="red").json()
    assert matching["ofa"]["task"] == "qa_matching" and matching["ofa"]["result"]["answer"] in ("yes", "no")
    drawn = chat(client, user("a red circle"), task="text_to_image", seed=1).json()
    assert Image.open(io.BytesIO(base64.b64decode(drawn["ofa"]["image"]))).format == "PNG"
    assert drawn["choices"][0]["finish_reason"] == "stop" and drawn["usage"]["completion_tokens"] == 16


def test_sampling_and_stop(client: TestClient, png: bytes) -> None:
    message = user("what is this?", data_uri(png))
    a = chat(client, message, temperature=0.9, top_p=0.9, seed=3, max_tokens=6).json()
    b = chat(client, message, temperature=0.9, top_p=0.9, seed=3, max_tokens=6).json()
    assert a["choices"][0]["message"] == b["choices"][0]["message"]  # seeded sampling repeats
    full = chat(client, message, temperature=0, max_tokens=6).json()["choices"][0]
    text = full["message"]["content"]
    if len(text) < 2:
        pytest.skip(f"the random model wrote {text!r}: too short to cut")
    stop = text[1:]
    cut = chat(client, message, temperature=0, max_tokens=6, stop=stop).json()["choices"][0]
    assert cut["message"]["content"] == text[: text.find(stop)] and cut["finish_reason"] == "stop"
    events = sse_json(chat(client, message, temperature=0, max_tokens=6, stop=[stop, "zz"], stream=True))
    assert "".join(e["choices"][0]["delta"]["content"] or "" for e in events[1:]) == cut["message"]["content"]
    assert events[-1]["choices"][0]["finish_reason"] == "stop"


def test_models_openapi_and_error_shapes(client: TestClient, predictor: Predictor) -> None:
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["id"] == "micro"
    assert set(models["data"][0]) == {"id", "object", "created", "owned_by"}
    spec = client.get("/openapi.json").json()
    assert "Single turn" in spec["paths"]["/v1/chat/completions"]["post"]["description"]
    assert "/v1/models" in spec["paths"]
    openai_error(client.get("/v1/chat/completions"), 405)
    openai_error(client.post("/v1/chat/completions", json={"model": "micro"}), 422, "messages")
    openai_error(
        client.post("/v1/chat/completions", content=b"{oops", headers={"content-type": "application/json"}),
        422,
    )
    # the rest of the server keeps its own error body
    assert "request_id" in client.post("/v1/generate", json={}).json()["error"]
    with serve(predictor, model_name="micro", max_queue_depth=0) as full:
        r = chat(full, user("hi", data_uri(encode(scene()))))
        assert "max_queue_depth" in openai_error(r, 503, code="unavailable") and "retry-after" in r.headers


# ---------------------------------------------------------------------------------------------------
# Image URLs


class _Images(http.server.BaseHTTPRequestHandler):
    """Serves `files` by path; `/slow` dribbles bytes; `/sized/...` sends a Content-Length."""

    files: dict[str, bytes] = {}

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        if self.path == "/slow":
            self.send_response(200)
            self.end_headers()
            for _ in range(20):
                self.wfile.write(b"\x89PNG")
                self.wfile.flush()
                time.sleep(0.1)
            return
        data = self.files.get(self.path.removeprefix("/sized"))
        if data is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        if self.path.startswith("/sized"):
            self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: Any) -> None:
        pass


@contextmanager
def image_host(files: dict[str, bytes]) -> Iterator[str]:
    handler = type("Images", (_Images,), {"files": files})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_image_urls_fetched_when_allowed(predictor: Predictor, png: bytes) -> None:
    noise = encode(Image.fromarray(np.random.default_rng(0).integers(0, 255, (120, 120, 3), dtype=np.uint8)))
    small = encode(Image.new("RGB", (W, H), (200, 30, 30)))
    files = {"/scene.png": png, "/noise.png": noise, "/small.png": small}
    with image_host(files) as host:
        with serve(predictor, model_name="micro", fetch_image_urls=True, image_fetch_timeout_s=0.5) as c:
            by_url = chat(c, user("what is this?", host + "/scene.png"), temperature=0, max_tokens=4)
            by_data = chat(c, user("what is this?", data_uri(png)), temperature=0, max_tokens=4)
            assert by_url.status_code == 200, by_url.text
            assert by_url.json()["choices"] == by_data.json()["choices"]
            assert by_url.json()["ofa"]["image_size"] == [W, H]
            assert "HTTP 404" in openai_error(chat(c, user("x", host + "/missing.png")), 422, "messages")
            slow = chat(c, user("x", host + "/slow"))
            assert "image_fetch_timeout_s" in openai_error(slow, 422, "messages", "image_fetch_failed")
        limits = {"max_upload_bytes": len(noise) - 1, "max_image_pixels": W * H - 1}
        with serve(predictor, model_name="micro", fetch_image_urls=True, **limits) as c:
            for path in ("/noise.png", "/sized/noise.png"):  # streamed, and refused by Content-Length
                msg = openai_error(chat(c, user("x", host + path)), 413, "messages", "limit_exceeded")
                assert "max_upload_bytes" in msg
            msg = openai_error(chat(c, user("x", host + "/small.png")), 413, "messages", "limit_exceeded")
            assert "max_image_pixels" in msg and f"{W}x{H}" in msg

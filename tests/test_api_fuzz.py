"""Schemathesis over the app's own OpenAPI document, in-process (ASGI), against a micro random-weight
checkpoint with a VQ tokenizer and a retrieval head. Per operation, a bounded and derandomized run
(fixed seed): the schema's examples, the coverage phase (each field's edge values, every wrong type,
other methods) and 25 fuzzed cases; no response may be a 5xx, and each must match what the schema
declares (status code, content type, headers, body).

Random strings are almost never images, so the fuzzer alone would stop at the input checks (422).
The `flatmap_case` hook offers each fuzzed case either unchanged or with what the schema cannot
say: a decodable image (a file in multipart, base64 or a data: URI in JSON), a box inside it, one of
instruction/task, candidate texts for retrieval's image query, and for the chat API the served model
id and a single user turn with an image. Every POST operation must see a 200 (a request the model
answered). `pytest -s` prints each operation's status codes.
"""

from __future__ import annotations

import base64
import collections
import time
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from fastapi import FastAPI
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from schemathesis import Case, HookContext, checks

from ofa_unified.inference import Predictor
from serving import ServeConfig, build_app
from serving import protocol as p
from tests.test_serving import build_micro_checkpoint, encode, scene

SEED = 20261203
MAX_EXAMPLES = 25  # fuzzed cases per operation (the examples and coverage phases add their own)
MODEL_ID = "micro"
# Small decoding limits: a fuzzed request the server accepts costs at most 8 tokens x 2 beams.
FUZZ_CONFIG = {"max_new_tokens": 8, "max_beam_size": 2, "max_instruction_chars": 200, "model_name": MODEL_ID}
CHECKS = [
    checks.not_a_server_error,
    checks.response_schema_conformance,
    checks.status_code_conformance,
    checks.content_type_conformance,
    checks.response_headers_conformance,
]
# The document GET /openapi.json serves, fetched without a lifespan (nothing loads) so that pytest can
# parametrize by operation at collection; the requests go to the `app` fixture.
OPENAPI = TestClient(build_app(ServeConfig())).get("/openapi.json").json()
schema = schemathesis.openapi.from_dict(
    OPENAPI,
    config=schemathesis.Config.from_dict(
        {
            "seed": SEED,
            "generation": {"max-examples": MAX_EXAMPLES, "deterministic": True, "database": "none"},
        }
    ),
)

PNG = encode(scene((32, 24)))
PNG_B64 = base64.b64encode(PNG).decode("ascii")
DATA_URI = "data:image/png;base64," + PNG_B64
BOX = [2.0, 3.0, 20.0, 16.0]  # inside the 32x24 image
REPAIRS = (None, "base64", "data URI")  # how a JSON image is sent (multipart sends the file either way)
CHAT_FIELDS = set(p.ChatCompletionRequest.model_fields) - {"task", "n"}  # no random task names, one choice
STATUSES: dict[str, collections.Counter[int]] = collections.defaultdict(collections.Counter)


def _takes_image(case: Case) -> bool:
    content = case.operation.definition.raw.get("requestBody", {}).get("content", {})
    return "multipart/form-data" in content  # routes.body_doc adds it exactly for the image bodies


def repaired(case: Case, image_form: str | None) -> Case:
    """`case` (a fresh draw, so changed in place) with the inputs the model needs to run."""
    if image_form is None or not isinstance(case.body, dict):
        return case
    body: dict[str, Any] = dict(case.body)
    path = case.operation.path
    if path == "/v1/chat/completions":
        texts = [m["content"] for m in body.get("messages", []) if isinstance(m.get("content"), str)]
        text = next((t for t in texts if t.strip()), "what is in the image?")
        turn = {
            "role": "user",
            "content": [
                {"type": "text", "text": text},
                {"type": "image_url", "image_url": {"url": DATA_URI}},
            ],
        }
        body = {k: v for k, v in body.items() if k in CHAT_FIELDS}
        body.update(model=MODEL_ID, messages=[turn])
    if _takes_image(case):
        multipart = case.media_type == "multipart/form-data"
        body["image"] = PNG if multipart else PNG_B64 if image_form == "base64" else DATA_URI
    if path == "/v1/grounded-caption":
        body["box"] = BOX
    if path == "/v1/embeddings":  # exactly one input: the image
        body.pop("text", None)
    if path == "/v1/retrieval":  # an image query ranks texts
        body = {k: v for k, v in body.items() if k not in ("text", "images")}
        texts = body.get("texts")
        if not (isinstance(texts, list) and texts and all(isinstance(t, str) and t.strip() for t in texts)):
            body["texts"] = ["a red circle", "two blue squares"]
    if path == "/v1/generate":  # a free instruction (a random task name is never one)
        body = {k: v for k, v in body.items() if k not in ("task", "fields")}
        body["instruction"] = body.get("instruction") or "what is in the image?"
    case.body = body
    return case


@schema.hook
def flatmap_case(context: HookContext, case: Case) -> st.SearchStrategy[Case]:
    """Each fuzzed case as generated (what it shrinks to) or repaired."""
    return st.sampled_from(REPAIRS).map(lambda image_form: repaired(case, image_form))


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> FastAPI:
    checkpoint = build_micro_checkpoint(tmp_path_factory.mktemp("fuzz"), itc_dim=16)  # retrieval too
    return build_app(ServeConfig(**FUZZ_CONFIG), predictor=Predictor.from_checkpoint(checkpoint))


@pytest.fixture
def ready_app(app: FastAPI, request: pytest.FixtureRequest) -> Iterator[FastAPI]:
    """The app, ready (schemathesis ends an ASGI app's lifespan after each test, and the first
    request of the next starts it again); afterwards, the operation's status codes."""
    readyz = schema["/readyz"]["GET"]
    deadline = time.monotonic() + 60
    while readyz.Case().call(app=app).status_code != 200:
        assert time.monotonic() < deadline, "not ready in 60 s"
        time.sleep(0.02)
    yield app
    label = request.node.operation_label  # "POST /v1/vqa": set on the items schemathesis makes
    statuses = dict(sorted(STATUSES[label].items()))
    print(f"\n{label}: {statuses}")
    if label.startswith("POST "):
        assert 200 in statuses, f"no request to {label} reached the model: {statuses}"


@schema.parametrize()
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])  # ready_app: once per operation
def test_no_server_errors_and_responses_match_the_schema(case: Case, ready_app: FastAPI) -> None:
    response = case.call(app=ready_app)
    STATUSES[case.operation.label][response.status_code] += 1
    case.validate_response(response, checks=CHECKS)

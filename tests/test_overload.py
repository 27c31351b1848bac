"""A real `python -m serving` process on loopback, sent a burst of concurrent requests three times
larger than its queue: each must be answered 200, 503 with Retry-After (queue full) or 504 (timed
out), never another status or a dropped connection, and the server must be ready and answering
afterwards. The burst is bounded (36 requests, one per thread), so the test stops by itself."""

from __future__ import annotations

import base64
import collections
import json
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from tests.test_serving import build_micro_checkpoint, encode
from tests.test_serving_process import server_process

QUEUE = 12
BURST = 3 * QUEUE
# One request at a time on the model, so the burst outruns it and the queue fills.
FLAGS = ("--max-queue-depth", str(QUEUE), "--max-batch-size", "1", "--batch-window-ms", "0")
FLAGS += ("--request-timeout-s", "20", "--retry-after-s", "2", "--log-level", "warning")


PNG = encode(Image.new("RGB", (48, 32), (30, 160, 60)))
B64 = base64.b64encode(PNG).decode("ascii")
SENT = ("/v1/caption", "/v1/vqa", "/v1/generate")


def _send(client: httpx.Client, i: int, start: threading.Barrier) -> httpx.Response:
    """Request `i` of the burst, sent once every thread is ready: multipart, JSON (data: URI) and a
    streamed /v1/generate in turn, so each way into the queue meets it full."""
    start.wait(timeout=30)
    if i % 3 == 0:
        return client.post(
            "/v1/caption", files={"image": ("x.png", PNG, "image/png")}, data={"beam_size": "2"}
        )
    if i % 3 == 1:
        body = {"image": "data:image/png;base64," + B64, "question": "what colour is it?"}
        return client.post("/v1/vqa", json=body)
    body = {"image": B64, "instruction": "what is it?", "stream": True, "max_new_tokens": 8, "seed": i}
    return client.post("/v1/generate", json={**body, "do_sample": True})


def test_a_burst_past_the_queue_is_refused_cleanly_and_the_server_recovers(tmp_path: Path) -> None:
    checkpoint = build_micro_checkpoint(tmp_path, with_vq=False)
    log_path = tmp_path / "server.log"
    limits = httpx.Limits(max_connections=BURST, max_keepalive_connections=BURST)
    with (
        server_process(checkpoint, log_path, *FLAGS) as (base, _),
        httpx.Client(base_url=base, trust_env=False, timeout=60, limits=limits) as client,
    ):
        start = threading.Barrier(BURST)
        with ThreadPoolExecutor(BURST) as pool:
            # A connection error raises here, out of .result(): it fails the test as itself.
            responses = [f.result() for f in [pool.submit(_send, client, i, start) for i in range(BURST)]]
        statuses = collections.Counter(r.status_code for r in responses)
        print(f"\n{BURST} requests, queue {QUEUE}: {dict(sorted(statuses.items()))}")
        assert set(statuses) <= {200, 503, 504}, (
            statuses,
            [r.text for r in responses if r.status_code >= 400],
        )
        assert statuses[200] >= 1 and statuses[503] >= 1, statuses  # the queue did fill, the model did answer
        for r in responses:
            if r.status_code == 503:
                assert r.headers["retry-after"] == "2" and r.json()["error"]["limit"] == "max_queue_depth"
            if r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream"):
                events = [line.removeprefix("data: ") for line in r.text.splitlines() if line]
                assert events[-1] == "[DONE]" and json.loads(events[-2])["type"] == "result", r.text

        assert client.get("/readyz").json()["status"] == "ready"
        after = client.post("/v1/caption", files={"image": ("x.png", PNG, "image/png")})
        assert after.status_code == 200 and after.json()["image_size"] == [48, 32], after.text
        refused = sum(
            s.value
            for family in text_string_to_metric_families(client.get("/metrics").text)
            for s in family.samples
            if s.name == "ofa_requests_total" and s.labels["status"] == "503" and s.labels["endpoint"] in SENT
        )
        assert refused == statuses[503]  # every refusal counted (/readyz's 503s while loading are not)

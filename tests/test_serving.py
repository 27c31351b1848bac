"""The HTTP server against a micro random-weight checkpoint: every endpoint, every refusal, batching,
metrics, readiness and draining. Apps are driven in-process through TestClient (lifespan included)."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from ofa_unified.checkpoint import save_checkpoint
from ofa_unified.data.shapes import iter_samples
from ofa_unified.inference import Predictor, Request
from ofa_unified.model import build_model
from ofa_unified.tasks import list_tasks
from ofa_unified.vocab import Vocab, train_sentencepiece
from ofa_unified.vq import VQConfig, VQTokenizer
from serving import ServeConfig, build_app
from serving.engine import BatchingEngine
from serving.streaming import TextDeltas, cut_at_stop
from serving.telemetry import JsonFormatter, ServeMetrics, request_id_var

W, H = 100, 60  # a non-square upload, so a box in the wrong frame shows


# ---------------------------------------------------------------------------------------------------
# Fixtures and helpers


def build_micro_checkpoint(root: Path, with_vq: bool = True, **overrides) -> Path:
    """A random `micro` model with a SentencePiece vocabulary trained on shapes-world text (16 codes,
    64 bins) and, optionally, a tiny random VQ tokenizer with a 16-code codebook under `vq/`;
    `overrides` change the model config (e.g. `itc_dim` for a retrieval head)."""
    texts: list[str] = []
    for _, record in iter_samples("train", 8):
        texts += record.get("captions", [])
        texts += [record[k] for k in ("question", "text", "text1", "text2") if isinstance(record.get(k), str)]
    spm = train_sentencepiece(texts[:120], root / "spm", vocab_size=300)
    vocab = Vocab.from_sentencepiece(spm, num_codes=16, num_bins=64)
    torch.manual_seed(0)
    ckpt = save_checkpoint(build_model("micro", vocab_size=len(vocab), **overrides), vocab, root / "micro")
    if with_vq:
        config = VQConfig(channels=8, num_res_blocks=0, patch_hidden=8, codebook_size=16, code_dim=8)
        VQTokenizer(config).save(ckpt / "vq")
    return ckpt


@pytest.fixture(scope="session")
def micro_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_micro_checkpoint(tmp_path_factory.mktemp("serving"))


@pytest.fixture(scope="module")
def predictor(micro_checkpoint: Path) -> Predictor:
    return Predictor.from_checkpoint(micro_checkpoint)


class Gate:
    """Wraps a predictor: can block its predict calls (`open` cleared) or slow them (`delay`); with
    continuous batching, the starts of requests (`StepwiseSession.add`)."""

    def __init__(self, inner: Predictor, delay: float = 0.0) -> None:
        self.inner, self.delay = inner, delay
        self.open = threading.Event()
        self.open.set()
        self.entered = threading.Event()
        self.batches: list[int] = []

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def predict(self, requests: list[Request]) -> list[dict]:
        self._pass(len(requests))
        return self.inner.predict(requests)

    def _pass(self, batch: int) -> None:
        self.entered.set()
        self.open.wait(10)
        time.sleep(self.delay)
        self.batches.append(batch)

    def stepwise(self) -> _GatedSession:
        return _GatedSession(self, self.inner.stepwise())


class _GatedSession:
    """A step-wise session whose `add` (requests joining) passes its gate first."""

    def __init__(self, gate: Gate, inner) -> None:
        self.gate, self.inner = gate, inner

    def __len__(self) -> int:
        return len(self.inner)

    def add(self, requests: list) -> list:
        if requests:
            self.gate._pass(len(requests))
        return self.inner.add(requests)

    def step(self) -> list:
        return self.inner.step()


def wait_ready(client: TestClient, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while client.get("/readyz").status_code != 200:
        assert time.monotonic() < deadline, client.get("/readyz").json()
        time.sleep(0.02)


@contextmanager
def serve(predictor, ready: bool = True, **config) -> Iterator[TestClient]:
    app = build_app(ServeConfig(**config), predictor=predictor)
    with TestClient(app, raise_server_exceptions=False) as client:
        if ready:
            wait_ready(client)
        yield client


@pytest.fixture(scope="module")
def client(predictor: Predictor) -> Iterator[TestClient]:
    with serve(predictor, max_instruction_chars=200) as c:
        yield c


def encode(image: Image.Image, fmt: str = "PNG", **save) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **save)
    return buf.getvalue()


def scene(size: tuple[int, int] = (W, H)) -> Image.Image:
    image, _ = next(iter_samples("val", 1))
    return image.resize(size)


@pytest.fixture(scope="module")
def png() -> bytes:
    return encode(scene())


def upload(data: bytes, name: str = "x.png") -> dict:
    return {"image": (name, data, "application/octet-stream")}


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def error(response, status: int, limit: str | None = None) -> str:
    """Assert a JSON error with this status (and limit); return its message."""
    assert response.status_code == status, response.text
    body = response.json()["error"]
    assert body["request_id"] == response.headers["x-request-id"]
    assert "Traceback" not in body["message"]
    if limit is not None:
        assert body["limit"] == limit
        assert limit in body["message"]
    return body["message"]


def metric_samples(client: TestClient) -> dict[str, list]:
    out: dict[str, list] = {}
    for family in text_string_to_metric_families(client.get("/metrics").text):
        for s in family.samples:
            out.setdefault(s.name, []).append(s)
    return out


def in_frame(box: list[float], size: tuple[int, int]) -> bool:
    w, h = size
    return len(box) == 4 and 0 <= box[0] <= box[2] <= w and 0 <= box[1] <= box[3] <= h


# ---------------------------------------------------------------------------------------------------
# Every endpoint


def test_health_ready_and_task_list(client: TestClient) -> None:
    assert client.get("/healthz").json()["status"] == "ok"
    assert client.get("/readyz").json()["status"] == "ready"
    tasks = {t["name"]: t for t in client.get("/v1/tasks").json()["tasks"]}
    assert sorted(tasks) == list_tasks()
    assert tasks["vqa"]["fields"] == ["question"] and tasks["vqa"]["endpoint"] == "/v1/vqa"
    assert tasks["visual_entailment"]["labels"] == ["yes", "no", "maybe"]
    assert tasks["text_to_image"]["needs_image"] is False and tasks["text_to_image"]["available"] is True


def test_openapi_documents_both_encodings(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    for path in ("/v1/generate", "/v1/caption", "/v1/image-generation", "/healthz", "/metrics"):
        assert path in spec["paths"]
    content = spec["paths"]["/v1/vqa"]["post"]["requestBody"]["content"]
    form = content["multipart/form-data"]["schema"]["properties"]
    assert form["image"]["format"] == "binary"
    assert form["max_new_tokens"]["type"] == "integer" and "anyOf" not in form["max_new_tokens"]  # no null
    assert "question" in content["application/json"]["schema"]["required"]
    assert content["application/json"]["schema"]["properties"]["question"]["pattern"] == r"\S"
    assert "400" in spec["paths"]["/v1/vqa"]["post"]["responses"]  # a malformed multipart body


def test_caption_multipart_json_and_data_uri_agree(client: TestClient, png: bytes) -> None:
    a = client.post("/v1/caption", files=upload(png), data={"max_new_tokens": "5"})
    b = client.post("/v1/caption", json={"image": b64(png), "max_new_tokens": 5})
    c = client.post("/v1/caption", json={"image": "data:image/png;base64," + b64(png), "max_new_tokens": 5})
    assert a.status_code == b.status_code == c.status_code == 200, a.text
    assert a.json()["tokens"] == b.json()["tokens"] == c.json()["tokens"]
    body = a.json()
    assert 1 <= len(body["tokens"]) <= 5 and body["image_size"] == [W, H]
    assert body["caption"] == body["text"] or body["parse_error"]


def test_vqa_with_candidates(client: TestClient, png: bytes) -> None:
    r = client.post(
        "/v1/vqa", files=upload(png), data={"question": "what color?", "candidates": ["red", "blue"]}
    )
    body = r.json()
    assert r.status_code == 200 and body["answer"] in ("red", "blue")
    assert set(body["probabilities"]) == {"red", "blue"}
    assert body["probability"] == pytest.approx(body["probabilities"][body["answer"]])
    assert sum(body["probabilities"].values()) == pytest.approx(1.0)


def test_grounding_box_in_upload_pixels(client: TestClient, png: bytes) -> None:
    body = client.post("/v1/grounding", json={"image": b64(png), "text": "the red circle"}).json()
    assert body["image_size"] == [W, H]
    assert body["box"] is not None and in_frame(body["box"], (W, H)), body
    assert len(body["tokens"]) == 4


def test_grounded_caption_and_bad_boxes(client: TestClient, png: bytes) -> None:
    r = client.post(
        "/v1/grounded-caption", files=upload(png), data={"box": "[5, 5, 50, 40]", "max_new_tokens": 4}
    )
    assert r.status_code == 200 and "caption" in r.json()
    for box in ([5, 5, 50], [50, 5, 5, 40], [0, 0, W + 1, H], [-1, 0, 10, 10]):
        msg = error(client.post("/v1/grounded-caption", json={"image": b64(png), "box": box}), 422)
        assert "box" in msg


def test_itm_yes_no_with_probability(client: TestClient, png: bytes) -> None:
    body = client.post("/v1/itm", files=upload(png), data={"text": "a red circle"}).json()
    assert body["answer"] in ("yes", "no") and body["match"] == (body["answer"] == "yes")
    assert 0.0 <= body["probability"] <= 1.0 and set(body["probabilities"]) == {"yes", "no"}


def test_detection(client: TestClient, png: bytes) -> None:
    r = client.post("/v1/detection", files=upload(png), data={"max_new_tokens": "8", "beam_size": "2"})
    body = r.json()
    assert r.status_code == 200 and len(body["tokens"]) <= 8
    assert body["objects"] is not None or body["parse_error"]
    assert all(in_frame(o["box"], (W, H)) for o in body["objects"] or [])


def test_text_infilling_needs_a_mask(client: TestClient, png: bytes) -> None:
    r = client.post(
        "/v1/text-infilling", files=upload(png), data={"text": "a red <mask>", "max_new_tokens": 6}
    )
    assert r.status_code == 200 and "filled_text" in r.json()
    assert "<mask>" in error(
        client.post("/v1/text-infilling", files=upload(png), data={"text": "a red"}), 422
    )


def test_image_infilling_json_and_png(client: TestClient, png: bytes) -> None:
    body = client.post("/v1/image-infilling", files=upload(png)).json()
    image = Image.open(io.BytesIO(base64.b64decode(body["image"])))
    assert image.format == "PNG" and image.size == (W, H) == (body["width"], body["height"])
    assert len(body["codes"]) == 16 and all(0 <= c < 16 for c in body["codes"])
    raw = client.post("/v1/image-infilling?format=png", files=upload(png))
    assert raw.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(raw.content)).size == (W, H)
    assert body["images_averaged"] == 16  # the task's default: the mean of 16 samples
    one = client.post(
        "/v1/image-infilling", files=upload(png), data={"mean_image": "false", "seed": 1}
    ).json()
    assert one["images_averaged"] is None and len(one["codes"]) == 16
    caption = client.post("/v1/caption", files=upload(png), data={"mean_image": "true"})
    assert "mean_image" in error(caption, 422)


def test_image_generation_without_an_image(client: TestClient) -> None:
    r = client.post("/v1/image-generation?format=png", json={"caption": "a red circle", "seed": 3})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    again = client.post("/v1/image-generation", json={"caption": "a red circle", "seed": 3}).json()
    assert base64.b64decode(again["image"]) == r.content  # seeded sampling is reproducible
    assert error(client.post("/v1/image-generation", json={"caption": "x", "max_new_tokens": 3}), 422)
    assert error(client.post("/v1/image-generation?format=gif", json={"caption": "x"}), 422)
    assert "image" in error(
        client.post("/v1/image-generation", files=upload(b"x"), data={"caption": "x"}), 422
    )


def test_visual_entailment(client: TestClient, png: bytes) -> None:
    body = client.post(
        "/v1/visual-entailment", json={"image": b64(png), "text1": "a circle", "text2": "a shape"}
    ).json()
    assert body["answer"] in ("yes", "no", "maybe") and set(body["probabilities"]) == {"yes", "no", "maybe"}


def test_generate_task_instruction_and_candidates(client: TestClient, png: bytes) -> None:
    r = client.post(
        "/v1/generate",
        files=upload(png),
        data={"task": "vqa", "fields": '{"question": "what?"}', "max_new_tokens": 3},
    )
    assert r.status_code == 200 and r.json()["task"] == "vqa"
    r = client.post(
        "/v1/generate",
        json={"image": b64(png), "task": "qa_matching", "fields": {"question": "q?", "answer": "red"}},
    )
    assert r.json()["result"]["answer"] in ("yes", "no")
    r = client.post(
        "/v1/generate", json={"image": b64(png), "instruction": "is it red?", "candidates": ["yes", "no"]}
    )
    body = r.json()
    assert body["task"] is None and body["result"]["answer"] in ("yes", "no")
    assert body["probability"] == pytest.approx(body["probabilities"][body["result"]["answer"]])
    r = client.post(
        "/v1/generate",
        json={
            "image": b64(png),
            "instruction": "describe",
            "max_new_tokens": 3,
            "do_sample": True,
            "top_k": 5,
            "seed": 1,
        },
    )
    assert r.status_code == 200 and {"boxes", "codes"} <= set(r.json()["result"]) and "text" in r.json()
    r = client.post(
        "/v1/generate", json={"task": "text_to_image", "fields": {"caption": "a star"}, "seed": 0}
    )
    assert Image.open(io.BytesIO(base64.b64decode(r.json()["image"]))).format == "PNG"


def test_request_id_is_honoured_or_generated(client: TestClient) -> None:
    assert client.get("/healthz", headers={"X-Request-ID": "abc-123"}).headers["x-request-id"] == "abc-123"
    generated = client.get("/healthz", headers={"X-Request-ID": "bad id\twith spaces"}).headers[
        "x-request-id"
    ]
    assert len(generated) == 32 and " " not in generated


# ---------------------------------------------------------------------------------------------------
# Refusals


@pytest.mark.parametrize(
    ("body", "needle", "limit"),
    [
        ({"instruction": "   "}, "empty", None),
        ({"instruction": ""}, "empty", None),
        ({"task": "segmentation"}, "known tasks: caption", None),
        ({"task": "vqa"}, "['question']", None),
        ({"task": "grounding", "fields": {"txt": "a"}}, "unknown", None),
        ({"task": "vqa", "instruction": "x", "fields": {"question": "q"}}, "exactly one", None),
        ({}, "exactly one", None),
        ({"task": "grounded_caption", "fields": {"box": [1, 2, 3]}}, "box", None),
        (
            {"instruction": "x", "candidates": [str(i) for i in range(101)]},
            "101 candidates",
            "max_candidates",
        ),
        ({"instruction": "x", "candidates": ["a", " "]}, "candidates[1]", None),
        ({"instruction": "x", "max_new_tokens": 257}, "257", "max_new_tokens"),
        ({"instruction": "x", "max_new_tokens": 0}, "max_new_tokens", None),
        ({"instruction": "x", "beam_size": 9}, "beam_size=9", "max_beam_size"),
        ({"instruction": "x" * 201}, "201 characters", "max_instruction_chars"),
        ({"instruction": "x", "temperature": 0}, "temperature", None),
        ({"instruction": "x", "top_p": 1.5}, "top_p", None),
        ({"instruction": "x", "seed": 2**64}, "seed: Input should be less than or equal to", None),
        ({"instruction": "x", "colour": "red"}, "colour", None),
    ],
)
def test_generate_validation_errors(
    client: TestClient, png: bytes, body: dict, needle: str, limit: str | None
) -> None:
    msg = error(client.post("/v1/generate", json={"image": b64(png), **body}), 422, limit)
    assert needle in msg


@pytest.mark.parametrize("options", [{"temperature": 5e-324}, {"temperature": 1e300}, {"top_p": 5e-324}])
def test_extreme_sampling_values_are_answered(client: TestClient, png: bytes, options: dict) -> None:
    """Found by tests/test_api_fuzz.py: each made the sampling probabilities NaN (a 500)."""
    body = {"image": b64(png), "do_sample": True, "max_new_tokens": 3, **options}
    assert client.post("/v1/caption", json=body).status_code == 200


def test_multipart_fields_validate_like_json(client: TestClient, png: bytes) -> None:
    assert "instruction: must not be empty" in error(
        client.post("/v1/generate", files=upload(png), data={"instruction": ""}), 422
    )
    r = client.post(
        "/v1/generate", files=upload(png), data={"instruction": "x", "max_new_tokens": "", "beam_size": "1"}
    )
    assert r.status_code == 200, r.text  # an empty optional form field means unset
    r = client.post("/v1/vqa", files=upload(png), data={"question": "q", "candidates": '["red", "blue"]'})
    assert r.json()["answer"] in ("red", "blue")


def test_token_limit(predictor: Predictor, png: bytes) -> None:
    with serve(predictor, max_instruction_tokens=8) as c:
        r = c.post(
            "/v1/generate", json={"image": b64(png), "instruction": "what is the colour of the big shape?"}
        )
        assert "tokens" in error(r, 422, "max_instruction_tokens")


def test_malformed_bodies_are_4xx(client: TestClient, png: bytes) -> None:
    assert "image" in error(client.post("/v1/caption", json={}), 422)  # no image
    error(client.post("/v1/caption", content=b"{not json", headers={"content-type": "application/json"}), 422)
    error(client.post("/v1/caption", content=b"[1, 2]", headers={"content-type": "application/json"}), 422)
    error(client.post("/v1/caption", content=b"", headers={"content-type": "application/json"}), 422)
    error(client.post("/v1/caption", content=b"hello", headers={"content-type": "text/plain"}), 415)
    error(client.post("/v1/caption", json={"image": "not base64!!"}), 422)
    error(client.post("/v1/caption", json={"image": "data:image/png,abc"}), 422)
    error(client.post("/v1/caption", json={"image": ""}), 422)
    error(client.post("/v1/vqa", files=upload(png), data={"question": "q", "candidates": "[1, "}), 422)
    error(client.post("/v1/generate", files=upload(png), data={"task": "vqa", "fields": "{oops"}), 422)
    error(client.post("/v1/caption", files=upload(png), data={"beam_size": "many"}), 422)
    error(client.post("/v1/nothing-here", json={}), 404)
    error(client.get("/v1/caption"), 405)


def test_not_an_image_is_415(client: TestClient) -> None:
    rng = np.random.default_rng(0)
    msg = error(client.post("/v1/caption", files=upload(rng.bytes(500))), 415)
    assert "image" in msg


def test_truncated_image_is_422(client: TestClient, png: bytes) -> None:
    assert "truncated" in error(client.post("/v1/caption", files=upload(png[: len(png) // 2])), 422)
    jpeg = encode(scene(), "JPEG")
    error(client.post("/v1/caption", files=upload(jpeg[: len(jpeg) // 3])), 422)


def test_upload_bytes_limit_is_413(predictor: Predictor) -> None:
    noise = encode(Image.fromarray(np.random.default_rng(0).integers(0, 255, (60, 60, 3), dtype=np.uint8)))
    assert len(noise) > 2000
    with serve(predictor, max_upload_bytes=2000) as c:
        error(c.post("/v1/caption", files=upload(noise)), 413, "max_upload_bytes")
        error(c.post("/v1/caption", json={"image": b64(noise)}), 413, "max_upload_bytes")
        # a body far over the limit is refused from its Content-Length, before it is read
        error(c.post("/v1/caption", files=upload(b"\0" * 1_200_000)), 413, "max_upload_bytes")


def test_pixel_limit_is_413(predictor: Predictor, png: bytes) -> None:
    with serve(predictor, max_image_pixels=W * H - 1) as c:
        msg = error(c.post("/v1/caption", files=upload(png)), 413, "max_image_pixels")
        assert f"{W}x{H}" in msg


def _palette() -> Image.Image:
    return scene().convert("P", palette=Image.Palette.ADAPTIVE, colors=16)


def _palette_transparent() -> Image.Image:
    image = _palette()
    image.info["transparency"] = 0
    return image


def _sixteen_bit() -> Image.Image:
    grey = np.asarray(scene().convert("L"), dtype=np.uint16) * 257
    return Image.fromarray(grey)  # mode I;16


@pytest.mark.parametrize(
    ("make", "fmt"),
    [
        (lambda: scene().convert("L"), "PNG"),
        (lambda: scene().convert("1"), "PNG"),
        (lambda: scene().convert("RGBA"), "PNG"),
        (lambda: scene().convert("LA"), "PNG"),
        (lambda: scene().convert("CMYK"), "JPEG"),
        (lambda: scene().convert("L"), "JPEG"),
        (_sixteen_bit, "PNG"),
        (_palette, "PNG"),
        (_palette_transparent, "PNG"),
        (lambda: scene(), "WEBP"),
        (lambda: scene(), "BMP"),
        (lambda: scene(), "GIF"),
        (lambda: scene(), "TIFF"),
    ],
    ids=[
        "L",
        "1bit",
        "RGBA",
        "LA",
        "CMYK-jpeg",
        "L-jpeg",
        "I16",
        "P",
        "P-transparent",
        "webp",
        "bmp",
        "gif",
        "tiff",
    ],
)
def test_image_modes_and_formats_decode(client: TestClient, make, fmt: str) -> None:
    data = encode(make(), fmt)
    r = client.post("/v1/grounding", files=upload(data), data={"text": "a shape"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["image_size"] == [W, H]
    assert body["box"] is None or in_frame(body["box"], (W, H))


def test_exif_rotation_sets_the_box_frame(client: TestClient) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape W x H, displayed rotated 90 degrees: H x W
    data = encode(scene(), "JPEG", exif=exif)
    body = client.post("/v1/grounding", files=upload(data), data={"text": "a shape"}).json()
    assert body["image_size"] == [H, W]
    assert body["box"] is None or in_frame(body["box"], (H, W))
    ok = client.post(
        "/v1/grounded-caption",
        files=upload(data),
        data={"box": f"[0, 0, {H - 5}, {W - 5}]", "max_new_tokens": 2},
    )
    assert ok.status_code == 200, ok.text
    wrong_frame = client.post(
        "/v1/grounded-caption", files=upload(data), data={"box": f"[0, 0, {W - 5}, {H - 5}]"}
    )
    assert f"{H}x{W}" in error(wrong_frame, 422)


def test_image_outputs_need_a_vq_tokenizer(tmp_path: Path, png: bytes) -> None:
    plain = Predictor.from_checkpoint(build_micro_checkpoint(tmp_path, with_vq=False))
    with serve(plain) as c:
        assert "VQ tokenizer" in error(c.post("/v1/image-infilling", files=upload(png)), 501)
        assert "VQ tokenizer" in error(c.post("/v1/image-generation", json={"caption": "a star"}), 501)
        assert "VQ tokenizer" in error(
            c.post("/v1/generate", json={"task": "text_to_image", "fields": {"caption": "x"}}), 501
        )
        tasks = {t["name"]: t for t in c.get("/v1/tasks").json()["tasks"]}
        assert tasks["text_to_image"]["available"] is False and tasks["caption"]["available"] is True


def test_queue_depth_zero_is_503_with_retry_after(predictor: Predictor, png: bytes) -> None:
    with serve(predictor, max_queue_depth=0, retry_after_s=7) as c:
        r = c.post("/v1/caption", files=upload(png))
        error(r, 503, "max_queue_depth")
        assert r.headers["retry-after"] == "7"


def test_blocked_engine_fills_the_queue(predictor: Predictor, png: bytes) -> None:
    gate = Gate(predictor)
    with (
        serve(gate, max_batch_size=1, max_queue_depth=1, batch_window_ms=0) as c,
        ThreadPoolExecutor(2) as pool,
    ):
        gate.open.clear()
        gate.entered.clear()
        running = pool.submit(c.post, "/v1/itm", files=upload(png), data={"text": "a"})
        assert gate.entered.wait(5)
        queued = pool.submit(c.post, "/v1/itm", files=upload(png), data={"text": "b"})
        deadline = time.monotonic() + 5
        while c.app.state.serving.engine.queue_depth < 1:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        r = c.post("/v1/itm", files=upload(png), data={"text": "c"})
        error(r, 503, "max_queue_depth")
        assert int(r.headers["retry-after"]) >= 0
        gate.open.set()
        assert running.result().status_code == 200 and queued.result().status_code == 200


def test_not_ready_until_warmed_up(predictor: Predictor, png: bytes) -> None:
    gate = Gate(predictor)
    gate.open.clear()
    with serve(gate, ready=False) as c:
        assert gate.entered.wait(5)  # the warm-up request is running
        r = c.get("/readyz")
        assert r.status_code == 503 and r.json()["status"] == "loading" and "retry-after" in r.headers
        assert c.get("/healthz").status_code == 200
        r = c.post("/v1/caption", files=upload(png))
        assert "not ready" in error(r, 503) and "retry-after" in r.headers
        gate.open.set()
        wait_ready(c)
        assert c.post("/v1/caption", files=upload(png), data={"max_new_tokens": 2}).status_code == 200


def test_a_second_lifespan_serves_again(predictor: Predictor, png: bytes) -> None:
    """An app whose lifespan had ended (a TestClient entered twice; schemathesis ends it after each
    test) stayed 'shutting down' (503) when it started again."""
    app = build_app(ServeConfig(), predictor=predictor)
    for _ in range(2):
        with TestClient(app, raise_server_exceptions=False) as c:
            wait_ready(c)
            assert c.post("/v1/caption", json={"image": b64(png), "max_new_tokens": 2}).status_code == 200


def test_timeout_is_504(predictor: Predictor, png: bytes) -> None:
    gate = Gate(predictor)
    with serve(gate, request_timeout_s=0.05) as c:
        gate.delay = 0.3
        error(c.post("/v1/caption", files=upload(png)), 504, "request_timeout_s")


def test_failed_checkpoint_load_is_reported(tmp_path: Path) -> None:
    app = build_app(ServeConfig(checkpoint=str(tmp_path / "missing"), device="cpu"))
    with TestClient(app) as c:
        deadline = time.monotonic() + 10
        while c.get("/readyz").json()["status"] == "loading":
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert c.get("/readyz").json()["status"] == "failed"
        assert "does not exist" in c.get("/healthz").json()["detail"]
        assert "failed to load" in error(c.post("/v1/caption", json={"image": "x"}), 503)


# ---------------------------------------------------------------------------------------------------
# Batching, metrics, logs, draining


def _batch_histogram(c: TestClient) -> tuple[float, float]:
    """(batches of size 1, all batches) from the batch size histogram."""
    samples = metric_samples(c)
    ones = next(s.value for s in samples["ofa_batch_size_bucket"] if s.labels["le"] == "1.0")
    return ones, samples["ofa_batch_size_count"][0].value


@pytest.mark.parametrize("max_batch_size", [8, 1])
def test_concurrent_requests_are_batched(predictor: Predictor, png: bytes, max_batch_size: int) -> None:
    gate = Gate(predictor, delay=0.1)  # while one batch runs, the others queue up
    with serve(gate, max_batch_size=max_batch_size, batch_window_ms=20) as c:
        with ThreadPoolExecutor(8) as pool:
            futures = [
                pool.submit(c.post, "/v1/grounding", files=upload(png), data={"text": f"shape {i}"})
                for i in range(8)
            ]
            responses = [f.result() for f in futures]
        assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
        ones, batches = _batch_histogram(c)
        if max_batch_size == 1:
            assert ones == batches and max(gate.batches[1:]) == 1
        else:
            assert batches > ones, "no batch held more than one request"
            assert max(gate.batches) > 1 and sum(gate.batches[1:]) == 8  # [0] is the warm-up


def test_metrics_exposition(client: TestClient, png: bytes) -> None:
    client.post("/v1/itm", files=upload(png), data={"text": "a red circle"})
    client.post("/v1/itm", json={})
    samples = metric_samples(client)
    requests = {(s.labels["endpoint"], s.labels["status"]) for s in samples["ofa_requests_total"]}
    assert {("/v1/itm", "200"), ("/v1/itm", "422")} <= requests
    assert any(s.labels.get("endpoint") == "/v1/itm" for s in samples["ofa_request_latency_seconds_bucket"])
    assert samples["ofa_queue_depth"][0].value == 0
    tokens = {s.labels["task"]: s.value for s in samples["ofa_generated_tokens_total"]}
    assert tokens["itm"] >= 1
    assert samples["ofa_batch_size_count"][0].value >= 1


def test_two_apps_have_separate_registries(predictor: Predictor) -> None:
    with serve(predictor) as a, serve(predictor) as b:
        a.get("/healthz")
        count = {s.labels["endpoint"] for s in metric_samples(b)["ofa_requests_total"]}
        assert "/healthz" not in count


def test_json_log_lines_carry_the_request_id() -> None:
    import logging

    token = request_id_var.set("rid-42")
    try:
        record = logging.LogRecord("serving", logging.INFO, __file__, 1, "hello %s", ("world",), None)
        record.status = 200
        line = json.loads(JsonFormatter().format(record))
    finally:
        request_id_var.reset(token)
    assert line["message"] == "hello world" and line["request_id"] == "rid-42" and line["status"] == 200


def test_engine_isolates_failures_and_drains_on_stop(predictor: Predictor, png: bytes) -> None:
    """A bad request fails alone inside its batch; stop() lets queued requests finish."""
    image = Image.open(io.BytesIO(png))

    async def scenario() -> list:
        config = ServeConfig(max_batch_size=4, batch_window_ms=50)
        engine = BatchingEngine(Gate(predictor, delay=0.05), config, ServeMetrics())
        await engine.start()
        good = Request(image, "itm", {"text": "a shape"})
        bad = Request(None, "itm", {"text": "no image"})
        jobs = [asyncio.ensure_future(engine.generate(r, 10)) for r in (good, bad, good, good, good)]
        await asyncio.sleep(0.01)
        await engine.stop(timeout=10)
        return await asyncio.gather(*jobs, return_exceptions=True)

    outcomes = asyncio.run(scenario())
    assert isinstance(outcomes[1], ValueError) and "image" in str(outcomes[1])
    assert all(isinstance(o, dict) and o["answer"] in ("yes", "no") for i, o in enumerate(outcomes) if i != 1)


# ---------------------------------------------------------------------------------------------------
# Streaming

GREEDY = {"do_sample": False, "beam_size": 1}


def sse_json(response) -> list[dict]:
    """A text/event-stream body: every `data:` line is JSON until the final `[DONE]`."""
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    blocks = response.text.split("\n\n")
    assert blocks[-1] == "" and blocks[-2] == "data: [DONE]", response.text[-200:]
    events = []
    for block in blocks[:-2]:
        assert block.startswith("data: ") and "\n" not in block, block
        events.append(json.loads(block.removeprefix("data: ")))
    return events


def streamed(pieces: list[str], stop: tuple[str, ...] = ()) -> list[str]:
    """The deltas of an answer whose text grows through `pieces` (the last one is the answer)."""
    deltas = TextDeltas(stop)
    out = [deltas.push(text) for text in pieces] + [deltas.finish(pieces[-1])]
    for i in range(len(out)):  # what was sent is always the start of the final content
        assert cut_at_stop(pieces[-1], stop)[0].startswith("".join(out[: i + 1]))
    return out


def test_text_deltas_hold_back_partial_characters_and_stop_strings() -> None:
    text = "héllo wörld, 3 € (and ✓)"
    data = text.encode()
    out = streamed([data[:i].decode("utf-8", errors="replace") for i in range(1, len(data) + 1)])
    assert "".join(out) == text and not any("\ufffd" in d for d in out)
    assert sum(1 for d in out if d) > 10
    cases = [
        ("hello world", ("wor",), "hello "),
        ("hello wax", ("wor",), "hello wax"),
        ("abcXdef", ("abcX", "c"), ""),  # "c" is found first, but "abcX" starts before it
        ("a stop", ("stop", "a s"), ""),
        ("no stop here", ("zz",), "no stop here"),
    ]
    for answer, stop, content in cases:
        out = streamed([answer[:i] for i in range(1, len(answer) + 1)], stop)
        assert "".join(out) == content, (answer, stop, out)


def test_text_deltas_over_sentencepiece_byte_pieces(predictor: Predictor) -> None:
    """Random ids of the micro vocabulary (byte pieces, subwords, bins, codes): the decoded text of
    each prefix starts the next, so the deltas add up to the decoded whole."""
    vocab = predictor.vocab
    rng = np.random.default_rng(0)
    for _ in range(100):
        ids = rng.integers(4, len(vocab), size=int(rng.integers(1, 30))).tolist()
        out = streamed([vocab.decode(ids[: i + 1]) for i in range(len(ids))])
        assert "".join(out) == vocab.decode(ids)


def test_generate_stream_deltas_add_up_to_the_answer(client: TestClient, png: bytes) -> None:
    for options in (
        {**GREEDY, "max_new_tokens": 12},
        {"do_sample": True, "beam_size": 1, "seed": 4, "max_new_tokens": 12},
    ):
        body = {"image": b64(png), "instruction": "what does the image describe?", **options}
        plain = client.post("/v1/generate", json=body).json()
        events = sse_json(client.post("/v1/generate", json={**body, "stream": True}))
        *deltas, final = events
        assert all(set(e) == {"type", "text"} and e["type"] == "delta" and e["text"] for e in deltas)
        assert "".join(e["text"] for e in deltas) == plain["text"]
        assert final == {"type": "result", "response": plain}
        assert len(plain["tokens"]) >= 6 and len(deltas) > 1, "not streamed token by token"
    # multipart, a task, its beam search: the text comes as one delta at the end
    form = {"task": "caption", "max_new_tokens": "5", "stream": "true"}
    *deltas, final = sse_json(client.post("/v1/generate", files=upload(png), data=form))
    plain = client.post("/v1/generate", files=upload(png), data={**form, "stream": "false"}).json()
    assert [e["text"] for e in deltas] == ([plain["text"]] if plain["text"] else [])
    assert final["response"] == plain
    # refusals come before the stream, as ordinary JSON errors
    error(client.post("/v1/generate", json={"instruction": "x", "stream": True}), 422)
    spec = client.get("/openapi.json").json()["paths"]["/v1/generate"]["post"]
    assert "text/event-stream" in spec["responses"]["200"]["content"] and '"delta"' in spec["description"]


def test_generate_stream_keeps_the_queue_limits_and_timeout(predictor: Predictor, png: bytes) -> None:
    body = {"image": b64(png), "instruction": "describe", "stream": True, **GREEDY}
    with serve(predictor, max_queue_depth=0) as c:
        error(c.post("/v1/generate", json=body), 503, "max_queue_depth")
    gate = Gate(predictor)
    with serve(gate, request_timeout_s=0.05) as c:
        gate.delay = 0.3
        error(c.post("/v1/generate", json=body), 504, "request_timeout_s")


class _PausingListener:
    """Passes a listener's calls on; after the first streamed tokens the model's thread waits for
    `resume`, so a test can close the stream at a known step."""

    def __init__(self, inner, resume: threading.Event) -> None:
        self.inner, self.resume, self.paused = inner, resume, False

    @property
    def cancelled(self) -> bool:
        return self.inner.cancelled

    @property
    def streaming(self) -> bool:
        return self.inner.streaming

    def tokens(self, ids: list[int], text: str) -> None:
        self.inner.tokens(ids, text)
        if self.inner.streaming and not self.paused:
            self.paused = True
            self.resume.wait(10)


class Pausing(Gate):
    def __init__(self, inner: Predictor) -> None:
        super().__init__(inner)
        self.resume = threading.Event()
        self.results: list[dict] = []

    def predict(self, requests: list[Request]) -> list[dict]:
        for r in requests:
            if r.listener is not None:  # not the warm-up request
                r.listener = _PausingListener(r.listener, self.resume)
        self.batches.append(len(requests))
        self.results = self.inner.predict(requests)
        return self.results


def test_engine_streams_in_a_shared_batch_and_drops_a_closed_stream(predictor: Predictor, png: bytes) -> None:
    image = Image.open(io.BytesIO(png))
    request = Request(
        image, instruction="what does the image describe?", options={**GREEDY, "max_new_tokens": 32}
    )
    metrics = ServeMetrics()
    pausing = Pausing(predictor)

    async def scenario():
        config = ServeConfig(max_batch_size=4, batch_window_ms=50, continuous_batching=False)
        engine = BatchingEngine(pausing, config, metrics)
        await engine.start()
        stream = engine.stream(request, 30)
        plain = asyncio.ensure_future(engine.generate(request, 30))
        first = await anext(stream)  # the model's thread now waits in the listener
        stream.close()
        pausing.resume.set()
        answer = await plain
        while engine.busy:
            await asyncio.sleep(0.01)
        await engine.stop(timeout=1)
        return first, answer

    first, answer = asyncio.run(scenario())
    assert pausing.batches == [2]  # the streaming request shared its batch
    assert first.tokens == answer["tokens"][:1] and answer["text"].startswith(first.text.rstrip("\ufffd"))
    assert len(answer["tokens"]) == 32 and pausing.results[0] == {"task": None, "cancelled": True}
    samples = {
        s.name: s for f in metrics.registry.collect() for s in f.samples if not s.name.endswith("_created")
    }
    assert samples["ofa_cancelled_requests_total"].labels == {"stage": "decoding"}
    assert samples["ofa_cancelled_requests_total"].value == 1
    assert samples["ofa_running_requests"].value == 0
    assert samples["ofa_generated_tokens_total"].value == 32  # the closed stream's tokens are not counted


def test_a_timeout_mid_stream_is_an_error_event(predictor: Predictor, png: bytes) -> None:
    """The first tokens came (the response began), then the model stalls past request_timeout_s."""
    pausing = Pausing(predictor)
    body = {"image": b64(png), "instruction": "describe", "stream": True, **GREEDY}
    content = [
        {"type": "text", "text": "describe"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + b64(png)}},
    ]
    chat = {
        "model": "micro",
        "stream": True,
        "temperature": 0,
        "messages": [{"role": "user", "content": content}],
    }
    with serve(pausing, request_timeout_s=1.0, model_name="micro", continuous_batching=False) as c:
        for path, payload in (("/v1/generate", body), ("/v1/chat/completions", chat)):
            pausing.resume.clear()
            events = sse_json(c.post(path, json=payload))
            pausing.resume.set()  # the model's thread goes on, sees the request cancelled, stops
            if path == "/v1/generate":
                assert [e["type"] for e in events] == ["delta", "error"]
                assert events[-1]["error"]["type"] == "timeout"
                assert events[-1]["error"]["limit"] == "request_timeout_s"
            else:
                assert events[0]["choices"][0]["delta"]["role"] == "assistant"
                assert set(events[-1]) == {"error"} and events[-1]["error"]["code"] == "timeout"
            while c.app.state.serving.engine.busy:
                time.sleep(0.01)
        cancelled = metric_samples(c)["ofa_cancelled_requests_total"]
        assert [(s.labels["stage"], s.value) for s in cancelled] == [("decoding", 2.0)]


# ---------------------------------------------------------------------------------------------------
# Configuration


def test_config_flags_override_env_override_defaults() -> None:
    env = {"OFA_SERVE_MAX_BATCH_SIZE": "2", "OFA_SERVE_WARMUP": "false", "OFA_SERVE_REQUEST_TIMEOUT_S": "1.5"}
    assert ServeConfig.from_env({}).max_batch_size == ServeConfig().max_batch_size
    cfg = ServeConfig.from_args([], environ=env)
    assert (cfg.max_batch_size, cfg.warmup, cfg.request_timeout_s) == (2, False, 1.5)
    cfg = ServeConfig.from_args(["--max-batch-size", "4", "--warmup", "--device", "cpu"], environ=env)
    assert (cfg.max_batch_size, cfg.warmup, cfg.device) == (4, True, "cpu")
    with pytest.raises(ValueError, match="OFA_SERVE_MAX_QUEUE_DEPTH"):
        ServeConfig.from_env({"OFA_SERVE_MAX_QUEUE_DEPTH": "lots"})
    with pytest.raises(ValueError, match="max_batch_size"):
        ServeConfig(max_batch_size=0)

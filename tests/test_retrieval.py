"""Contrastive retrieval on micro models: the Predictor's embeddings and ranking, /v1/embeddings and
/v1/retrieval (one trained for a few steps to tell solid colours apart), their refusals, and the
retrieval entry of train/evaluate.py."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from ofa_unified.inference import NO_RETRIEVAL_HEAD, Predictor, Request
from ofa_unified.model import itc_loss
from tests.test_evaluate import load_evaluate
from tests.test_serving import b64, build_micro_checkpoint, encode, error, serve

COLOURS = {"red": (220, 30, 30), "green": (30, 190, 40), "blue": (30, 40, 220), "yellow": (235, 220, 30)}
TEXTS = [f"a {name} circle" for name in COLOURS]
ITC_DIM = 16


def solid(rgb: tuple[int, int, int], size: tuple[int, int] = (40, 30)) -> Image.Image:
    return Image.new("RGB", size, rgb)


IMAGES = [solid(rgb) for rgb in COLOURS.values()]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_micro_checkpoint(tmp_path_factory.mktemp("retrieval"), with_vq=False, itc_dim=ITC_DIM)


@pytest.fixture(scope="module")
def predictor(checkpoint: Path) -> Predictor:
    return Predictor.from_checkpoint(checkpoint)


@pytest.fixture(scope="module")
def trained(checkpoint: Path) -> Predictor:
    """The micro model after a few dozen contrastive steps on four colours and their captions."""
    predictor = Predictor.from_checkpoint(checkpoint)
    model = predictor.model
    pixels = torch.stack([predictor.transform(im)[0] for im in IMAGES])
    ids = predictor.text_ids(TEXTS)
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(40):
        loss = itc_loss(model.embed(patch_images=pixels), model.embed(input_ids=ids), model.itc_scale())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    return predictor


@pytest.fixture(scope="module")
def client(trained: Predictor) -> Iterator[TestClient]:
    with serve(trained, max_retrieval_texts=6, max_retrieval_images=5, max_rerank=3) as c:
        yield c


# ---------------------------------------------------------------------------------------------------
# Predictor


def test_embeddings_are_unit_vectors_and_chunking_does_not_change_them(predictor: Predictor) -> None:
    images = predictor.embed_images(IMAGES)
    texts = predictor.embed_texts(TEXTS)
    assert images.shape == texts.shape == (4, ITC_DIM)
    assert torch.allclose(images.norm(dim=1), torch.ones(4), atol=1e-5)
    assert torch.allclose(texts.norm(dim=1), torch.ones(4), atol=1e-5)
    assert torch.allclose(predictor.embed_images(IMAGES, batch_size=3), images, atol=1e-5)
    assert torch.allclose(predictor.embed_texts(TEXTS, batch_size=3), texts, atol=1e-5)
    assert predictor.embed_texts([]).shape == (0, ITC_DIM)


def test_rank_orders_every_candidate_and_rerank_reorders_the_top_k(predictor: Predictor) -> None:
    ranked = predictor.rank(IMAGES[0], TEXTS)
    assert sorted(r["index"] for r in ranked) == [0, 1, 2, 3]
    scores = [r["score"] for r in ranked]
    assert scores == sorted(scores, reverse=True) and all(-1.0 <= s <= 1.0 for s in scores)
    assert all(r["text"] == TEXTS[r["index"]] and r["score"] == r["embedding_score"] for r in ranked)

    reranked = predictor.rank(IMAGES[0], TEXTS, rerank=3)
    top, rest = reranked[:3], reranked[3:]
    assert {r["index"] for r in top} == {r["index"] for r in ranked[:3]}
    assert [r["score"] for r in top] == sorted((r["itm_score"] for r in top), reverse=True)
    assert all(0.0 <= r["itm_score"] <= 1.0 for r in top) and "itm_score" not in rest[0]
    assert rest == ranked[3:]
    by_index = {r["index"]: r["embedding_score"] for r in ranked}
    assert all(r["embedding_score"] == by_index[r["index"]] for r in top)

    images = predictor.rank(TEXTS[1], IMAGES, rerank=10)  # k above the pool: every candidate
    assert sorted(r["index"] for r in images) == [0, 1, 2, 3] and all("itm_score" in r for r in images)
    assert "text" not in images[0]


def test_itm_score_is_the_itm_tasks_yes_probability(predictor: Predictor) -> None:
    [result] = predictor.predict([Request(IMAGES[2], "itm", {"text": TEXTS[0]})])
    [score] = predictor.itm_scores([(IMAGES[2], TEXTS[0])])
    assert score == pytest.approx(result["probabilities"]["yes"], abs=1e-6)


def test_rank_refuses_bad_input(predictor: Predictor) -> None:
    with pytest.raises(ValueError, match="no candidates"):
        predictor.rank(IMAGES[0], [])
    with pytest.raises(ValueError, match="image query ranks texts"):
        predictor.rank(IMAGES[0], IMAGES)
    with pytest.raises(ValueError, match="rerank must be >= 0"):
        predictor.rank(TEXTS[0], IMAGES, rerank=-1)
    with pytest.raises(ValueError, match="empty"):
        predictor.embed_texts(["a red circle", "  "])


def test_a_model_without_a_retrieval_head_says_so(tmp_path: Path) -> None:
    plain = Predictor.from_checkpoint(build_micro_checkpoint(tmp_path, with_vq=False))
    assert not plain.has_retrieval
    for call in (lambda: plain.embed_images(IMAGES), lambda: plain.rank("a red circle", IMAGES)):
        with pytest.raises(ValueError, match=r"no retrieval head \(itc_dim=0\)"):
            call()
    with serve(plain) as c:
        for path, body in (("/v1/embeddings", {"text": "a red circle"}), ("/v1/retrieval", {"text": "x"})):
            message = error(c.post(path, json=body), 422)
            assert message.startswith(NO_RETRIEVAL_HEAD), message


# ---------------------------------------------------------------------------------------------------
# HTTP


def test_retrieval_ranks_the_matching_caption_first(client: TestClient) -> None:
    for i, image in enumerate(IMAGES):
        r = client.post("/v1/retrieval", json={"image": b64(encode(image)), "texts": TEXTS})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["query"] == "image" and body["reranked"] == 0
        assert [c["index"] for c in body["results"]][0] == i, body
        assert body["results"][0]["text"] == TEXTS[i]


def test_retrieval_text_query_over_uploaded_images(client: TestClient) -> None:
    files = [("images", (f"{n}.png", encode(im), "image/png")) for n, im in zip(COLOURS, IMAGES, strict=True)]
    for i, text in enumerate(TEXTS):
        r = client.post("/v1/retrieval", data={"text": text}, files=files)
        assert r.status_code == 200, r.text
        assert r.json()["results"][0]["index"] == i, r.json()
    # JSON: base64 and data: URIs
    images = [b64(encode(im)) for im in IMAGES[:2]] + ["data:image/png;base64," + b64(encode(IMAGES[2]))]
    r = client.post("/v1/retrieval", json={"text": TEXTS[2], "images": images})
    assert r.status_code == 200 and r.json()["results"][0]["index"] == 2, r.text


def test_retrieval_rerank_scores_the_top_k_with_itm(client: TestClient, trained: Predictor) -> None:
    r = client.post("/v1/retrieval", json={"image": b64(encode(IMAGES[1])), "texts": TEXTS, "rerank": 2})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["reranked"] == 2
    top, rest = body["results"][:2], body["results"][2:]
    assert all(c["itm_score"] is not None and c["score"] == c["itm_score"] for c in top)
    assert top[0]["itm_score"] >= top[1]["itm_score"]
    assert all(c["itm_score"] is None and c["score"] == c["embedding_score"] for c in rest)
    plain = trained.rank(IMAGES[1], TEXTS)
    assert {c["index"] for c in top} == {c["index"] for c in plain[:2]}
    form = client.post(
        "/v1/retrieval",
        data={"texts": TEXTS, "rerank": "2"},
        files={"image": ("x.png", encode(IMAGES[1]), "image/png")},
    )
    assert form.status_code == 200 and form.json() == body, form.text


def test_embeddings_endpoint(client: TestClient, trained: Predictor) -> None:
    png = encode(IMAGES[0])
    text = client.post("/v1/embeddings", json={"text": TEXTS[0]}).json()
    upload = client.post("/v1/embeddings", files={"image": ("x.png", png, "image/png")}).json()
    base64 = client.post("/v1/embeddings", json={"image": b64(png)}).json()
    assert text["input"] == "text" and upload["input"] == base64["input"] == "image"
    assert text["dim"] == len(text["embedding"]) == ITC_DIM
    assert upload["embedding"] == pytest.approx(base64["embedding"])
    assert sum(v * v for v in upload["embedding"]) == pytest.approx(1.0, abs=1e-5)
    assert text["embedding"] == pytest.approx(trained.embed_texts([TEXTS[0]])[0].tolist(), abs=1e-6)


@pytest.mark.parametrize(
    ("path", "body", "status", "limit", "says"),
    [
        ("/v1/embeddings", {}, 422, None, "exactly one of 'image' and 'text'"),
        ("/v1/embeddings", {"text": "a", "image": "PNG"}, 422, None, "exactly one of 'image' and 'text'"),
        ("/v1/embeddings", {"text": "  "}, 422, None, "text: must not be empty"),
        ("/v1/retrieval", {"texts": TEXTS}, 422, None, "give exactly one query"),
        ("/v1/retrieval", {"text": "a", "image": "PNG", "texts": TEXTS}, 422, None, "give exactly one query"),
        ("/v1/retrieval", {"image": "PNG"}, 422, None, "no candidates: give a non-empty 'texts' list"),
        ("/v1/retrieval", {"image": "PNG", "texts": []}, 422, None, "no candidates"),
        ("/v1/retrieval", {"text": "a red circle"}, 422, None, "no candidates: give a non-empty 'images'"),
        ("/v1/retrieval", {"image": "PNG", "images": ["PNG"]}, 422, None, "ranks 'texts', not 'images'"),
        ("/v1/retrieval", {"text": "a", "texts": TEXTS}, 422, None, "ranks 'images', not 'texts'"),
        ("/v1/retrieval", {"image": "PNG", "texts": TEXTS * 2}, 422, "max_retrieval_texts", "8 candidate"),
        ("/v1/retrieval", {"text": "a", "images": ["PNG"] * 6}, 422, "max_retrieval_images", "6 candidate"),
        ("/v1/retrieval", {"image": "PNG", "texts": TEXTS, "rerank": 4}, 422, "max_rerank", "rerank=4"),
        ("/v1/retrieval", {"image": "PNG", "texts": TEXTS, "rerank": -1}, 422, None, "rerank"),
        ("/v1/retrieval", {"image": "PNG", "texts": ["a", " "]}, 422, None, "texts.1: must not be empty"),
        ("/v1/retrieval", {"image": "PNG", "texts": ["x" * 1001]}, 422, "max_instruction_chars", "texts[0]"),
        ("/v1/retrieval", {"text": "a", "images": ["PNG", "bm90IGFuIGltYWdl"]}, 415, None, "images[1]:"),
        ("/v1/retrieval", {"text": "a", "images": ["PNG", "#"]}, 422, None, "images[1]: image is not valid"),
    ],
)
def test_bad_requests_are_4xx_with_a_message(
    client: TestClient, path: str, body: dict, status: int, limit: str | None, says: str
) -> None:
    png = b64(encode(IMAGES[0]))
    body = {
        k: png if v == "PNG" else [png if x == "PNG" else x for x in v] if k == "images" else v
        for k, v in body.items()
    }
    message = error(client.post(path, json=body), status, limit)
    assert says in message, message


def test_candidate_images_share_one_pixel_budget(trained: Predictor) -> None:
    images = [b64(encode(solid((9, 9, 9), (20, 20)))) for _ in range(3)]  # 400 pixels each
    with serve(trained, max_image_pixels=1000) as c:
        message = error(
            c.post("/v1/retrieval", json={"text": "a", "images": images}), 413, "max_image_pixels"
        )
        assert message.startswith("images[2]:"), message
        assert c.post("/v1/retrieval", json={"text": "a", "images": images[:2]}).status_code == 200


def test_retrieval_runs_on_the_engine_thread_and_queue(trained: Predictor) -> None:
    threads: list[str] = []

    class Spy:
        def __getattr__(self, name: str):
            return getattr(trained, name)

        def rank(self, *args, **kwargs):
            threads.append(threading.current_thread().name)
            return trained.rank(*args, **kwargs)

    with serve(Spy()) as c:
        r = c.post("/v1/retrieval", json={"image": b64(encode(IMAGES[0])), "texts": TEXTS})
        assert r.status_code == 200, r.text
        metrics = c.get("/metrics").text
    assert threads and threads[0].startswith("ofa-engine")
    assert 'ofa_requests_total{endpoint="/v1/retrieval",status="200"}' in metrics
    with serve(trained, max_queue_depth=0) as c:  # the same queue and its limit as every request
        r = c.post("/v1/embeddings", json={"text": TEXTS[0]})
        assert error(r, 503, "max_queue_depth") and r.headers["retry-after"] == "1"


def test_the_itc_task_points_to_retrieval_and_is_not_decoded(client: TestClient, trained: Predictor) -> None:
    itc = {t["name"]: t for t in client.get("/v1/tasks").json()["tasks"]}["itc"]
    assert itc["endpoint"] == "/v1/retrieval" and itc["available"] is True
    body = {"task": "itc", "fields": {"text": TEXTS[0]}, "image": b64(encode(IMAGES[0]))}
    assert "/v1/retrieval" in error(client.post("/v1/generate", json=body), 422)
    with pytest.raises(ValueError, match="decodes nothing"):
        trained.predict([Request(IMAGES[0], "itc", {"text": TEXTS[0]})])


def test_openapi_documents_the_retrieval_bodies(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    form = paths["/v1/retrieval"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert form["properties"]["images"]["items"] == {"type": "string", "format": "binary"}
    assert form["properties"]["image"]["format"] == "binary"
    assert {"application/json", "multipart/form-data"} <= set(
        paths["/v1/embeddings"]["post"]["requestBody"]["content"]
    )
    assert "422" in paths["/v1/retrieval"]["post"]["responses"]


# ---------------------------------------------------------------------------------------------------
# train/evaluate.py


def test_evaluate_reports_retrieval_recalls(checkpoint: Path) -> None:
    evaluate = load_evaluate()
    argv = ["--checkpoint", str(checkpoint), "--n", "6", "--tasks", "itm", "--rerank", "3"]
    report = evaluate.main(argv)["retrieval"]
    assert report["pool_size"] == 6 and report["pools"] == 1 and report["rerank"] == 3
    for key in ("image_to_text", "text_to_image", "image_to_text_reranked", "text_to_image_reranked"):
        assert set(report[key]) == {"r@1", "r@5"} and all(0.0 <= v <= 1.0 for v in report[key].values())
        assert report[key]["r@1"] <= report[key]["r@5"]

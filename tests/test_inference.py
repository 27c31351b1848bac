"""Predictor and CLI end to end on a random micro model: every task returns a well-formed result."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from ofa_unified.data.shapes import sample
from ofa_unified.inference import Predictor, Request
from ofa_unified.tasks import UnknownTaskError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def predictor(micro_checkpoint):
    return Predictor.from_checkpoint(micro_checkpoint)


@pytest.fixture(scope="module")
def image():
    img, _ = sample("test", 0)
    return img.resize((160, 96))  # not square, not the model size: outputs must come back in this frame


def test_every_task_returns_a_result(predictor, image):
    fast = {"max_new_tokens": 8, "beam_size": 2}
    requests = [
        Request(image, "caption", options=fast),
        Request(image, "vqa", {"question": "what color is the circle?"}, options=fast),
        Request(image, "grounding", {"text": "the red circle"}),
        Request(image, "grounded_caption", {"box": [10, 20, 60, 70]}, options=fast),
        Request(image, "itm", {"text": "a red circle"}),
        Request(image, "visual_entailment", {"text1": "a red circle", "text2": "there is a circle"}),
        Request(image, "detection", options=fast),
        Request(image, "text_infilling", {"text": "a large red circle"}, options=fast),
        Request(image, instruction="what is in the picture?", options=fast),
    ]
    results = predictor.predict(requests)
    assert len(results) == len(requests)
    for req, res in zip(requests, results, strict=True):
        assert isinstance(res["tokens"], list) and isinstance(res["score"], float)
        assert res["task"] == req.task
    box = results[2]["box"]
    assert len(box) == 4 and 0 <= box[0] <= box[2] <= 160 and 0 <= box[1] <= box[3] <= 96
    assert results[4]["answer"] in ("yes", "no")
    assert sum(results[4]["probabilities"].values()) == pytest.approx(1.0)
    assert results[4]["probability"] == results[4]["probabilities"][results[4]["answer"]]
    assert results[5]["answer"] in ("yes", "no", "maybe")


def test_request_candidates_constrain_the_answer(predictor, image):
    candidates = ["two", "three", "a large red circle"]
    res = predictor.predict([Request(image, "vqa", {"question": "how many?"}, candidates=candidates)])[0]
    assert res["answer"] in candidates
    assert set(res["probabilities"]) == set(candidates)


def test_batched_equals_one_by_one(predictor, image):
    other, _ = sample("test", 1)
    reqs = [
        Request(image, "grounding", {"text": "the red circle"}),
        Request(other, "grounding", {"text": "a"}),
    ]
    batched = predictor.predict(reqs)
    single = [predictor.predict([r])[0] for r in reqs]
    for a, b in zip(batched, single, strict=True):
        assert a["tokens"] == b["tokens"]
        assert a["score"] == pytest.approx(b["score"], abs=1e-4)


@pytest.mark.parametrize(
    ("request_", "match"),
    [
        (Request(None, "caption"), "needs an image"),
        (Request(Image.new("RGB", (8, 8)), "colorize"), "unknown task 'colorize'"),
        (Request(Image.new("RGB", (8, 8)), "vqa"), r"lacks field\(s\) \['question'\]"),
        (Request(Image.new("RGB", (8, 8)), instruction="   "), "instruction is empty"),
        (Request(Image.new("RGB", (8, 8)), "caption", instruction="x"), "exactly one"),
        (Request(Image.new("RGB", (8, 8)), "caption", options={"beam_size": 0}), "beam_size"),
        (Request(Image.new("RGB", (8, 8)), "image_infilling"), "no VQ tokenizer"),
        (Request(Image.new("RGB", (8, 8)), "caption", options={"mean_image": True}), "write images"),
        (Request(Image.new("RGB", (8, 8)), "caption", options={"mean_image": "no"}), "true or false"),
    ],
)
def test_bad_requests_raise_named_errors(predictor, request_, match):
    with pytest.raises(ValueError, match=match):
        predictor.predict([request_])
    assert issubclass(UnknownTaskError, ValueError)


def run_cli(*args: str) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "ofa_unified", *args], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_predict_cli_prints_json(micro_checkpoint, image, tmp_path):
    path = tmp_path / "img.png"
    image.save(path)
    res = json.loads(
        run_cli(
            "predict",
            "--checkpoint",
            str(micro_checkpoint),
            "--image",
            str(path),
            "--task",
            "grounding",
            "--text",
            "the red circle",
            "--beam",
            "2",
        )
    )
    assert len(res["box"]) == 4 and len(res["tokens"]) == 4 and "score" in res
    res = json.loads(
        run_cli(
            "predict",
            "--checkpoint",
            str(micro_checkpoint),
            "--image",
            str(path),
            "--task",
            "itm",
            "--text",
            "a red circle",
            "--candidates",
            "yes,no",
        )
    )
    assert res["answer"] in ("yes", "no")


def test_predict_cli_errors_are_messages(micro_checkpoint, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "ofa_unified",
            "predict",
            "--checkpoint",
            str(micro_checkpoint),
            "--image",
            str(bad),
            "--task",
            "caption",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert out.returncode != 0 and "cannot read image" in out.stderr and "Traceback" not in out.stderr


def test_sizes_cli_lists_every_size():
    data = json.loads(run_cli("sizes"))
    counts = {row["name"]: row["params_ofa_vocab"] for row in data["sizes"]}
    assert counts["tiny"] == 33_488_336 and counts["huge"] == 929_486_848


def test_convert_and_forward_cli_reproduce_the_reference(reference_dir, tmp_path):
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "model.safetensors").symlink_to(reference_dir / "weights.safetensors")
    (hf / "config.json").write_text((reference_dir / "config.json").read_text())
    converted = json.loads(run_cli("convert", str(hf), "--out", str(tmp_path / "own")))
    assert converted["from"] == "hf"
    run_cli(
        "forward",
        "--checkpoint",
        str(tmp_path / "own"),
        "--inputs",
        str(reference_dir / "inputs.safetensors"),
        "--out",
        str(tmp_path / "out.safetensors"),
    )
    got = load_file(str(tmp_path / "out.safetensors"))
    expected = load_file(str(reference_dir / "outputs.safetensors"))
    for key in ("logits", "encoder_out"):
        torch.testing.assert_close(got[key], expected[key], atol=1e-4, rtol=1e-4)


def test_shapes_cli_writes_images_and_annotations(tmp_path):
    run_cli("shapes", "--split", "test", "--n", "3", "--out", str(tmp_path / "s"))
    assert len(list((tmp_path / "s" / "images").glob("*.png"))) == 3
    assert len((tmp_path / "s" / "annotations.jsonl").read_text().splitlines()) == 3


@pytest.fixture(scope="module")
def micro_with_vq(micro_checkpoint, tmp_path_factory):
    """The micro checkpoint plus a tiny random VQ tokenizer (16 codes, as its vocabulary has)."""
    import shutil

    from ofa_unified.vq import VQConfig, VQTokenizer

    root = tmp_path_factory.mktemp("micro_vq") / "checkpoint"
    shutil.copytree(micro_checkpoint, root)
    config = VQConfig(channels=8, num_res_blocks=0, patch_hidden=8, codebook_size=16, code_dim=8)
    VQTokenizer(config).save(root / "vq")
    return root


def test_image_tasks_return_images_without_a_code_grid_field(micro_with_vq, image):
    predictor = Predictor.from_checkpoint(micro_with_vq)
    infill, generated = predictor.predict(
        [Request(image, "image_infilling"), Request(None, "text_to_image", {"caption": "a red circle"})]
    )
    assert infill["image"].size == image.size  # the middle, decoded and pasted into the original frame
    assert len(infill["codes"]) == predictor.code_grid("image_infilling") ** 2
    side = predictor.image_size
    assert generated["image"].size == (side, side)
    assert len(generated["codes"]) == predictor.code_grid("text_to_image") ** 2


def test_mean_image_is_the_pixel_mean_of_the_decoded_samples(micro_with_vq, image):
    from ofa_unified.vq import tensor_to_pil

    predictor = Predictor.from_checkpoint(micro_with_vq)
    square = image.resize((predictor.image_size, predictor.image_size))  # no resize on the way out
    decoded = []
    decode = predictor.vq.decode
    predictor.vq.decode = lambda codes: decoded.append((codes, decode(codes))) or decoded[-1][1]
    options = {"do_sample": True, "beam_size": 3, "top_k": 0, "seed": 0}
    mean, best = predictor.predict(
        [
            Request(square, "image_infilling", options={**options, "mean_image": True}),
            Request(square, "image_infilling", options={**options, "mean_image": False}),
        ]
    )
    (grids, pictures), (best_grid, best_picture) = decoded
    assert mean["images_averaged"] == 3 and "images_averaged" not in best
    assert grids.shape[0] == 3 and best_grid.shape[0] == 1
    assert grids[0].flatten().tolist() == mean["codes"]  # the best sample's codes are still reported
    expected = np.asarray(tensor_to_pil(pictures.mean(0)), dtype=np.int16)
    lo, hi = predictor.image_size // 4, 3 * predictor.image_size // 4
    got = np.asarray(mean["image"], dtype=np.int16)[lo:hi, lo:hi]
    assert np.abs(got - expected).max() <= 1
    assert (pictures - pictures.mean(0)).abs().max() > 0  # the samples differ: the mean is a real blend


def test_convert_to_float16_carries_the_vq_tokenizer(micro_with_vq, tmp_path):
    from ofa_unified.vq import VQTokenizer

    run_cli("convert", str(micro_with_vq), "--out", str(tmp_path / "half"), "--dtype", "float16")
    stored = load_file(str(tmp_path / "half" / "vq" / "vq.safetensors"))
    assert all(t.dtype == torch.float16 for t in stored.values() if t.is_floating_point())
    original, half = VQTokenizer.load(micro_with_vq / "vq"), VQTokenizer.load(tmp_path / "half" / "vq")
    for (name, a), b in zip(original.state_dict().items(), half.state_dict().values(), strict=True):
        assert b.dtype == a.dtype and torch.allclose(a.float(), b.float(), atol=1e-2), name


def test_convert_can_recompute_batchnorm_statistics(micro_checkpoint, tmp_path):
    run_cli("convert", str(micro_checkpoint), "--out", str(tmp_path / "pbn"), "--precise-bn", "8")
    before = load_file(str(micro_checkpoint / "model.safetensors"))
    after = load_file(str(tmp_path / "pbn" / "model.safetensors"))
    moved = [k for k in before if not torch.equal(before[k], after[k])]
    assert moved and all("embed_images" in k and ("running_" in k or "num_batches" in k) for k in moved)
    meta = json.loads((tmp_path / "pbn" / "config.json").read_text())["meta"]
    assert meta["precise_bn"] == {"images": 8, "data": "shapes"} and meta["converted_from"] == str(
        micro_checkpoint
    )

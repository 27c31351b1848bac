import base64
import io
import json
import logging

import pytest
from PIL import Image

from ofa_unified.data.readers import (
    CocoCaptionReader,
    CocoDetectionReader,
    DataError,
    JsonlReader,
    OFATsvReader,
    RefExpReader,
    VQAv2Reader,
    open_dataset,
    validate_record,
    xywh_to_xyxy,
)


def image_bytes(size=(16, 12), color=(200, 30, 30), fmt="PNG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, fmt)
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def write_lines(path, rows):
    path.write_text("".join("\t".join(r) + "\n" if isinstance(r, (list, tuple)) else r + "\n" for r in rows))
    return path


IMG = b64(image_bytes())


# ---------------------------------------------------------------------------- OFA TSV


def test_tsv_caption(tmp_path):
    path = write_lines(
        tmp_path / "cap.tsv",
        [
            ["1", "391895", "a man rides a bike", "bike&&man", IMG],
            "",  # blank lines are ignored
            ["2", "522418", "a woman&&a person cutting cake ", "cake", b64(image_bytes(fmt="JPEG"))],
        ],
    )
    out = list(OFATsvReader("caption", path))
    assert len(out) == 2
    image, rec = out[0]
    assert image.mode == "RGB" and image.size == (16, 12)
    assert rec == {"task": "caption", "captions": ["a man rides a bike"], "id": "1", "image_id": "391895"}
    assert out[1][1]["captions"] == ["a woman", "a person cutting cake"]


def test_tsv_caption_selected_cols_like_ofa_stage2(tmp_path):
    path = write_lines(tmp_path / "cap.tsv", [["1", "391895", "a dog", "dog", IMG]])
    ((_, rec),) = OFATsvReader("caption", path, columns="1,4,2")
    assert rec["id"] == "391895" and "image_id" not in rec and rec["captions"] == ["a dog"]


def test_tsv_vqa_answers_sorted_by_confidence(tmp_path):
    refs = "0.6|!+two&&1.0|!+2&&0.3|!+3"
    path = write_lines(tmp_path / "vqa.tsv", [["7", "42", "how many dogs?", refs, "dog&&dog", IMG]])
    ((image, rec),) = OFATsvReader("vqa", path)
    assert rec["question"] == "how many dogs?"
    assert rec["answers"] == ["2", "two", "3"]
    assert rec["answer_scores"] == {"2": 1.0, "two": 0.6, "3": 0.3}
    assert rec["id"] == "7" and rec["image_id"] == "42"


def test_tsv_refcoco_box(tmp_path):
    path = write_lines(tmp_path / "ref.tsv", [["3", "9", "man on the left", "1.5,2,10,11.5", IMG]])
    ((image, rec),) = OFATsvReader("refcoco", path)
    assert rec == {
        "task": "grounding",
        "text": "man on the left",
        "box": [1.5, 2.0, 10.0, 11.5],
        "id": "3",
        "image_id": "9",
    }


def test_tsv_snli_ve_labels(tmp_path):
    path = write_lines(
        tmp_path / "ve.tsv",
        [
            ["1", "9", IMG, "a dog sleeps", "a dog on a sofa", "neutral"],
            ["2", "9", IMG, "an animal", "a dog on a sofa", "entailment"],
            ["3", "9", IMG, "a cat", "a dog on a sofa", "contradiction"],
        ],
    )
    recs = [r for _, r in OFATsvReader("visual_entailment", path)]
    assert [r["label"] for r in recs] == ["maybe", "yes", "no"]
    assert recs[0]["text1"] == "a dog on a sofa" and recs[0]["text2"] == "a dog sleeps"


def test_tsv_detection(tmp_path):
    path = write_lines(tmp_path / "det.tsv", [["5", IMG, "1,2,8,9,18,dog&&0,0,4,4,1,traffic light"]])
    ((_, rec),) = OFATsvReader("detection", path)
    assert rec["objects"] == [
        {"box": [1.0, 2.0, 8.0, 9.0], "label": "dog"},
        {"box": [0.0, 0.0, 4.0, 4.0], "label": "traffic light"},
    ]


def test_tsv_accepts_urlsafe_base64(tmp_path):
    data = image_bytes(size=(33, 17))
    path = write_lines(tmp_path / "cap.tsv", [["1", "1", "x", "", base64.urlsafe_b64encode(data).decode()]])
    ((image, _),) = OFATsvReader("caption", path)
    assert image.size == (33, 17)


def malformed_refcoco(tmp_path):
    return write_lines(
        tmp_path / "bad.tsv",
        [
            ["1", "9", "good one", "1,1,5,5", IMG],
            ["2", "9", "too few columns", IMG],
            ["3", "9", "bad base64", "1,1,5,5", "%%%not-base64%%%"],
            ["4", "9", "not an image", "1,1,5,5", b64(b"hello world, not a png")],
            ["5", "9", "x1 < x0", "9,1,5,5", IMG],
            ["6", "9", "outside the image", "0,0,100,100", IMG],
            ["7", "9", "also good", "0,0,16,12", IMG],
        ],
    )


@pytest.mark.parametrize(
    "line, message",
    [
        (2, "wrong column count: expected 5"),
        (3, "bad base64 in column 4"),
        (4, "undecodable image"),
        (5, "x1 < x0"),
        (6, "outside the 16x12 image"),
    ],
)
def test_tsv_errors_name_file_and_line(tmp_path, line, message):
    path = malformed_refcoco(tmp_path)
    lines = path.read_text().splitlines()
    path.write_text(lines[0] + "\n" + lines[line - 1] + "\n")  # the bad row becomes line 2
    with pytest.raises(DataError, match=message) as info:
        list(OFATsvReader("refcoco", path))
    assert str(info.value).startswith(f"{path}:2: ")


def test_tsv_skip_bad_counts_and_logs(tmp_path, caplog):
    path = malformed_refcoco(tmp_path)
    reader = OFATsvReader("refcoco", path, skip_bad=True)
    with caplog.at_level(logging.WARNING):
        out = list(reader)
    assert [r["id"] for _, r in out] == ["1", "7"]
    assert reader.skipped == 5
    messages = [r.getMessage() for r in caplog.records]
    assert sum("(skipped)" in m for m in messages) == 5
    assert any(f"{path}:3: bad base64" in m for m in messages)
    assert any("skipped 5 bad entries, kept 2" in m for m in messages)
    # records() checks rows but decodes no image: only the column-count and box-order rows fail there
    assert [s.record["id"] for s in reader.records()] == ["1", "3", "4", "6", "7"] and reader.skipped == 2


def test_tsv_bad_vqa_answers_and_labels(tmp_path):
    path = write_lines(tmp_path / "vqa.tsv", [["7", "42", "what?", "yes", "", IMG]])
    with pytest.raises(DataError, match=r":1: answer 'yes' is not 'confidence\|!\+answer'"):
        list(OFATsvReader("vqa", path))
    path = write_lines(tmp_path / "ve.tsv", [["1", "9", IMG, "h", "p", "unsure"]])
    with pytest.raises(DataError, match="unknown label 'unsure'"):
        list(OFATsvReader("snli_ve", path))


def test_tsv_unknown_task_and_bad_columns(tmp_path):
    with pytest.raises(ValueError, match="unknown TSV task 'ocr'"):
        OFATsvReader("ocr", tmp_path / "x.tsv")
    with pytest.raises(ValueError, match="lacks the fields"):
        OFATsvReader("refcoco", tmp_path / "x.tsv", columns="0,4")


# ---------------------------------------------------------------------------- COCO captions


def coco_images(tmp_path, ids=(1, 2, 3), size=(16, 12)):
    image_dir = tmp_path / "images"
    image_dir.mkdir(exist_ok=True)
    out = []
    for i in ids:
        name = f"{i:012d}.jpg"
        (image_dir / name).write_bytes(image_bytes(size, fmt="JPEG"))
        out.append({"id": i, "file_name": name, "width": size[0], "height": size[1]})
    return image_dir, out


def test_coco_caption(tmp_path, caplog):
    image_dir, images = coco_images(tmp_path)
    anns = [
        {"id": 10, "image_id": 1, "caption": "A cat. "},
        {"id": 11, "image_id": 2, "caption": "A dog."},
        {"id": 12, "image_id": 1, "caption": "A kitten."},
    ]
    ann_path = tmp_path / "captions.json"
    ann_path.write_text(json.dumps({"images": images, "annotations": anns}))
    with caplog.at_level(logging.WARNING):
        out = list(CocoCaptionReader(ann_path, image_dir))
    assert [r for _, r in out] == [
        {"task": "caption", "captions": ["A cat.", "A kitten."], "id": "1", "image_id": 1},
        {"task": "caption", "captions": ["A dog."], "id": "2", "image_id": 2},
    ]
    assert "1 images have no captions" in caplog.text


def test_coco_caption_errors(tmp_path):
    image_dir, images = coco_images(tmp_path, ids=(1,))
    anns = [
        {"id": 10, "image_id": 1, "caption": "ok"},
        {"id": 11, "image_id": 1},
        {"id": 12, "image_id": 99, "caption": "x"},
    ]
    ann_path = tmp_path / "captions.json"
    ann_path.write_text(json.dumps({"images": images, "annotations": anns}))
    with pytest.raises(DataError, match=r"annotations\[1\] \(id 11\): missing field 'caption'"):
        list(CocoCaptionReader(ann_path, image_dir))
    reader = CocoCaptionReader(ann_path, image_dir, skip_bad=True)
    assert [r["captions"] for _, r in reader] == [["ok"]] and reader.skipped == 2
    ann_path.write_text(json.dumps({"images": images, "annotations": anns[:1]}))
    (image_dir / images[0]["file_name"]).unlink()
    with pytest.raises(DataError, match=r"images\[0\] \(id 1\): image file not found"):
        list(CocoCaptionReader(ann_path, image_dir))
    ann_path.write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        list(CocoCaptionReader(ann_path, image_dir, skip_bad=True))


# ---------------------------------------------------------------------------- VQAv2


def vqa_files(tmp_path, annotations=None):
    image_dir = tmp_path / "val2014"
    image_dir.mkdir()
    (image_dir / "COCO_val2014_000000000042.jpg").write_bytes(image_bytes(fmt="JPEG"))
    questions = {
        "data_subtype": "val2014",
        "questions": [
            {"question_id": 420, "image_id": 42, "question": "What color is it?"},
            {"question_id": 421, "image_id": 42, "question": "Is it red?"},
        ],
    }
    answers = ["red"] * 7 + ["pink", "red", "orange"]
    annotations = annotations or [
        {
            "question_id": 420,
            "image_id": 42,
            "answer_type": "other",
            "answers": [{"answer": a} for a in answers],
        },
        {"question_id": 421, "image_id": 42, "answer_type": "yes/no", "answers": [{"answer": "yes"}] * 10},
    ]
    (tmp_path / "q.json").write_text(json.dumps(questions))
    (tmp_path / "a.json").write_text(json.dumps({"annotations": annotations}))
    return tmp_path / "q.json", tmp_path / "a.json", image_dir


def test_vqav2(tmp_path):
    q, a, image_dir = vqa_files(tmp_path)
    out = list(VQAv2Reader(q, a, image_dir))
    image, rec = out[0]
    assert image.size == (16, 12)
    assert rec["task"] == "vqa" and rec["question"] == "What color is it?" and rec["id"] == "420"
    assert len(rec["answers"]) == 10 and rec["answers"].count("red") == 8
    assert rec["answer_type"] == "other" and out[1][1]["answers"] == ["yes"] * 10
    test_split = [r for _, r in VQAv2Reader(q, None, image_dir)]
    assert [r["answers"] for r in test_split] == [[], []]


def test_vqav2_missing_annotation(tmp_path):
    q, a, image_dir = vqa_files(tmp_path, annotations=[{"question_id": 420, "answers": [{"answer": "red"}]}])
    with pytest.raises(DataError, match=r"questions\[1\] \(question_id 421\): no annotation"):
        list(VQAv2Reader(q, a, image_dir))
    reader = VQAv2Reader(q, a, image_dir, skip_bad=True)
    assert len(list(reader)) == 1 and reader.skipped == 1


def test_vqav2_missing_image(tmp_path):
    q, a, image_dir = vqa_files(tmp_path)
    with pytest.raises(DataError, match="image file not found: .*000000000042.png"):
        list(VQAv2Reader(q, a, image_dir, image_pattern="{image_id:012d}.png"))


# ---------------------------------------------------------------------------- referring expressions


def test_refexp_json_xywh_to_xyxy(tmp_path):
    (tmp_path / "a.png").write_bytes(image_bytes((20, 20)))
    refs = [
        {
            "ref_id": 5,
            "image": "a.png",
            "bbox": [2, 3, 4, 5],
            "split": "train",
            "sentences": [{"sent": "left dog"}, "the dog on the left"],
        },
        {"ref_id": 6, "image": "a.png", "bbox": [0, 0, 20, 20], "split": "testA", "text": "everything"},
    ]
    path = tmp_path / "refs.json"
    path.write_text(json.dumps(refs))
    recs = [r for _, r in RefExpReader(path)]
    assert recs[0] == {"task": "grounding", "text": "left dog", "box": [2.0, 3.0, 6.0, 8.0], "id": "5_0"}
    assert recs[1]["text"] == "the dog on the left" and recs[1]["id"] == "5_1"
    assert [r["id"] for _, r in RefExpReader(path, split="testA")] == ["6_0"]
    path.write_text(json.dumps({"refs": refs}))
    assert len(list(RefExpReader(path, tmp_path))) == 3


def test_refexp_jsonl_errors(tmp_path):
    (tmp_path / "a.png").write_bytes(image_bytes((20, 20)))
    lines = [
        {"image": "a.png", "bbox": [1, 1, 5, 5], "sentences": ["ok"]},
        {"image": "a.png", "bbox": [1, 1, -5, 5], "sentences": ["negative width"]},
        {"image": "a.png", "sentences": ["no box"]},
    ]
    path = tmp_path / "refs.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    with pytest.raises(DataError, match=f"^{path}:2: bbox .* negative width"):
        list(RefExpReader(path))
    reader = RefExpReader(path, skip_bad=True)
    assert len(list(reader)) == 1 and reader.skipped == 2
    with pytest.raises(DataError, match="x1 < x0"):
        list(RefExpReader(path, box_format="xyxy"))  # [1, 1, -5, 5] read as corners


# ---------------------------------------------------------------------------- COCO detection


def detection_json(tmp_path, annotations, images=None):
    image_dir, default_images = coco_images(tmp_path, ids=(1, 2), size=(40, 30))
    data = {
        "images": images or default_images,
        "categories": [{"id": 1, "name": "person"}, {"id": 18, "name": "dog"}],
        "annotations": annotations,
    }
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(data))
    return path, image_dir


def test_coco_detection(tmp_path):
    anns = [
        {"id": 1, "image_id": 1, "category_id": 18, "bbox": [10, 5, 20, 15], "iscrowd": 0},
        {"id": 2, "image_id": 1, "category_id": 1, "bbox": [0, 0, 40, 30], "iscrowd": 1},
        {"id": 3, "image_id": 1, "category_id": 1, "bbox": [1.5, 2.5, 3, 4]},
    ]
    path, image_dir = detection_json(tmp_path, anns)
    out = [r for _, r in CocoDetectionReader(path, image_dir)]
    assert out[0] == {
        "task": "detection",
        "objects": [
            {"box": [10.0, 5.0, 30.0, 20.0], "label": "dog"},
            {"box": [1.5, 2.5, 4.5, 6.5], "label": "person"},
        ],
        "id": "1",
        "image_id": 1,
    }
    assert out[1]["objects"] == []
    assert len(list(CocoDetectionReader(path, image_dir, skip_empty=True))) == 1


def test_coco_detection_bad_annotation_drops_its_image(tmp_path):
    anns = [
        {"id": 1, "image_id": 1, "category_id": 18, "bbox": [10, 5, 20, 15]},
        {"id": 2, "image_id": 1, "category_id": 77, "bbox": [0, 0, 4, 4]},
        {"id": 3, "image_id": 2, "category_id": 1, "bbox": [0, 0, 4, 4]},
    ]
    path, image_dir = detection_json(tmp_path, anns)
    with pytest.raises(DataError, match=r"annotations\[1\] \(id 2\): category_id 77 is not in 'categories'"):
        list(CocoDetectionReader(path, image_dir))
    reader = CocoDetectionReader(path, image_dir, skip_bad=True)
    assert [r["image_id"] for _, r in reader] == [2] and reader.skipped == 1


def test_coco_detection_size_mismatch(tmp_path):
    _, images = coco_images(tmp_path, ids=(1,), size=(40, 30))
    images[0].update(width=30, height=40)
    path, image_dir = detection_json(tmp_path, [], images=images)
    with pytest.raises(
        DataError, match=r"images\[0\] \(id 1\): image is 40x30 but the annotation file says 30x40"
    ):
        list(CocoDetectionReader(path, image_dir))


def test_xywh_to_xyxy():
    assert xywh_to_xyxy([1, 2, 3, 4]) == [1, 2, 4, 6]
    with pytest.raises(ValueError, match="negative"):
        xywh_to_xyxy([1, 2, -3, 4])
    with pytest.raises(ValueError, match="4 numbers"):
        xywh_to_xyxy([1, 2, 3])


# ---------------------------------------------------------------------------- JSONL


def test_jsonl(tmp_path):
    sub = tmp_path / "imgs"
    sub.mkdir()
    (sub / "a.png").write_bytes(image_bytes((10, 10)))
    lines = [
        {"image": "imgs/a.png", "task": "grounding", "text": "red", "box": [1, 1, 9, 9], "id": "g1"},
        {"image": str(sub / "a.png"), "task": "caption", "caption": "a red square"},
        {"image": "imgs/a.png", "task": "detection", "objects": [{"box": [0, 0, 10, 10], "label": "square"}]},
        {"image": "imgs/a.png", "task": "itm", "text": "a red square", "label": "yes"},
    ]
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    out = list(JsonlReader(path))
    assert out[0][0].size == (10, 10)
    assert out[0][1] == {"task": "grounding", "text": "red", "box": [1.0, 1.0, 9.0, 9.0], "id": "g1"}
    assert out[1][1]["captions"] == ["a red square"]
    assert out[2][1]["objects"][0]["label"] == "square"


@pytest.mark.parametrize(
    "entry, message",
    [
        ('{"image": "a.png", "task": "ocr"}', "unknown task 'ocr'"),
        ('{"image": "a.png", "task": "vqa", "answers": ["x"]}', "missing field 'question'"),
        ('{"task": "caption", "captions": ["x"]}', "missing field 'image'"),
        ('{"image": "a.png", "task": "itm", "text": "t", "label": "maybe"}', "'label' must be one of"),
        ('{"image": "a.png", "task": "grounding", "text": "t", "box": [5, 1, 2, 3]}', "x1 < x0"),
        ('{"image": "missing.png", "task": "caption", "captions": ["x"]}', "image file not found"),
        (
            '{"image": "a.png", "task": "grounding", "text": "t", "box": [1, 1, 50, 5]}',
            "outside the 10x10 image",
        ),
        ("{oops", "invalid JSON"),
    ],
)
def test_jsonl_errors_name_line(tmp_path, entry, message):
    (tmp_path / "a.png").write_bytes(image_bytes((10, 10)))
    good = json.dumps({"image": "a.png", "task": "caption", "captions": ["x"]})
    path = tmp_path / "data.jsonl"
    path.write_text(f"{good}\n{good}\n{entry}\n{good}\n")
    with pytest.raises(DataError, match=message) as info:
        list(JsonlReader(path))
    assert str(info.value).startswith(f"{path}:3: ")
    reader = JsonlReader(path, skip_bad=True)
    assert len(list(reader)) == 3 and reader.skipped == 1


def test_validate_record_does_not_mutate_input():
    rec = {"task": "detection", "objects": [{"box": [0, 0, 1, 1], "label": "x"}]}
    out = validate_record(rec)
    out["objects"][0]["box"][0] = 5.0
    assert rec["objects"][0]["box"] == [0, 0, 1, 1]


# ---------------------------------------------------------------------------- open_dataset


def test_open_dataset_specs(tmp_path):
    tsv = write_lines(tmp_path / "cap.tsv", [["1", "77", "a dog", "dog", IMG], ["bad row"]])
    reader = open_dataset(f"tsv:caption:{tsv}?columns=1,4,2&skip_bad=true")
    assert isinstance(reader, OFATsvReader)
    assert [r["id"] for _, r in reader] == ["77"] and reader.skipped == 1

    q, a, image_dir = vqa_files(tmp_path)
    assert isinstance(open_dataset(f"vqav2:{q}:{a}:{image_dir}"), VQAv2Reader)
    test_reader = open_dataset(f"vqav2:{q}::{image_dir}")
    assert test_reader.annotations is None and len(list(test_reader)) == 2

    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text(
        json.dumps({"image": "val2014/COCO_val2014_000000000042.jpg", "task": "caption", "captions": ["x"]})
    )
    assert len(list(open_dataset(f"jsonl:{jsonl}"))) == 1
    assert len(list(open_dataset({"format": "jsonl", "path": str(jsonl)}, skip_bad=True))) == 1

    reader = open_dataset(
        {"format": "refexp", "path": str(tmp_path / "r.json"), "split": "val", "box_format": "xyxy"}
    )
    assert isinstance(reader, RefExpReader) and reader.split == "val" and reader.image_dir == tmp_path
    assert isinstance(open_dataset(f"coco_caption:{tmp_path}/c.json:{tmp_path}"), CocoCaptionReader)
    assert isinstance(
        open_dataset(f"coco_detection:{tmp_path}/i.json:{tmp_path}?skip_empty=1"), CocoDetectionReader
    )


@pytest.mark.parametrize(
    "spec, message",
    [
        ("parquet:x", "unknown dataset format 'parquet'"),
        ("tsv:x.tsv", r"expected tsv:TASK:PATH"),
        ("jsonl:a:b", r"expected jsonl:PATH"),
        ("jsonl:a?skip_bad=maybe", "must be true or false"),
        ("jsonl:a?colour=red", r"unknown options \['colour'\]"),
        ("jsonl:a?skip_bad", "expected NAME=VALUE"),
        ({"format": "tsv", "path": "x"}, r"lacks \['task'\]"),
    ],
)
def test_open_dataset_bad_specs(spec, message):
    with pytest.raises(ValueError, match=message):
        open_dataset(spec)


def test_coco_entries_with_odd_ids_are_errors_not_crashes(tmp_path):
    anns = [{"id": 1, "image_id": [1], "category_id": 18, "bbox": [0, 0, 4, 4]}]
    images = [{"id": 1, "file_name": "000000000001.jpg"}, {"id": {"x": 1}, "file_name": "b.jpg"}]
    path, image_dir = detection_json(tmp_path, anns, images=images)
    reader = CocoDetectionReader(path, image_dir, skip_bad=True)
    assert [r["image_id"] for _, r in reader] == [1] and reader.skipped == 2
    with pytest.raises(DataError, match=r"images\[1\] .*: 'id' must be an integer or a string"):
        list(CocoDetectionReader(path, image_dir))

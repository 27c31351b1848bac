import json
import random
from collections import Counter

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from ofa_unified.data.pipeline import (
    IGNORE_INDEX,
    IndexSampler,
    Mixture,
    RecordError,
    RecordsDataset,
    ShapesMultitask,
    build_example,
    build_shapes_vocab,
    collate,
    require_vq,
    split_by_output,
)
from ofa_unified.data.preprocess import ImageTransform
from ofa_unified.data.readers import DataError
from ofa_unified.vocab import BOS, EOS, PAD, quantize
from ofa_unified.vq import VQConfig, VQTokenizer

SIZE = 64  # model input side in these tests (the micro model's)


@pytest.fixture(scope="module")
def vocab(tmp_path_factory):
    return build_shapes_vocab(tmp_path_factory.mktemp("vocab"), 320, num_codes=16, num_bins=32, num_scenes=30)


@pytest.fixture(scope="module")
def vq():
    torch.manual_seed(0)
    cfg = VQConfig(channels=4, num_res_blocks=0, patch_hidden=8, codebook_size=16, code_dim=4)
    return VQTokenizer(cfg).eval()  # 8x downsampling: a 32 px middle -> 4 x 4 codes


@pytest.fixture
def transform():
    return ImageTransform(SIZE)


def image(w=128, h=128, color=(200, 40, 40)):
    return Image.new("RGB", (w, h), color)


def example(record, vocab, transform, **kw):
    return build_example(kw.pop("img", image()), record, vocab, transform, random.Random(0), **kw)


RECORDS = [
    {"id": "c", "task": "caption", "captions": ["a red circle"]},
    {"id": "q", "task": "vqa", "question": "what color is the circle?", "answers": ["red"] * 10},
    {"id": "g", "task": "grounding", "text": "the red circle", "box": [10.0, 20.0, 60.0, 90.0]},
    {"id": "d", "task": "detection", "objects": [{"box": [1, 2, 30, 40], "label": "red circle"}]},
]


def test_collate_aligns_decoder_inputs_and_labels(vocab, transform):
    examples = [example(r, vocab, transform) for r in RECORDS]
    batch = collate(examples)
    b = len(RECORDS)
    assert batch["input_ids"].shape[0] == b and batch["patch_images"].shape == (b, 3, SIZE, SIZE)
    assert batch["patch_masks"].tolist() == [True] * b and batch["code_mask"].tolist() == [False] * b
    assert batch["decoder_input_ids"].shape == batch["labels"].shape
    assert batch["tasks"] == [r["task"] for r in RECORDS]
    for i, e in enumerate(examples):
        n = len(e.target_ids)
        assert batch["input_ids"][i, : len(e.source_ids)].tolist() == e.source_ids
        assert e.source_ids[0] == BOS and e.source_ids[-1] == EOS
        assert (batch["input_ids"][i, len(e.source_ids) :] == PAD).all()
        assert batch["decoder_input_ids"][i, : n + 1].tolist() == [BOS, *e.target_ids]
        assert batch["labels"][i, : n + 1].tolist() == [*e.target_ids, EOS]
        assert (batch["labels"][i, n + 1 :] == IGNORE_INDEX).all()
        assert (batch["decoder_input_ids"][i, n + 1 :] == PAD).all()
        # teacher forcing: the label at t is the decoder input at t + 1
        assert batch["labels"][i, :n].tolist() == batch["decoder_input_ids"][i, 1 : n + 1].tolist()
    assert vocab.decode(examples[0].target_ids).strip() == "a red circle"
    assert vocab.decode(examples[1].source_ids).strip() == "what color is the circle?"


def test_prompt_collate_puts_source_before_target_without_loss(vocab, transform):
    e = example(RECORDS[1], vocab, transform)
    batch = collate([e], prompt=True)
    prompt = e.source_ids[1:-1]
    n = len(prompt) + len(e.target_ids)
    assert batch["decoder_input_ids"][0].tolist() == [BOS, *prompt, *e.target_ids]
    assert batch["labels"][0].tolist() == [IGNORE_INDEX] * len(prompt) + [*e.target_ids, EOS]
    assert batch["labels"].shape[1] == n + 1


def test_box_bins_are_relative_to_the_original_image(vocab, transform):
    box = [50.0, 20.0, 150.0, 75.0]
    img = image(200, 100)  # not square: x bins scale by W, y bins by H
    expected = [
        vocab.bin_id(quantize(v, s, vocab.num_bins)) for v, s in zip(box, (200, 100, 200, 100), strict=True)
    ]
    assert [quantize(v, s, 32) for v, s in zip(box, (200, 100, 200, 100), strict=True)] == [8, 6, 23, 23]
    g = example(
        {"id": "g", "task": "grounding", "text": "the red circle", "box": box}, vocab, transform, img=img
    )
    assert g.target_ids == expected and g.size == (200, 100)
    rc = example(
        {"id": "r", "task": "grounded_caption", "text": "a circle", "box": box}, vocab, transform, img=img
    )
    assert rc.source_ids[-5:-1] == expected
    d = example(
        {"id": "d", "task": "detection", "objects": [{"box": box, "label": "red circle"}]},
        vocab,
        transform,
        img=img,
    )
    assert d.target_ids[:4] == expected and vocab.decode(d.target_ids[4:]).strip() == "red circle"


def test_image_outputs_use_vq_codes(vocab, transform, vq):
    img = image(100, 80)
    infill = example({"id": "i", "task": "image_infilling"}, vocab, transform, img=img, vq=vq)
    full, _ = transform(img)
    assert infill.code_output and infill.has_image
    assert len(infill.target_ids) == 16 and all(vocab.is_code(t) for t in infill.target_ids)
    assert infill.record["target_codes"] == [t - vocab.code_offset for t in infill.target_ids]
    assert (infill.image[:, 16:48, 16:48] == 0).all()  # the middle is blanked ...
    assert torch.equal(infill.image[:, :16], full[:, :16])  # ... the rest is the image
    t2i = example(
        {"id": "t", "task": "text_to_image", "caption": "a red circle"},
        vocab,
        transform,
        img=img,
        vq=vq,
        image_size=32,
    )
    assert t2i.code_output and not t2i.has_image and (t2i.image == 0).all()
    assert len(t2i.target_ids) == 16 and all(vocab.is_code(t) for t in t2i.target_ids)
    batch = collate([infill, t2i])
    assert batch["patch_masks"].tolist() == [True, False] and batch["code_mask"].tolist() == [True, True]


def test_masked_image_modeling_blanks_patches_and_scores_only_them(vocab, transform, vq):
    img = Image.effect_noise((100, 80), 60).convert("RGB")
    mim = example(
        {"id": "m", "task": "masked_image_modeling"}, vocab, transform, img=img, vq=vq, image_size=32
    )
    full, _ = transform(img)
    masked = mim.record["masked_patches"]  # drawn by the pipeline: blocks of a 4x4 grid (32 px / 8)
    assert masked == sorted(set(masked)) and 0 < len(masked) < 16 and mim.has_image and mim.code_output
    assert len(mim.target_ids) == 16 and mim.loss_positions == masked
    for cell in range(16):
        r, c = divmod(cell, 4)
        patch = mim.image[:, 16 * r : 16 * (r + 1), 16 * c : 16 * (c + 1)]
        truth = full[:, 16 * r : 16 * (r + 1), 16 * c : 16 * (c + 1)]
        assert (patch == 0).all() if cell in masked else torch.equal(patch, truth), cell
    labels = collate([mim])["labels"][0]
    scored = [i for i in range(16) if labels[i] != IGNORE_INDEX]
    assert scored == masked and labels[16] == EOS  # eos always scored
    assert [labels[i] - vocab.code_offset for i in scored] == [mim.record["target_codes"][i] for i in masked]
    fixed = {"id": "m", "task": "masked_image_modeling", "masked_patches": [0, 99]}
    with pytest.raises(RecordError, match="patch 99 is outside the 4x4 grid"):
        example(fixed, vocab, transform, img=img, vq=vq, image_size=32)


def test_image_outputs_without_vq_fail_clearly(vocab, transform):
    with pytest.raises(RecordError, match=r"record i \(image_infilling\).*VQ"):
        example({"id": "i", "task": "image_infilling"}, vocab, transform)
    with pytest.raises(ValueError, match="need a VQ tokenizer"):
        require_vq(["caption", "text_to_image"], None)
    with pytest.raises(ValueError, match="need a VQ tokenizer"):
        ShapesMultitask("train", {"caption": 1, "image_infilling": 1}, vocab, SIZE)
    precomputed = {"id": "i", "task": "image_infilling", "target_codes": [1, 2, 3, 4]}
    assert example(precomputed, vocab, transform).target_ids == [vocab.code_id(c) for c in (1, 2, 3, 4)]


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"id": "a1", "task": "grounding", "text": "x"}, r"record a1 \(grounding\).*box"),
        ({"id": "a2", "task": "grounding", "text": "x", "box": [50, 0, 10, 10]}, r"record a2 .*x1 < x0"),
        (
            {"id": "a3", "task": "grounding", "text": "x", "box": [0, 0, 300, 10]},
            r"record a3 .*outside the 128x128",
        ),
        ({"id": "a4", "task": "captioning", "captions": ["x"]}, r"record a4: unknown task 'captioning'"),
        ({"id": "a5", "task": "itm", "text": "x", "label": "maybe"}, r"record a5 \(itm\).*label"),
        ({"id": "a6", "task": "vqa", "question": "what?", "answers": []}, r"record a6 \(vqa\).*answers"),
        ({"task": "caption"}, r"record <no id> \(caption\).*captions"),
    ],
)
def test_malformed_records_name_the_record(vocab, transform, record, message):
    with pytest.raises(RecordError, match=message):
        example(record, vocab, transform)


def test_shapes_dataset_is_deterministic(vocab):
    tasks = {"caption": 2.0, "grounding": 1.0, "detection": 1.0, "vqa": 0.0}
    a, b = (ShapesMultitask("train", tasks, vocab, SIZE, seed=3) for _ in range(2))
    for i in (0, 7):
        x, y = a[i], b[i]
        assert (x.task, x.source_ids, x.target_ids) == (y.task, y.source_ids, y.target_ids)
        assert torch.equal(x.image, y.image)
    assert a[7].target_ids == a[7].target_ids
    # the mix follows the weights (vqa has weight 0) and depends on the seed
    counts = Counter(a.task_for(i) for i in range(4000))
    assert set(counts) == {"caption", "grounding", "detection"}
    assert 0.45 < counts["caption"] / 4000 < 0.55
    other = ShapesMultitask("train", tasks, vocab, SIZE, seed=4)
    assert [a.task_for(i) for i in range(50)] != [other.task_for(i) for i in range(50)]
    # a small scene pool revisits scene i % n with other tasks
    pool = ShapesMultitask("train", tasks, vocab, SIZE, num_scenes=2)
    assert pool.sample(0)[0].tobytes() == pool.sample(2)[0].tobytes()


def test_sampler_shards_ranks_and_resumes():
    ranks = [iter(IndexSampler(3, rank=r, world_size=2)) for r in range(2)]
    first = [next(it) for it in ranks for _ in range(2)]
    assert first == [[0, 1, 2], [6, 7, 8], [3, 4, 5], [9, 10, 11]]
    resumed = iter(IndexSampler(3, start=1, rank=1, world_size=2))
    assert next(resumed) == [9, 10, 11]


def test_worker_processes_give_the_same_batches(vocab):
    ds = ShapesMultitask("train", {"caption": 1, "grounding": 1}, vocab, SIZE)

    def batches(workers):
        loader = DataLoader(
            ds, batch_sampler=IndexSampler(2, start=1), collate_fn=collate, num_workers=workers
        )
        it = iter(loader)
        return [next(it) for _ in range(2)]

    for x, y in zip(batches(0), batches(2), strict=True):
        for key in ("input_ids", "patch_images", "labels", "decoder_input_ids"):
            assert torch.equal(x[key], y[key])


def test_records_dataset_reads_jsonl_and_names_bad_lines(vocab, tmp_path):
    image(40, 30).save(tmp_path / "a.png")
    lines = [
        {"image": "a.png", "task": "caption", "captions": ["a red square"], "id": "ok"},
        {"image": "a.png", "task": "grounding", "text": "the square", "box": [0, 0, 20, 10], "id": "box"},
        {"image": "a.png", "task": "grounding", "text": "the square", "box": [0, 0, 99, 10], "id": "far"},
    ]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    ds = RecordsDataset(f"jsonl:{tmp_path / 'd.jsonl'}", vocab, SIZE)
    assert len(ds) == 3 and ds[0].task == "caption" and ds[1].size == (40, 30)
    assert ds[1].target_ids == [vocab.bin_id(b) for b in (0, 0, 16, 10)]
    with pytest.raises(RecordError, match=r"d\.jsonl:3: record far \(grounding\): box .* outside the 40x30"):
        ds[2]
    only = RecordsDataset(f"jsonl:{tmp_path / 'd.jsonl'}", vocab, SIZE, tasks=["caption"])
    assert len(only) == 1
    (tmp_path / "bad.jsonl").write_text('{"image": "a.png", "task": "caption"}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:1: .*captions"):
        RecordsDataset(f"jsonl:{tmp_path / 'bad.jsonl'}", vocab, SIZE)
    mix = Mixture([(only, 1.0), (ShapesMultitask("train", {"vqa": 1}, vocab, SIZE), 1.0)], seed=0, length=40)
    tasks = [mix[i].task for i in range(12)]
    assert set(tasks) == {"caption", "vqa"} and tasks == [mix[i].task for i in range(12)]


def test_split_by_output_separates_code_targets(vocab, transform):
    text = [example(r, vocab, transform) for r in RECORDS[:2]]
    codes = example({"id": "i", "task": "image_infilling", "target_codes": list(range(16))}, vocab, transform)
    parts = split_by_output(collate([text[0], codes, text[1]]))
    assert [p["tasks"] for p in parts] == [["caption", "vqa"], ["image_infilling"]]
    for part, alone in zip(parts, (collate(text), collate([codes])), strict=True):
        for key in ("input_ids", "decoder_input_ids", "labels", "patch_images", "code_mask", "patch_masks"):
            assert torch.equal(part[key], alone[key]), key
    assert split_by_output(collate(text))[0]["labels"].shape == collate(text)["labels"].shape


def test_image_batches_read_a_reader_spec(tmp_path):
    from ofa_unified.data.pipeline import image_batches

    for name, color in (("a.png", "red"), ("b.png", "blue")):
        Image.new("RGB", (40, 30), color).save(tmp_path / name)
    lines = [{"image": n, "task": "caption", "captions": ["x"]} for n in ("a.png", "b.png", "a.png")]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    batches = list(image_batches(f"jsonl:{tmp_path / 'd.jsonl'}", 5, 32, batch_size=2))
    assert [tuple(b.shape) for b in batches] == [(2, 3, 32, 32), (1, 3, 32, 32)]  # 3 samples < 5
    red, blue = batches[0][:, 0, 0, 0]  # red channel of each image's first pixel, in [-1, 1]
    assert red > 0.9 and blue < -0.5

"""bench/second_renderer.py: boxes are exactly the drawn pixels, objects apart, colours and records right."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from bench.second_renderer import (
    KEEP_TASKS,
    SEED_BASE,
    background_pixels,
    draw,
    make_scene,
    records,
    to_uint8,
)
from bench.second_renderer import write as write_scenes
from ofa_unified.data import shapes
from ofa_unified.data.readers import open_dataset

INDICES = range(12)


def changed(scene: shapes.Scene) -> np.ndarray:
    """Pixels where the render differs from the background-only render."""
    image = np.asarray(draw(scene)[0])
    return (image != to_uint8(background_pixels(scene))).any(axis=-1)


def bbox(mask: np.ndarray) -> list[float]:
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return [float(cols[0]), float(rows[0]), float(cols[-1] + 1), float(rows[-1] + 1)]


@pytest.mark.parametrize("index", INDICES)
def test_boxes_are_the_changed_pixels(index):
    scene = make_scene(index)
    assert scene.seed == SEED_BASE + index and 1 <= len(scene.objects) <= shapes.MAX_OBJECTS
    _, covers = draw(scene)
    union = np.zeros((scene.height, scene.width), bool)
    for obj, cover in zip(scene.objects, covers, strict=True):
        union |= cover > 0
        # each object alone on the same background: its changed pixels span exactly its box
        assert bbox(changed(replace(scene, objects=[obj]))) == obj.box
        x0, y0, x1, y1 = obj.box
        assert 0 <= x0 < x1 <= scene.width and 0 <= y0 < y1 <= scene.height
        lo, hi = shapes.SIZE_RANGE[obj.size]
        assert lo * scene.width <= obj.extent <= hi * scene.width
    assert np.array_equal(changed(scene), union)  # nothing drawn outside the objects


@pytest.mark.parametrize("index", INDICES)
def test_objects_apart_and_coloured(index):
    scene = make_scene(index)
    image = np.asarray(draw(scene)[0]).astype(int)
    for i, a in enumerate(scene.objects):
        for b in scene.objects[i + 1 :]:
            apart_x = a.box[2] + 2 <= b.box[0] or b.box[2] + 2 <= a.box[0]
            apart_y = a.box[3] + 2 <= b.box[1] or b.box[3] + 2 <= a.box[1]
            assert apart_x or apart_y, (a.box, b.box)
        cx, cy = (int(c) for c in a.box_center)
        centre = image[cy, cx]
        assert np.abs(centre - np.array(shapes.COLORS[a.color])).max() <= shapes.COLOR_JITTER
        assert np.array_equal(centre, a.rgb)


def test_backgrounds_neutral():
    for index in range(40):
        bg = make_scene(index).background
        for tone in bg.colors:
            assert max(tone) - min(tone) <= 2 * shapes.TINT


def test_records_and_jsonl_reader(tmp_path):
    scene = make_scene(3)
    tasks = {r["task"] for r in records(scene)}
    assert tasks == set(KEEP_TASKS)
    out = write_scenes(3, tmp_path)
    lines = [json.loads(line) for line in (out / "annotations.jsonl").read_text().splitlines()]
    assert [(e["split"], e["index"], e["seed"]) for e in lines] == [
        ("second_renderer", i, SEED_BASE + i) for i in range(3)
    ]
    assert all((out / e["image"]).is_file() for e in lines)
    pairs = list(open_dataset(f"jsonl:{out / 'records.jsonl'}"))
    assert len(pairs) == sum(len(e["records"]) for e in lines)
    assert {r["task"] for _, r in pairs} == set(KEEP_TASKS) and pairs[0][0].size == (128, 128)

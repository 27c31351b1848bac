"""Shapes world: determinism, disjoint splits, ground truth recomputed independently from the objects."""

from __future__ import annotations

import io
import json
import random
import re
from collections import Counter
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image, ImageDraw

from ofa_unified.data import shapes
from ofa_unified.data.shapes import (
    COLORS,
    NUMBER_WORDS,
    SHAPES,
    SIZES,
    SPLIT_SIZE,
    TASKS,
    UNDETERMINED,
    VQA_ANSWERS,
    Background,
    Scene,
    ShapeObject,
)

SEEDS = (
    [shapes.scene_seed("train", i) for i in range(150)]
    + [shapes.scene_seed("val", i) for i in range(25)]
    + [shapes.scene_seed("test", i) for i in range(25)]
)
SINGULAR = {**{s: s for s in SHAPES}, **{s + ("es" if s.endswith("s") else "s"): s for s in SHAPES}}
GENERIC = {"shape", "shapes", "object", "objects"}
SPATIAL = {"on the left": (0, 1), "on the right": (0, -1), "at the top": (1, 1), "at the bottom": (1, -1)}
RELATION = {"left of": (0, 1), "right of": (0, -1), "above": (1, 1), "below": (1, -1)}
RELATION_RE = "left of|right of|above|below"


@pytest.fixture(scope="module")
def scenes() -> list[tuple[Scene, list[dict]]]:
    out = []
    for seed in SEEDS:
        scene = shapes.make_scene(seed)
        out.append((scene, shapes.scene_records(scene, shapes.record_rng(seed))))
    return out


def png_bytes(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def centre(obj: ShapeObject) -> tuple[float, float]:
    return (obj.box[0] + obj.box[2]) / 2, (obj.box[1] + obj.box[3]) / 2


def phrase_attrs(words: list[str]) -> dict[str, str]:
    """Attributes named by a noun phrase's words (no article): "small red circles" -> size, color, shape."""
    attrs = {}
    for w in words:
        if w in SIZES:
            attrs["size"] = w
        elif w in COLORS:
            attrs["color"] = w
        elif w in SINGULAR:
            attrs["shape"] = SINGULAR[w]
        else:
            assert w in GENERIC, f"unexpected word {w!r}"
    return attrs


def matching(scene: Scene, attrs: dict[str, str]) -> list[ShapeObject]:
    return [o for o in scene.objects if all(getattr(o, k) == v for k, v in attrs.items())]


def resolve(scene: Scene, expression: str) -> list[ShapeObject]:
    """Objects a referring expression picks: all attribute matches, or the clear extreme for a spatial one."""
    words = expression.split()
    assert words[0] == "the", expression
    for phrase, (axis, sign) in SPATIAL.items():
        if expression.endswith(" " + phrase):
            group = matching(scene, phrase_attrs(words[1:-3]))
            assert len(group) >= 2, expression
            ranked = sorted(group, key=lambda o, a=axis, s=sign: s * centre(o)[a])
            gap = sign * (centre(ranked[1])[axis] - centre(ranked[0])[axis])
            return [ranked[0]] if gap >= shapes.CLEAR_MARGIN * scene.width else ranked
    return matching(scene, phrase_attrs(words[1:]))


def the_one(scene: Scene, expression: str) -> ShapeObject:
    found = resolve(scene, expression)
    assert len(found) == 1, (expression, found)
    return found[0]


def related(scene: Scene, a: ShapeObject, b: ShapeObject, relation: str) -> bool:
    axis, sign = RELATION[relation]
    delta = sign * (centre(b)[axis] - centre(a)[axis])
    assert abs(delta) >= shapes.CLEAR_MARGIN * scene.width, "relation asked about objects too close to tell"
    return delta > 0


def parse_caption(text: str) -> tuple[int | None, list[tuple[int, dict[str, str]]]]:
    """A caption -> (stated total or None, [(count, attributes)])."""
    total = None
    if m := re.fullmatch(r"(\w+) shapes?: (.+)", text):
        total, text = NUMBER_WORDS.index(m.group(1)), m.group(2)
    items = []
    for part in re.split(r", | and ", text):
        first, *rest = part.split()
        items.append((1 if first in ("a", "an") else NUMBER_WORDS.index(first), phrase_attrs(rest)))
    return total, items


def caption_true(scene: Scene, text: str) -> bool:
    """Captions describe every object: stated counts per attribute combination must be exact."""
    total, items = parse_caption(text)
    keys = sorted({k for _, a in items for k in a})
    assert all(sorted(a) == keys for _, a in items), "one caption names the same attributes for every item"
    claimed = Counter()
    for count, attrs in items:
        claimed[tuple(attrs[k] for k in keys)] += count
    actual = Counter(tuple(getattr(o, k) for k in keys) for o in scene.objects)
    return claimed == actual and total in (None, len(scene.objects))


def normalise(text: str) -> list[str]:
    words = text.replace(",", "").replace(":", "").split()
    return ["one" if w in ("a", "an") else SINGULAR.get(w, "shape" if w == "shapes" else w) for w in words]


def category(word: str) -> str:
    for name, values in (("color", COLORS), ("shape", SHAPES), ("count", NUMBER_WORDS)):
        if word in values:
            return name
    return "other"


def statement_truth(scene: Scene, text: str) -> bool | None:
    """Truth of a visual-entailment hypothesis; None when it uses an undetermined predicate."""
    if m := re.fullmatch(r"there is one (.+)", text):
        return len(matching(scene, phrase_attrs(m.group(1).split()))) == 1
    if m := re.fullmatch(r"there are (\w+) (.+)", text):
        return len(matching(scene, phrase_attrs(m.group(2).split()))) == NUMBER_WORDS.index(m.group(1))
    if m := re.fullmatch(r"there is an? (.+)", text):
        return len(matching(scene, phrase_attrs(m.group(1).split()))) >= 1
    if m := re.fullmatch(rf"(the .+?) is ({RELATION_RE}) (the .+)", text):
        return related(scene, the_one(scene, m.group(1)), the_one(scene, m.group(3)), m.group(2))
    if m := re.fullmatch(r"the shapes are (\w+)", text):
        assert m.group(1) in UNDETERMINED
        return None
    m = re.fullmatch(r"(the .+) is (\w+)", text)
    assert m, text
    obj, value = the_one(scene, m.group(1)), m.group(2)
    if value in UNDETERMINED:
        return None
    return value == (obj.size if value in SIZES else obj.color)


def by_task(records: list[dict], task: str) -> list[dict]:
    return [r for r in records if r["task"] == task]


# ---------------------------------------------------------------- determinism and splits


def test_same_seed_same_png_and_records():
    for seed in (0, 7, 10_000_003, 20_000_042):
        a, b = shapes.make_scene(seed), shapes.make_scene(seed)
        assert png_bytes(shapes.render(a)) == png_bytes(shapes.render(b))
        assert shapes.scene_records(a, random.Random(1)) == shapes.scene_records(b, random.Random(1))


def test_different_seeds_differ():
    pngs = {png_bytes(shapes.render(shapes.make_scene(seed))) for seed in range(30)}
    assert len(pngs) == 30
    captions = {
        json.dumps(by_task(shapes.scene_records(shapes.make_scene(s), random.Random(0)), "caption"))
        for s in range(30)
    }
    assert len(captions) >= 25


def test_split_seed_ranges_disjoint():
    ranges = {
        split: {shapes.scene_seed(split, i) for i in (*range(500), SPLIT_SIZE - 1)} for split in shapes.SPLITS
    }
    assert not ranges["train"] & ranges["val"] and not ranges["train"] & ranges["test"]
    assert not ranges["val"] & ranges["test"]
    assert shapes.scene_seed("train", SPLIT_SIZE - 1) < shapes.scene_seed("val", 0)
    assert shapes.scene_seed("val", SPLIT_SIZE - 1) < shapes.scene_seed("test", 0)
    for bad in (("train", -1), ("val", SPLIT_SIZE), ("dev", 0)):
        with pytest.raises(ValueError):
            shapes.scene_seed(*bad)


def test_image_size_and_mode():
    image, scene = shapes.sample("val", 3, image_size=96)
    assert image.mode == "RGB" and image.size == (96, 96) == (scene.width, scene.height)


# ---------------------------------------------------------------- scenes and boxes


def test_boxes_tight_on_each_object_alone(scenes):
    black = Background("plain", [(0, 0, 0)])
    for scene, _ in scenes[:100]:
        for obj in scene.objects:
            alone = np.asarray(shapes.render(replace(scene, background=black, objects=[obj])))
            ys, xs = np.nonzero(alone.max(axis=2) > 0)
            actual = [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
            assert np.abs(np.asarray(obj.box) - actual).max() <= 1, (scene.seed, obj, actual)


def test_boxes_hold_every_changed_pixel_in_scene(scenes):
    for scene, _ in scenes[:60]:
        changed = np.any(
            np.asarray(shapes.render(scene)) != np.asarray(shapes.render(replace(scene, objects=[]))), axis=2
        )
        inside = np.zeros_like(changed)
        for obj in scene.objects:
            x0, y0, x1, y1 = (int(v) for v in obj.box)
            inside[y0:y1, x0:x1] = True
            crop = changed[y0:y1, x0:x1]  # each edge of the box touches a visible pixel of the object
            assert crop[0].any() and crop[-1].any() and crop[:, 0].any() and crop[:, -1].any()
        assert not (changed & ~inside).any(), scene.seed


def test_scene_layout(scenes):
    counts = Counter()
    for scene, _ in scenes:
        assert 1 <= len(scene.objects) <= 6
        counts[len(scene.objects)] += 1
        for bg in scene.background.colors:  # neutral: never mistaken for a saturated object color
            assert max(bg) - min(bg) <= 2 * shapes.TINT
        for obj in scene.objects:
            x0, y0, x1, y1 = obj.box
            assert 0 <= x0 < x1 <= scene.width and 0 <= y0 < y1 <= scene.height
            assert max(obj.rgb) - min(obj.rgb) >= 100
            side = max(x1 - x0, y1 - y0)
            assert side <= 21 if obj.size == "small" else side >= 26, (obj.size, side)  # 20 px + pixel grid
        for a in scene.objects:  # no overlap, so every object is fully visible
            for b in scene.objects:
                if a is not b:
                    assert (
                        a.box[2] <= b.box[0]
                        or b.box[2] <= a.box[0]
                        or a.box[3] <= b.box[1]
                        or b.box[3] <= a.box[1]
                    )
    assert set(counts) == set(range(1, 7))


# ---------------------------------------------------------------- records


def test_every_task_with_ids(scenes):
    for scene, records in scenes:
        assert {r["task"] for r in records} == set(TASKS)
        per_task = Counter()
        for r in records:
            assert (
                r["id"] == f"{scene.seed}-{r['task']}-{per_task[r['task']]}" and r["image_id"] == scene.seed
            )
            per_task[r["task"]] += 1
        json.dumps(records)


def test_captions_true_and_first_left_to_right(scenes):
    for scene, records in scenes:
        (record,) = by_task(records, "caption")
        captions = record["captions"]
        assert 3 <= len(captions) <= 5 and len(set(captions)) == len(captions)
        assert all(caption_true(scene, c) for c in captions), captions
        _, items = parse_caption(captions[0])
        ordered = sorted(scene.objects, key=centre)
        assert [a["shape"] for _, a in items] == [o.shape for o in ordered]
        assert [a["color"] for _, a in items] == [o.color for o in ordered]
        (t2i,) = by_task(records, "text_to_image")
        assert t2i["caption"] == captions[0]
        (infill,) = by_task(records, "text_infilling")
        assert infill["text"] in captions
        (image_infill,) = by_task(records, "image_infilling")
        assert set(image_infill) == {"id", "image_id", "task"}


def test_vqa_answers_match_scene(scenes):
    kinds, relation_answers = Counter(), Counter()
    for scene, records in scenes:
        existence = Counter()
        for r in by_task(records, "vqa"):
            q, answer = r["question"], r["answers"][0]
            assert (
                r["answers"] == [answer] * 10
                and r["candidates"] == list(VQA_ANSWERS)
                and answer in VQA_ANSWERS
            )
            kinds[r["question_type"]] += 1
            if m := re.fullmatch(r"what color is (the .+)\?", q):
                assert not set(m.group(1).split()) & set(COLORS)  # the question must not give the answer away
                assert answer == the_one(scene, m.group(1)).color
            elif m := re.fullmatch(r"what shape is (the .+)\?", q):
                assert not set(m.group(1).split()) & set(SINGULAR)
                assert answer == the_one(scene, m.group(1)).shape
            elif m := re.fullmatch(r"how many (.+) are there\?", q):
                assert answer == NUMBER_WORDS[len(matching(scene, phrase_attrs(m.group(1).split())))]
            elif m := re.fullmatch(r"is there an? (.+)\?", q):
                existence[answer] += 1
                assert (answer == "yes") == bool(matching(scene, phrase_attrs(m.group(1).split())))
            else:
                m = re.fullmatch(rf"is (the .+?) ({RELATION_RE}) (the .+)\?", q)
                assert m, q
                a, b = the_one(scene, m.group(1)), the_one(scene, m.group(3))
                assert a is not b and (answer == "yes") == related(scene, a, b, m.group(2))
                relation_answers[answer] += 1
        assert existence == {"yes": 1, "no": 1}
    assert set(kinds) == {"color", "shape", "count", "existence", "relation"} and min(kinds.values()) >= 100
    assert relation_answers["yes"] == relation_answers["no"]


def test_grounding_identifies_exactly_one_object(scenes):
    total = 0
    for scene, records in scenes:
        grounding = by_task(records, "grounding")
        total += len(grounding)
        for r in grounding:
            assert the_one(scene, r["text"]).box == r["box"], r
        for r in by_task(records, "grounded_caption"):
            (obj,) = [o for o in scene.objects if o.box == r["box"]]
            assert r["text"] in (
                f"a {obj.size} {obj.color} {obj.shape}",
                f"an {obj.size} {obj.color} {obj.shape}",
            )
            assert r["texts"][0] == r["text"]
    assert total >= 0.95 * sum(len(s.objects) for s, _ in scenes)


def test_detection_lists_every_object(scenes):
    for scene, records in scenes:
        (r,) = by_task(records, "detection")
        ordered = sorted(scene.objects, key=centre)
        assert r["objects"] == [{"box": o.box, "label": f"{o.color} {o.shape}"} for o in ordered]


def test_itm_positives_true_negatives_one_swap(scenes):
    swapped = Counter()
    for scene, records in scenes:
        itm = by_task(records, "itm")
        captions = by_task(records, "caption")[0]["captions"]
        assert Counter(r["label"] for r in itm) == {"yes": 2, "no": 2}
        for r in itm:
            assert caption_true(scene, r["text"]) == (r["label"] == "yes"), r
            if r["label"] == "no":
                diffs = []
                for c in captions:
                    a, b = normalise(c), normalise(r["text"])
                    if len(a) == len(b):
                        pos = [(x, y) for x, y in zip(a, b, strict=True) if x != y]
                        if len(pos) == 1 and category(pos[0][0]) == category(pos[0][1]) != "other":
                            diffs.append(category(pos[0][0]))
                assert diffs, (r["text"], captions)
                swapped[diffs[0]] += 1
    assert set(swapped) == {"color", "shape", "count"}


def test_visual_entailment_labels(scenes):
    for scene, records in scenes:
        ve = by_task(records, "visual_entailment")
        captions = by_task(records, "caption")[0]["captions"]
        assert [r["label"] for r in ve] == ["yes", "no", "maybe"]
        for r in ve:
            assert r["text1"] in captions
            assert (
                statement_truth(scene, r["text2"]) == {"yes": True, "no": False, "maybe": None}[r["label"]]
            ), r


# ---------------------------------------------------------------- iteration and files


def test_iter_samples_filters_tasks_and_is_deterministic():
    a = list(shapes.iter_samples("val", 3, tasks=["vqa", "grounding"]))
    b = list(shapes.iter_samples("val", 3, tasks=["vqa", "grounding"]))
    assert {r["task"] for _, r in a} == {"vqa", "grounding"}
    assert [r for _, r in a] == [r for _, r in b]
    assert all(png_bytes(x) == png_bytes(y) for (x, _), (y, _) in zip(a, b, strict=True))
    assert {r["image_id"] for _, r in a} == {shapes.scene_seed("val", i) for i in range(3)}


def test_write_split_round_trip(tmp_path):
    out = shapes.write_split("test", 3, tmp_path / "shapes", image_size=64)
    assert sorted(p.name for p in (out / "images").iterdir()) == sorted(
        f"{shapes.scene_seed('test', i)}.png" for i in range(3)
    )
    lines = [json.loads(line) for line in (out / "annotations.jsonl").read_text().splitlines()]
    assert len(lines) == 3
    for i, line in enumerate(lines):
        assert line["seed"] == shapes.scene_seed("test", i) and line["width"] == 64 and line["objects"]
        assert all("image" not in r for r in line["records"])
    loaded = list(shapes.load_split(out))
    fresh = list(shapes.iter_samples("test", 3, image_size=64))
    assert [r for _, r in loaded] == json.loads(json.dumps([r for _, r in fresh]))
    assert all(
        np.array_equal(np.asarray(x), np.asarray(y)) for (x, _), (y, _) in zip(loaded, fresh, strict=True)
    )


def test_a_tasks_records_do_not_depend_on_the_other_tasks_asked_for():
    for seed in range(30):
        scene = shapes.make_scene(seed)
        every = shapes.scene_records(scene, shapes.record_rng(seed))
        for task in ("vqa", "itm", "grounding", "visual_entailment"):
            alone = shapes.scene_records(scene, shapes.record_rng(seed), [task])
            assert alone == [r for r in every if r["task"] == task]


def test_object_window_rendering_equals_the_full_canvas():
    """The alpha is drawn in a window around the object: it must equal drawing the whole canvas."""
    f = shapes.SUPERSAMPLE
    for seed in range(40):
        scene = shapes.make_scene(seed)
        for obj in scene.objects:
            canvas = Image.new("L", (scene.width * f, scene.height * f), 0)
            draw = ImageDraw.Draw(canvas)
            (cx, cy), r = obj.center, obj.extent / 2
            if obj.shape == "circle":
                draw.ellipse([(cx - r) * f, (cy - r) * f, (cx + r) * f - 1, (cy + r) * f - 1], fill=255)
            else:
                draw.polygon([(x * f, y * f) for x, y in shapes._outline(obj.shape, cx, cy, r)], fill=255)
            full = np.asarray(canvas.resize((scene.width, scene.height), Image.Resampling.BOX))
            full = np.where(full >= shapes.MIN_ALPHA, full, 0)
            assert np.array_equal(shapes._object_alpha(obj, scene.width, scene.height), full)


@pytest.mark.parametrize("grid", [8, 16])
def test_cell_labels_own_cells_inside_their_object_and_recover_its_box(scenes, grid):
    for scene, _ in scenes[:40]:
        labels = shapes.cell_labels(scene, grid)
        cell = scene.width / grid
        owners = set()
        for gy, gx in zip(*np.nonzero(labels["color"]), strict=True):
            cx, cy = (gx + 0.5) * cell, (gy + 0.5) * cell
            box = labels["box"][gy, gx] * scene.width + np.array([cx, cy, cx, cy])
            obj = next(o for o in scene.objects if np.allclose(box, o.box, atol=1e-3))
            owners.add(id(obj))
            assert labels["color"][gy, gx] == 1 + list(COLORS).index(obj.color)
            assert labels["shape"][gy, gx] == 1 + SHAPES.index(obj.shape)
            assert labels["size"][gy, gx] == 1 + SIZES.index(obj.size)
            x0, y0, x1, y1 = obj.box  # the cell overlaps the object's box
            assert x0 < (gx + 1) * cell and gx * cell < x1 and y0 < (gy + 1) * cell and gy * cell < y1
        assert owners == {id(o) for o in scene.objects}, "every object owns at least one cell"
        background = labels["color"] == 0
        assert (labels["shape"][background] == 0).all() and (labels["box"][background] == 0).all()


def test_cell_labels_need_a_grid_that_divides_the_image(scenes):
    with pytest.raises(ValueError, match="does not split into 10x10 cells"):
        shapes.cell_labels(scenes[0][0], 10)

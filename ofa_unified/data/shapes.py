"""Shapes world: seeded procedural scenes with ground truth for every task.

A scene holds 1-6 non-overlapping objects, each a shape (circle, square, triangle, star, diamond,
cross), a color (red, green, blue, yellow, purple, orange) and a size (small or large), on a
neutral background (plain, gradient or grey noise, never saturated, so no object color can be
confused with it). Everything follows from one integer seed, so the data set needs no files and the
train / val / test splits are disjoint seed ranges.

Boxes are ``[x0, y0, x1, y1]``, x first, in pixel-edge coordinates: the object's drawn pixels are
columns ``x0 .. x1 - 1`` and rows ``y0 .. y1 - 1`` (COCO-style continuous coordinates). Objects are
drawn with 4x supersampling; coverage below a quarter of a pixel is dropped, so the box is exactly
the bounding box of every pixel the object changed.

Language is small, regular and lowercase (a few dozen words) so a tiny model can learn it. Phrases
put attributes in the order size, color, shape; ``shape`` is the noun when the shape is unsaid.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from itertools import combinations
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SPLITS = ("train", "val", "test")
SPLIT_SIZE = 10_000_000  # seeds per split: train [0, 10M), val [10M, 20M), test [20M, 30M)

SHAPES = ("circle", "square", "triangle", "star", "diamond", "cross")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (35, 160, 55),
    "blue": (35, 75, 215),
    "yellow": (240, 205, 25),
    "purple": (140, 55, 190),
    "orange": (245, 130, 20),
}
SIZES = ("small", "large")
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six")
VQA_ANSWERS = (*COLORS, *SHAPES, *NUMBER_WORDS, "yes", "no")
TASKS = (
    "caption",
    "vqa",
    "grounding",
    "grounded_caption",
    "itm",
    "detection",
    "text_infilling",
    "visual_entailment",
    "image_infilling",
    "text_to_image",
    "masked_image_modeling",
    "prefix_lm",
    "itc",
)
# Predicates the shapes world does not model: a statement using one is neither entailed nor
# contradicted by the image, which makes visual entailment's "maybe" well defined.
UNDETERMINED = ("heavy", "moving", "wet", "soft", "hot", "cold", "old", "new")

MAX_OBJECTS = 6
# Object extent as a fraction of the image side: 14-20 px small, 28-38 px large at 128 px, a clear gap.
SIZE_RANGE = {"small": (0.11, 0.155), "large": (0.22, 0.30)}
CLEAR_MARGIN = 0.08  # fraction of the image side two box centres must differ by for left/right/above/below
COLOR_JITTER = 10  # per channel, so the model sees colors as ranges, not single values
LIGHT_TONES, DARK_TONES, TINT = (170, 235), (15, 80), 10  # neutral backgrounds: grey level, +- channel tint
SUPERSAMPLE = 4
MIN_ALPHA = 64  # coverage (of 255) below which an antialiased edge pixel is not drawn

ATTRIBUTES = ("size", "color", "shape")
_ATTRIBUTE_SUBSETS = [s for k in range(4) for s in combinations(ATTRIBUTES, k)]
# phrase -> (axis, sign): the extreme object minimises sign * centre[axis]
_DIRECTIONS = {"on the left": (0, 1), "on the right": (0, -1), "at the top": (1, 1), "at the bottom": (1, -1)}
# relation word -> (axis, sign): "a REL b" holds when sign * (centre_b - centre_a)[axis] >= margin
_RELATIONS = {"left of": (0, 1), "right of": (0, -1), "above": (1, 1), "below": (1, -1)}


@dataclass
class ShapeObject:
    """One drawn object; ``rgb``, ``center`` and ``extent`` (nominal side in px) are what render draws."""

    shape: str
    color: str
    size: str
    box: list[float]
    rgb: tuple[int, int, int] = (0, 0, 0)
    center: tuple[float, float] = (0.0, 0.0)
    extent: float = 0.0

    @property
    def box_center(self) -> tuple[float, float]:
        return (self.box[0] + self.box[2]) / 2, (self.box[1] + self.box[3]) / 2


@dataclass
class Background:
    """``kind`` plain | gradient | noise; ``colors`` one tone, or the two ends of a gradient."""

    kind: str
    colors: list[tuple[int, int, int]]
    angle: float = 0.0  # gradient direction, degrees
    noise: float = 0.0  # std of grey noise added to every channel alike


@dataclass
class Scene:
    seed: int
    width: int
    height: int
    background: Background
    objects: list[ShapeObject]

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------- scenes and rendering


def scene_seed(split: str, index: int) -> int:
    """Seed of the index-th scene of a split; splits occupy disjoint seed ranges."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    if not 0 <= index < SPLIT_SIZE:
        raise ValueError(f"index {index} outside [0, {SPLIT_SIZE})")
    return SPLITS.index(split) * SPLIT_SIZE + index


def record_rng(seed: int) -> random.Random:
    """The rng that picks a scene's record phrasings in iter_samples and write_split."""
    return random.Random(f"records-{seed}")


def make_scene(seed: int, image_size: int = 128, max_objects: int = MAX_OBJECTS) -> Scene:
    """Lay out a scene from its seed alone (python ``random.Random(seed)``, no global state).
    `max_objects` below the default makes the easy scenes of a curriculum or a test bed."""
    if not 1 <= max_objects <= MAX_OBJECTS:
        raise ValueError(f"max_objects must be in [1, {MAX_OBJECTS}], got {max_objects}")
    rng = random.Random(seed)
    background = _make_background(rng)
    gap = max(2.0, 0.025 * image_size)
    placed: list[tuple[float, float, float, float]] = []
    objects = []
    for _ in range(rng.randint(1, max_objects)):
        shape, color, size = rng.choice(SHAPES), rng.choice(list(COLORS)), rng.choice(SIZES)
        spot = _place(rng, image_size, size, placed, gap)
        if spot is None and size == "large":
            size = "small"
            spot = _place(rng, image_size, size, placed, gap)
        if spot is None:
            continue
        cx, cy, extent = spot
        rgb = tuple(min(255, max(0, c + rng.randint(-COLOR_JITTER, COLOR_JITTER))) for c in COLORS[color])
        obj = ShapeObject(shape, color, size, [0.0] * 4, rgb, (cx, cy), extent)
        x0, y0, x1, y1 = Image.fromarray(_object_alpha(obj, image_size, image_size)).getbbox()
        obj.box = [float(x0), float(y0), float(x1), float(y1)]
        objects.append(obj)
    return Scene(seed, image_size, image_size, background, objects)


def render(scene: Scene) -> Image.Image:
    """Draw the scene (RGB); the background's grey noise comes from ``numpy`` seeded by the scene seed."""
    img = _background_pixels(scene)
    for obj in scene.objects:
        alpha = _object_alpha(obj, scene.width, scene.height)[..., None].astype(np.float32) / 255.0
        img = img * (1.0 - alpha) + np.asarray(obj.rgb, np.float32) * alpha
    return Image.fromarray(np.clip(np.rint(img), 0, 255).astype(np.uint8), "RGB")


def sample(
    split: str, index: int, image_size: int = 128, max_objects: int = MAX_OBJECTS
) -> tuple[Image.Image, Scene]:
    scene = make_scene(scene_seed(split, index), image_size, max_objects)
    return render(scene), scene


def _make_background(rng: random.Random) -> Background:
    kind = rng.choice(("plain", "gradient", "noise"))
    lo, hi = LIGHT_TONES if rng.random() < 0.6 else DARK_TONES

    def tone() -> tuple[int, int, int]:
        grey = rng.randint(lo, hi)
        return tuple(min(255, max(0, grey + rng.randint(-TINT, TINT))) for _ in range(3))

    colors = [tone(), tone()] if kind == "gradient" else [tone()]
    angle = rng.uniform(0.0, 360.0) if kind == "gradient" else 0.0
    noise = rng.uniform(3.0, 8.0) if kind == "noise" else 0.0
    return Background(kind, colors, angle, noise)


def _background_pixels(scene: Scene) -> np.ndarray:
    bg, h, w = scene.background, scene.height, scene.width
    first = np.asarray(bg.colors[0], np.float32)
    img = np.broadcast_to(first, (h, w, 3)).astype(np.float32)
    if bg.kind == "gradient":
        theta = np.deg2rad(bg.angle)
        ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
        proj = xs * np.cos(theta) + ys * np.sin(theta)
        t = ((proj - proj.min()) / max(float(np.ptp(proj)), 1e-6))[..., None]
        img = first * (1.0 - t) + np.asarray(bg.colors[1], np.float32) * t
    if bg.noise > 0:
        noise = np.random.default_rng(scene.seed).normal(0.0, bg.noise, (h, w)).astype(np.float32)
        img = img + noise[..., None]
    return np.clip(img, 0, 255)


def _place(
    rng: random.Random, image_size: int, size: str, placed: list[tuple[float, ...]], gap: float
) -> tuple[float, float, float] | None:
    """Centre and extent of a new object whose nominal box keeps ``gap`` px from the others and the edges."""
    lo, hi = SIZE_RANGE[size]
    for _ in range(100):
        extent = rng.uniform(lo, hi) * image_size
        r = extent / 2
        cx = rng.uniform(r + gap, image_size - r - gap)
        cy = rng.uniform(r + gap, image_size - r - gap)
        box = (cx - r, cy - r, cx + r, cy + r)
        if all(
            box[0] >= p[2] + gap or p[0] >= box[2] + gap or box[1] >= p[3] + gap or p[1] >= box[3] + gap
            for p in placed
        ):
            placed.append(box)
            return cx, cy, extent
    return None


def _outline(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """Polygon of a non-circle shape with half-extent r, pointing up."""
    if shape == "square":
        return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "triangle":
        return [(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "diamond":  # narrower than tall so it never reads as a tilted square
        return [(cx, cy - r), (cx + 0.8 * r, cy), (cx, cy + r), (cx - 0.8 * r, cy)]
    if shape == "star":  # five points; shifted down so its box is centred
        dy = 0.095 * r
        angles = np.deg2rad(-90.0 + 36.0 * np.arange(10))
        radii = np.where(np.arange(10) % 2 == 0, r, 0.45 * r)
        return [(cx + q * np.cos(a), cy + dy + q * np.sin(a)) for q, a in zip(radii, angles, strict=True)]
    if shape == "cross":
        h = 0.36 * r
        return [
            (cx - h, cy - r), (cx + h, cy - r), (cx + h, cy - h), (cx + r, cy - h),
            (cx + r, cy + h), (cx + h, cy + h), (cx + h, cy + r), (cx - h, cy + r),
            (cx - h, cy + h), (cx - r, cy + h), (cx - r, cy - h), (cx - h, cy - h),
        ]  # fmt: skip
    raise ValueError(f"unknown shape {shape!r}")


def _object_alpha(obj: ShapeObject, width: int, height: int) -> np.ndarray:
    """Coverage (uint8, H x W) of one object, supersampled; faint edge pixels dropped.

    Only a window around the object is drawn and downsampled (whole pixels, so the result is the
    same as for the full canvas): this is the costliest step of making a training sample.
    """
    f = SUPERSAMPLE
    (cx, cy), r = obj.center, obj.extent / 2
    x0, y0 = max(0, int(cx - r) - 2), max(0, int(cy - r) - 2)
    x1, y1 = min(width, int(cx + r) + 3), min(height, int(cy + r) + 3)
    canvas = Image.new("L", ((x1 - x0) * f, (y1 - y0) * f), 0)
    draw = ImageDraw.Draw(canvas)
    ox, oy = x0 * f, y0 * f
    if obj.shape == "circle":
        draw.ellipse(
            [(cx - r) * f - ox, (cy - r) * f - oy, (cx + r) * f - 1 - ox, (cy + r) * f - 1 - oy], fill=255
        )
    else:
        draw.polygon([(x * f - ox, y * f - oy) for x, y in _outline(obj.shape, cx, cy, r)], fill=255)
    window = np.asarray(canvas.resize((x1 - x0, y1 - y0), Image.Resampling.BOX))
    alpha = np.zeros((height, width), np.uint8)
    alpha[y0:y1, x0:x1] = np.where(window >= MIN_ALPHA, window, 0)
    return alpha


# ---------------------------------------------------------------- language


def plural(word: str) -> str:
    return word + "es" if word.endswith(("s", "x")) else word + "s"


def noun_phrase(attrs: dict[str, str], many: bool = False, noun: str = "shape") -> str:
    """``{"size": "small", "color": "red"}`` -> "small red shape" (attributes in size, color, shape order)."""
    head = attrs.get("shape", noun)
    return " ".join([*(attrs[k] for k in ("size", "color") if k in attrs), plural(head) if many else head])


def with_article(phrase: str) -> str:
    """ "red circle" -> "a red circle", "orange star" -> "an orange star"."""
    return f"{'an' if phrase[0] in 'aeiou' else 'a'} {phrase}"


def _counted(count: int, attrs: dict[str, str]) -> str:
    """1 -> "a red circle", 3 -> "three red circles"."""
    return (
        with_article(noun_phrase(attrs))
        if count == 1
        else f"{NUMBER_WORDS[count]} {noun_phrase(attrs, True)}"
    )


def _join(parts: Sequence[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _attrs(obj: ShapeObject, keys: Iterable[str]) -> dict[str, str]:
    return {k: getattr(obj, k) for k in keys}


def _matches(obj: ShapeObject, attrs: dict[str, str]) -> bool:
    return all(getattr(obj, k) == v for k, v in attrs.items())


def _count(scene: Scene, attrs: dict[str, str]) -> int:
    return sum(_matches(o, attrs) for o in scene.objects)


def _left_to_right(scene: Scene) -> list[ShapeObject]:
    return sorted(scene.objects, key=lambda o: (o.box_center[0], o.box_center[1]))


def _margin(scene: Scene) -> float:
    return CLEAR_MARGIN * scene.width


@dataclass
class _Claim:
    """A complete description of a scene: ``items`` (count, attributes) partition its objects."""

    total: int | None
    items: list[tuple[int, dict[str, str]]]

    @property
    def text(self) -> str:
        body = _join([_counted(c, a) for c, a in self.items])
        if self.total is None:
            return body
        return f"{NUMBER_WORDS[self.total]} {'shape' if self.total == 1 else 'shapes'}: {body}"


def _claims(scene: Scene) -> list[_Claim]:
    """Caption structures: left-to-right list, counted list, then summaries by shape, color and size."""
    ordered = _left_to_right(scene)
    n = len(ordered)
    listed = ("size", "color", "shape") if n <= 3 else ("color", "shape")
    claims = [
        _Claim(None, [(1, _attrs(o, listed)) for o in ordered]),
        _Claim(n, [(1, _attrs(o, ("color", "shape"))) for o in ordered]),
    ]
    for key, values in (("shape", SHAPES), ("color", tuple(COLORS)), ("size", ("large", "small"))):
        counts = Counter(getattr(o, key) for o in scene.objects)
        groups = sorted(counts, key=lambda v: (-counts[v], values.index(v)))
        claims.append(_Claim(None, [(counts[v], {key: v}) for v in groups]))
    return claims


def _swap(claim: _Claim, kind: str, rng: random.Random) -> _Claim | None:
    """A hard negative: ``claim`` with exactly one color, shape or count changed so it becomes false.

    A new color/shape is one the claim does not use anywhere (the claim lists every object, so no
    object has it); a count moves by one and never down to 1 ("a circle" would still be true).
    """
    if kind == "count":
        options: list[tuple[int | None, int]] = []
        if claim.total is not None:
            options += [(None, t) for t in (claim.total - 1, claim.total + 1) if 1 <= t <= MAX_OBJECTS]
        for i, (c, _) in enumerate(claim.items):
            options += [(i, t) for t in (c - 1, c + 1) if 2 <= t <= MAX_OBJECTS]
        if not options:
            return None
        i, t = rng.choice(options)
        if i is None:
            return _Claim(t, claim.items)
        return _Claim(claim.total, [(t, a) if j == i else (c, a) for j, (c, a) in enumerate(claim.items)])
    values = SHAPES if kind == "shape" else tuple(COLORS)
    used = {a[kind] for _, a in claim.items if kind in a}
    free = [v for v in values if v not in used]
    slots = [i for i, (_, a) in enumerate(claim.items) if kind in a]
    if not free or not slots:
        return None
    i, v = rng.choice(slots), rng.choice(free)
    return _Claim(
        claim.total, [(c, {**a, kind: v}) if j == i else (c, a) for j, (c, a) in enumerate(claim.items)]
    )


def referring_expressions(
    scene: Scene, index: int, exclude: Iterable[str] = (), spatial: bool = True, noun: str = "shape"
) -> list[str]:
    """Every expression "the ..." that picks out exactly object ``index``.

    Either its attributes alone are unique ("the small red circle", "the blue shape"), or it is the
    extreme one of the objects sharing the named attributes by a clear margin ("the circle on the
    left", "the shape at the top"). ``exclude`` keeps attributes out (a color question must not name
    the color); ``spatial=False`` keeps attribute-only expressions.
    """
    target, margin = scene.objects[index], _margin(scene)
    skip = set(exclude)
    out = []
    for keys in _ATTRIBUTE_SUBSETS:
        if skip & set(keys):
            continue
        attrs = _attrs(target, keys)
        group = [o for o in scene.objects if _matches(o, attrs)]
        if len(group) == 1:
            if keys:
                out.append(f"the {noun_phrase(attrs, noun=noun)}")
            continue
        if not spatial:
            continue
        for phrase, (axis, sign) in _DIRECTIONS.items():
            first, second = sorted(group, key=lambda o, a=axis, s=sign: s * o.box_center[a])[:2]
            if first is target and sign * (second.box_center[axis] - first.box_center[axis]) >= margin:
                out.append(f"the {noun_phrase(attrs, noun=noun)} {phrase}")
    return out


def _related(scene: Scene, a: ShapeObject, b: ShapeObject, relation: str) -> bool | None:
    """Whether ``a relation b`` holds by box centres; None when they are too close on that axis to say."""
    axis, sign = _RELATIONS[relation]
    delta = sign * (b.box_center[axis] - a.box_center[axis])
    return None if abs(delta) < _margin(scene) else delta > 0


def _relation_pairs(scene: Scene) -> list[tuple[ShapeObject, ShapeObject, list[str], list[str], str]]:
    """(a, b, names of a, names of b, relation) for attribute-named pairs clearly apart on an axis."""
    names = {i: referring_expressions(scene, i, spatial=False) for i in range(len(scene.objects))}
    out = []
    for i, j in combinations(range(len(scene.objects)), 2):
        if names[i] and names[j]:
            a, b = scene.objects[i], scene.objects[j]
            out += [
                (a, b, names[i], names[j], r)
                for r in ("left of", "above")
                if _related(scene, a, b, r) is not None
            ]
    return out


# ---------------------------------------------------------------- records


def scene_records(scene: Scene, rng: random.Random, tasks: Iterable[str] | None = None) -> list[dict]:
    """Ground truth of every task (or of `tasks` only) for one scene (record schema in the package
    docs), phrasings drawn from rng.

    Each task draws from its own stream seeded by one draw of ``rng``, so a task's records do not
    depend on which other tasks were asked for (the training pipeline asks for one). Detection labels
    are "color shape" ("red circle"), listed left to right; ``rng`` only picks phrasings and
    negatives, the facts come from ``scene``.
    """
    base = rng.getrandbits(64)
    captions = [c.text for c in _claims(scene)]
    ordered = _left_to_right(scene)

    def grounding(r: random.Random) -> list[dict]:
        out = []
        for obj in ordered:
            expressions = referring_expressions(scene, scene.objects.index(obj))
            if expressions:
                out.append({"text": r.choice(expressions), "box": obj.box})
        return out

    def grounded_caption(r: random.Random) -> list[dict]:
        out = []
        for obj in ordered:
            text = with_article(f"{obj.size} {obj.color} {obj.shape}")
            out.append(
                {"box": obj.box, "text": text, "texts": [text, with_article(f"{obj.color} {obj.shape}")]}
            )
        return out

    builders: dict[str, Callable[[random.Random], list[dict]]] = {
        "caption": lambda r: [{"captions": captions}],
        "vqa": lambda r: _vqa(scene, r),
        "grounding": grounding,
        "grounded_caption": grounded_caption,
        "itm": lambda r: _itm(scene, r),
        "detection": lambda r: [
            {"objects": [{"box": o.box, "label": f"{o.color} {o.shape}"} for o in ordered]}
        ],
        "text_infilling": lambda r: [{"text": r.choice(captions)}],
        "visual_entailment": lambda r: _entailment(scene, r, captions),
        "image_infilling": lambda r: [{}],
        "text_to_image": lambda r: [{"caption": captions[0]}],
        "masked_image_modeling": lambda r: [{}],  # the pipeline draws the masked patches per sample
        # a caption cut at a random word; the second is the text-only case (the encoder sees no image)
        "prefix_lm": lambda r: [
            {"text": r.choice(captions), "split_seed": r.getrandbits(32)},
            {"text": r.choice(captions), "split_seed": r.getrandbits(32), "text_only": True},
        ],
        "itc": lambda r: [{"text": r.choice(captions)}],
    }
    asked = set(TASKS if tasks is None else tasks)
    wanted = [t for t in TASKS if t in asked]
    return [
        {"id": f"{scene.seed}-{task}-{k}", "image_id": scene.seed, "task": task, **fields}
        for task in wanted
        for k, fields in enumerate(builders[task](random.Random(f"{base}-{task}")))
    ]


def _random_attrs(rng: random.Random, obj: ShapeObject | None = None, min_keys: int = 1) -> dict[str, str]:
    """A random attribute subset, taking values from ``obj`` or at random."""
    keys = rng.choice([k for k in _ATTRIBUTE_SUBSETS if len(k) >= min_keys])
    pools = {"size": SIZES, "color": tuple(COLORS), "shape": SHAPES}
    return {k: getattr(obj, k) if obj is not None else rng.choice(pools[k]) for k in keys}


def _absent_attrs(scene: Scene, rng: random.Random) -> dict[str, str]:
    """Attributes no object has, usually one value away from a real object (a hard existence negative)."""
    pools = {"size": SIZES, "color": tuple(COLORS), "shape": SHAPES}
    for _ in range(50):
        attrs = _random_attrs(rng, rng.choice(scene.objects))
        key = rng.choice(list(attrs))
        attrs[key] = rng.choice([v for v in pools[key] if v != attrs[key]])
        if _count(scene, attrs) == 0:
            return attrs
    while True:  # a full triple: at most 6 of 72 exist
        attrs = _random_attrs(rng, None, min_keys=3)
        if _count(scene, attrs) == 0:
            return attrs


def _vqa(scene: Scene, rng: random.Random) -> list[dict]:
    """Up to two questions of each kind: color, shape, count, existence (yes+no), relation (yes+no)."""
    qas: dict[str, tuple[str, str, str | None]] = {}  # question -> (answer, kind, evidence)
    n = len(scene.objects)

    def ask(kind: str, make) -> None:
        for _ in range(20):
            got = make()
            if got is not None and got[0] not in qas:
                qas[got[0]] = (got[1], kind, got[2] if len(got) > 2 else None)
                return

    def attribute_question(key: str, template: str, noun: str):
        i = rng.randrange(n)
        names = referring_expressions(scene, i, exclude=[key], noun=noun)
        return (template.format(rng.choice(names)), getattr(scene.objects[i], key)) if names else None

    def count_question():
        attrs = _random_attrs(rng, rng.choice(scene.objects), 0) if rng.random() < 0.8 else _random_attrs(rng)
        return f"how many {noun_phrase(attrs, True)} are there?", NUMBER_WORDS[_count(scene, attrs)]

    def exists_question(answer: str):
        attrs = (
            _random_attrs(rng, rng.choice(scene.objects)) if answer == "yes" else _absent_attrs(scene, rng)
        )
        return f"is there {with_article(noun_phrase(attrs))}?", answer, _existence_evidence(scene, attrs)

    pairs = _relation_pairs(scene)

    def relation_question(answer: str):
        a, b, names_a, names_b, relation = rng.choice(pairs)
        if rng.random() < 0.5:
            a, b, names_a, names_b = b, a, names_b, names_a
        options = [r for r in _RELATIONS if _RELATIONS[r][0] == _RELATIONS[relation][0]]
        asked = next(r for r in options if _related(scene, a, b, r) == (answer == "yes"))
        holds = next(r for r in options if _related(scene, a, b, r))
        name_a, name_b = rng.choice(names_a), rng.choice(names_b)
        return f"is {name_a} {asked} {name_b}?", answer, f"{name_a} is {holds} {name_b}"

    for _ in range(2):
        ask("color", lambda: attribute_question("color", "what color is {}?", "shape"))
        ask("shape", lambda: attribute_question("shape", "what shape is {}?", "object"))
        ask("count", count_question)
    for answer in ("yes", "no"):
        ask("existence", lambda a=answer: exists_question(a))
        if pairs:
            ask("relation", lambda a=answer: relation_question(a))
    return [
        {
            "question": q,
            "answers": [a] * 10,
            "candidates": list(VQA_ANSWERS),
            "question_type": kind,
            **({"evidence": evidence} if evidence else {}),
        }
        for q, (a, kind, evidence) in qas.items()
    ]


def _existence_evidence(scene: Scene, attrs: dict[str, str]) -> str:
    """What settles "is there a small red circle?": the colours of the small circles ("small circles:
    blue, green"; shape or size when the question names no colour). The verdict is then a lookup of
    the named value in that list, which a model learns where it does not learn the yes / no alone."""
    key = next(k for k in ("color", "shape", "size") if k in attrs)
    rest = {k: v for k, v in attrs.items() if k != key}
    found = {getattr(o, key) for o in scene.objects if _matches(o, rest)}
    values = [v for v in {"color": tuple(COLORS), "shape": SHAPES, "size": SIZES}[key] if v in found]
    return f"{noun_phrase(rest, True)}: {', '.join(values) if values else 'none'}"


def _itm(scene: Scene, rng: random.Random) -> list[dict]:
    """Two true captions and two hard negatives, each one color, shape or count away from a true one."""
    claims = _claims(scene)
    texts = {c.text for c in claims}
    positives = rng.sample(sorted(texts), 2)
    negatives: dict[str, str] = {}  # negative -> the true claim it was made from (its evidence)
    kinds = rng.sample(["color", "shape", "count"], 3)
    for attempt in range(30):
        claim = rng.choice(claims)
        swapped = _swap(claim, kinds[attempt % 3], rng)
        if swapped is not None and swapped.text not in texts and swapped.text not in negatives:
            negatives[swapped.text] = claim.text
            if len(negatives) == 2:
                break
    pairs = zip(positives, negatives, strict=False)  # two and two, bar a pathological scene
    return [
        {"text": t, "label": label, "evidence": e}
        for p, q in pairs
        for t, label, e in ((p, "yes", p), (q, "no", negatives[q]))
    ]


def _entailment(scene: Scene, rng: random.Random, captions: list[str]) -> list[dict]:
    """One entailed ("yes"), one contradicted ("no") and one undetermined ("maybe") statement per scene.

    Statements: existence, exact count, an attribute of a uniquely named object, a relation by box
    centres; "maybe" gives a named object (or all shapes) a predicate the world does not model.
    """
    pairs = _relation_pairs(scene)

    def existence(truth: bool) -> str:
        attrs = _random_attrs(rng, rng.choice(scene.objects)) if truth else _absent_attrs(scene, rng)
        return f"there is {with_article(noun_phrase(attrs))}"

    def count(truth: bool) -> str:
        attrs = _random_attrs(rng, rng.choice(scene.objects), 0)
        k = _count(scene, attrs)
        if not truth:
            k = rng.choice([v for v in (k - 1, k + 1) if 1 <= v <= MAX_OBJECTS])
        return f"there is one {noun_phrase(attrs)}" if k == 1 else f"there are {_counted(k, attrs)}"

    def attribute(truth: bool) -> str | None:
        i = rng.randrange(len(scene.objects))
        key = rng.choice(("size", "color"))
        names = referring_expressions(scene, i, exclude=[key])
        if not names:
            return None
        value = getattr(scene.objects[i], key)
        if not truth:
            value = rng.choice([v for v in (SIZES if key == "size" else tuple(COLORS)) if v != value])
        return f"{rng.choice(names)} is {value}"

    def relation(truth: bool) -> str | None:
        if not pairs:
            return None
        a, b, names_a, names_b, relation = rng.choice(pairs)
        options = [r for r in _RELATIONS if _RELATIONS[r][0] == _RELATIONS[relation][0]]
        relation = next(r for r in options if _related(scene, a, b, r) == truth)
        return f"{rng.choice(names_a)} is {relation} {rng.choice(names_b)}"

    def statement(truth: bool) -> str:
        makers = [existence, count, attribute, relation]
        while True:
            text = rng.choice(makers)(truth)
            if text is not None:
                return text

    named = [names for i in range(len(scene.objects)) if (names := referring_expressions(scene, i))]
    predicate = rng.choice(UNDETERMINED)
    maybe = f"{rng.choice(rng.choice(named))} is {predicate}" if named else f"the shapes are {predicate}"
    return [
        {"text1": rng.choice(captions), "text2": text, "label": label}
        for text, label in ((statement(True), "yes"), (statement(False), "no"), (maybe, "maybe"))
    ]


# ---------------------------------------------------------------- dense labels (stem pretraining)

# A cell belongs to the object covering most of it, if that object covers CELL_COVER of the cell or
# CELL_COVER of the object lies in it (a small object split over four cells still labels them).
CELL_COVER = 0.25


def cell_labels(scene: Scene, grid: int) -> dict[str, np.ndarray]:
    """Per-cell targets on a grid x grid partition of the image, for supervised stem pretraining.

    ``color``/``shape``/``size``: int64 [grid, grid], 0 = background, else 1 + the index into
    COLORS/SHAPES/SIZES; ``box``: float32 [grid, grid, 4], the owning object's box minus the cell
    centre, divided by the image side (zeros on background cells).
    """
    if scene.width % grid or scene.height % grid:
        raise ValueError(f"a {scene.width}x{scene.height} image does not split into {grid}x{grid} cells")
    ch, cw = scene.height // grid, scene.width // grid
    labels = {k: np.zeros((grid, grid), np.int64) for k in ATTRIBUTES}
    box = np.zeros((grid, grid, 4), np.float32)
    best = np.zeros((grid, grid), np.float32)
    ys, xs = (np.arange(grid, dtype=np.float32) + 0.5) * ch, (np.arange(grid, dtype=np.float32) + 0.5) * cw
    for obj in scene.objects:
        alpha = _object_alpha(obj, scene.width, scene.height).astype(np.float32) / 255.0
        cover = alpha.reshape(grid, ch, grid, cw).sum(axis=(1, 3))
        share = cover / (ch * cw)
        owned = ((share >= CELL_COVER) | (cover >= CELL_COVER * alpha.sum())) & (share > best)
        best = np.where(owned, share, best)
        labels["color"][owned] = 1 + list(COLORS).index(obj.color)
        labels["shape"][owned] = 1 + SHAPES.index(obj.shape)
        labels["size"][owned] = 1 + SIZES.index(obj.size)
        x0, y0, x1, y1 = obj.box
        offsets = np.stack(
            np.broadcast_arrays(x0 - xs[None], y0 - ys[:, None], x1 - xs[None], y1 - ys[:, None]), -1
        )
        box[owned] = offsets[owned] / scene.width
    return {**labels, "box": box}


# ---------------------------------------------------------------- iteration and files


def render_images(split: str, n: int, image_size: int = 128) -> np.ndarray:
    """The first n scenes of a split as one uint8 array [n, S, S, 3] (e.g. to test an image tokenizer)."""
    return np.stack(
        [np.asarray(sample(split, i, image_size)[0].convert("RGB"), dtype=np.uint8) for i in range(n)]
    )


def iter_samples(
    split: str, n: int, image_size: int = 128, tasks: Iterable[str] | None = None
) -> Iterator[tuple[Image.Image, dict]]:
    """(image, record) pairs of the first n scenes of a split, every record of each scene in task order.

    Each record gets its own copy of the image so a task may edit it in place.
    """
    wanted = set(TASKS if tasks is None else tasks)
    for index in range(n):
        image, scene = sample(split, index, image_size)
        for record in scene_records(scene, record_rng(scene.seed)):
            if record["task"] in wanted:
                yield image.copy(), record


def write_split(split: str, n: int, out_dir: str | Path, image_size: int = 128) -> Path:
    """Write ``images/{seed}.png`` and ``annotations.jsonl`` (one line per image: scene + records)."""
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    with open(out / "annotations.jsonl", "w", encoding="utf-8") as f:
        for index in range(n):
            image, scene = sample(split, index, image_size)
            image.save(out / "images" / f"{scene.seed}.png")
            line = {
                "image": f"images/{scene.seed}.png",
                "split": split,
                "index": index,
                **scene.to_dict(),
                "records": scene_records(scene, record_rng(scene.seed)),
            }
            f.write(json.dumps(line) + "\n")
    return out


def load_split(out_dir: str | Path, tasks: Iterable[str] | None = None) -> Iterator[tuple[Image.Image, dict]]:
    """(image, record) pairs back from a directory written by write_split."""
    root = Path(out_dir)
    wanted = set(TASKS if tasks is None else tasks)
    with open(root / "annotations.jsonl", encoding="utf-8") as f:
        for line in f:
            entry = json.loads(line)
            records = [r for r in entry["records"] if r["task"] in wanted]
            if records:
                image = Image.open(root / entry["image"]).convert("RGB")
                for record in records:
                    yield image.copy(), record

"""Held-out shapes-world scenes from a second, independently written renderer.

    python bench/second_renderer.py --n 200 --out runs/second_renderer
    python train/evaluate.py --checkpoint checkpoints/default \
        --data jsonl:runs/second_renderer/records.jsonl \
        --tasks caption vqa grounding grounded_caption itm detection visual_entailment

The model trains on the exact pixels of `ofa_unified.data.shapes`. These scenes follow the same
spec (shapes, colours with +-10 jitter, small/large extents, neutral backgrounds, separated objects)
but are drawn with separate geometry and rasterisation (signed tests on a 5x5 supersampled grid,
its own star ratio, triangle, cross arm width), so a score here measures generalisation beyond the
training renderer's pixels rather than its memorisation. Layout draws from a numpy Generator seeded
900_000_000 + index, outside shapes.py's seed ranges. Language comes from shapes.scene_records, as
the records depend only on objects and boxes.

Output: `images/{seed}.png` and `annotations.jsonl` in `shapes.write_split`'s layout (one line per
image: scene + records, split "second_renderer"), plus `records.jsonl`, one record per line with its
image path, because that is the layout the library's `jsonl:` reader (and so evaluate's `--data`)
reads; no reader reads write_split's per-image layout.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ofa_unified.data import shapes

SEED_BASE = 900_000_000  # far outside shapes.py's train/val/test seeds [0, 30M)
SPLIT = "second_renderer"
# Tasks whose answer is text or boxes and whose records need only the scene (text infilling and the
# image outputs are left out): the ones this check scores.
KEEP_TASKS = tuple(
    t
    for t in shapes.TASKS
    if t not in ("text_infilling", "image_infilling", "text_to_image", "masked_image_modeling")
)
SUB = 5  # supersampling per axis (25 samples per pixel)
MIN_COVER = 0.2  # coverage below which an edge pixel is left untouched, so every drawn pixel visibly changes
GAP = 2.0  # px between any two objects' drawn boxes
NOISE_STD = (2.0, 6.0)
PLACE_TRIES = 150

# ---------------------------------------------------------------- geometry (unit square [-1, 1]^2, y down)


def _star_vertices(points: int = 5, inner: float = 0.42) -> np.ndarray:
    """A 5-point star, tip up, recentred so its vertical extent is symmetric about 0."""
    angles = -np.pi / 2 + np.arange(2 * points) * np.pi / points
    radius = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
    verts = np.stack([radius * np.cos(angles), radius * np.sin(angles)], 1)
    verts[:, 1] -= (verts[:, 1].max() + verts[:, 1].min()) / 2
    return verts


_TRIANGLE = np.array([[0.0, -0.9], [0.96, 0.86], [-0.96, 0.86]])  # apex up
_STAR = _star_vertices()
SQUARE_HALF = 0.84
CROSS_ARM = 0.3  # half-width of each bar of the plus sign
CROSS_LENGTH = 0.97


def _in_polygon(u: np.ndarray, v: np.ndarray, verts: np.ndarray) -> np.ndarray:
    """Even-odd crossing test against every edge at once (works for the concave star)."""
    inside = np.zeros(u.shape, bool)
    for (x1, y1), (x2, y2) in zip(verts, np.roll(verts, -1, 0), strict=True):
        if y1 == y2:
            continue  # a horizontal edge is never crossed by a horizontal ray
        straddles = (y1 > v) != (y2 > v)
        x_cross = x1 + (v - y1) * (x2 - x1) / (y2 - y1)
        inside ^= straddles & (u < x_cross)
    return inside


_INSIDE: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "circle": lambda u, v: u * u + v * v <= 1.0,
    "square": lambda u, v: np.maximum(np.abs(u), np.abs(v)) <= SQUARE_HALF,
    "diamond": lambda u, v: np.abs(u) + np.abs(v) <= 1.0,
    "cross": lambda u, v: (
        ((np.abs(u) <= CROSS_ARM) & (np.abs(v) <= CROSS_LENGTH))
        | ((np.abs(v) <= CROSS_ARM) & (np.abs(u) <= CROSS_LENGTH))
    ),
    "triangle": lambda u, v: _in_polygon(u, v, _TRIANGLE),
    "star": lambda u, v: _in_polygon(u, v, _STAR),
}
assert set(_INSIDE) == set(shapes.SHAPES)


def coverage(shape: str, cx: float, cy: float, extent: float, width: int, height: int) -> np.ndarray:
    """Fraction of each pixel inside the shape (float [H, W]), zero below MIN_COVER.

    Only the window around the nominal box is sampled; samples sit at pixel-edge coordinates
    i + (k + 0.5) / SUB, so pixel column i spans [i, i + 1) as the boxes do.
    """
    half = extent / 2
    x0, x1 = max(0, int(np.floor(cx - half)) - 1), min(width, int(np.ceil(cx + half)) + 1)
    y0, y1 = max(0, int(np.floor(cy - half)) - 1), min(height, int(np.ceil(cy + half)) + 1)
    offsets = (np.arange(SUB) + 0.5) / SUB
    xs = (np.arange(x0, x1)[:, None] + offsets[None]).ravel()
    ys = (np.arange(y0, y1)[:, None] + offsets[None]).ravel()
    u, v = np.meshgrid((xs - cx) / half, (ys - cy) / half)
    hits = _INSIDE[shape](u, v).astype(np.float32)
    local = hits.reshape(y1 - y0, SUB, x1 - x0, SUB).mean(axis=(1, 3))
    out = np.zeros((height, width), np.float32)
    out[y0:y1, x0:x1] = np.where(local >= MIN_COVER, local, 0.0)
    return out


def mask_box(mask: np.ndarray) -> list[float]:
    """[x0, y0, x1, y1] in pixel-edge coordinates of the True pixels."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return [float(cols[0]), float(rows[0]), float(cols[-1] + 1), float(rows[-1] + 1)]


def _apart(a: list[float], b: list[float], gap: float = GAP) -> bool:
    return a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1]


# ---------------------------------------------------------------- scenes


def _tone(rng: np.random.Generator) -> tuple[int, int, int]:
    """A neutral grey, light or dark, each channel tinted by at most +-TINT."""
    lo, hi = shapes.LIGHT_TONES if rng.random() < 0.5 else shapes.DARK_TONES
    grey = int(rng.integers(lo, hi + 1))
    tint = rng.integers(-shapes.TINT, shapes.TINT + 1, 3)
    return tuple(int(c) for c in np.clip(grey + tint, 0, 255))


def _background(rng: np.random.Generator) -> shapes.Background:
    kind = str(rng.choice(["plain", "gradient", "noise"]))
    if kind == "gradient":
        return shapes.Background(kind, [_tone(rng), _tone(rng)], angle=float(rng.uniform(0, 360)))
    if kind == "noise":
        return shapes.Background(kind, [_tone(rng)], noise=float(rng.uniform(*NOISE_STD)))
    return shapes.Background(kind, [_tone(rng)])


def _try_place(
    rng: np.random.Generator, shape: str, size: str, side: int, boxes: list[list[float]]
) -> tuple[float, float, float, list[float]] | None:
    """Rejection-sample a centre and extent whose drawn box is inside and GAP clear of the others."""
    lo, hi = shapes.SIZE_RANGE[size]
    for _ in range(PLACE_TRIES):
        extent = float(rng.uniform(lo, hi) * side)
        half = extent / 2 + 1.0  # the nominal box plus a pixel stays inside
        cx, cy = (float(rng.uniform(half, side - half)) for _ in range(2))
        cover = coverage(shape, cx, cy, extent, side, side)
        box = mask_box(cover > 0)
        if all(_apart(box, other) for other in boxes):
            return cx, cy, extent, box
    return None


def make_scene(index: int, side: int = 128) -> shapes.Scene:
    """Lay out scene `index` from seed SEED_BASE + index alone (numpy Generator, no global state)."""
    seed = SEED_BASE + index
    rng = np.random.default_rng(seed)
    background = _background(rng)
    objects: list[shapes.ShapeObject] = []
    for _ in range(int(rng.integers(1, shapes.MAX_OBJECTS + 1))):
        shape = str(rng.choice(shapes.SHAPES))
        color = str(rng.choice(list(shapes.COLORS)))
        size = str(rng.choice(shapes.SIZES))
        boxes = [o.box for o in objects]
        spot = _try_place(rng, shape, size, side, boxes)
        if spot is None and size == "large":
            size = "small"  # a crowded scene keeps its object count with a smaller one
            spot = _try_place(rng, shape, size, side, boxes)
        if spot is None:
            continue
        cx, cy, extent, box = spot
        jitter = rng.integers(-shapes.COLOR_JITTER, shapes.COLOR_JITTER + 1, 3)
        rgb = tuple(int(c) for c in np.clip(np.array(shapes.COLORS[color]) + jitter, 0, 255))
        objects.append(shapes.ShapeObject(shape, color, size, box, rgb, (cx, cy), extent))
    return shapes.Scene(seed, side, side, background, objects)


# ---------------------------------------------------------------- drawing


def background_pixels(scene: shapes.Scene) -> np.ndarray:
    """Float [H, W, 3] background; the noise is seeded by the scene so it can be redrawn alone."""
    bg, h, w = scene.background, scene.height, scene.width
    first = np.array(bg.colors[0], np.float64)
    if bg.kind == "gradient":
        theta = np.deg2rad(bg.angle)
        ys, xs = np.mgrid[0:h, 0:w] + 0.5
        proj = (xs - w / 2) * np.cos(theta) + (ys - h / 2) * np.sin(theta)
        t = (proj - proj.min()) / max(proj.max() - proj.min(), 1e-9)
        return first + t[..., None] * (np.array(bg.colors[1], np.float64) - first)
    pixels = np.broadcast_to(first, (h, w, 3)).copy()
    if bg.kind == "noise":
        grain = np.random.default_rng([scene.seed, 1]).normal(0.0, bg.noise, (h, w, 1))
        pixels += grain  # the same value on every channel: grey noise
    return pixels


def to_uint8(pixels: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(pixels), 0, 255).astype(np.uint8)


def draw(scene: shapes.Scene) -> tuple[Image.Image, list[np.ndarray]]:
    """The scene's RGB image and each object's coverage (float [H, W], > 0 where it drew)."""
    pixels = background_pixels(scene)
    covers = []
    for obj in scene.objects:
        alpha = coverage(obj.shape, *obj.center, obj.extent, scene.width, scene.height)
        pixels = pixels * (1 - alpha[..., None]) + np.array(obj.rgb, np.float64) * alpha[..., None]
        covers.append(alpha)
    return Image.fromarray(to_uint8(pixels), "RGB"), covers


def records(scene: shapes.Scene) -> list[dict]:
    """Ground truth from shapes.py's language code, text/box tasks only."""
    return [r for r in shapes.scene_records(scene, shapes.record_rng(scene.seed)) if r["task"] in KEEP_TASKS]


# ---------------------------------------------------------------- files


def write(n: int, out_dir: str | Path, side: int = 128) -> Path:
    """write_split's layout (images/, annotations.jsonl) plus a flat records.jsonl for the jsonl reader."""
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    with (
        open(out / "annotations.jsonl", "w", encoding="utf-8") as per_image,
        open(out / "records.jsonl", "w", encoding="utf-8") as flat,
    ):
        for index in range(n):
            scene = make_scene(index, side)
            image, _ = draw(scene)
            rel = f"images/{scene.seed}.png"
            image.save(out / rel)
            recs = records(scene)
            line = {"image": rel, "split": SPLIT, "index": index, **scene.to_dict(), "records": recs}
            per_image.write(json.dumps(line) + "\n")
            for rec in recs:
                flat.write(json.dumps({"image": rel, **rec}) + "\n")
    return out


def contact_sheet(indices: list[int], path: str | Path, side: int = 128, scale: int = 2) -> Path:
    """Each scene twice, plain and with its boxes and labels, to eyeball shapes, colours and boxes."""
    cell = side * scale
    cols = 4
    rows = -(-len(indices) // cols)
    sheet = Image.new("RGB", (cols * 2 * cell + (cols - 1) * 8, rows * cell + (rows - 1) * 8), "white")
    for k, index in enumerate(indices):
        scene = make_scene(index, side)
        image = draw(scene)[0].resize((cell, cell), Image.NEAREST)
        boxed = image.copy()
        pen = ImageDraw.Draw(boxed)
        for obj in scene.objects:
            x0, y0, x1, y1 = (c * scale for c in obj.box)
            pen.rectangle([x0 - 1, y0 - 1, x1, y1], outline=(255, 255, 255))
            pen.text((x0, max(0, y0 - 11)), f"{obj.size[0]} {obj.color} {obj.shape}", fill=(255, 255, 255))
        x, y = (k % cols) * (2 * cell + 8), (k // cols) * (cell + 8)
        sheet.paste(image, (x, y))
        sheet.paste(boxed, (x + cell, y))
    sheet.save(path)
    return Path(path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=200, help="scenes")
    parser.add_argument("--out", type=Path, default=Path("runs/second_renderer"))
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--sheet", type=Path, help="also save a contact sheet of the first 8 scenes here")
    args = parser.parse_args(argv)
    out = write(args.n, args.out, args.image_size)
    if args.sheet:
        contact_sheet(list(range(8)), args.sheet, args.image_size)
    print(json.dumps({"out": str(out), "split": SPLIT, "n": args.n, "records": str(out / "records.jsonl")}))


if __name__ == "__main__":
    main()

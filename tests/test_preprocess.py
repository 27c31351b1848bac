import io
import random
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from ofa_unified.data.preprocess import (
    BoxMap,
    ImageDecodeError,
    ImageTooLargeError,
    ImageTransform,
    UnsupportedImageError,
    image_to_tensor,
    load_image,
    tensor_to_image,
)


def encode(im: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A tiny valid PNG whose IHDR is rewritten to claim width x height (IDAT stays 1x1)."""
    data = bytearray(encode(Image.new("L", (1, 1))))
    ihdr = 8  # signature, then length(4) type(4) data(13) crc(4)
    data[ihdr + 8 : ihdr + 16] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr + 4 : ihdr + 21]))
    data[ihdr + 21 : ihdr + 25] = struct.pack(">I", crc)
    return bytes(data)


# ---------------------------------------------------------------------------- load_image


def test_grayscale_png_becomes_rgb():
    im = load_image(encode(Image.new("L", (5, 3), 77)))
    assert im.mode == "RGB" and im.size == (5, 3)
    assert im.getpixel((2, 1)) == (77, 77, 77)


def test_rgba_composites_on_white():
    src = Image.new("RGBA", (4, 2), (255, 0, 0, 0))
    src.putpixel((0, 0), (255, 0, 0, 255))
    src.putpixel((1, 0), (0, 0, 0, 128))
    im = load_image(encode(src))
    assert im.getpixel((0, 0)) == (255, 0, 0)  # opaque stays
    assert im.getpixel((3, 1)) == (255, 255, 255)  # transparent -> white, not black or red
    assert all(abs(c - 127) <= 1 for c in im.getpixel((1, 0)))  # half black over white


def test_la_composites_on_white():
    src = Image.new("LA", (2, 2), (0, 0))
    src.putpixel((0, 0), (40, 255))
    im = load_image(encode(src))
    assert im.getpixel((0, 0)) == (40, 40, 40)
    assert im.getpixel((1, 1)) == (255, 255, 255)


def test_cmyk_jpeg():
    src = Image.new("CMYK", (16, 16), (255, 0, 0, 0))  # pure cyan
    src.paste((0, 0, 0, 0), (0, 0, 8, 16))  # left half: no ink = white
    im = load_image(encode(src, "JPEG", quality=95))
    assert im.mode == "RGB"
    assert all(abs(a - b) <= 8 for a, b in zip(im.getpixel((2, 8)), (255, 255, 255), strict=True))
    assert all(abs(a - b) <= 8 for a, b in zip(im.getpixel((13, 8)), (0, 255, 255), strict=True))


def test_16bit_png_is_scaled_not_clipped():
    a = np.array([[0, 32768, 65535]], dtype=np.uint16)
    raw = encode(Image.fromarray(a))
    assert Image.open(io.BytesIO(raw)).mode.startswith("I")
    im = load_image(raw)
    assert [im.getpixel((x, 0))[0] for x in range(3)] == [0, 128, 255]


def test_palette_with_and_without_transparency():
    src = Image.new("P", (3, 1))
    src.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    src.putpixel((1, 0), 1)
    im = load_image(encode(src))
    assert im.getpixel((0, 0)) == (255, 0, 0) and im.getpixel((1, 0)) == (0, 0, 255)
    im = load_image(encode(src, transparency=0))
    assert im.getpixel((0, 0)) == (255, 255, 255) and im.getpixel((1, 0)) == (0, 0, 255)


def test_exif_orientation_6_rotates_clockwise():
    src = Image.new("RGB", (40, 20), (0, 0, 0))
    src.paste((255, 0, 0), (0, 0, 8, 8))  # stored top-left corner marked red
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    im = load_image(encode(src, "JPEG", quality=95, exif=exif.tobytes()))
    assert im.size == (20, 40)  # width and height swap
    r, g, b = im.getpixel((16, 3))  # the stored top-left lands at the displayed top-right
    assert r > 200 and g < 60 and b < 60
    assert max(im.getpixel((3, 3))) < 60 and max(im.getpixel((3, 36))) < 60


def test_load_from_path(tmp_path):
    p = tmp_path / "x.png"
    Image.new("RGB", (3, 2), (1, 2, 3)).save(p)
    assert load_image(p).getpixel((0, 0)) == (1, 2, 3)
    assert load_image(str(p)).size == (3, 2)
    with pytest.raises(FileNotFoundError):
        load_image(tmp_path / "missing.png")


def test_truncated_images_raise_decode_error():
    jpeg = encode(Image.effect_noise((64, 64), 50).convert("RGB"), "JPEG")
    with pytest.raises(ImageDecodeError, match="truncated|corrupt"):
        load_image(jpeg[: len(jpeg) // 2])
    png = encode(Image.effect_noise((64, 64), 50))
    with pytest.raises(ImageDecodeError):
        load_image(png[: len(png) // 2])


def test_random_bytes_are_unsupported():
    data = random.Random(0).randbytes(500)
    with pytest.raises(UnsupportedImageError, match="identify"):
        load_image(data)
    with pytest.raises(ImageDecodeError):  # the 415 error is also a decode error
        load_image(b"")


def test_decompression_bomb_header_refused_before_decoding():
    with pytest.raises(ImageTooLargeError, match=r"limit of 1000000 pixels") as info:
        load_image(png_claiming(5000, 4000), max_pixels=1_000_000)
    assert info.value.size == (5000, 4000) and info.value.limit == 1_000_000
    # Past Pillow's own bomb check the error is still ours, with the pixel count.
    with pytest.raises(ImageTooLargeError, match="pixels, above the limit"):
        load_image(png_claiming(100_000, 100_000))


def test_real_image_over_a_low_limit():
    raw = encode(Image.new("RGB", (200, 100)))
    with pytest.raises(ImageTooLargeError, match="200x100 = 20000 pixels, above the limit of 19999"):
        load_image(raw, max_pixels=19_999)
    assert load_image(raw, max_pixels=20_000).size == (200, 100)


# ---------------------------------------------------------------------------- tensors and transforms


def test_tensor_round_trip_is_exact():
    im = Image.effect_noise((7, 5), 80).convert("RGB")
    t = image_to_tensor(im)
    assert t.shape == (3, 5, 7) and t.min() >= -1 and t.max() <= 1
    assert np.array_equal(np.asarray(tensor_to_image(t)), np.asarray(im))
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    assert np.array_equal(
        np.asarray(tensor_to_image(image_to_tensor(im, mean, std), mean, std)), np.asarray(im)
    )
    with pytest.raises(ValueError, match="3, H, W"):
        tensor_to_image(t[None])


@pytest.mark.parametrize("mode", ["resize", "letterbox"])
def test_transform_shape_and_range(mode):
    im = Image.effect_noise((50, 30), 100).convert("RGB")
    t, bmap = ImageTransform(32, mode=mode)(im)
    assert t.shape == (3, 32, 32) and t.dtype == torch.float32
    assert float(t.min()) >= -1.0 and float(t.max()) <= 1.0
    assert bmap.image_size == (50, 30) and bmap.model_size == (32, 32)


def test_letterbox_pads_with_zero_after_normalisation():
    t, bmap = ImageTransform(40, mode="letterbox")(Image.new("RGB", (80, 40), (255, 255, 255)))
    assert bmap.offset == (0, 10)
    assert t[:, :10].abs().max() < 0.01  # top padding
    assert torch.all(t[:, 10:30] == 1.0)  # the white image
    assert t[:, 30:].abs().max() < 0.01


def test_resize_boxmap_values():
    bmap = ImageTransform(64).box_map((200, 100))
    assert bmap.to_model([20, 10, 100, 50]) == pytest.approx([6.4, 6.4, 32, 32])
    assert bmap.to_image([6.4, 6.4, 32, 32]) == pytest.approx([20, 10, 100, 50])
    assert bmap.to_model([-5, -5, 300, 300]) == [0, 0, 64, 64]  # clamped


def test_letterbox_boxmap_values():
    bmap = ImageTransform(64, mode="letterbox").box_map((200, 100))
    assert bmap.to_model([0, 0, 200, 100]) == pytest.approx([0, 16, 64, 48])
    assert bmap.to_image([0, 0, 64, 64]) == pytest.approx([0, 0, 200, 100])  # padding clamps to the edge


@pytest.mark.parametrize("mode", ["resize", "letterbox"])
@pytest.mark.parametrize("size", [(200, 100), (50, 150), (64, 64)])
def test_boxmap_round_trip(mode, size):
    bmap = ImageTransform(48, mode=mode).box_map(size)
    rng = random.Random(1)
    w, h = size
    for _ in range(20):
        x0, x1 = sorted(rng.uniform(0, w) for _ in range(2))
        y0, y1 = sorted(rng.uniform(0, h) for _ in range(2))
        m = bmap.to_model([x0, y0, x1, y1])
        assert all(0 <= v <= 48 for v in m)
        assert bmap.to_image(m) == pytest.approx([x0, y0, x1, y1], abs=1e-6)


@pytest.mark.parametrize("mode", ["resize", "letterbox"])
@pytest.mark.parametrize("size", [(120, 60), (45, 90)])
def test_boxes_follow_the_pixels(mode, size):
    """A white rectangle drawn at a box lands where BoxMap.to_model puts the box."""
    box = [size[0] * 0.25, size[1] * 0.4, size[0] * 0.75, size[1] * 0.9]
    im = Image.new("RGB", size, (0, 0, 0))
    ImageDraw.Draw(im).rectangle([round(v) for v in box], fill=(255, 255, 255))
    t, bmap = ImageTransform(60, mode=mode)(im)
    x0, y0, x1, y1 = bmap.to_model(box)
    grey = t.mean(0)
    assert grey[int((y0 + y1) / 2), int((x0 + x1) / 2)] > 0.9
    assert grey[int(y0 + 2) : int(y1 - 2), int(x0 + 2) : int(x1 - 2)].min() > 0.5
    assert grey[int(max(y0 - 4, 0)), int((x0 + x1) / 2)] < 0.1  # above the box: not white


def test_augment_is_seeded_and_mild():
    im = Image.effect_noise((24, 24), 60).convert("RGB")
    tf = ImageTransform(16, augment=True)
    a, _ = tf(im, random.Random(3))
    b, _ = tf(im, random.Random(3))
    c, _ = tf(im, torch.Generator().manual_seed(3))
    d, _ = tf(im, torch.Generator().manual_seed(3))
    plain, _ = ImageTransform(16)(im)
    assert torch.equal(a, b) and torch.equal(c, d)
    assert not torch.equal(a, plain)
    assert (a - plain).abs().mean() < 0.3
    assert float(a.min()) >= -1 and float(a.max()) <= 1


def test_transform_rejects_bad_arguments():
    with pytest.raises(ValueError, match="mode"):
        ImageTransform(32, mode="crop")
    with pytest.raises(ValueError, match="mean/std"):
        ImageTransform(32, mean=(0.5, 0.5))(Image.new("RGB", (4, 4)))


def test_boxmap_is_plain_data():
    bmap = BoxMap((10, 20), (5, 5), (0.5, 0.25), (0.0, 0.0))
    assert bmap.to_model([2, 4, 10, 20]) == [1, 1, 5, 5]

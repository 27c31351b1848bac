"""Image decoding and the model's image transform.

`load_image` turns untrusted bytes or files into an RGB PIL image, refusing what it cannot decode
safely; the server maps its errors to HTTP codes (`ImageTooLargeError` -> 413,
`UnsupportedImageError` -> 415, `ImageDecodeError` -> 422).

`ImageTransform` does what OFA fine-tuning does: resize to a square S x S without keeping the aspect
ratio (bicubic) and normalise with mean = std = 0.5 to [-1, 1]. A letterbox mode keeps the aspect
ratio and pads instead. Each call also returns a `BoxMap`, so boxes given in pixels of the original
image go through the same geometry as the image, and predicted boxes come back in original pixels.
"""

from __future__ import annotations

import io
import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageOps

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "BoxMap",
    "ImageDecodeError",
    "ImageError",
    "ImageTooLargeError",
    "ImageTransform",
    "UnsupportedImageError",
    "image_to_tensor",
    "load_image",
    "tensor_to_image",
]

logger = logging.getLogger(__name__)

# 50 megapixels (e.g. 8660 x 5773): far above any training resolution, far below what exhausts memory.
DEFAULT_MAX_PIXELS = 50_000_000


class ImageError(ValueError):
    """Base class of the errors `load_image` raises for bad input."""


class ImageDecodeError(ImageError):
    """The bytes are an image format we know but the data is truncated or corrupt (HTTP 422)."""


class UnsupportedImageError(ImageDecodeError):
    """The bytes are not an image format Pillow can identify, or its mode cannot become RGB (HTTP 415)."""


class ImageTooLargeError(ImageError):
    """The image header claims more pixels than allowed: a decompression bomb or just too big (HTTP 413)."""

    def __init__(self, pixels: int, limit: int, size: tuple[int, int] | None = None) -> None:
        self.pixels, self.limit, self.size = pixels, limit, size
        dims = f"{size[0]}x{size[1]} = " if size else ""
        super().__init__(f"image is {dims}{pixels} pixels, above the limit of {limit} pixels")


def load_image(
    data: bytes | bytearray | memoryview | str | Path, max_pixels: int = DEFAULT_MAX_PIXELS
) -> Image.Image:
    """Decode `data` (encoded bytes, or a file path) to an RGB image with EXIF orientation applied.

    The pixel count is checked from the header before any pixel is decoded, so a small file that
    claims a huge size costs nothing. A missing file raises FileNotFoundError (not an image error).
    """
    if isinstance(data, (str, Path)):
        with open(data, "rb") as f:
            return _decode(f, max_pixels)
    return _decode(io.BytesIO(bytes(data)), max_pixels)


def _decode(fp: io.IOBase, max_pixels: int) -> Image.Image:
    try:
        im = Image.open(fp)
    except Image.DecompressionBombError as e:
        # Pillow's own check (at 2 x Image.MAX_IMAGE_PIXELS) fired before we could read the size.
        pil_limit = 2 * (Image.MAX_IMAGE_PIXELS or 0)
        claimed = next((int(w) for w in str(e).replace("(", " ").split() if w.isdigit()), 0)
        raise ImageTooLargeError(claimed, min(max_pixels, pil_limit)) from e
    except Image.UnidentifiedImageError as e:
        raise UnsupportedImageError("cannot identify the image format (not an image, or unsupported)") from e
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageDecodeError(f"cannot read the image header: {e}") from e
    width, height = im.size
    if width * height > max_pixels:
        raise ImageTooLargeError(width * height, max_pixels, (width, height))
    try:
        im.load()
    except (OSError, SyntaxError, ValueError, EOFError, MemoryError) as e:
        raise ImageDecodeError(f"corrupt or truncated {im.format} image: {e}") from e
    try:
        im = ImageOps.exif_transpose(im)
    except Exception as e:  # broken EXIF is common in the wild; the pixels are still fine
        logger.warning("ignoring unreadable EXIF orientation: %s", e)
    return _to_rgb(im)


def _to_rgb(im: Image.Image) -> Image.Image:
    """Convert any decoded mode to RGB the way a viewer would show it."""
    if im.mode == "RGB":
        return im
    if im.mode.startswith("I;16") or im.mode == "I":
        # 16-bit grey: Pillow's own convert clips at 255 instead of scaling. "I" is taken as 16-bit too
        # (Pillow decodes 16-bit TIFF/PGM data to it); values outside 0..65535 are clipped.
        a = np.asarray(im, dtype=np.float64)
        grey = np.round(np.clip(a, 0, 65535) / 257.0).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    try:
        if "A" in im.getbands() or "a" in im.getbands() or "transparency" in im.info:
            rgba = im.convert("RGBA")  # palette/grey transparency and premultiplied alpha included
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(white, rgba).convert("RGB")
        return im.convert("RGB")
    except ValueError as e:
        raise UnsupportedImageError(f"cannot convert image mode {im.mode!r} to RGB") from e


def _channels(value: float | Sequence[float]) -> torch.Tensor:
    t = torch.as_tensor(value, dtype=torch.float32).flatten()
    if t.numel() == 1:
        t = t.expand(3)
    if t.numel() != 3:
        raise ValueError(f"mean/std must be one number or three, got {list(t.tolist())}")
    return t.reshape(3, 1, 1)


def image_to_tensor(
    image: Image.Image, mean: float | Sequence[float] = 0.5, std: float | Sequence[float] = 0.5
) -> torch.Tensor:
    """RGB PIL image -> float tensor [3, H, W], (x / 255 - mean) / std (OFA: [-1, 1])."""
    a = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    t = torch.from_numpy(a).permute(2, 0, 1).contiguous()
    return (t - _channels(mean)) / _channels(std)


def tensor_to_image(
    tensor: torch.Tensor, mean: float | Sequence[float] = 0.5, std: float | Sequence[float] = 0.5
) -> Image.Image:
    """Inverse of `image_to_tensor` for a [3, H, W] tensor (values outside the range are clipped)."""
    if tensor.dim() != 3 or tensor.shape[0] != 3:
        raise ValueError(f"expected a [3, H, W] tensor, got shape {tuple(tensor.shape)}")
    t = tensor.detach().to("cpu", torch.float32) * _channels(std) + _channels(mean)
    a = (t.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(a, "RGB")


@dataclass(frozen=True)
class BoxMap:
    """Affine map between original image pixels and model input pixels: model = image * scale + offset.

    Boxes are [x0, y0, x1, y1] (x first). Both directions clamp to the destination frame, so a box
    predicted in letterbox padding maps to the image edge rather than outside the image.
    """

    image_size: tuple[int, int]  # (W, H) of the original image
    model_size: tuple[int, int]  # (W, H) of the model input
    scale: tuple[float, float]  # (sx, sy)
    offset: tuple[float, float]  # (ox, oy)

    def to_model(self, box: Sequence[float]) -> list[float]:
        (sx, sy), (ox, oy) = self.scale, self.offset
        x0, y0, x1, y1 = box
        return _clamp([x0 * sx + ox, y0 * sy + oy, x1 * sx + ox, y1 * sy + oy], self.model_size)

    def to_image(self, box: Sequence[float]) -> list[float]:
        (sx, sy), (ox, oy) = self.scale, self.offset
        x0, y0, x1, y1 = box
        return _clamp([(x0 - ox) / sx, (y0 - oy) / sy, (x1 - ox) / sx, (y1 - oy) / sy], self.image_size)


def _clamp(box: list[float], size: tuple[int, int]) -> list[float]:
    w, h = size
    return [min(max(v, 0.0), float(lim)) for v, lim in zip(box, (w, h, w, h), strict=True)]


class ImageTransform:
    """PIL image -> (normalised float tensor [3, S, S], BoxMap).

    mode="resize" is OFA's: stretch to S x S, bicubic, so bins quantise x by W and y by H.
    mode="letterbox" keeps the aspect ratio, centres the image and pads with the mean colour
    (0 after normalisation).

    augment=True applies mild photometric jitter only (brightness, contrast, saturation factors in
    [1 - jitter, 1 + jitter]). No flips: a horizontal flip turns "the dog on the left" into a wrong
    label and breaks every left/right question and referring expression. No random crops either:
    they would cut boxes and drop objects that the text mentions.
    """

    def __init__(
        self,
        size: int,
        mode: str = "resize",
        mean: float | Sequence[float] = 0.5,
        std: float | Sequence[float] = 0.5,
        augment: bool = False,
        jitter: float = 0.2,
    ) -> None:
        if mode not in ("resize", "letterbox"):
            raise ValueError(f"mode must be 'resize' or 'letterbox', got {mode!r}")
        if size <= 0:
            raise ValueError(f"size must be positive, got {size}")
        if not 0 <= jitter < 1:
            raise ValueError(f"jitter must be in [0, 1), got {jitter}")
        self.size, self.mode, self.augment, self.jitter = size, mode, augment, jitter
        self.mean, self.std = mean, std

    def box_map(self, image_size: tuple[int, int]) -> BoxMap:
        """The geometry this transform applies to an image of `image_size` (W, H)."""
        w, h = image_size
        s = self.size
        if self.mode == "resize":
            return BoxMap((w, h), (s, s), (s / w, s / h), (0.0, 0.0))
        nw, nh = self._letterbox_size(w, h)
        return BoxMap((w, h), (s, s), (nw / w, nh / h), ((s - nw) // 2, (s - nh) // 2))

    def _letterbox_size(self, w: int, h: int) -> tuple[int, int]:
        r = self.size / max(w, h)
        return max(1, round(w * r)), max(1, round(h * r))

    def __call__(
        self, image: Image.Image, rng: random.Random | torch.Generator | None = None
    ) -> tuple[torch.Tensor, BoxMap]:
        """Transform `image`; `rng` seeds the jitter (None: torch's global RNG, which DataLoader seeds)."""
        image = image.convert("RGB")
        bmap = self.box_map(image.size)
        s = self.size
        if self.mode == "resize":
            out = image.resize((s, s), Image.Resampling.BICUBIC)
        else:
            nw, nh = self._letterbox_size(*image.size)
            fill = tuple(int(round(m * 255)) for m in _channels(self.mean).flatten().tolist())
            out = Image.new("RGB", (s, s), fill)
            out.paste(
                image.resize((nw, nh), Image.Resampling.BICUBIC), (int(bmap.offset[0]), int(bmap.offset[1]))
            )
        if self.augment:
            out = self._jitter(out, rng)
        return image_to_tensor(out, self.mean, self.std), bmap

    def _jitter(self, image: Image.Image, rng: random.Random | torch.Generator | None) -> Image.Image:
        for enhancer in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
            factor = 1.0 + self.jitter * (2.0 * _uniform(rng) - 1.0)
            image = enhancer(image).enhance(factor)
        return image


def _uniform(rng: random.Random | torch.Generator | None) -> float:
    if isinstance(rng, random.Random):
        return rng.random()
    return float(torch.rand((), generator=rng))

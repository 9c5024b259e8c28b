"""Decode and preprocess images exactly like timm's eval transform for the manifest's input spec.

timm ``transforms_imagenet_eval`` (crop_mode "center"): resize the shorter side to
``floor(size / crop_pct)`` with the manifest's interpolation (torchvision rounding), center crop
to the size (torchvision's rounding, zero padding if smaller), to float / 255, normalise.
Runs in a thread pool: Pillow releases the GIL while decoding and resizing.
"""

from __future__ import annotations

import io
import math
import time
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import Executor

import numpy as np
from PIL import Image

from contract.errors import InvalidInput, PayloadTooLarge
from contract.images import to_rgb
from contract.manifest import InputSpec

# the image formats a request may use: the common web/camera formats. Pillow opens some 40 more
# (EPS runs Ghostscript; PSD, FITS, ICNS, ... are rarely fuzzed parsers): not from the network
FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "AVIF")

# above this many times the crop's pixels, the resize step resamples only the cropped region
MAX_RESIZE_FACTOR = 16

RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}


def _resize_size(w: int, h: int, spec: InputSpec) -> tuple[int, int]:
    """Target (w, h) of the resize step, as timm + torchvision compute it."""
    _, th, tw = spec.size
    sh, sw = math.floor(th / spec.crop_pct), math.floor(tw / spec.crop_pct)
    if spec.crop_mode == "squash":
        return sw, sh
    if sh == sw and spec.crop_mode != "border":  # torchvision Resize(int): shorter side, long truncated
        short, long = (w, h) if w <= h else (h, w)
        new_short, new_long = sh, int(sh * long / short)
        return (new_short, new_long) if w <= h else (new_long, new_short)
    # timm ResizeKeepRatio: shortest edge to its target ("center"), longest edge ("border")
    ratios = (h / sh, w / sw)
    ratio = max(ratios) if spec.crop_mode == "border" else min(ratios)
    return round(w / ratio), round(h / ratio)


def _center_crop(img: Image.Image, th: int, tw: int, fill: tuple[int, ...] = (0, 0, 0)) -> Image.Image:
    w, h = img.size
    if w < tw or h < th:  # torchvision pads (zeros; timm "border" mode: the mean), then crops
        padded = Image.new(img.mode, (max(w, tw), max(h, th)), fill)
        padded.paste(img, ((max(w, tw) - w) // 2, (max(h, th) - h) // 2))
        img, (w, h) = padded, padded.size
    top = round((h - th) / 2.0)
    left = round((w - tw) / 2.0)
    return img.crop((left, top, left + tw, top + th))


def transform(img: Image.Image, spec: InputSpec) -> np.ndarray:
    """RGB PIL image -> float32 [3, H, W], normalised."""
    _, th, tw = spec.size
    size = _resize_size(img.width, img.height, spec)
    resample = RESAMPLE.get(spec.interpolation, Image.Resampling.BILINEAR)
    if size[0] * size[1] > MAX_RESIZE_FACTOR * th * tw and size[0] >= tw and size[1] >= th:
        # extreme aspect ratio (1x100000): resizing the whole image first would build an intermediate
        # of millions of pixels (32 x 3.2M for a 1x100000 image at 32 px) only to crop it; resample
        # just the region the center crop keeps (Pillow's box: the same filter at the same positions,
        # up to float rounding, which can move a tap by one source pixel)
        sx, sy = img.width / size[0], img.height / size[1]
        top, left = round((size[1] - th) / 2.0), round((size[0] - tw) / 2.0)
        img = img.resize((tw, th), resample, box=(left * sx, top * sy, (left + tw) * sx, (top + th) * sy))
    elif size != img.size:
        img = img.resize(size, resample)
    fill = tuple(round(255 * v) for v in spec.mean) if spec.crop_mode == "border" else (0, 0, 0)
    img = _center_crop(img, th, tw, fill)
    x = np.asarray(img, dtype=np.float32) / np.float32(255.0)
    x = (x - np.asarray(spec.mean, np.float32)) / np.asarray(spec.std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


class Offload(Exception):
    """More pixels than the event loop may decode itself: decode in the pool instead."""


def decode(data: bytes, max_pixels: int, loop_max_pixels: int | None = None) -> Image.Image:
    """Encoded bytes -> RGB image. 413 over ``max_pixels`` (checked before decoding), 422 if undecodable;
    :class:`Offload` over ``loop_max_pixels`` (before decoding: the caller decodes it elsewhere)."""
    if not data:
        raise InvalidInput("empty image")
    try:
        img = Image.open(io.BytesIO(data), formats=FORMATS)  # Pillow's bomb warning: an error (below)
        if img.width * img.height > max_pixels:
            raise PayloadTooLarge(
                f"image of {img.width}x{img.height} pixels is over the limit of {max_pixels}"
            )
        if loop_max_pixels is not None and img.width * img.height > loop_max_pixels:
            raise Offload()
        img.load()
        return to_rgb(img)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise PayloadTooLarge(f"image over the pixel limit: {exc}") from None
    except (PayloadTooLarge, InvalidInput, Offload):
        raise
    except Image.UnidentifiedImageError:
        raise InvalidInput(f"cannot decode image: not one of the formats {', '.join(FORMATS)}") from None
    except Exception as exc:  # Pillow raises many types (OSError, SyntaxError, ValueError, ...)
        raise InvalidInput(f"cannot decode image: {type(exc).__name__}: {exc}") from None


def load_image(
    data: bytes, spec: InputSpec, max_pixels: int, loop_max_pixels: int | None = None
) -> np.ndarray:
    return transform(decode(data, max_pixels, loop_max_pixels), spec)


# One small image is decoded on the event loop: handing it to a thread and back costs more CPU than
# decoding it (a 28x28 PNG: ~40 us of decode + resize against ~80 us of hand-off, measured with
# `mtserve bench api-cpu`). Larger bodies or more pixels go to the pool (they would stall the loop).
LOOP_MAX_BYTES = 16 * 1024
LOOP_MAX_PIXELS = 128 * 128


class Preprocessor:
    """Decode + transform (one small image on the event loop, else in a thread pool); reports each
    image's time to ``observe``."""

    def __init__(
        self, spec: InputSpec, pool: Executor, max_pixels: int, observe: Callable[[float], None] | None = None
    ):
        self.spec = spec
        self.pool = pool
        self.max_pixels = max_pixels
        self.observe = observe
        Image.MAX_IMAGE_PIXELS = max_pixels  # Pillow's own bomb guard, at 2x this it raises
        # and over 1x it warns: an error too, set once for the process (``catch_warnings`` per image
        # cost the event loop a few microseconds per request and is not thread-safe in the pool)
        warnings.filterwarnings("error", category=Image.DecompressionBombWarning)

    def _one(self, data: bytes, loop_max_pixels: int | None = None) -> np.ndarray:
        t0 = time.perf_counter()
        try:
            x = load_image(data, self.spec, self.max_pixels, loop_max_pixels)
        except Offload:
            raise  # not decoded here: the pool decodes (and observes) it
        except Exception:
            self._observe(t0)
            raise
        self._observe(t0)
        return x

    def _observe(self, t0: float) -> None:
        if self.observe is not None:
            self.observe(time.perf_counter() - t0)

    def inline(self, blobs: Sequence[bytes]) -> np.ndarray | None:
        """One small image decoded on the calling thread (the event loop's): float32 [1, 3, H, W]; None
        when the request is for the pool (several images, a large body, many pixels). No coroutine:
        the lean path calls it first, and awaits :meth:`__call__` only for the pool's share."""
        if len(blobs) == 1 and len(blobs[0]) <= LOOP_MAX_BYTES:
            try:
                return self._one(blobs[0], LOOP_MAX_PIXELS)[None]
            except Offload:
                return None
        return None

    async def __call__(self, blobs: Sequence[bytes]) -> np.ndarray:
        """Encoded images -> float32 [N, 3, H, W] (one small image on the event loop, else the pool)."""
        import asyncio

        if (x := self.inline(blobs)) is not None:
            return x
        loop = asyncio.get_running_loop()
        arrays = await asyncio.gather(*(loop.run_in_executor(self.pool, self._one, b) for b in blobs))
        return np.stack(arrays)

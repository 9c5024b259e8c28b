"""Hostile and odd inputs against the REAL service: the tiny exported bundle, onnxruntime, the full
app (middlewares, error table) through httpx's ASGI transport.

Every hostile request must get its 4xx with the JSON error body of DESIGN.md §5
(``{"error": {"code", "message"}}``, /v2 included), never a 5xx; after each one the app is still
live and ready, a good request still succeeds, and ``/metrics`` holds no task label that is not in
the manifest. Odd images that ARE valid (1x1, 16-bit, CMYK, palette, alpha, animated, extreme
aspect ratio within the pixel limit) get 200 with the same scores as the image the trainer would
read from the same file (``training.imagefolder.to_rgb``), sent as a plain PNG.
"""

from __future__ import annotations

import base64
import io
import json
import struct
import zlib
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from functools import cache

import httpx
import numpy as np
import pytest
import pytest_asyncio
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from service.app import create_app
from service.settings import Settings

in_module_loop = pytest.mark.asyncio(loop_scope="module")  # the app (and its batcher) lives in one loop

MAX_BODY = 1 << 20  # max_body_mb=1
LIMIT_IMAGES = 4
MAX_PIXELS = 1_000_000
CODES = {
    404: {"unknown_task", "not_found"},
    405: {"method_not_allowed"},
    413: {"payload_too_large"},
    415: {"unsupported_media_type"},
    422: {"invalid_input"},
}
SEEN: Counter = Counter()  # status class of every hostile/odd request, for the summary


# -- the app ------------------------------------------------------------------------------------
@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def client(tiny_bundle) -> AsyncIterator[httpx.AsyncClient]:
    pixels = Image.MAX_IMAGE_PIXELS  # the Preprocessor sets Pillow's global guard: put it back after
    settings = Settings(
        bundle=tiny_bundle,
        max_wait_ms=1,
        max_body_mb=MAX_BODY / (1 << 20),
        max_images_per_request=LIMIT_IMAGES,
        max_pixels=MAX_PIXELS,
        timeout_ms=30_000,  # generous: the 2-core test machine is shared
        threads=1,
        preprocess_workers=2,
        warmup=False,
    )
    app = create_app(settings)
    try:
        async with app.router.lifespan_context(app):
            assert await app.state.service.wait_ready()
            transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
            async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=30) as c:
                c.tasks = frozenset(app.state.service.manifest.tasks)
                c.app = app
                yield c
    finally:
        Image.MAX_IMAGE_PIXELS = pixels


# -- image builders -----------------------------------------------------------------------------
def noise(w: int, h: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def smooth(w: int, h: int) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    return np.dstack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1), (x + y) % 256]).astype(np.uint8)


def save(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


@cache
def png(w: int = 40, h: int = 30, seed: int = 0) -> bytes:
    return save(Image.fromarray(noise(w, h, seed)), "PNG")


@cache
def jpeg(w: int = 40, h: int = 30) -> bytes:
    return save(Image.fromarray(noise(w, h, 1)), "JPEG")


@cache
def webp(w: int = 40, h: int = 30) -> bytes:
    return save(Image.fromarray(noise(w, h, 2)), "WEBP")


@cache
def gif(w: int = 40, h: int = 30) -> bytes:
    return save(Image.fromarray(noise(w, h, 3)).convert("P"), "GIF")


def chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


def raw_png(
    w: int, h: int, depth: int = 8, color: int = 2, rows: bytes = b"\0" * 16, extra: bytes = b""
) -> bytes:
    """A PNG written by hand: any IHDR (declared size, bit depth, colour type), any pixel data."""
    ihdr = struct.pack(">IIBBBBB", w, h, depth, color, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + extra
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


def png16_rgb(w: int = 24, h: int = 20) -> bytes:
    """48-bit RGB (16 bits a channel), which Pillow cannot write."""
    px = (smooth(w, h).astype(">u2") * 257).astype(">u2")
    return raw_png(w, h, 16, 2, b"".join(b"\0" + px[r].tobytes() for r in range(h)))


def png_bomb(side: int) -> bytes:
    """A real, valid gray PNG of side x side zeros: a few KB that decode to side^2 bytes."""
    return raw_png(side, side, 8, 0, b"\0" * ((side + 1) * side))


def text_bomb() -> bytes:
    """A 16x16 PNG with a zTXt chunk inflating to 64 MB (Pillow's MAX_TEXT_CHUNK guard)."""
    ztxt = b"k\0\0" + zlib.compress(b"\0" * (64 << 20), 9)
    ok = raw_png(16, 16, 8, 0, b"\0" * (17 * 16))
    return ok[:33] + chunk(b"zTXt", ztxt) + ok[33:]


def declared(data: bytes, fmt: str, w: int, h: int) -> bytes:
    """A valid image whose header now declares w x h."""
    if fmt == "JPEG":  # SOF0: FFC0, length, precision, height, width
        i = data.index(b"\xff\xc0")
        return data[: i + 5] + struct.pack(">HH", h, w) + data[i + 9 :]
    if fmt == "GIF":  # logical screen descriptor
        return data[:6] + struct.pack("<HH", w, h) + data[10:]
    if fmt == "BMP":  # BITMAPINFOHEADER
        return data[:18] + struct.pack("<ii", w, h) + data[26:]
    if fmt == "WEBP":  # VP8 key frame header: 14-bit width and height
        i = data.index(b"VP8 ") + 8 + 6
        return data[:i] + struct.pack("<HH", w, h) + data[i + 4 :]
    raise ValueError(fmt)


def animated(fmt: str) -> bytes:
    frames = [Image.fromarray(noise(36, 28, s)) for s in range(3)]
    if fmt == "GIF":
        frames = [f.convert("P") for f in frames]
    return save(frames[0], fmt, save_all=True, append_images=frames[1:], duration=50, loop=0)


def odd_images() -> dict[str, tuple[bytes, str]]:
    """Valid images with unusual modes and shapes: (bytes, content type)."""
    g = smooth(33, 27)[..., 0]
    rgb = Image.fromarray(smooth(33, 27))
    rgba = np.dstack([smooth(33, 27), (np.arange(33 * 27) % 256).reshape(27, 33).astype(np.uint8)])
    pal = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    pal.info["transparency"] = 3
    i16 = Image.fromarray((g.astype(np.uint16) * 257).astype(np.uint16))
    i16 = i16 if i16.mode.startswith("I;16") else i16.convert("I;16")
    return {
        "1x1-png": (save(Image.new("RGB", (1, 1), (200, 10, 10)), "PNG"), "image/png"),
        "1x1-jpeg": (save(Image.new("RGB", (1, 1), (10, 200, 10)), "JPEG"), "image/jpeg"),
        "1x1-webp": (save(Image.new("RGB", (1, 1), (10, 10, 200)), "WEBP"), "image/webp"),
        "1x1-gif": (save(Image.new("P", (1, 1), 7), "GIF"), "image/gif"),
        "1x5000-png": (save(Image.fromarray(smooth(1, 5000)), "PNG"), "image/png"),
        "5000x1-png": (save(Image.fromarray(smooth(5000, 1)), "PNG"), "image/png"),
        # 900k pixels, under the 1M limit: resizing it whole first took 30 s (32 x 28.8M intermediate)
        "1x900000-png": (save(Image.new("L", (1, 900_000), 9), "PNG"), "image/png"),
        "16bit-gray-png": (save(i16, "PNG"), "image/png"),
        "16bit-rgb-png": (png16_rgb(), "image/png"),
        "1bit-png": (save(Image.fromarray(g > 128), "PNG"), "image/png"),
        "gray-jpeg": (save(Image.fromarray(g, "L"), "JPEG"), "image/jpeg"),
        "cmyk-jpeg": (save(rgb.convert("CMYK"), "JPEG"), "image/jpeg"),
        "progressive-jpeg": (save(rgb, "JPEG", progressive=True, quality=80), "image/jpeg"),
        "palette-transparency-png": (save(pal, "PNG", transparency=3), "image/png"),
        "palette-transparency-gif": (save(pal, "GIF", transparency=3), "image/gif"),
        "la-png": (save(Image.fromarray(np.dstack([g, g[::-1]]), "LA"), "PNG"), "image/png"),
        "rgba-png": (save(Image.fromarray(rgba, "RGBA"), "PNG"), "image/png"),
        "rgba-webp": (save(Image.fromarray(rgba, "RGBA"), "WEBP", lossless=True), "image/webp"),
        "animated-gif": (animated("GIF"), "image/gif"),
        "animated-webp": (animated("WEBP"), "image/webp"),
        "animated-png": (animated("PNG"), "image/png"),
        "int32-tiff": (save(Image.fromarray(g.astype(np.int32) * 1000), "TIFF"), "image/tiff"),
        "float-tiff": (save(Image.fromarray(g.astype(np.float32) / 255), "TIFF"), "image/tiff"),
        "bmp": (save(rgb, "BMP"), "image/bmp"),
        "jpeg-sent-as-png": (save(rgb, "JPEG"), "image/png"),
        "png-as-octet-stream": (save(rgb, "PNG"), "application/octet-stream"),
        "png-uppercase-type-with-params": (save(rgb, "PNG"), "IMAGE/PNG; charset=binary"),
    }


# -- the cases ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    id: str
    path: str
    build: Callable[[], dict]  # httpx request keyword arguments, built when the case runs
    status: int
    method: str = "POST"


def raw(data: bytes | Callable[[], bytes], ctype: str | None = "image/png") -> Callable[[], dict]:
    def build() -> dict:
        body = data() if callable(data) else data
        return {"content": body, "headers": {"content-type": ctype} if ctype is not None else {}}

    return build


def as_json(obj) -> Callable[[], dict]:
    return lambda: {"json": obj() if callable(obj) else obj}


def body(text: bytes, ctype: str = "application/json") -> Callable[[], dict]:
    return lambda: {"content": text, "headers": {"content-type": ctype}}


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def multipart(parts: list[tuple[str, str | None, bytes]], boundary: str = "xYzZy") -> Callable[[], dict]:
    """Hand-written multipart: (field name, filename or None for a plain field, payload)."""

    def build() -> dict:
        out = b""
        for name, filename, payload in parts:
            disp = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
            out += f"--{boundary}\r\nContent-Disposition: {disp}\r\n\r\n".encode() + payload + b"\r\n"
        out += f"--{boundary}--\r\n".encode()
        return {"content": out, "headers": {"content-type": f"multipart/form-data; boundary={boundary}"}}

    return build


def streamed(n_bytes: int, ctype: str) -> Callable[[], dict]:
    """A chunked body with no Content-Length: the limit must hold while it streams."""

    async def gen():
        sent = 0
        while sent < n_bytes:
            piece = min(64 << 10, n_bytes - sent)
            sent += piece
            yield b"\0" * piece

    return lambda: {"content": gen(), "headers": {"content-type": ctype}}


def tensor(shape, datatype="FP32", data=None, name="input", **extra) -> dict:
    if (
        data is None
        and datatype == "FP32"
        and isinstance(shape, list)
        and all(isinstance(d, int) and 0 < d < 10**4 for d in shape)
    ):
        data = [0.0] * int(np.prod(shape))
    t = {"name": name, "shape": shape, "datatype": datatype, "data": data} | extra
    return {"inputs": [t]}


def good_tensor(**extra) -> dict:
    return tensor([1, 3, 32, 32]) | extra


def binary(header: dict, payload: bytes, length: str | None = None) -> Callable[[], dict]:
    def build() -> dict:
        h = json.dumps(header).encode()
        hdrs = {"inference-header-content-length": length if length is not None else str(len(h))}
        return {"content": h + payload, "headers": hdrs | {"content-type": "application/octet-stream"}}

    return build


def bytes_elems(*blobs: bytes) -> bytes:
    return b"".join(struct.pack("<I", len(b)) + b for b in blobs)


P, V2 = "/predict/digits", "/v2/models/digits/infer"
CASES: list[Case] = []

# empty bodies
for ctype, status in [
    ("image/png", 422),
    ("image/jpeg", 422),
    ("application/octet-stream", 422),
    ("application/json", 422),
    ("multipart/form-data; boundary=x", 422),
    (None, 415),
]:
    CASES.append(Case(f"empty-body-{ctype}", P, raw(b"", ctype), status))
CASES.append(Case("v2-empty-body", V2, raw(b"", "application/json"), 422))

# truncated images: header only, and cut inside the pixel data
for fmt, make in [("png", png), ("jpeg", jpeg), ("webp", webp), ("gif", gif)]:
    for frac in (0.1, 0.5, 0.8):
        CASES.append(
            Case(f"truncated-{fmt}-{frac}", P, raw(lambda m=make, f=frac: m()[: int(len(m()) * f)]), 422)
        )
    CASES.append(Case(f"magic-only-{fmt}", P, raw(lambda m=make: m()[:12]), 422))

# garbage, bare and behind each format's magic bytes
for n in (1, 7, 100, 5000):
    for ctype in ("image/jpeg", "image/png", "image/webp", "application/octet-stream"):
        CASES.append(
            Case(f"garbage-{n}B-{ctype}", P, raw(lambda n=n: np.random.default_rng(n).bytes(n), ctype), 422)
        )
for name, magic in [
    ("png", b"\x89PNG\r\n\x1a\n"),
    ("jpeg", b"\xff\xd8\xff\xe0"),
    ("gif", b"GIF89a"),
    ("webp", b"RIFF\x00\x01\x00\x00WEBPVP8 "),
    ("bmp", b"BM"),
    ("tiff", b"II*\x00"),
]:
    CASES.append(
        Case(f"magic-then-garbage-{name}", P, raw(magic + np.random.default_rng(9).bytes(3000)), 422)
    )
CASES += [
    Case("png-bad-crc", P, raw(lambda: png()[:29] + b"\0\0\0\0" + png()[33:]), 422),
    Case("png-zero-width", P, raw(raw_png(0, 10, 8, 2, b"\0" * 10)), 422),
    Case("png-bad-bit-depth", P, raw(raw_png(10, 10, 7, 2)), 422),
    Case("png-pixels-missing", P, raw(raw_png(64, 64, 8, 2, b"\0" * 10)), 422),
    Case(
        "svg",
        P,
        raw(b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>', "image/svg+xml"),
        422,
    ),
    Case("html-as-png", P, raw(b"<html><body>hi</body></html>"), 422),
    Case("pdf-as-png", P, raw(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF"), 422),
]

# formats Pillow decodes but a network service should not (EPS would run Ghostscript)
for fmt, mode in [
    ("EPS", "RGB"),
    ("PSD", None),
    ("TGA", "RGB"),
    ("PCX", "RGB"),
    ("PPM", "RGB"),
    ("ICO", "RGB"),
    ("SGI", "RGB"),
    ("XBM", "1"),
    ("IM", "RGB"),
    ("DDS", "RGBA"),
    ("QOI", "RGB"),
]:
    if fmt == "PSD":  # Pillow reads PSD but cannot write it: a minimal 1x1 RGB one by hand
        data = (
            b"8BPS\0\1" + b"\0" * 6 + struct.pack(">HIIHH", 3, 1, 1, 8, 3) + b"\0" * 12 + b"\0\0" + b"\0" * 3
        )
        CASES.append(Case("format-PSD", P, raw(data, "image/vnd.adobe.photoshop"), 422))
        continue
    CASES.append(
        Case(
            f"format-{fmt}",
            P,
            raw(lambda f=fmt, m=mode: save(Image.new(m, (8, 8), 1), f), "image/x-any"),
            422,
        )
    )

# decompression bombs and huge declared sizes (MAX_PIXELS = 1M): refused before decoding
CASES += [
    Case("png-declares-100000x100000", P, raw(raw_png(100_000, 100_000)), 413),
    Case("png-declares-1x2000000", P, raw(raw_png(1, 2_000_000, 8, 0)), 413),
    Case("png-declares-2^31-1-square", P, raw(raw_png(2**31 - 1, 2**31 - 1)), 413),
    Case("png-bomb-4000x4000-zeros", P, raw(lambda: png_bomb(4000)), 413),
    Case("png-bomb-1001x1000", P, raw(lambda: png_bomb(1001)), 413),
    Case("png-ztxt-text-bomb", P, raw(text_bomb), 422),
    Case(
        "jpeg-declares-65500x65500", P, raw(lambda: declared(jpeg(), "JPEG", 65500, 65500), "image/jpeg"), 413
    ),
    Case("gif-declares-65535x65535", P, raw(lambda: declared(gif(), "GIF", 65535, 65535), "image/gif"), 413),
    Case(
        "bmp-declares-100000x100000",
        P,
        raw(lambda: declared(save(Image.new("RGB", (4, 4)), "BMP"), "BMP", 100_000, 100_000), "image/bmp"),
        413,
    ),
    Case(
        "webp-declares-16383x16383", P, raw(lambda: declared(webp(), "WEBP", 16383, 16383), "image/webp"), 413
    ),
    Case(
        "tiff-deflate-bomb",
        P,
        raw(
            lambda: save(Image.new("L", (3000, 3000)), "TIFF", compression="tiff_adobe_deflate"), "image/tiff"
        ),
        413,
    ),
    Case("gif-bomb-3000x3000", P, raw(lambda: save(Image.new("P", (3000, 3000)), "GIF"), "image/gif"), 413),
]

# media types
CASES += [
    Case("text-plain-with-png", P, raw(png, "text/plain"), 415),
    Case("no-content-type-with-png", P, raw(png, None), 415),
    Case("form-urlencoded", P, raw(b"image=abc", "application/x-www-form-urlencoded"), 415),
    Case("multipart-mixed", P, raw(png, "multipart/mixed; boundary=x"), 415),
    Case("application-xml", P, raw(b"<image/>", "application/xml"), 415),
    Case("content-type-semicolons", P, raw(png, ";;;"), 415),
    Case("content-type-image-no-slash", P, raw(png, "image"), 415),
    Case("json-type-with-png-body", P, raw(png, "application/json"), 422),
]

# multipart
CASES += [
    Case("multipart-no-boundary", P, raw(lambda: b"--x\r\n" + png(), "multipart/form-data"), 422),
    Case("multipart-only-text-fields", P, multipart([("file", None, b"not a file"), ("x", None, b"1")]), 422),
    Case("multipart-empty-file", P, multipart([("file", "a.png", b"")]), 422),
    Case("multipart-garbage-file", P, multipart([("file", "a.png", b"\x89PNG garbage")]), 422),
    Case("multipart-5-files", P, lambda: {"files": [("file", ("a.png", png(), "image/png"))] * 5}, 413),
    Case("multipart-9-files", P, lambda: {"files": [("file", ("a.png", png(), "image/png"))] * 9}, 413),
    Case("multipart-100-fields", P, multipart([(f"f{i}", None, b"x") for i in range(100)]), 413),
    Case(
        "multipart-one-good-one-bad",
        P,
        multipart([("file", "a.png", png()), ("file", "b.png", b"junk")]),
        422,
    ),
    Case(
        "multipart-wrong-boundary",
        P,
        lambda: (
            multipart([("file", "a.png", png())], boundary="AAA")()
            | {"headers": {"content-type": "multipart/form-data; boundary=BBB"}}
        ),
        422,
    ),
    Case(
        "multipart-unterminated",
        P,
        raw(
            b'--x\r\nContent-Disposition: form-data; name="file"; filename="a"\r\n\r\n\x89PNG',
            "multipart/form-data; boundary=x",
        ),
        422,
    ),
]

# JSON bodies of /predict
GOOD = b64(b"\x89PNG\r\n\x1a\n")  # valid base64, not an image
CASES += [
    Case("json-truncated", P, body(b'{"image": "'), 422),
    Case("json-open-brace", P, body(b"{"), 422),
    Case("json-null", P, body(b"null"), 422),
    Case("json-string", P, body(b'"abc"'), 422),
    Case("json-number", P, body(b"123"), 422),
    Case("json-array", P, body(b"[]"), 422),
    Case("json-not-utf8", P, body(b'{"image": "\xff\xfe"}'), 422),
    Case("json-nested-100k-deep", P, body(b"[" * 100_000), 422),
    Case("json-trailing-garbage", P, body(b'{"image": "AAAA"} junk'), 422),
    Case("json-empty-object", P, as_json({}), 422),
    Case("json-image-null", P, as_json({"image": None}), 422),
    Case("json-image-number", P, as_json({"image": 123}), 422),
    Case("json-image-list", P, as_json({"image": [GOOD]}), 422),
    Case("json-image-object", P, as_json({"image": {"b64": GOOD}}), 422),
    Case("json-images-string", P, as_json({"images": GOOD}), 422),
    Case("json-images-numbers", P, as_json({"images": [1, 2]}), 422),
    Case("json-images-null-item", P, as_json({"images": [None]}), 422),
    Case("json-images-nested", P, as_json({"images": [[GOOD]]}), 422),
    Case("json-images-empty", P, as_json({"images": []}), 422),
    Case("json-image-empty-string", P, as_json({"image": ""}), 422),
    Case("json-extra-field", P, as_json(lambda: {"image": b64(png()), "extra": 1}), 422),
    Case("json-5-images", P, as_json(lambda: {"images": [b64(png())] * 5}), 413),
    Case(
        "json-image-plus-4-images", P, as_json(lambda: {"image": b64(png()), "images": [b64(png())] * 4}), 413
    ),
    Case("b64-bad-padding", P, as_json({"image": "abc"}), 422),
    Case("b64-too-much-padding", P, as_json({"image": "a==="}), 422),
    Case("b64-bad-alphabet", P, as_json({"image": "!!!!"}), 422),
    Case(
        "b64-urlsafe-alphabet", P, as_json(lambda: {"image": base64.urlsafe_b64encode(png()).decode()}), 422
    ),
    Case("b64-data-url-bad-payload", P, as_json({"image": "data:image/png;base64,@@@@"}), 422),
    Case("b64-nul", P, as_json({"image": "\u0000"}), 422),
    Case("b64-lone-surrogate", P, body(b'{"image": "\\ud800"}'), 422),
    Case("b64-of-garbage", P, as_json({"image": GOOD}), 422),
    Case("b64-of-truncated-png", P, as_json(lambda: {"image": b64(png()[:60])}), 422),
    Case("json-top-k-0", P, as_json(lambda: {"image": b64(png()), "top_k": 0}), 422),
    Case("json-top-k-negative", P, as_json(lambda: {"image": b64(png()), "top_k": -3}), 422),
    Case("json-top-k-string", P, as_json(lambda: {"image": b64(png()), "top_k": "x"}), 422),
    Case("json-top-k-float", P, as_json(lambda: {"image": b64(png()), "top_k": 1.5}), 422),
    Case("json-top-k-list", P, as_json(lambda: {"image": b64(png()), "top_k": [1]}), 422),
]
for q in ("0", "-5", "abc", "1.5", "", "1e3"):
    CASES.append(Case(f"query-top-k-{q or 'empty'}", f"{P}?top_k={q}", raw(png), 422))

# oversized bodies (max_body_mb = 1)
CASES += [
    Case("raw-over-limit-declared", P, raw(b"\0" * (MAX_BODY + 1)), 413),
    Case("raw-over-limit-streamed", P, streamed(MAX_BODY + 100_000, "image/png"), 413),
    Case("json-over-limit-streamed", P, streamed(3 * MAX_BODY, "application/json"), 413),
    Case(
        "multipart-over-limit",
        P,
        lambda: {"files": [("file", ("a.png", b"\0" * (MAX_BODY + 1), "image/png"))]},
        413,
    ),
    Case("v2-over-limit-declared", V2, raw(b" " * (MAX_BODY + 1), "application/json"), 413),
    Case("v2-over-limit-streamed", V2, streamed(2 * MAX_BODY, "application/octet-stream"), 413),
]

# task names: unicode, path-like, encoded, long, empty, NUL
NAMES = [
    "数字",
    "digits\u200b",
    "DIGITS",
    "digits%20",
    "%20digits",
    "%2e%2e",
    "..%2Fx",
    "..%2f..%2fetc%2fpasswd",
    "%2Fdigits",
    "a" * 5000,
    "%00",
    "digits%00",
    "%F0%9F%98%80",
    "%ff%fe",
    "__proto__",
    "con",
    "*",
    "digits;x",
]
for i, name in enumerate(NAMES):
    short = name if len(name) < 40 else f"{name[:8]}...x{len(name)}"
    CASES.append(Case(f"task-{i}-{short}", f"/predict/{name}", raw(png), 404))
    CASES.append(Case(f"v2-task-{i}-{short}", f"/v2/models/{name}/infer", as_json(good_tensor), 404))
    CASES.append(Case(f"tasks-get-{i}-{short}", f"/tasks/{name}", dict, 404, "GET"))
    CASES.append(Case(f"v2-meta-{i}-{short}", f"/v2/models/{name}", dict, 404, "GET"))
CASES += [
    Case("task-dotdot-path", "/predict/../x", raw(png), 404),
    Case("task-empty", "/predict/", raw(png), 404),
    Case("v2-task-empty", "/v2/models//infer", as_json(good_tensor), 404),
    Case("v2-version-unknown", "/v2/models/digits/versions/999/infer", as_json(good_tensor), 404),
    Case("v2-version-dotdot", "/v2/models/digits/versions/%2e%2e/infer", as_json(good_tensor), 404),
    Case("v2-ready-unknown", "/v2/models/%2e%2e/ready", dict, 404, "GET"),
    Case("get-predict", P, dict, 405, "GET"),
    Case("put-v2-infer", V2, as_json(good_tensor), 405, "PUT"),
    Case("delete-tasks", "/tasks", dict, 405, "DELETE"),
]

# Open Inference Protocol v2: shapes, datatypes, counts, names, parameters, binary extension
for shape in (
    [1, 3, 16, 16],
    [3, 32, 32],
    [1, 32, 32, 3],
    [0, 3, 32, 32],
    [-1, 3, 32, 32],
    [],
    [1, 3, 32, 32, 1],
    [1, 3, 2**40, 32],
    [1.5, 3, 32, 32],
    "1,3,32,32",
    None,
):
    CASES.append(Case(f"v2-shape-{shape}", V2, as_json(tensor(shape)), 422))
for shape in ([10**20, 3, 32, 32], [2**64, 3, 32, 32], [5, 3, 32, 32]):
    CASES.append(Case(f"v2-shape-rows-{shape[0]}", V2, as_json(tensor(shape, data=[])), 413))
for dt in ("FP16", "INT8", "UINT8", "BOOL", "FP64", "INT64", "BF16", "fp32", "", "STRING"):
    CASES.append(
        Case(f"v2-datatype-{dt or 'empty'}", V2, as_json(tensor([1, 3, 32, 32], dt, [0] * 3072)), 422)
    )
CASES += [
    Case("v2-fp32-too-few", V2, as_json(tensor([1, 3, 32, 32], data=[0.0] * 3071)), 422),
    Case("v2-fp32-too-many", V2, as_json(tensor([1, 3, 32, 32], data=[0.0] * 3073)), 422),
    Case("v2-fp32-ragged", V2, as_json(tensor([1, 3, 32, 32], data=[[0.0] * 1536, [0.0] * 1535])), 422),
    Case(
        "v2-fp32-no-data",
        V2,
        as_json({"inputs": [{"name": "input", "shape": [1, 3, 32, 32], "datatype": "FP32"}]}),
        422,
    ),
    Case("v2-fp32-data-string", V2, as_json(tensor([1, 3, 32, 32], data="abc")), 422),
    Case("v2-fp32-data-object", V2, as_json(tensor([1, 3, 32, 32], data={"a": 1})), 422),
    Case(
        "v2-fp32-nan", V2, body(json.dumps(tensor([1, 3, 32, 32], data=[float("nan")] * 3072)).encode()), 422
    ),
    Case(
        "v2-fp32-inf", V2, body(json.dumps(tensor([1, 3, 32, 32], data=[float("inf")] * 3072)).encode()), 422
    ),
    Case("v2-fp32-overflow", V2, as_json(tensor([1, 3, 32, 32], data=[1e39] * 3072)), 422),
    Case("v2-fp32-strings", V2, as_json(tensor([1, 3, 32, 32], data=["x"] * 3072)), 422),
    Case("v2-name-unknown", V2, as_json(tensor([1, 3, 32, 32], name="foo")), 422),
    Case("v2-name-image-fp32", V2, as_json(tensor([1, 3, 32, 32], name="image")), 422),
    Case("v2-name-input-bytes", V2, as_json(lambda: tensor([1], "BYTES", [b64(png())], name="input")), 422),
    Case(
        "v2-bytes-count-mismatch", V2, as_json(lambda: tensor([2], "BYTES", [b64(png())], name="image")), 422
    ),
    Case(
        "v2-bytes-shape-1x2",
        V2,
        as_json(lambda: tensor([1, 2], "BYTES", [b64(png())] * 2, name="image")),
        422,
    ),
    Case("v2-bytes-numbers", V2, as_json(tensor([1], "BYTES", [1], name="image")), 422),
    Case("v2-bytes-null", V2, as_json(tensor([1], "BYTES", [None], name="image")), 422),
    Case("v2-bytes-not-list", V2, as_json(tensor([1], "BYTES", "abc", name="image")), 422),
    Case("v2-bytes-no-data", V2, as_json(tensor([1], "BYTES", None, name="image")), 422),
    Case("v2-bytes-garbage", V2, as_json(tensor([1], "BYTES", [GOOD], name="image")), 422),
    Case("v2-bytes-plain-text", V2, as_json(tensor([1], "BYTES", ["hello"], name="image")), 422),
    Case(
        "v2-bytes-lone-surrogate",
        V2,
        body(b'{"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": ["\\ud800"]}]}'),
        422,
    ),
    Case("v2-bytes-5-images", V2, as_json(lambda: tensor([5], "BYTES", [b64(png())] * 5, name="image")), 413),
    Case("v2-inputs-empty", V2, as_json({"inputs": []}), 422),
    Case("v2-inputs-missing", V2, as_json({}), 422),
    Case("v2-inputs-not-list", V2, as_json({"inputs": {"name": "input"}}), 422),
    Case("v2-two-inputs", V2, as_json(lambda: {"inputs": good_tensor()["inputs"] * 2}), 422),
    Case("v2-body-array", V2, as_json([]), 422),
    Case("v2-body-null", V2, body(b"null"), 422),
    Case("v2-nested-100k-deep", V2, body(b"[" * 100_000), 422),
    Case("v2-not-utf8", V2, body(b'{"inputs": "\xff"}'), 422),
    Case("v2-id-number", V2, as_json(good_tensor(id=5)), 422),
    Case("v2-parameters-string", V2, as_json(good_tensor(parameters="x")), 422),
    Case("v2-parameters-list", V2, as_json(good_tensor(parameters=[1])), 422),
    Case("v2-output-unknown", V2, as_json(good_tensor(outputs=[{"name": "logits"}])), 422),
    Case("v2-outputs-not-list", V2, as_json(good_tensor(outputs={"name": "probabilities"})), 422),
    Case("v2-output-name-number", V2, as_json(good_tensor(outputs=[{"name": 5}])), 422),
]
for k in (0, -1, "3", 1.5, True, [3]):
    out = [{"name": "probabilities", "parameters": {"classification": k}}]
    CASES.append(Case(f"v2-classification-{k!r}", V2, as_json(good_tensor(outputs=out)), 422))
X = np.zeros((1, 3, 32, 32), "<f4").tobytes()
FP32_HEADER = {
    "inputs": [
        {
            "name": "input",
            "shape": [1, 3, 32, 32],
            "datatype": "FP32",
            "parameters": {"binary_data_size": len(X)},
        }
    ]
}


def bin_header(datatype="FP32", shape=(1, 3, 32, 32), size=len(X), name="input") -> dict:
    params = {"binary_data_size": size}
    return {"inputs": [{"name": name, "shape": list(shape), "datatype": datatype, "parameters": params}]}


CASES += [
    Case("bin-header-length-abc", V2, binary(FP32_HEADER, X, "abc"), 422),
    Case("bin-header-length-negative", V2, binary(FP32_HEADER, X, "-1"), 422),
    Case("bin-header-length-past-body", V2, binary(FP32_HEADER, X, str(10**9)), 422),
    Case("bin-header-length-zero", V2, binary(FP32_HEADER, X, "0"), 422),
    Case("bin-header-length-mid-header", V2, binary(FP32_HEADER, X, "7"), 422),
    Case("bin-size-past-data", V2, binary(bin_header(size=len(X) + 4), X), 422),
    Case("bin-size-negative", V2, binary(bin_header(size=-4), X), 422),
    Case("bin-size-float", V2, binary(bin_header(size=4.5), X), 422),
    Case("bin-size-string", V2, binary(bin_header(size="12288"), X), 422),
    Case("bin-fp32-not-multiple-of-4", V2, binary(bin_header(size=len(X) - 1), X), 422),
    Case("bin-fp32-short", V2, binary(bin_header(size=len(X) - 4), X[:-4]), 422),
    Case("bin-fp32-nan", V2, binary(bin_header(), np.full((1, 3, 32, 32), np.nan, "<f4").tobytes()), 422),
    Case("bin-bytes-truncated-prefix", V2, binary(bin_header("BYTES", [1], 2, "image"), b"\x05\x00"), 422),
    Case(
        "bin-bytes-huge-prefix",
        V2,
        binary(bin_header("BYTES", [1], 8, "image"), b"\xff\xff\xff\xff1234"),
        422,
    ),
    Case(
        "bin-bytes-count-mismatch",
        V2,
        lambda: binary(
            bin_header("BYTES", [1], len(bytes_elems(png(), png())), "image"), bytes_elems(png(), png())
        )(),
        422,
    ),
    Case("bin-bytes-garbage", V2, binary(bin_header("BYTES", [1], 8, "image"), bytes_elems(b"junk")), 422),
]

ODD = odd_images()


def _ids(cases):
    return [c.id for c in cases]


# -- the checks ---------------------------------------------------------------------------------
def check_error(r: httpx.Response) -> None:
    assert r.headers.get("content-type", "").startswith("application/json"), r.headers
    err = r.json()["error"]
    assert set(err) == {"code", "message"} and isinstance(err["message"], str) and err["message"]
    assert err["code"] in CODES[r.status_code], (r.status_code, err)


def scores(r: httpx.Response) -> np.ndarray:
    assert r.status_code == 200, r.text
    (pred,) = r.json()["predictions"]
    v = np.zeros(len(pred["top_k"]))
    for t in pred["top_k"]:
        v[t["index"]] = t["score"]
    return v


async def predict(client: httpx.AsyncClient, data: bytes, ctype: str = "image/png") -> httpx.Response:
    return await client.post(P, params={"top_k": 1000}, content=data, headers={"content-type": ctype})


async def assert_healthy(client: httpx.AsyncClient) -> None:
    """Live, ready, a good request answers, and no task label outside the manifest in /metrics."""
    assert (await client.get("/healthz")).status_code == 200
    assert (await client.get("/readyz")).status_code == 200
    scores(await predict(client, png(32, 32, 5)))
    r = await client.get("/metrics")
    assert r.status_code == 200
    labels = {
        s.labels["task"]
        for fam in text_string_to_metric_families(r.text)
        for s in fam.samples
        if "task" in s.labels
    }
    assert labels and labels <= client.tasks, labels - client.tasks


@in_module_loop
@pytest.mark.parametrize("case", CASES, ids=_ids(CASES))
async def test_hostile_request_is_refused_cleanly(client, case: Case):
    r = await client.request(case.method, case.path, **case.build())
    SEEN[f"{r.status_code // 100}xx"] += 1
    assert r.status_code < 500, r.text
    assert r.status_code == case.status, r.text[:300]
    check_error(r)
    await assert_healthy(client)


def fastapi_only(app):
    """The app without its lean path: every request through the outer layer and FastAPI's routes."""
    if app.middleware_stack is None:  # as Starlette builds it at the first call
        app.middleware_stack = app.build_middleware_stack()
    outer = app.middleware_stack.outer

    async def asgi(scope, receive, send):
        scope["app"] = app
        await outer(scope, receive, send)

    return asgi


LEAN_CASES = [c for c in CASES if c.method == "POST" and c.path.startswith(("/predict/", "/v2/models/"))]
LEAN_CASES += [Case(f"odd-{name}", P, raw(*ODD[name]), 200) for name in ODD] + [
    Case("good-png-top3", P + "?top_k=3", raw(png(32, 32, 7)), 200),
    Case("good-json", P, as_json({"images": [b64(png(20, 20, 1)), b64(jpeg())], "top_k": 2}), 200),
    Case("v2-good", V2, as_json({"id": "r1", "inputs": [good_tensor()]}), 200),
]


@in_module_loop
@pytest.mark.parametrize("case", LEAN_CASES, ids=_ids(LEAN_CASES))
async def test_the_lean_path_answers_byte_for_byte_as_the_fastapi_routes(client, case: Case):
    """Every hostile and odd request (and good ones) gets the same status, headers and body from the
    lean path (service/hot_path.py, in front of everything) as from the FastAPI routes behind the
    outer layer, which run the same answer code: what the lean path skips changes no answer."""
    transport = httpx.ASGITransport(app=fastapi_only(client.app), raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=30) as plain:
        lean = await client.request(case.method, case.path, **case.build())
        routed = await plain.request(case.method, case.path, **case.build())  # a stream is read once
    assert (lean.status_code, lean.content) == (routed.status_code, routed.content), case.id
    assert sorted(lean.headers.items()) == sorted(routed.headers.items()), case.id


@in_module_loop
@pytest.mark.parametrize("name", list(ODD))
async def test_odd_but_valid_image_is_read_as_the_trainer_reads_it(client, name):
    from training.imagefolder import to_rgb

    data, ctype = ODD[name]
    r = await predict(client, data, ctype)
    SEEN[f"{r.status_code // 100}xx"] += 1
    got = scores(r)
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        want_img = to_rgb(img)
    want = scores(await predict(client, save(want_img, "PNG")))
    np.testing.assert_allclose(got, want, atol=1e-5)
    await assert_healthy(client)


@in_module_loop
async def test_sixteen_bit_gray_is_rescaled_not_clipped(client):
    """A 16-bit gray image answers like its 8-bit version (value / 257), not like a white one."""
    g = smooth(40, 40)[..., 0]
    sixteen = Image.fromarray((g.astype(np.uint16) * 257).astype(np.uint16))
    sixteen = sixteen if sixteen.mode.startswith("I;16") else sixteen.convert("I;16")
    got = scores(await predict(client, save(sixteen, "PNG")))
    want = scores(await predict(client, save(Image.fromarray(g, "L"), "PNG")))
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_extreme_aspect_ratio_resamples_only_the_crop_and_stays_close_to_the_full_path(monkeypatch):
    """A 1x900000 image within the pixel limit once built a 32 x 28.8M intermediate (2.7 GB, 30 s)
    to crop 32x32 from it: no resize may now output more than MAX_RESIZE_FACTOR crops' pixels, and
    the result stays within a few levels of resize-whole-then-crop (smooth images)."""
    from contract.manifest import InputSpec
    from service.preprocess import MAX_RESIZE_FACTOR, RESAMPLE, _center_crop, _resize_size, transform

    outputs: list[tuple[int, int]] = []
    resize = Image.Image.resize

    def recording(self, size, *args, **kw):
        outputs.append(tuple(size))
        return resize(self, size, *args, **kw)

    spec = InputSpec(
        size=(3, 32, 32), mean=(0.5,) * 3, std=(0.5,) * 3, crop_pct=0.875, interpolation="bicubic"
    )
    for w, h in [(40, 3000), (3000, 40), (7, 999), (1, 900_000)]:
        img = Image.fromarray(smooth(w, h)) if w * h < 10**6 else Image.new("RGB", (w, h), (9, 99, 199))
        size = _resize_size(w, h, spec)
        monkeypatch.setattr(Image.Image, "resize", recording)
        got = transform(img, spec).transpose(1, 2, 0) * 0.5 + 0.5
        monkeypatch.setattr(Image.Image, "resize", resize)
        assert max(a * b for a, b in outputs) <= MAX_RESIZE_FACTOR * 32 * 32, (w, h, outputs)
        outputs.clear()
        if size[0] * size[1] < 10**6:
            full = np.asarray(_center_crop(img.resize(size, RESAMPLE["bicubic"]), 32, 32), np.float32) / 255
            assert np.abs(got - full).max() <= 3 / 255, (w, h)


@in_module_loop
async def test_many_odd_requests_at_once_leave_the_server_healthy(client):
    """Hostile requests interleaved with good ones, concurrently: the good ones still answer 200."""
    import asyncio

    picks = [c for c in CASES if c.method == "POST"][::7]
    bad = [client.request(c.method, c.path, **c.build()) for c in picks]
    good = [predict(client, png(30, 30, i)) for i in range(8)]
    answers = await asyncio.gather(*bad, *good)
    assert all(r.status_code < 500 for r in answers)
    assert all(r.status_code == 200 for r in answers[len(bad) :])
    await assert_healthy(client)


@in_module_loop
async def test_zz_summary(client):
    """Counts of this module's requests by status class (printed with -s); no 5xx."""
    print(f"\nhostile/odd requests by status class: {dict(sorted(SEEN.items()))}")
    assert SEEN.get("5xx", 0) == 0

"""Image sources drawn with Pillow from Debian packages: Latin font glyphs, icon-theme
categories and emoji groups. Each loader returns a :class:`training.sources.Source` of
64x64 images (``RENDER``); the benchmark builder resizes them."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import string
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from training.source_types import INSTALL_HINT, Source, SourceUnavailable
from training.split_groups import emoji_base, font_family

RENDER = 64
GLYPHS = tuple(string.ascii_uppercase + string.digits)
GREEK = tuple(chr(c) for c in range(0x3B1, 0x3CA) if c != 0x3C2)  # alpha..omega without final sigma
_NOT_LATIN_TEXT = re.compile(r"symbol|dingbat|emoji|awesome|icon|math|music|braille|d050000l|z003", re.I)


def _pil():  # type: ignore[no-untyped-def]
    try:
        from PIL import Image, ImageDraw, ImageFont
    except ImportError:
        raise SourceUnavailable("Pillow is not installed: pip install pillow") from None
    return Image, ImageDraw, ImageFont


def _dirs(env: str, default: str) -> list[Path]:
    return [Path(p) for p in os.environ.get(env, default).split(os.pathsep) if p]


def fit_square(img, size: int = RENDER, background: int | tuple[int, ...] = 0, margin: float = 0.08):  # type: ignore[no-untyped-def]
    """Crop ``img`` to its content (its alpha or non-background pixels), pad it to a centred
    square with a small margin and resize it to ``size`` x ``size``."""
    Image, _, _ = _pil()
    bbox = img.getchannel("A").getbbox() if img.mode == "RGBA" else img.getbbox()
    if bbox is None:
        return None
    img = img.crop(bbox)
    side = int(max(img.size) * (1 + 2 * margin)) + 1
    canvas = Image.new(img.mode, (side, side), background)
    canvas.paste(img, ((side - img.width) // 2, (side - img.height) // 2))
    return canvas.resize((size, size), Image.Resampling.LANCZOS)


# ---------------------------------------------------------------- glyphs


def font_files() -> list[Path]:
    """Candidate Latin text fonts under ``MTSERVE_FONT_DIRS`` (default /usr/share/fonts)."""
    files = []
    for root in _dirs("MTSERVE_FONT_DIRS", "/usr/share/fonts"):
        for path in sorted(root.rglob("*")):
            if path.suffix.lower() in (".ttf", ".otf") and not _NOT_LATIN_TEXT.search(path.name):
                files.append(path)
    return files


def _draw_glyph(font, ch: str) -> bytes | None:  # type: ignore[no-untyped-def]
    Image, ImageDraw, _ = _pil()
    canvas = Image.new("L", (3 * font.size, 3 * font.size), 0)
    ImageDraw.Draw(canvas).text((font.size, font.size), ch, font=font, fill=255)
    glyph = fit_square(canvas)
    return None if glyph is None else glyph.tobytes()


def render_font(
    path: Path, size: int = 48, chars: tuple[str, ...] = GLYPHS
) -> tuple[str, list[bytes]] | None:
    """All of ``chars`` in one font as RENDER x RENDER bitmaps, or None when the font cannot
    be read or lacks any of them (a missing glyph draws as the font's .notdef box). The name is
    "family style"; :func:`font_family` takes the family (``name`` minus the style)."""
    _, _, ImageFont = _pil()
    try:
        font = ImageFont.truetype(str(path), size)
        name = " ".join(n for n in font.getname() if n)
        notdef = _draw_glyph(font, "\U0010fffd")
        glyphs = [_draw_glyph(font, ch) for ch in chars]
    except OSError:
        return None
    if any(g is None or g == notdef for g in glyphs) or len(set(glyphs)) < len(chars) // 2:
        return None
    return name, glyphs  # type: ignore[return-value]


def _family_of(path: Path) -> str:
    _, _, ImageFont = _pil()
    return font_family(ImageFont.truetype(str(path), 12).getname()[0] or "", path)


def load_greek(max_fonts: int | None = None) -> Source:
    """Lowercase Greek letters (24 classes) from every installed font that draws them, held out by
    font family like ``glyphs``: a script domain with its own label set (replaces ``digits``)."""
    import unicodedata

    src = load_glyphs(max_fonts, chars=GREEK, name="greek")
    names = tuple(unicodedata.name(c).split()[-1].lower() for c in GREEK)  # folder-safe class names
    return dataclasses.replace(
        src, classes=names, origin=src.origin.replace("fonts-* packages", "fonts, Greek")
    )


def load_glyphs(
    max_fonts: int | None = None, chars: tuple[str, ...] = GLYPHS, name: str = "glyphs"
) -> Source:
    """A-Z0-9 rendered from every installed Latin font; ``groups`` is the font *family* (with its
    metric clones, :func:`training.split_groups.font_family`), so validation holds out whole
    families. Duplicate fonts (same name or same drawings) count once."""
    files = font_files()
    if not files:
        raise SourceUnavailable(
            f"no fonts under /usr/share/fonts: apt-get install fonts-... ({INSTALL_HINT})"
        )
    names: list[str] = []
    families: list[str] = []
    seen: set[str] = set()
    bitmaps: list[bytes] = []
    for path in files:
        rendered = render_font(path, chars=chars)
        if rendered is None:
            continue
        font_name, glyphs = rendered
        digest = hashlib.sha1(b"".join(glyphs)).hexdigest()
        if font_name in seen or digest in seen:
            continue
        seen.update((font_name, digest))
        names.append(font_name)
        families.append(_family_of(path))
        bitmaps.extend(glyphs)
        if max_fonts and len(names) >= max_fonts:
            break
    if len(set(families)) < 2:
        raise SourceUnavailable(f"fewer than 2 font families draw {name}: {INSTALL_HINT}")
    images = np.frombuffer(b"".join(bitmaps), np.uint8).reshape(-1, RENDER, RENDER)
    n = len(chars)
    _, family_ids = np.unique(np.asarray(families), return_inverse=True)
    return Source(
        name, images, np.tile(np.arange(n, dtype=np.int64), len(names)), chars,
        licence="per font: SIL OFL 1.1, GPL with font exception, Apache-2.0, LPPL, ... "
        "(see /usr/share/doc/fonts-*/copyright)",
        origin=f"Debian fonts-* packages, {len(names)} fonts of {len(set(families))} families, "
        "rendered with Pillow",
        groups=np.repeat(family_ids.astype(np.int64), n), group_kind="font family",
        notes=tuple(names),
    )  # fmt: skip


# ---------------------------------------------------------------- icons

ICON_CATEGORIES = ("actions", "apps", "devices", "mimetypes", "places", "status")
ICON_THEMES = ("oxygen/base", "Tango", "gnome")


def _icon_files(root: Path) -> Iterator[tuple[str, str, Path]]:
    """(category, icon name, PNG) for every PNG of at least 32 px in the themes' category
    folders; links resolve to their target, so a drawing is listed once."""
    seen: set[Path] = set()
    for theme in ICON_THEMES:
        for size_dir in sorted((root / theme).glob("*x*")):
            px = size_dir.name.split("x")[0]
            if not px.isdigit() or int(px) < 32:
                continue
            for cat in ICON_CATEGORIES:
                for png in sorted((size_dir / cat).glob("*.png")):
                    real = png.resolve()
                    if real not in seen:
                        seen.add(real)
                        yield cat, png.stem, real


def load_icons() -> Source:
    """Icons of six categories (by directory name) from the oxygen, Tango and GNOME themes,
    on white; ``groups`` is the icon name, so one icon's drawings stay in one split."""
    Image, _, _ = _pil()
    roots = _dirs("MTSERVE_ICON_DIR", "/usr/share/icons")
    items = [item for root in roots if root.is_dir() for item in _icon_files(root)]
    if not items:
        raise SourceUnavailable(f"no oxygen/tango/gnome icon themes in /usr/share/icons: {INSTALL_HINT}")
    images, labels, stems, seen = [], [], [], set()
    for cat, stem, png in items:
        digest = hashlib.sha1(png.read_bytes()).hexdigest()
        if digest in seen:
            continue
        seen.add(digest)
        with Image.open(png) as im:
            rgba = im.convert("RGBA")
        icon = fit_square(rgba, background=(255, 255, 255, 0), margin=0.04)
        if icon is None:
            continue
        white = Image.new("RGBA", icon.size, (255, 255, 255, 255))
        images.append(np.asarray(Image.alpha_composite(white, icon).convert("RGB")))
        labels.append(ICON_CATEGORIES.index(cat))
        stems.append(stem)
    _, groups = np.unique(np.asarray(stems), return_inverse=True)
    return Source(
        "icons", np.stack(images), np.asarray(labels, np.int64), ICON_CATEGORIES,
        licence="oxygen-icon-theme LGPL-3+; tango-icon-theme public domain; gnome-icon-theme GPL-3+",
        origin="Debian oxygen-icon-theme, tango-icon-theme, gnome-icon-theme PNGs (>= 32 px)",
        groups=groups.astype(np.int64), group_kind="icon name",
    )  # fmt: skip


# ---------------------------------------------------------------- emoji

EMOJI_FONT = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
EMOJI_TEST = Path("/usr/share/unicode/emoji/emoji-test.txt")
_SKIN_TONES = {chr(c) for c in range(0x1F3FB, 0x1F400)}


def emoji_entries(path: Path = EMOJI_TEST) -> list[tuple[str, str, str]]:
    """(emoji, group, name) for fully-qualified emoji of emoji-test.txt, without the Component
    group and without skin-tone variants (near-duplicates of their base emoji)."""
    out, group = [], ""
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("# group:"):
            group = line.split(":", 1)[1].strip()
        elif "; fully-qualified" in line and group != "Component":
            emoji = "".join(chr(int(cp, 16)) for cp in line.split(";")[0].split())
            if not _SKIN_TONES.intersection(emoji):
                found = re.search(r"#\s*\S+\s+E\d+\.\d+\s+(.*)$", line)
                out.append((emoji, group, found.group(1).strip() if found else emoji))
    return out


def emoji_groups(path: Path = EMOJI_TEST) -> list[tuple[str, str]]:
    """(emoji, group) of :func:`emoji_entries`."""
    return [(e, g) for e, g, _ in emoji_entries(path)]


def load_emoji() -> Source:
    """Noto Color Emoji drawn at its bitmap size 109 and downscaled, labelled by emoji-test
    group; sequences the font cannot draw as one glyph are dropped."""
    Image, ImageDraw, ImageFont = _pil()
    font_path = Path(os.environ.get("MTSERVE_EMOJI_FONT", EMOJI_FONT))
    test = Path(os.environ.get("MTSERVE_EMOJI_TEST", EMOJI_TEST))
    if not font_path.is_file() or not test.is_file():
        raise SourceUnavailable(
            "emoji font or emoji-test.txt missing: apt-get install fonts-noto-color-emoji unicode-data "
            f"({INSTALL_HINT})"
        )
    font = ImageFont.truetype(str(font_path), 109)
    entries = emoji_entries(test)
    classes = tuple(dict.fromkeys(g for _, g, _ in entries))
    images, labels, bases, dropped = [], [], [], 0
    for emoji, group, name in entries:
        canvas = Image.new("RGBA", (400, 160), (255, 255, 255, 0))
        ImageDraw.Draw(canvas).text((10, 10), emoji, font=font, embedded_color=True)
        bbox = canvas.getchannel("A").getbbox()
        if bbox is None or (bbox[2] - bbox[0]) > 1.4 * (bbox[3] - bbox[1]):  # blank or split in pieces
            dropped += 1
            continue
        icon = fit_square(canvas, background=(255, 255, 255, 0), margin=0.04)
        white = Image.new("RGBA", icon.size, (255, 255, 255, 255))
        images.append(np.asarray(Image.alpha_composite(white, icon).convert("RGB")))
        labels.append(classes.index(group))
        bases.append(emoji_base(name))
    _, groups = np.unique(np.asarray(bases), return_inverse=True)
    return Source(
        "emoji", np.stack(images), np.asarray(labels, np.int64), classes,
        licence="Noto Color Emoji: SIL OFL 1.1 (font), Apache-2.0 (images); emoji-test.txt: Unicode License",
        origin="Debian fonts-noto-color-emoji + unicode-data emoji-test.txt, rendered with Pillow",
        groups=groups.astype(np.int64), group_kind="base emoji",
        notes=(f"{dropped} sequences not drawable as one glyph dropped",),
    )  # fmt: skip

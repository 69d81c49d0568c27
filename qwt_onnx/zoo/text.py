"""Real text rendered with real fonts: lines and pages with their ground truth.

The text is the license texts every Debian system ships in
/usr/share/common-licenses; the fonts are the DejaVu faces that matplotlib
bundles. Calibration and evaluation use disjoint license files.
"""

from __future__ import annotations

import glob
import hashlib
import os
import re

import numpy as np

from qwt_onnx.errors import InputError

LICENSES = "/usr/share/common-licenses"
FONT_FILES = ("DejaVuSans.ttf", "DejaVuSerif.ttf", "DejaVuSansMono.ttf", "DejaVuSans-Bold.ttf", "DejaVuSerif-Bold.ttf")


def license_texts() -> dict[str, str]:
    """Each distinct license text (symlinked aliases dropped), by file name."""
    texts, seen = {}, set()
    for path in sorted(glob.glob(os.path.join(LICENSES, "*"))):
        real = os.path.realpath(path)
        if os.path.isfile(real) and real not in seen:
            seen.add(real)
            with open(real, encoding="utf-8", errors="replace") as f:
                texts[os.path.basename(path)] = f.read()
    if not texts:
        raise InputError(f"no license texts under {LICENSES}; the text zoo models need a Debian-like system")
    return texts


def split_texts() -> tuple[list[str], list[str]]:
    """(calibration texts, evaluation texts): one license file in four goes to evaluation."""
    texts = license_texts()
    evaluation = [t for n, t in texts.items() if hashlib.sha1(n.encode()).digest()[0] % 4 == 0]
    calibration = [t for n, t in texts.items() if hashlib.sha1(n.encode()).digest()[0] % 4 != 0]
    return calibration, evaluation


def fonts() -> list[str]:
    import matplotlib

    folder = os.path.join(os.path.dirname(matplotlib.__file__), "mpl-data", "fonts", "ttf")
    return [os.path.join(folder, name) for name in FONT_FILES]


def lines(texts: list[str], count: int, rng: np.random.Generator, min_chars: int = 6, max_chars: int = 24) -> list[str]:
    """``count`` text lines of whole words, drawn from ``texts``."""
    words = [w for text in texts for w in re.split(r"\s+", text) if w and w.isprintable() and w.isascii()]
    out = []
    while len(out) < count:
        start = int(rng.integers(0, len(words) - 8))
        line = ""
        for word in words[start:]:
            if len(line) + len(word) + 1 > max_chars:
                break
            line = f"{line} {word}".strip()
        if len(line) >= min_chars:
            out.append(line)
    return out


def render_line(text: str, font_path: str, height: int, rng: np.random.Generator) -> np.ndarray:
    """One line of dark text on a light background, as an RGB uint8 image ``height`` pixels high."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.truetype(font_path, size=int(height * rng.uniform(0.55, 0.75)))
    left, top, right, bottom = font.getbbox(text)
    margin = int(height * 0.15)
    width = right - left + 2 * margin
    paper = tuple(int(v) for v in rng.integers(150, 256, size=3))
    ink = tuple(int(v) for v in rng.integers(0, 120, size=3))
    image = Image.new("RGB", (width, height), paper)
    ImageDraw.Draw(image).text((margin - left, (height - (bottom - top)) // 2 - top), text, font=font, fill=ink)
    return _degraded(image, rng, text_height=height)


def render_page(texts: list[str], size: tuple[int, int], rng: np.random.Generator):
    """A page of text lines: the RGB image and each line's box ``(top, left, bottom, right)``."""
    from PIL import Image, ImageDraw, ImageFont

    height, width = size
    paper = tuple(int(v) for v in rng.integers(150, 256, size=3))
    image = Image.new("RGB", (width, height), paper)
    draw = ImageDraw.Draw(image)
    font_size = int(rng.integers(14, 26))
    font = ImageFont.truetype(fonts()[int(rng.integers(len(FONT_FILES)))], size=font_size)
    ink = tuple(int(v) for v in rng.integers(0, 120, size=3))
    boxes = []
    y = int(rng.integers(2, 20))
    for line in lines(texts, 64, rng, min_chars=4, max_chars=int(rng.integers(10, 40))):
        x = int(rng.integers(2, max(3, width // 4)))
        left, top, right, bottom = draw.textbbox((x, y), line, font=font)
        if bottom >= height - 2:
            break
        if rng.random() < 0.85:  # leave the odd line out, so pages differ in layout
            draw.text((x, y), line, font=font, fill=ink)
            boxes.append((max(top, 0), max(left, 0), min(bottom, height), min(right, width)))
        y = bottom + int(rng.integers(4, 18))
    return _degraded(image, rng, text_height=font_size), boxes


def _degraded(image, rng: np.random.Generator, text_height: int) -> np.ndarray:
    """What a camera or scanner does to a page: blur (relative to the text size), noise, JPEG."""
    import io

    from PIL import Image, ImageFilter

    image = image.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.0, 1.2)) * text_height / 24))
    pixels = np.asarray(image).astype(np.float32) + rng.normal(0.0, rng.uniform(0.0, 14.0), (image.height, image.width, 3))
    buffer = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buffer, format="JPEG", quality=int(rng.integers(25, 90)))
    with Image.open(buffer) as decoded:
        return np.asarray(decoded.convert("RGB"))

"""Real photos from the package registries: scikit-image's samples and Debian's opencv-doc.

Calibration and evaluation draw from disjoint sets of source images, split by
a hash of each file's name, so no evaluation image is ever calibrated on.
"""

from __future__ import annotations

import glob
import hashlib
import os
import shutil
import subprocess
import tempfile

import numpy as np

from qwt_onnx.cache import cache_dir
from qwt_onnx.errors import InputError

MIN_SIDE = 128  # smaller pictures in the docs are icons and thumbnails
EVAL_SHARE = 4  # one source image in four goes to the evaluation set


def opencv_doc_dir() -> str:
    """Debian's opencv-doc unpacked in the cache (fetched with ``apt-get download`` once)."""
    return debian_files("opencv-doc", "usr/share/doc/opencv-doc", "**/*.jp*g")


def debian_files(package: str, root: str, pattern: str) -> str:
    """A folder in the cache holding the files of Debian package ``package`` under ``root`` that
    match ``pattern``, flattened (``a/b.jpg`` -> ``a__b.jpg``); fetched with ``apt-get download`` once."""
    target = os.path.join(cache_dir(), package)
    if os.path.isdir(target):
        return target
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        raise InputError(f"the zoo's data comes from Debian's {package} package; run on Debian/Ubuntu with apt-get")
    with tempfile.TemporaryDirectory() as tmp:
        fetched = subprocess.run(["apt-get", "download", package], cwd=tmp, capture_output=True, text=True)
        debs = glob.glob(os.path.join(tmp, f"{package}_*.deb"))
        if fetched.returncode != 0 or not debs:
            raise InputError(f"apt-get download {package} failed ({fetched.stderr.strip()[:200]}); check the Debian mirror")
        unpacked = os.path.join(tmp, "x")
        subprocess.run(["dpkg-deb", "-x", debs[0], unpacked], check=True)
        os.makedirs(target + ".part", exist_ok=True)
        for path in glob.glob(os.path.join(unpacked, root, pattern), recursive=True):
            name = os.path.relpath(path, os.path.join(unpacked, root)).replace(os.sep, "__")
            shutil.copyfile(path, os.path.join(target + ".part", name))
        os.replace(target + ".part", target)
    return target


def photo_paths() -> list[str]:
    """Every usable real photo, in a fixed order."""
    import skimage.data
    from PIL import Image

    skimage_dir = os.path.dirname(skimage.data.__file__)
    candidates = sorted(glob.glob(os.path.join(skimage_dir, "*.png")) + glob.glob(os.path.join(skimage_dir, "*.jpg")))
    candidates += sorted(glob.glob(os.path.join(opencv_doc_dir(), "*")))
    usable = []
    for path in candidates:
        try:
            with Image.open(path) as image:
                if min(image.size) >= MIN_SIDE:
                    usable.append(path)
        except OSError:
            continue
    return usable


def is_evaluation_image(path: str) -> bool:
    digest = hashlib.sha1(os.path.basename(path).encode()).digest()
    return digest[0] % EVAL_SHARE == 0


def split_photos() -> tuple[list[str], list[str]]:
    """(calibration sources, evaluation sources)."""
    paths = photo_paths()
    evaluation = [p for p in paths if is_evaluation_image(p)]
    return [p for p in paths if not is_evaluation_image(p)], evaluation


def imagenet_chw(image: np.ndarray) -> np.ndarray:
    """An HWC image in 0..255 normalised with the ImageNet mean and deviation, as CHW float32."""
    normalised = (image / 255.0 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    return normalised.transpose(2, 0, 1).astype(np.float32)


def load_rgb(path: str) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def random_crop(image: np.ndarray, rng: np.random.Generator, min_area: float = 0.35) -> np.ndarray:
    """A crop covering ``min_area`` to all of the image, aspect ratio between 3/4 and 4/3."""
    h, w = image.shape[:2]
    area = rng.uniform(min_area, 1.0) * h * w
    aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
    ch = int(min(h, round(np.sqrt(area / aspect))))
    cw = int(min(w, round(np.sqrt(area * aspect))))
    top, left = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
    return image[top : top + ch, left : left + cw]


def calibration_order(paths: list[str]) -> list[str]:
    """The sources in a fixed shuffled order, so any prefix mixes both image collections."""
    order = np.random.default_rng(0).permutation(len(paths))
    return [paths[i] for i in order]


def fill_with_crops(photos: list[np.ndarray], count: int) -> list[np.ndarray]:
    """Each photo whole, as deployment sees it, then random crops of them up to ``count``."""
    rng = np.random.default_rng(1)
    picked = photos[:count]
    while len(picked) < count:
        picked.append(random_crop(photos[len(picked) % len(photos)], rng))
    return picked

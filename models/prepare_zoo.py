"""Prepare the zoo's models and real calibration / evaluation data in the cache.

    python models/prepare_zoo.py            # every zoo model
    python models/prepare_zoo.py vit-s      # one

Needs ``pip install -e ".[zoo]"``; the photos come from scikit-image and
Debian's opencv-doc package (fetched with ``apt-get download`` once).
"""

from __future__ import annotations

import sys

from qwt_onnx import zoo


def main(names: list[str]) -> None:
    for name in names or sorted(zoo.ENTRIES):
        prepared = zoo.prepare(name)
        print(f"{name}: model {prepared.model}\n  calibration {prepared.calibration}\n  evaluation {prepared.evaluation}")


if __name__ == "__main__":
    main(sys.argv[1:])

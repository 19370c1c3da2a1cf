"""``digits``: scikit-learn's handwritten digits (UCI optdigits test set; 1,797 real 8x8 scans of
43 writers, 17 grey levels), which the installed scikit-learn ships, so nothing is downloaded.

Split for zero-shot retrieval like CUB/Cars: digits 0-4 train, digits 5-9 test (every test image
queries the others). The images are written once as 8-bit grey PNGs into the data cache
(``$DISTILL_CACHE`` or ``~/.cache/distill``, or ``digits:DIR``) and reused.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from distill.data._common import build_cache, reject_options
from distill.data.base import Sample, Splits, register_dataset
from distill.data.synthetic import cache_root

TRAIN_DIGITS = range(5)


def _render(directory: Path) -> None:
    from sklearn.datasets import load_digits

    digits = load_digits()
    records = []
    for i, (image, label) in enumerate(zip(digits.images, digits.target)):
        name = f"{int(label)}/{i:04d}.png"
        (directory / str(int(label))).mkdir(exist_ok=True)
        Image.fromarray(np.round(image * 255 / 16).astype(np.uint8), mode="L").save(directory / name)
        records.append({"file": name, "label": int(label)})
    (directory / "index.json").write_text(json.dumps(records))


@register_dataset("digits")
def load_digits_dataset(path: str | None = None, *, strict: bool = False, **options) -> Splits:
    """scikit-learn's digits as a retrieval data set (0-4 train, 5-9 test); ``strict`` is accepted
    for uniformity (the images are written here, so none is unreadable)."""
    reject_options("digits", options, ["strict"])
    directory = build_cache((Path(path) if path else cache_root()) / "digits-v1", _render)
    records = json.loads((directory / "index.json").read_text())
    samples = [Sample(str(directory / r["file"]), r["label"]) for r in records]
    train = [s for s in samples if s.label in TRAIN_DIGITS]
    test = [s for s in samples if s.label not in TRAIN_DIGITS]
    return Splits("digits", train, test, test, protocol="retrieval")

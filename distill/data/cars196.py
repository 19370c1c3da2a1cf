"""Cars196 / Stanford Cars (Krause et al., 3dRR 2013) with the split of Song et al. (CVPR 2016).

``PATH/cars_annos.mat`` (MATLAB v5) holds the struct array ``annotations`` with fields
``relative_im_path`` (``car_ims/000001.jpg``), ``class`` (1-196), bounding box and ``test``; the
images are under ``PATH/car_ims/``. Classes 1-98 train, 99-196 test (the ``test`` flag of the
classification split is not used); the test list is both query and gallery.
"""

from __future__ import annotations

import numpy as np

from distill.data._common import check_counts, class_counts, dataset_root, inside_root, reject_options, require
from distill.data.base import Sample, Splits, register_dataset
from distill.data.dataset import check_images
from distill.errors import DistillError

NUM_CLASSES = 196
TRAIN_CLASSES = 98
# Song et al. 2016, sec. 6 (arXiv:1511.06452): 16,185 images; the first 98 models (8,054 images)
# train, the other 98 (8,131 images) test.
OFFICIAL = {"train_classes": 98, "train_images": 8054, "test_classes": 98, "test_images": 8131}
HOLDS = "cars_annos.mat and car_ims/"


@register_dataset("cars196")
def load_cars196(path: str | None, *, strict: bool = False, **options) -> Splits:
    """Cars196 at ``path`` -> retrieval splits (classes 1-98 train, 99-196 test)."""
    from scipy.io import loadmat

    reject_options("cars196", options, ["strict"])
    root = dataset_root("cars196", path, HOLDS)
    annos = require("cars196", root / "cars_annos.mat")
    try:
        mat = loadmat(annos, squeeze_me=True)
    except Exception as err:  # scipy raises ValueError, MatReadError, NotImplementedError, ...
        raise DistillError(f"cars196: cannot read {annos} as a MATLAB file ({err})") from None
    if "annotations" not in mat:
        raise DistillError(f"cars196: {annos} has no 'annotations' struct array")
    records = np.atleast_1d(mat["annotations"])
    fields = records.dtype.names or ()
    missing = [f for f in ("relative_im_path", "class") if f not in fields]
    if missing:
        raise DistillError(f"cars196: {annos}: 'annotations' has no field(s) {', '.join(missing)}")
    samples = []
    for n, (rel, label) in enumerate(zip(records["relative_im_path"], records["class"]), 1):
        label = int(label)
        if not 1 <= label <= NUM_CLASSES:
            raise DistillError(f"cars196: {annos}: annotation {n} ({rel}) has class {label}, outside 1..{NUM_CLASSES}")
        samples.append(Sample(str(inside_root(root, str(rel), f"cars196: {annos}: annotation {n}")), label))
    train = [s for s in samples if s.label <= TRAIN_CLASSES]
    test = [s for s in samples if s.label > TRAIN_CLASSES]
    counts = class_counts("train", train) | class_counts("test", test)
    check_counts("cars196", root, counts, OFFICIAL)
    test = check_images(test, strict)
    info = {"root": str(root), "counts": counts}
    return Splits("cars196", check_images(train, strict), test, list(test), protocol="retrieval", info=info)

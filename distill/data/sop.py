"""Stanford Online Products (Song et al., CVPR 2016) in its published layout.

``PATH`` is the ``Stanford_Online_Products`` directory: ``Ebay_train.txt`` and ``Ebay_test.txt``,
each with the header ``image_id class_id super_class_id path`` and one image per line
(``1 1 1 bicycle_final/111085122871_0.JPG``), paths relative to ``PATH``. Labels are the
product (class) ids; the test list is both query and gallery (Recall@K / NMI / F1).
"""

from __future__ import annotations

from pathlib import Path

from distill.data._common import check_counts, class_counts, dataset_root, inside_root, read_table, reject_options, require
from distill.data.base import Sample, Splits, register_dataset
from distill.data.dataset import check_images
from distill.errors import DistillError

HEADER = "image_id class_id super_class_id path"
# Song et al. 2016, sec. 5 (arXiv:1511.06452) and the release's Ebay_*.txt: 120,053 images of
# 22,634 products; 59,551 images of 11,318 products train, 60,502 images of 11,316 products test.
OFFICIAL = {"train_classes": 11318, "train_images": 59551, "test_classes": 11316, "test_images": 60502}
HOLDS = "Ebay_train.txt, Ebay_test.txt and the image folders (the Stanford_Online_Products directory)"


def _read_list(root: Path, name: str) -> list[Sample]:
    path = require("sop", root / name)
    rows = read_table(path, "<image_id> <class_id> <super_class_id> <path>", (int, int, int, str), header=HEADER)
    if not rows:
        raise DistillError(f"sop: {path} lists no images")
    return [Sample(str(inside_root(root, rel, f"{path}, line {line}")), class_id) for line, (_, class_id, _, rel) in rows]


@register_dataset("sop")
def load_sop(path: str | None, *, strict: bool = False, **options) -> Splits:
    """Stanford Online Products at ``path`` -> retrieval splits (Ebay_train.txt / Ebay_test.txt)."""
    reject_options("sop", options, ["strict"])
    root = dataset_root("sop", path, HOLDS)
    train, test = _read_list(root, "Ebay_train.txt"), _read_list(root, "Ebay_test.txt")
    overlap = {s.label for s in train} & {s.label for s in test}
    if overlap:
        raise DistillError(
            f"sop: class ids {sorted(overlap)[:5]} appear in both Ebay_train.txt and Ebay_test.txt; "
            "train and test products must be disjoint"
        )
    counts = class_counts("train", train) | class_counts("test", test)
    check_counts("sop", root, counts, OFFICIAL)
    test = check_images(test, strict)
    info = {"root": str(root), "counts": counts}
    return Splits("sop", check_images(train, strict), test, list(test), protocol="retrieval", info=info)

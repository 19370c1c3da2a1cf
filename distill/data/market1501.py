"""Market-1501 (Zheng et al., ICCV 2015) in its published layout.

``PATH/bounding_box_train``, ``PATH/query``, ``PATH/bounding_box_test`` hold images named
``PPPP_cCsS_FFFFFF_NN.jpg`` (person id, camera C, sequence S, frame, box). Person id ``-1``
marks junk boxes, which are ignored; id ``0000`` marks distractors, which stay in the gallery.
Labels are the person ids, cameras the ``C`` digit (1-6); the protocol is re-ID (mAP/CMC).
"""

from __future__ import annotations

import re
from pathlib import Path

from distill.data._common import check_counts, dataset_root, reject_options, require
from distill.data.base import Sample, Splits, register_dataset
from distill.data.dataset import check_images
from distill.errors import DistillError

NAME = re.compile(r"^(-1|\d{4})_c([1-6])s(\d)_(\d{6})_(\d{2})\.jpg$")
# From the release's readme.txt: 751 train ids / 12,936 images; 750 test ids, 3,368 queries;
# 19,732 images in bounding_box_test (junk and distractors included).
OFFICIAL = {"train_ids": 751, "train_images": 12936, "query_ids": 750, "query_images": 3368, "gallery_images": 19732}
HOLDS = "bounding_box_train/, query/ and bounding_box_test/"


def _read_dir(folder: Path, distractors_allowed: bool) -> tuple[list[Sample], int]:
    """Samples of one folder (sorted by name) and the number of junk files skipped.

    Files that are not ``.jpg`` (the release ships ``Thumbs.db`` files) are ignored.
    """
    samples, junk = [], 0
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() != ".jpg":
            continue
        m = NAME.match(path.name)
        if m is None:
            raise DistillError(
                f"market1501: malformed file name {path} (expected PPPP_cCsS_FFFFFF_NN.jpg, e.g. 0002_c1s1_000451_03.jpg)"
            )
        pid, camera = int(m[1]), int(m[2])
        if pid == -1:
            junk += 1
            continue
        if pid == 0 and not distractors_allowed:
            raise DistillError(f"market1501: distractor (person id 0000) outside bounding_box_test: {path}")
        samples.append(Sample(str(path), pid, camera))
    if not samples:
        raise DistillError(f"market1501: no images in {folder}")
    return samples, junk


@register_dataset("market1501")
def load_market1501(path: str | None, *, strict: bool = False, **options) -> Splits:
    """Market-1501 at ``path`` -> re-ID splits (junk ignored, distractors kept in the gallery)."""
    reject_options("market1501", options, ["strict"])
    root = dataset_root("market1501", path, HOLDS)
    train, _ = _read_dir(require("market1501", root / "bounding_box_train", "directory"), False)
    query, _ = _read_dir(require("market1501", root / "query", "directory"), False)
    gallery, junk = _read_dir(require("market1501", root / "bounding_box_test", "directory"), True)
    overlap = {s.label for s in train} & {s.label for s in query + gallery}
    if overlap:
        raise DistillError(
            f"market1501: person ids {sorted(overlap)[:5]} appear in both bounding_box_train and the test set; "
            "train and test identities must be disjoint"
        )
    counts = {
        "train_ids": len({s.label for s in train}),
        "train_images": len(train),
        "query_ids": len({s.label for s in query}),
        "query_images": len(query),
        "gallery_images": len(gallery) + junk,
    }
    check_counts("market1501", root, counts, OFFICIAL)
    info = {
        "root": str(root),
        "counts": counts,
        "junk_ignored": junk,
        "distractors": sum(s.label == 0 for s in gallery),
        "cameras": sorted({s.camera for s in train + query + gallery}),
    }
    return Splits(
        "market1501",
        check_images(train, strict),
        check_images(query, strict),
        check_images(gallery, strict),
        protocol="reid",
        info=info,
    )

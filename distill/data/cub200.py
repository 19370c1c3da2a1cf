"""CUB-200-2011 (Wah et al., 2011) with the zero-shot retrieval split of Song et al. (CVPR 2016).

``PATH`` is the ``CUB_200_2011`` directory: ``images.txt`` (``<image_id> <path>``),
``image_class_labels.txt`` (``<image_id> <class_id>``), ``images/`` and, for ``bbox_crop``,
``bounding_boxes.txt`` (``<image_id> <x> <y> <width> <height>``). Classes 1-100 train,
101-200 test; the test list is both query and gallery (Recall@K / NMI / F1).

With ``bbox_crop=True`` every image is cropped to its box once, into ``images_bbox/`` under the
data cache (``derived_dir``; never into ``PATH``), written into a temp directory and renamed, and
the crops are used from then on. Paths in ``images.txt`` must stay inside ``PATH/images``.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from distill.data._common import (
    build_cache, check_counts, class_counts, dataset_root, derived_dir, inside_root, read_table, reject_options, require,
)
from distill.data.base import Sample, Splits, register_dataset
from distill.data.dataset import check_images
from distill.errors import DistillError

NUM_CLASSES = 200
TRAIN_CLASSES = 100
# Song et al. 2016, sec. 6 (arXiv:1511.06452): 11,788 images; the first 100 species (5,864 images)
# train, the other 100 (5,924 images) test.
OFFICIAL = {"train_classes": 100, "train_images": 5864, "test_classes": 100, "test_images": 5924}
HOLDS = "images.txt, image_class_labels.txt and images/ (the CUB_200_2011 directory)"


def _read_ids(path: Path, form: str, types: tuple) -> dict[int, tuple[int, tuple]]:
    """``{image_id: (line, other values)}``; a repeated image id is an error naming both lines."""
    out: dict[int, tuple[int, tuple]] = {}
    for line, (image_id, *rest) in read_table(path, form, types):
        if image_id in out:
            raise DistillError(f"{path}, line {line}: image id {image_id} already given on line {out[image_id][0]}")
        out[image_id] = (line, tuple(rest))
    return out


def _crop_all(root: Path, samples: list[Sample], boxes: dict[int, tuple[int, tuple]], ids: list[int], out: Path) -> None:
    for s, image_id in zip(samples, ids):
        x, y, w, h = boxes[image_id][1]
        target = out / Path(s.path).relative_to(root / "images")
        target.parent.mkdir(parents=True, exist_ok=True)
        with Image.open(s.path) as img:
            box = (max(0, int(x)), max(0, int(y)), min(img.width, int(x + w)), min(img.height, int(y + h)))
            img.convert("RGB").crop(box).save(target, quality=95, subsampling=0)


@register_dataset("cub200")
def load_cub200(
    path: str | None, *, bbox_crop: bool = False, strict: bool = False, cache_dir: str | None = None, **options
) -> Splits:
    """CUB-200-2011 at ``path`` -> retrieval splits (classes 1-100 train, 101-200 test).

    ``cache_dir`` puts the bounding-box crops there (default: ``derived_dir``, outside ``PATH``).
    """
    reject_options("cub200", options, ["bbox_crop", "strict", "cache_dir"])
    root = dataset_root("cub200", path, HOLDS)
    images_txt = require("cub200", root / "images.txt")
    labels_txt = require("cub200", root / "image_class_labels.txt")
    require("cub200", root / "images", "directory")
    images = _read_ids(images_txt, "<image_id> <path>", (int, str))
    labels = _read_ids(labels_txt, "<image_id> <class_id>", (int, int))
    for image_id, (line, (label,)) in labels.items():
        if image_id not in images:
            raise DistillError(f"{labels_txt}, line {line}: image id {image_id} is not in images.txt")
        if not 1 <= label <= NUM_CLASSES:
            raise DistillError(f"{labels_txt}, line {line}: class id {label} is outside 1..{NUM_CLASSES}")
    for image_id, (line, _) in images.items():
        if image_id not in labels:
            raise DistillError(f"{labels_txt}: no class for image id {image_id} (images.txt line {line})")
    ids = sorted(images)
    samples = {
        i: Sample(str(inside_root(root / "images", images[i][1][0], f"{images_txt}, line {images[i][0]}")), labels[i][1][0])
        for i in ids
    }
    train = [samples[i] for i in ids if samples[i].label <= TRAIN_CLASSES]
    test = [samples[i] for i in ids if samples[i].label > TRAIN_CLASSES]
    counts = class_counts("train", train) | class_counts("test", test)
    check_counts("cub200", root, counts, OFFICIAL)
    train, test = check_images(train, strict), check_images(test, strict)
    info = {"root": str(root), "counts": counts, "bbox_crop": bbox_crop}
    if bbox_crop:
        boxes_txt = require("cub200", root / "bounding_boxes.txt")
        boxes = _read_ids(boxes_txt, "<image_id> <x> <y> <width> <height>", (int, float, float, float, float))
        for image_id, (line, _) in images.items():
            if image_id not in boxes:
                raise DistillError(f"{boxes_txt}: no box for image id {image_id} (images.txt line {line})")
        for image_id, (line, (_, _, w, h)) in boxes.items():
            if w <= 0 or h <= 0:
                raise DistillError(f"{boxes_txt}, line {line}: box width and height must be > 0")
        by_path = {s.path: i for i, s in samples.items()}
        kept = train + test
        crops = derived_dir("cub200", root, "images_bbox", cache_dir)
        build_cache(crops, lambda tmp: _crop_all(root, kept, boxes, [by_path[s.path] for s in kept], tmp))

        def cropped(part: list[Sample]) -> list[Sample]:
            out = [Sample(str(crops / Path(s.path).relative_to(root / "images")), s.label) for s in part]
            missing = [s.path for s in out if not Path(s.path).is_file()]
            if missing:
                raise DistillError(f"cub200: the crop cache {crops} lacks {missing[0]}; delete it to crop again")
            return out

        train, test = cropped(train), cropped(test)
        info["images"] = str(crops)
    return Splits("cub200", train, test, list(test), protocol="retrieval", info=info)

"""Any ``PATH/<class>/<image>`` tree, split by class for zero-shot retrieval.

Classes are the sub-directories of ``PATH`` (hidden ones skipped), sorted by name; label ``i`` is
the i-th class. Images are the files with an image extension anywhere under a class directory; symbolic links
are followed only inside their class directory, and each real file is counted once (loops and
links to other classes are skipped with a warning).
Split rule: the first ``ceil(n / 2)`` classes train, the rest test. Or a split file
(``split_file=FILE``): one ``<class name> <train|test>`` per line, blank lines and ``#`` comments
ignored; classes it does not list are left out (with a warning).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

from torchvision.datasets.folder import IMG_EXTENSIONS

from distill.data._common import class_counts, dataset_root, reject_options
from distill.data.base import Sample, Splits, register_dataset
from distill.data.dataset import check_images
from distill.errors import DistillError

HOLDS = "one sub-directory of images per class"


def _images(folder: Path, seen: set[str]) -> list[str]:
    """Image files under ``folder`` (a class directory), following directory links only while they
    stay inside it.

    A directory reached twice (a link loop), a directory link leaving the class directory, a file
    link into another class of the same data set and a file whose real path is in ``seen``
    (already counted, here or in another class) are skipped with a warning; the real paths taken
    are added to ``seen``. File links to images outside the data set (a tree of links) are kept.
    """
    top, root = folder.resolve(), folder.parent.resolve()
    found, skipped, visited = [], [], set()
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        real = Path(dirpath).resolve()
        if real in visited or not real.is_relative_to(top):
            skipped.append(dirpath)
            dirnames[:] = []
            continue
        visited.add(real)
        dirnames.sort()
        for name in sorted(filenames):
            if not name.lower().endswith(IMG_EXTENSIONS):
                continue
            path = os.path.join(dirpath, name)
            target = os.path.realpath(path)
            if target in seen or (Path(target).is_relative_to(root) and not Path(target).is_relative_to(top)):
                skipped.append(path)
                continue
            seen.add(target)
            found.append(path)
    if skipped:
        warnings.warn(
            f"imagefolder: skipped {len(skipped)} path(s) under {folder} that loop, leave the class directory "
            f"or repeat an image already counted (links): {', '.join(skipped[:3])}",
            stacklevel=3,
        )
    return found


def _read_split(path: Path, classes: list[str]) -> dict[str, str]:
    """``{class name: "train" | "test"}`` from a split file; errors name the file and line."""
    if not path.is_file():
        raise DistillError(f"imagefolder: split file not found: {path}")
    known, split, lines = set(classes), {}, {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        parts = text.rsplit(maxsplit=1)
        if len(parts) != 2 or parts[1] not in ("train", "test"):
            raise DistillError(f"{path}, line {number}: expected '<class name> <train|test>', got '{text}'")
        name, part = parts
        if name not in known:
            raise DistillError(f"{path}, line {number}: no class directory named '{name}'")
        if name in split:
            raise DistillError(f"{path}, line {number}: class '{name}' already listed on line {lines[name]}")
        split[name], lines[name] = part, number
    return split


@register_dataset("imagefolder")
def load_imagefolder(path: str | None, *, split_file: str | None = None, strict: bool = False, **options) -> Splits:
    """``PATH/<class>/<image>`` -> retrieval splits by class (first half train, or ``split_file``)."""
    reject_options("imagefolder", options, ["split_file", "strict"])
    root = dataset_root("imagefolder", path, HOLDS)
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(classes) < 2:
        raise DistillError(f"imagefolder: {root} has {len(classes)} class directories; train and test need at least 2")
    if split_file is None:
        n_train = (len(classes) + 1) // 2
        split = {c: "train" if i < n_train else "test" for i, c in enumerate(classes)}
    else:
        split = _read_split(Path(split_file).expanduser(), classes)
        left_out = [c for c in classes if c not in split]
        if left_out:
            shown = ", ".join(left_out[:5]) + (f" and {len(left_out) - 5} more" if len(left_out) > 5 else "")
            warnings.warn(f"imagefolder: {len(left_out)} class(es) not in {split_file} are left out: {shown}", stacklevel=2)
    parts: dict[str, list[Sample]] = {"train": [], "test": []}
    seen: set[str] = set()
    for label, name in enumerate(classes):
        if name not in split:
            continue
        files = _images(root / name, seen)
        if not files:
            raise DistillError(f"imagefolder: class directory {root / name} has no images ({', '.join(IMG_EXTENSIONS)})")
        parts[split[name]] += [Sample(f, label) for f in files]
    for part, samples in parts.items():
        if not samples:
            raise DistillError(f"imagefolder: no {part} classes in {split_file or root}")
    test = check_images(parts["test"], strict)
    info = {
        "root": str(root),
        "classes": classes,
        "split": split_file or "first half of the sorted classes train",
        "counts": class_counts("train", parts["train"]) | class_counts("test", parts["test"]),
    }
    return Splits("imagefolder", check_images(parts["train"], strict), test, list(test), protocol="retrieval", info=info)

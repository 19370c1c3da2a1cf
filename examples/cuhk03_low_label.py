"""Make the low-label split of CUHK03 as folders of symbolic links (no image is copied):

    OUT/labeled/    Market-1501 layout: the training images of LABELED_IDS of the training people
                    (drawn with --seed), and the whole test split (query, bounding_box_test)
    OUT/unlabeled/  the training images of the other people, plus every image of --extra

then train with

    distill run --data market1501:OUT/labeled --unlabeled OUT/unlabeled --teacher-weights TEACHER ...

Usage: python examples/cuhk03_low_label.py --market /data/cuhk03_market --extra /data/cuhk03_extra --out /data/cuhk03_low
OUT must be outside this repository (images never go into it) and must not exist yet; the folder is
written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TEST_DIRS = ("query", "bounding_box_test")


def person(name: str) -> str:
    """The person id of a Market-1501 file name (``PPPP_cCsS_FFFFFF_NN.jpg``)."""
    return name.split("_")[0]


def link_all(files: list[Path], folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for f in files:
        (folder / f.name).symlink_to(f.resolve())


def images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))


def make_split(market: Path, extra: Path | None, out: Path, labeled_ids: int, seed: int) -> dict[str, int]:
    """Write the two folders of links (see the module docstring); returns what went where."""
    train = [p for p in images(market / "bounding_box_train") if not person(p.name).startswith("-")]
    people = sorted({person(p.name) for p in train})
    if not 0 < labeled_ids < len(people):
        raise SystemExit(f"--labeled-ids must be in 1..{len(people) - 1} ({len(people)} training people), got {labeled_ids}")
    labeled = set(random.Random(seed).sample(people, labeled_ids))
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    link_all([p for p in train if person(p.name) in labeled], tmp / "labeled" / "bounding_box_train")
    for name in TEST_DIRS:
        link_all(images(market / name), tmp / "labeled" / name)
    rest = [p for p in train if person(p.name) not in labeled]
    link_all(rest, tmp / "unlabeled" / "train_rest")
    extra_files = images(extra) if extra else []
    link_all(extra_files, tmp / "unlabeled" / "extra")
    tmp.rename(out)
    return {"labeled people": len(labeled), "labeled images": len(train) - len(rest),
            "unlabeled images (other people)": len(rest), "unlabeled images (extra)": len(extra_files)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--market", type=Path, required=True, help="CUHK03 in the Market-1501 layout (cuhk03_market)")
    parser.add_argument("--extra", type=Path, help="more images of other people, all unlabeled (cuhk03_extra)")
    parser.add_argument("--out", type=Path, required=True, help="a new folder outside this repository")
    parser.add_argument("--labeled-ids", type=int, default=100, help="training people whose labels are kept")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    out = args.out.resolve()
    if out.is_relative_to(REPO):
        raise SystemExit(f"--out {out} is inside the repository {REPO}: choose a folder outside it")
    if out.exists():
        raise SystemExit(f"--out {out} exists already: choose a new folder")
    for folder in [args.market / "bounding_box_train", *(args.market / d for d in TEST_DIRS), *([args.extra] if args.extra else [])]:
        if not folder.is_dir():
            raise SystemExit(f"{folder} is not a folder")
    counts = make_split(args.market, args.extra, out, args.labeled_ids, args.seed)
    print(f"wrote {out}: " + ", ".join(f"{v} {k}" for k, v in counts.items()), file=sys.stderr)
    print(f"distill run --data market1501:{out / 'labeled'} --unlabeled {out / 'unlabeled'} --teacher-weights TEACHER", file=sys.stderr)


if __name__ == "__main__":
    main()

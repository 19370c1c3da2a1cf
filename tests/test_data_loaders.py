"""Each loader on a tiny on-disk fixture written in the data set's published layout."""

from __future__ import annotations

import itertools
import os
import warnings
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import h5py
import numpy as np
import pytest
from PIL import Image
from scipy.io import loadmat, savemat

from distill.data import cars196, cub200, cuhk03, dataset_names, load_dataset, market1501, sop
from distill.data._common import build_cache
from distill.errors import DistillError


def write_image(path: Path, seed: int = 0, size: tuple[int, int] = (6, 10)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


@contextmanager
def no_warnings() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


def write_gradient(path: Path, blue: int) -> None:
    """A smooth 20 x 16 image (red along x, green along y) that survives JPEG re-encoding."""
    path.parent.mkdir(parents=True, exist_ok=True)
    y, x = np.mgrid[0:16, 0:20]
    Image.fromarray(np.stack([12 * x, 15 * y, np.full_like(x, blue % 256)], -1).astype(np.uint8)).save(path, quality=100)


# ---------------------------------------------------------------- Market-1501

MARKET = {  # folder -> (person id, camera, frame) per file
    "bounding_box_train": [(2, 1, 10), (2, 3, 11), (2, 3, 12), (7, 2, 13), (7, 6, 14), (9, 5, 15)],
    "query": [(11, 1, 20), (11, 4, 21), (12, 2, 22)],
    "bounding_box_test": [(11, 2, 30), (11, 1, 31), (12, 5, 32), (12, 2, 33), (0, 3, 34), (0, 6, 35), (-1, 1, 36), (-1, 4, 37)],
}


def market_name(pid: int, camera: int, frame: int) -> str:
    return f"{'-1' if pid == -1 else f'{pid:04d}'}_c{camera}s1_{frame:06d}_01.jpg"


@pytest.fixture
def market(tmp_path: Path) -> Path:
    root = tmp_path / "Market-1501-v15.09.15"
    for folder, entries in MARKET.items():
        for n, entry in enumerate(entries):
            write_image(root / folder / market_name(*entry), seed=n)
        (root / folder / "Thumbs.db").write_bytes(b"\0")
    return root


def test_market1501_layout(market: Path) -> None:
    splits = load_dataset(f"market1501:{market}")
    assert splits.protocol == "reid" and splits.name == "market1501"
    for part, folder in (("train", "bounding_box_train"), ("query", "query"), ("gallery", "bounding_box_test")):
        expected = Counter((pid, cam) for pid, cam, _ in MARKET[folder] if pid != -1)
        got = getattr(splits, part)
        assert Counter((s.label, s.camera) for s in got) == expected
        assert all(Path(s.path).parent.name == folder and Path(s.path).is_file() for s in got)
    assert splits.num_train_classes == 3
    assert splits.info["junk_ignored"] == 2 and splits.info["distractors"] == 2
    assert splits.info["counts"] == {
        "train_ids": 3, "train_images": 6, "query_ids": 2, "query_images": 3, "gallery_images": 8
    }
    assert splits.info["cameras"] == [1, 2, 3, 4, 5, 6]


def test_market1501_corrupt_image_skipped_or_strict(market: Path) -> None:
    bad = market / "query" / market_name(12, 3, 99)
    bad.write_bytes(b"not a jpeg")
    with pytest.warns(UserWarning, match=r"skipping 1 unreadable image\(s\): .*0012_c3s1_000099_01.jpg"):
        splits = load_dataset(f"market1501:{market}")
    assert len(splits.query) == 3 and str(bad) not in {s.path for s in splits.query}
    with pytest.raises(DistillError, match=r"1 unreadable image\(s\): .*0012_c3s1_000099_01.jpg"):
        load_dataset(f"market1501:{market}", strict=True)


def test_market1501_layout_errors(market: Path, tmp_path: Path) -> None:
    with pytest.raises(DistillError, match=r"market1501 needs a path: --data market1501:PATH"):
        load_dataset("market1501")
    with pytest.raises(DistillError, match=r"market1501: directory not found: .*nowhere"):
        load_dataset(f"market1501:{tmp_path / 'nowhere'}")
    with pytest.raises(DistillError, match=r"market1501 does not take the option\(s\) bbox_crop; it takes: strict"):
        load_dataset(f"market1501:{market}", bbox_crop=True)
    bad = market / "query" / "0012_c3_000099.jpg"
    write_image(bad)
    with pytest.raises(DistillError, match=r"market1501: malformed file name .*0012_c3_000099.jpg \(expected PPPP_cCsS"):
        load_dataset(f"market1501:{market}")
    bad.unlink()
    write_image(market / "bounding_box_train" / market_name(0, 1, 50))
    with pytest.raises(DistillError, match=r"distractor \(person id 0000\) outside bounding_box_test: .*0000_c1s1_000050_01.jpg"):
        load_dataset(f"market1501:{market}")
    (market / "bounding_box_train" / market_name(0, 1, 50)).unlink()
    write_image(market / "bounding_box_train" / market_name(11, 1, 51))
    with pytest.raises(DistillError, match=r"person ids \[11\] appear in both bounding_box_train and the test set"):
        load_dataset(f"market1501:{market}")
    for f in (market / "query").iterdir():
        f.unlink()
    with pytest.raises(DistillError, match=r"market1501: no images in .*query"):
        load_dataset(f"market1501:{market}")
    (market / "query").rmdir()
    with pytest.raises(DistillError, match=r"market1501: missing directory .*query"):
        load_dataset(f"market1501:{market}")


def test_market1501_count_warning(market: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    exact = {"train_ids": 3, "train_images": 6, "query_ids": 2, "query_images": 3, "gallery_images": 8}
    monkeypatch.setattr(market1501, "OFFICIAL", exact)
    with no_warnings():
        load_dataset(f"market1501:{market}")
    monkeypatch.setattr(market1501, "OFFICIAL", exact | {"train_images": 7, "query_ids": 3})
    with pytest.warns(UserWarning, match=r"does not match the official release: train images 6 \(official 7\), query ids 2 \(official 3\)"):
        load_dataset(f"market1501:{market}")
    # a copy with at most half the official images is a deliberate subset: no warning
    monkeypatch.setattr(market1501, "OFFICIAL", exact | {"gallery_images": 26})
    with no_warnings():
        load_dataset(f"market1501:{market}")


# ---------------------------------------------------------------- CUHK03

def cuhk03_images(variant: str) -> list[list[list[np.ndarray | None]]]:
    """Camera pairs -> persons -> 10 images (H x W x 3 uint8, or None for an empty cell)."""
    rng = np.random.default_rng(0 if variant == "labeled" else 1)
    h, w = (10, 6) if variant == "labeled" else (12, 5)
    shapes = [[5, 5], [3, 4], [4, 2]], [[2, 5], [5, 1]]  # images in view 1 / view 2 per person
    pairs = []
    for pair in shapes:
        persons = []
        for n1, n2 in pair:
            cells = [None] * 10
            for i in list(range(n1)) + list(range(5, 5 + n2)):
                cells[i] = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            persons.append(cells)
        pairs.append(persons)
    return pairs


def write_cuhk03_mat(path: Path) -> None:
    """``cuhk-03.mat`` as MATLAB v7.3 writes it: HDF5 with a 512-byte header, cells as object references."""
    counter = itertools.count()
    with h5py.File(path, "w", userblock_size=512) as f:
        refs = f.create_group("#refs#")

        def put(data: np.ndarray, matlab_class: str, **kw) -> h5py.Reference:
            ds = refs.create_dataset(f"r{next(counter)}", data=data, **kw)
            ds.attrs["MATLAB_class"] = np.bytes_(matlab_class)
            return ds.ref

        def empty() -> h5py.Reference:
            ref = put(np.zeros(2, np.uint64), "double")
            f[ref].attrs["MATLAB_empty"] = np.uint8(1)
            return ref

        for variant in ("detected", "labeled"):
            pair_refs = []
            for persons in cuhk03_images(variant):
                cells = np.empty((len(persons), 10), dtype=h5py.ref_dtype)
                for p, images in enumerate(persons):
                    for i, image in enumerate(images):
                        cells[p, i] = empty() if image is None else put(image.T, "uint8")
                pair_refs.append(put(cells.T, "cell", dtype=h5py.ref_dtype))
            ds = f.create_dataset(variant, data=np.array(pair_refs, dtype=h5py.ref_dtype).reshape(1, -1))
            ds.attrs["MATLAB_class"] = np.bytes_("cell")
        f.create_dataset("testsets", data=np.zeros((1, 1)))
    with open(path, "r+b") as fh:
        fh.write(b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: Mon Jan  1 00:00:00 2014 HDF5 schema 1.00 .".ljust(116))
        fh.write(b"\0" * 8 + b"\x00\x02IM")


TEST_PERSONS = {3, 5}  # global person ids (pair 1 has persons 1-3, pair 2 persons 4-5)


def cuhk03_protocol(variant: str) -> dict:
    """Filelist of every non-empty image, person ids, views; train persons 1, 2, 4; test 3, 5
    with one query per view and the rest in the gallery (as in the new protocol)."""
    filelist, labels, cams = [], [], []
    person = 0
    for pair, persons in enumerate(cuhk03_images(variant), 1):
        for p, images in enumerate(persons, 1):
            person += 1
            for i, image in enumerate(images):
                if image is not None:
                    view = 1 if i < 5 else 2
                    filelist.append(f"{pair}_{p:03d}_{view}_{i + 1:02d}.png")
                    labels.append(person)
                    cams.append(view)
    train, query, gallery, seen = [], [], [], set()
    for n, (label, cam) in enumerate(zip(labels, cams), 1):
        if label not in TEST_PERSONS:
            train.append(n)
        elif (label, cam) not in seen:
            seen.add((label, cam))
            query.append(n)
        else:
            gallery.append(n)
    col = lambda v: np.array(v, dtype=np.float64).reshape(-1, 1)  # noqa: E731
    cell = np.empty((len(filelist), 1), dtype=object)
    for n, name in enumerate(filelist):
        cell[n, 0] = name
    return {"filelist": cell, "labels": col(labels), "camId": col(cams), "train_idx": col(train), "query_idx": col(query), "gallery_idx": col(gallery)}


@pytest.fixture
def cuhk(tmp_path: Path) -> Path:
    root = tmp_path / "cuhk03"
    (root / "cuhk03_release").mkdir(parents=True)
    write_cuhk03_mat(root / "cuhk03_release" / "cuhk-03.mat")
    for variant in ("labeled", "detected"):
        savemat(root / f"cuhk03_new_protocol_config_{variant}.mat", cuhk03_protocol(variant))
    return root


@pytest.mark.parametrize("variant", ["labeled", "detected"])
def test_cuhk03_extracts_and_splits(cuhk: Path, variant: str) -> None:
    splits = load_dataset(f"cuhk03:{cuhk}", cuhk03_variant=variant)
    assert splits.protocol == "reid" and splits.info["variant"] == variant
    # reference: walk the images with explicit loops
    expected = {"train": [], "query": [], "gallery": []}
    seen, person = set(), 0
    source = {}
    for pair, persons in enumerate(cuhk03_images(variant), 1):
        for p, images in enumerate(persons, 1):
            person += 1
            for i, image in enumerate(images):
                if image is None:
                    continue
                view = 1 if i < 5 else 2
                name = f"{pair}_{p:03d}_{view}_{i + 1:02d}.png"
                source[name] = image
                if person not in TEST_PERSONS:
                    part = "train"
                elif (person, view) not in seen:
                    part = "query"
                    seen.add((person, view))
                else:
                    part = "gallery"
                expected[part].append((name, person, view))
    for part, rows in expected.items():
        got = [(Path(s.path).name, s.label, s.camera) for s in getattr(splits, part)]
        assert got == rows
    assert {s.label for s in splits.train} == {1, 2, 4} and {s.label for s in splits.query} == TEST_PERSONS
    cache = Path(splits.info["images"])
    assert not cache.is_relative_to(cuhk) and not (cuhk / f"images_{variant}").exists()  # nothing written into the data set
    assert sorted(p.name for p in cache.iterdir()) == sorted(source)  # every non-empty cell extracted, nothing else
    for name, image in source.items():
        np.testing.assert_array_equal(np.asarray(Image.open(cache / name)), image)
    assert not [p for p in cuhk.iterdir() if p.name.endswith(".tmp")]


def test_cuhk03_cache_reused_and_atomic(cuhk: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = 0
    real_save = Image.Image.save

    def failing_save(self, fp, *args, **kwargs):
        nonlocal calls
        calls += 1
        if calls == 4:
            raise OSError(28, "No space left on device")
        return real_save(self, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", failing_save)
    with pytest.raises(DistillError, match=r"cannot write the cache .*images_labeled: .*No space left on device"):
        load_dataset(f"cuhk03:{cuhk}")
    assert not (cuhk / "images_labeled").exists()
    assert [p.name for p in cuhk.iterdir() if p.name.startswith(".")] == []  # temp dir removed
    monkeypatch.setattr(Image.Image, "save", real_save)
    first = load_dataset(f"cuhk03:{cuhk}")

    def no_extract(*args):
        raise AssertionError("extracted twice")

    monkeypatch.setattr(cuhk03, "_extract", no_extract)
    again = load_dataset(f"cuhk03:{cuhk}")
    assert again.train == first.train and again.gallery == first.gallery


def test_cuhk03_cache_dir_option(cuhk: Path, tmp_path: Path) -> None:
    splits = load_dataset(f"cuhk03:{cuhk}", cache_dir=str(tmp_path / "elsewhere"))
    assert all(Path(s.path).parent == tmp_path / "elsewhere" for s in splits.train + splits.query)
    assert not (cuhk / "images_labeled").exists()


def test_cuhk03_layout_errors(cuhk: Path) -> None:
    with pytest.raises(DistillError, match=r"--cuhk03-variant must be labeled or detected, got 'both'"):
        load_dataset(f"cuhk03:{cuhk}", cuhk03_variant="both")
    config = cuhk / "cuhk03_new_protocol_config_detected.mat"
    protocol = cuhk03_protocol("detected")
    config.unlink()
    with pytest.raises(DistillError, match=r"cuhk03: missing file .*cuhk03_new_protocol_config_detected.mat"):
        load_dataset(f"cuhk03:{cuhk}", cuhk03_variant="detected")
    savemat(config, {k: v for k, v in protocol.items() if k != "query_idx"})
    with pytest.raises(DistillError, match=r"has no variable\(s\) query_idx \(expected filelist, labels"):
        load_dataset(f"cuhk03:{cuhk}", cuhk03_variant="detected")
    n = len(protocol["filelist"])
    savemat(config, protocol | {"gallery_idx": np.array([[1.0], [n + 1.0]])})
    with pytest.raises(DistillError, match=rf"'gallery_idx' has index {n + 1} outside 1..{n}"):
        load_dataset(f"cuhk03:{cuhk}", cuhk03_variant="detected")
    renamed = protocol["filelist"].copy()
    renamed[0, 0] = "2_009_1_01.png"
    savemat(config, protocol | {"filelist": renamed})
    with pytest.raises(DistillError, match=r"lists 1 image\(s\) that cuhk-03.mat does not hold \(2_009_1_01.png\)"):
        load_dataset(f"cuhk03:{cuhk}", cuhk03_variant="detected")
    renamed[0, 0] = "person1.png"
    savemat(config, protocol | {"filelist": renamed})
    with pytest.raises(DistillError, match=r"malformed filelist entry 'person1.png'"):
        load_dataset(f"cuhk03:{cuhk}", cuhk03_variant="detected")
    config.write_bytes(b"garbage")
    with pytest.raises(DistillError, match=r"cuhk03: cannot read .*detected.mat as a MATLAB file"):
        load_dataset(f"cuhk03:{cuhk}", cuhk03_variant="detected")
    (cuhk / "cuhk03_release" / "cuhk-03.mat").write_bytes(b"truncated download")
    with pytest.raises(DistillError, match=r"cannot read .*cuhk-03.mat as MATLAB v7.3 \(HDF5\)"):
        load_dataset(f"cuhk03:{cuhk}")
    (cuhk / "cuhk03_release" / "cuhk-03.mat").unlink()
    with pytest.raises(DistillError, match=r"cuhk03: missing file .*cuhk03_release/cuhk-03.mat"):
        load_dataset(f"cuhk03:{cuhk}")


def test_cuhk03_count_warning(cuhk: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    splits = load_dataset(f"cuhk03:{cuhk}")
    counts = splits.info["counts"]
    assert counts["train_ids"] == 3 and counts["query_ids"] == 2 and counts["query_images"] == 4
    monkeypatch.setitem(cuhk03.OFFICIAL, "labeled", counts | {"gallery_images": counts["gallery_images"] + 1})
    with pytest.warns(UserWarning, match=rf"cuhk03 \(labeled\) at .* gallery images {counts['gallery_images']} "):
        load_dataset(f"cuhk03:{cuhk}")


# ---------------------------------------------------------------- CUB-200-2011

CUB_CLASSES = {1: 2, 2: 3, 100: 1, 101: 2, 150: 1, 200: 2}  # class id -> images


@pytest.fixture
def cub(tmp_path: Path) -> Path:
    root = tmp_path / "CUB_200_2011"
    images, labels, boxes = [], [], []
    image_id = 0
    for cls, n in CUB_CLASSES.items():
        for i in range(n):
            image_id += 1
            rel = f"{cls:03d}.Bird_{cls}/Bird_{cls}_{i:04d}_{image_id}.jpg"
            write_gradient(root / "images" / rel, blue=20 * image_id)
            images.append(f"{image_id} {rel}")
            labels.append(f"{image_id} {cls}")
            boxes.append(f"{image_id} {2 + i}.0 3.0 {9 + i}.0 7.0")
    (root / "images.txt").write_text("\n".join(images) + "\n")
    (root / "image_class_labels.txt").write_text("\n".join(labels) + "\n")
    (root / "bounding_boxes.txt").write_text("\n".join(boxes) + "\n")
    return root


def test_cub200_split(cub: Path) -> None:
    splits = load_dataset(f"cub200:{cub}")
    assert splits.protocol == "retrieval"
    expected_train = Counter({c: n for c, n in CUB_CLASSES.items() if c <= 100})
    expected_test = Counter({c: n for c, n in CUB_CLASSES.items() if c > 100})
    assert Counter(s.label for s in splits.train) == expected_train
    assert Counter(s.label for s in splits.query) == expected_test
    assert splits.query == splits.gallery and splits.query is not splits.gallery
    assert all(s.camera == -1 and Path(s.path).is_file() for s in splits.train + splits.query)
    assert splits.info["counts"] == {"train_classes": 3, "train_images": 6, "test_classes": 3, "test_images": 5}


def test_cub200_bbox_crop(cub: Path) -> None:
    splits = load_dataset(f"cub200:{cub}", bbox_crop=True)
    plain = load_dataset(f"cub200:{cub}")
    boxes = {}
    for line, image_line in zip((cub / "bounding_boxes.txt").read_text().split("\n"), (cub / "images.txt").read_text().split("\n")):
        if line:
            _, x, y, w, h = line.split()
            boxes[image_line.split()[1]] = tuple(int(float(v)) for v in (x, y, w, h))
    for cropped, original in zip(splits.train + splits.query, plain.train + plain.query):
        assert cropped.label == original.label
        rel = str(Path(original.path).relative_to(cub / "images"))
        assert Path(cropped.path) == Path(splits.info["images"]) / rel
        assert not Path(cropped.path).is_relative_to(cub)  # nothing written into the data set
        x, y, w, h = boxes[rel]
        reference = np.asarray(Image.open(original.path).convert("RGB"))[y : y + h, x : x + w].astype(float)
        got = np.asarray(Image.open(cropped.path)).astype(float)
        assert got.shape == reference.shape
        assert np.abs(got - reference).mean() < 2  # JPEG re-encoding; a crop one pixel off is 4-5 away


def test_cub200_layout_errors(cub: Path) -> None:
    labels = cub / "image_class_labels.txt"
    original = labels.read_text()
    labels.write_text(original.replace("3 2\n", "3 two\n"))
    with pytest.raises(DistillError, match=r"image_class_labels.txt, line 3: expected '<image_id> <class_id>', got '3 two'"):
        load_dataset(f"cub200:{cub}")
    labels.write_text(original.replace("3 2\n", "3 201\n"))
    with pytest.raises(DistillError, match=r"image_class_labels.txt, line 3: class id 201 is outside 1..200"):
        load_dataset(f"cub200:{cub}")
    labels.write_text(original.replace("3 2\n", "2 2\n"))
    with pytest.raises(DistillError, match=r"image_class_labels.txt, line 3: image id 2 already given on line 2"):
        load_dataset(f"cub200:{cub}")
    labels.write_text(original.replace("3 2\n", "99 2\n"))
    with pytest.raises(DistillError, match=r"image_class_labels.txt, line 3: image id 99 is not in images.txt"):
        load_dataset(f"cub200:{cub}")
    labels.write_text(original.replace("3 2\n", ""))
    with pytest.raises(DistillError, match=r"image_class_labels.txt: no class for image id 3 \(images.txt line 3\)"):
        load_dataset(f"cub200:{cub}")
    labels.write_text(original)
    boxes = cub / "bounding_boxes.txt"
    lines = boxes.read_text().splitlines()
    lines[3] = "4 3.0 3.0 0.0 7.0"
    boxes.write_text("\n".join(lines))
    with pytest.raises(DistillError, match=r"bounding_boxes.txt, line 4: box width and height must be > 0"):
        load_dataset(f"cub200:{cub}", bbox_crop=True)
    boxes.unlink()
    with pytest.raises(DistillError, match=r"cub200: missing file .*bounding_boxes.txt"):
        load_dataset(f"cub200:{cub}", bbox_crop=True)
    (cub / "images.txt").unlink()
    with pytest.raises(DistillError, match=r"cub200: missing file .*CUB_200_2011/images.txt"):
        load_dataset(f"cub200:{cub}")


def test_cub200_missing_image_and_count_warning(cub: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gone = next((cub / "images").glob("101.*/*.jpg"))
    gone.unlink()
    monkeypatch.setattr(cub200, "OFFICIAL", {"train_classes": 3, "train_images": 6, "test_classes": 3, "test_images": 6})
    with pytest.warns(UserWarning) as record:
        splits = load_dataset(f"cub200:{cub}")
    messages = [str(w.message) for w in record]
    assert any("test images 5 (official 6)" in m for m in messages)
    assert any(m.startswith("skipping 1 unreadable image(s)") and gone.name in m for m in messages)
    assert len(splits.query) == 4


# ---------------------------------------------------------------- Cars196

CARS_CLASSES = [1, 1, 98, 5, 99, 196, 196, 120]  # class of each annotation, in file order


def write_cars(root: Path, classes: list[int], **override) -> None:
    dtype = [(f, object) for f in ("relative_im_path", "bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "test")]
    annotations = np.zeros((1, len(classes)), dtype=dtype)
    for n, cls in enumerate(classes):
        rel = f"car_ims/{n + 1:06d}.jpg"
        write_image(root / rel, seed=n)
        annotations[0, n] = (rel, 1.0, 1.0, 5.0, 8.0, float(cls), float(n % 2))
    savemat(root / "cars_annos.mat", {"annotations": annotations, "class_names": np.array(["AM General Hummer"], dtype=object)} | override)


def test_cars196_split(tmp_path: Path) -> None:
    write_cars(tmp_path, CARS_CLASSES)
    splits = load_dataset(f"cars196:{tmp_path}")
    train = [(f"{n + 1:06d}.jpg", c) for n, c in enumerate(CARS_CLASSES) if c <= 98]
    test = [(f"{n + 1:06d}.jpg", c) for n, c in enumerate(CARS_CLASSES) if c > 98]
    assert [(Path(s.path).name, s.label) for s in splits.train] == train
    assert [(Path(s.path).name, s.label) for s in splits.query] == test and splits.gallery == splits.query
    assert splits.protocol == "retrieval" and all(s.camera == -1 for s in splits.train)
    assert splits.info["counts"] == {"train_classes": 3, "train_images": 4, "test_classes": 3, "test_images": 4}


def test_cars196_errors_and_warning(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(DistillError, match=r"cars196: missing file .*cars_annos.mat"):
        load_dataset(f"cars196:{tmp_path}")
    write_cars(tmp_path, [1, 197])
    with pytest.raises(DistillError, match=r"annotation 2 \(car_ims/000002.jpg\) has class 197, outside 1..196"):
        load_dataset(f"cars196:{tmp_path}")
    savemat(tmp_path / "cars_annos.mat", {"annotations": np.zeros((1, 2), dtype=[("relative_im_path", object)])})
    with pytest.raises(DistillError, match=r"'annotations' has no field\(s\) class"):
        load_dataset(f"cars196:{tmp_path}")
    savemat(tmp_path / "cars_annos.mat", {"class_names": np.array(["x"], dtype=object)})
    with pytest.raises(DistillError, match=r"has no 'annotations' struct array"):
        load_dataset(f"cars196:{tmp_path}")
    (tmp_path / "cars_annos.mat").write_text("oops")
    with pytest.raises(DistillError, match=r"cars196: cannot read .*cars_annos.mat as a MATLAB file"):
        load_dataset(f"cars196:{tmp_path}")
    write_cars(tmp_path, CARS_CLASSES)
    monkeypatch.setattr(cars196, "OFFICIAL", {"train_classes": 3, "train_images": 4, "test_classes": 4, "test_images": 4})
    with pytest.warns(UserWarning, match=r"cars196 at .* test classes 3 \(official 4\)"):
        load_dataset(f"cars196:{tmp_path}")


# ---------------------------------------------------------------- Stanford Online Products

SOP_ROWS = {  # file -> (class id, super class id, path)
    "Ebay_train.txt": [(1, 1, "bicycle_final/1_0.JPG"), (1, 1, "bicycle_final/1_1.JPG"), (2, 1, "bicycle_final/2_0.JPG"), (3, 2, "chair_final/3_0.JPG")],
    "Ebay_test.txt": [(4, 1, "bicycle_final/4_0.JPG"), (4, 1, "bicycle_final/4_1.JPG"), (5, 2, "chair_final/5_0.JPG")],
}


def write_sop(root: Path) -> None:
    image_id = 0
    for name, rows in SOP_ROWS.items():
        lines = ["image_id class_id super_class_id path"]
        for cls, sup, rel in rows:
            image_id += 1
            write_image(root / rel, seed=image_id)
            lines.append(f"{image_id} {cls} {sup} {rel}")
        (root / name).write_text("\n".join(lines) + "\n")


def test_sop_split(tmp_path: Path) -> None:
    write_sop(tmp_path)
    splits = load_dataset(f"sop:{tmp_path}")
    assert [(s.label, str(Path(s.path).relative_to(tmp_path))) for s in splits.train] == [(c, p) for c, _, p in SOP_ROWS["Ebay_train.txt"]]
    assert [(s.label, str(Path(s.path).relative_to(tmp_path))) for s in splits.query] == [(c, p) for c, _, p in SOP_ROWS["Ebay_test.txt"]]
    assert splits.gallery == splits.query and splits.protocol == "retrieval"
    assert splits.info["counts"] == {"train_classes": 3, "train_images": 4, "test_classes": 2, "test_images": 3}


def test_sop_errors_and_warning(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_sop(tmp_path)
    test_txt = tmp_path / "Ebay_test.txt"
    original = test_txt.read_text()
    test_txt.write_text(original.replace("image_id class_id", "id class"))
    with pytest.raises(DistillError, match=r"Ebay_test.txt, line 1: expected the header 'image_id class_id super_class_id path', got 'id class super_class_id path'"):
        load_dataset(f"sop:{tmp_path}")
    test_txt.write_text(original.replace("6 4 1 bicycle_final/4_1.JPG", "6 4 bicycle_final/4_1.JPG"))
    with pytest.raises(DistillError, match=r"Ebay_test.txt, line 3: expected '<image_id> <class_id> <super_class_id> <path>', got '6 4 bicycle_final/4_1.JPG'"):
        load_dataset(f"sop:{tmp_path}")
    test_txt.write_text(original.replace("7 5 2", "7 3 2"))
    with pytest.raises(DistillError, match=r"class ids \[3\] appear in both Ebay_train.txt and Ebay_test.txt"):
        load_dataset(f"sop:{tmp_path}")
    test_txt.write_text("image_id class_id super_class_id path\n")
    with pytest.raises(DistillError, match=r"sop: .*Ebay_test.txt lists no images"):
        load_dataset(f"sop:{tmp_path}")
    test_txt.unlink()
    with pytest.raises(DistillError, match=r"sop: missing file .*Ebay_test.txt"):
        load_dataset(f"sop:{tmp_path}")
    test_txt.write_text(original)
    monkeypatch.setattr(sop, "OFFICIAL", {"train_classes": 3, "train_images": 5, "test_classes": 2, "test_images": 3})
    with pytest.warns(UserWarning, match=r"sop at .* train images 4 \(official 5\)"):
        load_dataset(f"sop:{tmp_path}")


# ---------------------------------------------------------------- ImageFolder

FOLDER = {"cat": 2, "ant": 3, "dog": 1, "bee": 2, "eel": 2}  # class -> images


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "photos"
    for name, n in FOLDER.items():
        for i in range(n):
            write_image(root / name / ("nested" if i == 1 else "") / f"{i}.png", seed=i)
        (root / name / "notes.txt").write_text("not an image")
    write_image(root / ".hidden" / "x.png")
    return root


def test_imagefolder_first_half_rule(folder: Path) -> None:
    splits = load_dataset(f"imagefolder:{folder}")
    classes = sorted(FOLDER)  # ant bee cat dog eel -> first ceil(5/2)=3 train
    assert splits.info["classes"] == classes
    assert Counter(s.label for s in splits.train) == Counter({classes.index(c): FOLDER[c] for c in classes[:3]})
    assert Counter(s.label for s in splits.query) == Counter({classes.index(c): FOLDER[c] for c in classes[3:]})
    assert splits.gallery == splits.query and splits.protocol == "retrieval"
    assert all(s.path.endswith(".png") for s in splits.train + splits.query)


def test_imagefolder_split_file(folder: Path, tmp_path: Path) -> None:
    split = tmp_path / "split.txt"
    split.write_text("# my split\ncat train\n\ndog train\neel test\nant test\n")
    with pytest.warns(UserWarning, match=r"1 class\(es\) not in .*split.txt are left out: bee"):
        splits = load_dataset(f"imagefolder:{folder}", split_file=str(split))
    classes = sorted(FOLDER)
    assert Counter(s.label for s in splits.train) == Counter({classes.index("cat"): 2, classes.index("dog"): 1})
    assert Counter(s.label for s in splits.query) == Counter({classes.index("eel"): 2, classes.index("ant"): 3})
    for text, message in [
        ("cat train\ncat test\n", r"split.txt, line 2: class 'cat' already listed on line 1"),
        ("cat train\nfox test\n", r"split.txt, line 2: no class directory named 'fox'"),
        ("cat train\ndog val\n", r"split.txt, line 2: expected '<class name> <train\|test>', got 'dog val'"),
        ("cat train\ndog train\n", r"imagefolder: no test classes in .*split.txt"),
    ]:
        split.write_text(text)
        with pytest.raises(DistillError, match=message), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            load_dataset(f"imagefolder:{folder}", split_file=str(split))
    with pytest.raises(DistillError, match=r"imagefolder: split file not found: .*missing.txt"):
        load_dataset(f"imagefolder:{folder}", split_file=str(tmp_path / "missing.txt"))


def test_imagefolder_errors(folder: Path, tmp_path: Path) -> None:
    (folder / "fox").mkdir()
    (folder / "fox" / "readme.md").write_text("")
    with pytest.raises(DistillError, match=r"imagefolder: class directory .*fox has no images"):
        load_dataset(f"imagefolder:{folder}")
    write_image(tmp_path / "one" / "only" / "a.png")
    with pytest.raises(DistillError, match=r"has 1 class directories; train and test need at least 2"):
        load_dataset(f"imagefolder:{tmp_path / 'one'}")


def test_all_loaders_registered() -> None:
    assert {"market1501", "cuhk03", "cub200", "cars196", "sop", "imagefolder", "synthetic"} <= set(dataset_names())


def test_build_cache_keeps_the_copy_that_finished_first(tmp_path: Path) -> None:
    final = tmp_path / "images_labeled"

    def fill(tmp: Path) -> None:
        (tmp / "mine.png").write_bytes(b"")
        final.mkdir()  # meanwhile another DDP rank renamed its complete copy into place
        (final / "theirs.png").write_bytes(b"")

    assert build_cache(final, fill) == final
    assert [p.name for p in final.iterdir()] == ["theirs.png"]
    assert [p.name for p in tmp_path.iterdir()] == ["images_labeled"]  # our temp dir is gone


# ---------------------------------------------------------------- paths that leave the data set (issue 11)


def test_cub200_rejects_paths_outside_the_data_set_and_writes_nothing_there(cub: Path, tmp_path: Path) -> None:
    victim = tmp_path / "victim" / "photo.jpg"
    write_gradient(victim, blue=7)
    before = victim.read_bytes()
    images = cub / "images.txt"
    original = images.read_text()
    first = original.splitlines()[0].split()[1]
    images.write_text(original.replace(f"1 {first}", "1 ../../victim/photo.jpg"))
    with pytest.raises(DistillError, match=r"images.txt, line 1: path '../../victim/photo.jpg' leaves the data set's root .*images"):
        load_dataset(f"cub200:{cub}", bbox_crop=True)
    images.write_text(original.replace(f"1 {first}", f"1 {victim}"))
    with pytest.raises(DistillError, match=r"images.txt, line 1: path '/.*victim/photo.jpg' leaves the data set's root"):
        load_dataset(f"cub200:{cub}", bbox_crop=True)
    assert victim.read_bytes() == before
    images.write_text(original)
    with pytest.raises(DistillError, match=r"cub200: cache_dir .*crops is inside the data set .*; choose a directory outside it"):
        load_dataset(f"cub200:{cub}", bbox_crop=True, cache_dir=str(cub / "crops"))
    assert not (cub / "crops").exists()


def test_sop_and_cars196_reject_paths_outside_the_data_set(tmp_path: Path) -> None:
    write_sop(tmp_path / "sop")
    train = tmp_path / "sop" / "Ebay_train.txt"
    rel = SOP_ROWS["Ebay_train.txt"][0][2]
    train.write_text(train.read_text().replace(rel, "../outside.JPG"))
    with pytest.raises(DistillError, match=r"Ebay_train.txt, line 2: path '../outside.JPG' leaves the data set's root"):
        load_dataset(f"sop:{tmp_path / 'sop'}")
    cars = tmp_path / "cars"
    write_cars(cars, [1, 2, 99, 100])
    mat = loadmat(cars / "cars_annos.mat")
    mat["annotations"][0, 2]["relative_im_path"] = np.array(["../../etc/x.jpg"])
    savemat(cars / "cars_annos.mat", {"annotations": mat["annotations"]})
    with pytest.raises(DistillError, match=r"cars196: .*cars_annos.mat: annotation 3: path '../../etc/x.jpg' leaves the data set's root"):
        load_dataset(f"cars196:{cars}")


def test_imagefolder_symlink_loops_and_links_across_classes_count_each_file_once(folder: Path) -> None:
    plain = load_dataset(f"imagefolder:{folder}")
    (folder / "ant" / "loop").symlink_to("..")  # the whole tree again, test classes included
    (folder / "ant" / "self").symlink_to(".")  # the class directory again
    (folder / "bee" / "stolen.png").symlink_to(folder / "eel" / "0.png")  # a test image under a train class
    (folder / "bee" / "again.png").symlink_to("0.png")  # the same file twice in one class
    with pytest.warns(UserWarning, match=r"imagefolder: skipped \d+ path\(s\) under .*(ant|bee) that loop, leave the class directory"):
        splits = load_dataset(f"imagefolder:{folder}")
    assert splits.train == plain.train and splits.query == plain.query
    real = [os.path.realpath(s.path) for s in splits.train + splits.query]
    assert len(real) == len(set(real)) == sum(FOLDER.values())

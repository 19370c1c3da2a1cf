"""CUHK03 (Li et al., CVPR 2014) with the new 767/700 protocol (Zhong et al., CVPR 2017).

``PATH/cuhk-03.mat`` (or ``PATH/cuhk03_release/cuhk-03.mat``) is the official MATLAB v7.3 (HDF5)
release: cell arrays ``labeled`` and ``detected``, each 5 camera pairs x (persons x 10 images),
images 1-5 from the pair's first camera and 6-10 from its second, empty cells where an image is
missing. ``PATH/cuhk03_new_protocol_config_{labeled,detected}.mat`` hold the protocol: ``filelist``
(names ``P_PPP_V_II.png``: camera pair, person in the pair, view, image), ``labels`` (person ids),
``camId`` (view 1 or 2), and 1-based ``train_idx``, ``query_idx``, ``gallery_idx``.

Images are extracted once from ``cuhk-03.mat`` into ``images_{variant}/`` under the data cache
(``derived_dir``; never into ``PATH``), written into a temp directory and renamed, and reused afterwards.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from PIL import Image

from distill.data._common import build_cache, check_counts, dataset_root, derived_dir, reject_options, require
from distill.data.base import Sample, Splits, register_dataset
from distill.data.dataset import check_images
from distill.errors import DistillError

VARIANTS = ("labeled", "detected")
FILE_NAME = re.compile(r"^\d_\d{3}_[12]_\d{2}\.png$")
PROTOCOL_KEYS = ("filelist", "labels", "camId", "train_idx", "query_idx", "gallery_idx")
# The CUHK03-NP README (github.com/zhunzhong07/person-re-ranking/tree/master/CUHK03-NP):
# 767 train / 700 test identities; labeled 7,368 / 1,400 / 5,328, detected 7,365 / 1,400 / 5,332.
OFFICIAL = {
    "labeled": {"train_ids": 767, "train_images": 7368, "query_ids": 700, "query_images": 1400, "gallery_images": 5328},
    "detected": {"train_ids": 767, "train_images": 7365, "query_ids": 700, "query_images": 1400, "gallery_images": 5332},
}
HOLDS = "cuhk-03.mat (or cuhk03_release/cuhk-03.mat) and cuhk03_new_protocol_config_{labeled,detected}.mat"


def _read_protocol(path: Path) -> dict[str, np.ndarray]:
    """The new-protocol config file as flat arrays (indices made 0-based and range-checked)."""
    from scipy.io import loadmat

    try:
        mat = loadmat(path, squeeze_me=True)
    except Exception as err:  # scipy raises ValueError, MatReadError, NotImplementedError, ...
        raise DistillError(f"cuhk03: cannot read {path} as a MATLAB file ({err})") from None
    missing = [k for k in PROTOCOL_KEYS if k not in mat]
    if missing:
        raise DistillError(f"cuhk03: {path} has no variable(s) {', '.join(missing)} (expected {', '.join(PROTOCOL_KEYS)})")
    out = {k: np.atleast_1d(mat[k]) for k in PROTOCOL_KEYS}
    out["filelist"] = np.array([str(np.squeeze(f)) for f in out["filelist"]])
    n = len(out["filelist"])
    for k in ("labels", "camId"):
        if len(out[k]) != n:
            raise DistillError(f"cuhk03: {path}: '{k}' has {len(out[k])} entries but 'filelist' has {n}")
    for name in out["filelist"]:
        if not FILE_NAME.match(name):
            raise DistillError(f"cuhk03: {path}: malformed filelist entry '{name}' (expected names like 1_001_1_01.png)")
    for k in ("train_idx", "query_idx", "gallery_idx"):
        idx = out[k].astype(np.int64)
        bad = idx[(idx < 1) | (idx > n)]
        if len(bad):
            raise DistillError(f"cuhk03: {path}: '{k}' has index {bad[0]} outside 1..{n}")
        out[k] = idx - 1
    return out


def _extract(mat_path: Path, variant: str, out: Path) -> None:
    """Write every image of ``variant`` in ``cuhk-03.mat`` to ``out`` as ``P_PPP_V_II.png``."""
    import h5py

    try:
        f = h5py.File(mat_path, "r")
    except OSError as err:
        raise DistillError(f"cuhk03: cannot read {mat_path} as MATLAB v7.3 (HDF5): {err}") from None
    with f:
        if variant not in f:
            raise DistillError(f"cuhk03: {mat_path} has no '{variant}' cell array (expected 'labeled' and 'detected')")
        for pair, pair_ref in enumerate(np.asarray(f[variant]).ravel(), 1):
            cells = f[pair_ref][()].T  # MATLAB persons x 10 (HDF5 stores it transposed)
            for person in range(cells.shape[0]):
                for i in range(cells.shape[1]):
                    image = f[cells[person, i]][()]
                    if image.ndim != 3:  # an empty cell: MATLAB stores its dims as a 1-D array
                        continue
                    view = 1 if i < 5 else 2
                    name = f"{pair}_{person + 1:03d}_{view}_{i + 1:02d}.png"
                    Image.fromarray(np.ascontiguousarray(image.T)).save(out / name)


@register_dataset("cuhk03")
def load_cuhk03(
    path: str | None,
    *,
    cuhk03_variant: str = "labeled",
    strict: bool = False,
    cache_dir: str | None = None,
    **options,
) -> Splits:
    """CUHK03 at ``path`` -> re-ID splits of the new protocol, ``labeled`` or ``detected`` boxes.

    ``cache_dir`` puts the extracted images there (default: ``derived_dir``, outside ``PATH``).
    """
    reject_options("cuhk03", options, ["cuhk03_variant", "strict", "cache_dir"])
    if cuhk03_variant not in VARIANTS:
        raise DistillError(f"cuhk03: --cuhk03-variant must be labeled or detected, got '{cuhk03_variant}'")
    root = dataset_root("cuhk03", path, HOLDS)
    mat_path = root / "cuhk-03.mat"
    if not mat_path.is_file():
        mat_path = require("cuhk03", root / "cuhk03_release" / "cuhk-03.mat")
    config_path = require("cuhk03", root / f"cuhk03_new_protocol_config_{cuhk03_variant}.mat")
    protocol = _read_protocol(config_path)
    images = derived_dir("cuhk03", root, f"images_{cuhk03_variant}", cache_dir)
    build_cache(images, lambda tmp: _extract(mat_path, cuhk03_variant, tmp))

    def part(key: str) -> list[Sample]:
        return [
            Sample(str(images / protocol["filelist"][i]), int(protocol["labels"][i]), int(protocol["camId"][i]))
            for i in protocol[key]
        ]

    train, query, gallery = part("train_idx"), part("query_idx"), part("gallery_idx")
    missing = sorted({Path(s.path).name for s in train + query + gallery if not Path(s.path).is_file()})
    if missing:
        raise DistillError(
            f"cuhk03: {config_path.name} lists {len(missing)} image(s) that {mat_path.name} does not hold "
            f"({', '.join(missing[:3])}); if {images} is an incomplete cache, delete it to extract again"
        )
    overlap = {s.label for s in train} & {s.label for s in query + gallery}
    if overlap:
        raise DistillError(f"cuhk03: {config_path.name} puts person ids {sorted(overlap)[:5]} in both train and test")
    counts = {
        "train_ids": len({s.label for s in train}),
        "train_images": len(train),
        "query_ids": len({s.label for s in query}),
        "query_images": len(query),
        "gallery_images": len(gallery),
    }
    check_counts(f"cuhk03 ({cuhk03_variant})", root, counts, OFFICIAL[cuhk03_variant])
    info = {"root": str(root), "variant": cuhk03_variant, "images": str(images), "counts": counts}
    return Splits(
        "cuhk03",
        check_images(train, strict),
        check_images(query, strict),
        check_images(gallery, strict),
        protocol="reid",
        info=info,
    )

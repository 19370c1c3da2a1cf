"""The embedded default data set: a generated, fine-grained pedestrian re-identification set.

Nothing is downloaded. Each identity is a small "person" with its own combination of hair, upper-
and lower-body colours, clothing pattern, bag and build, drawn from a deliberately small palette so
that many identities differ in one or two attributes only (fine-grained). Each image is one
sighting by one of six "cameras": the camera sets a colour cast, brightness and background; the
sighting varies position, scale, mirror pose, clutter, occlusion and sensor noise.

Split like Market-1501: train identities are disjoint from test identities; each test identity has
one query per camera in two of its cameras, the rest of its images form the gallery. Images are
rendered once, deterministically from the seed, to PNG files in a cache directory
(``$DISTILL_CACHE`` or ``~/.cache/distill``), written atomically and reused.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from distill.data._common import cache_root, reject_options
from distill.data.base import Sample, Splits, register_dataset
from distill.errors import DistillError

PALETTE = np.array(
    [
        [200, 30, 30], [30, 60, 190], [30, 150, 60], [230, 200, 40], [20, 20, 25], [235, 235, 235],
        [120, 120, 125], [130, 70, 30], [150, 40, 160], [240, 130, 20], [40, 170, 190], [230, 120, 160],
    ],
    dtype=np.float32,
)
SKIN = np.array([[240, 200, 170], [200, 150, 110], [140, 90, 60], [90, 60, 40]], dtype=np.float32)
HAIR = np.array([[20, 15, 10], [90, 60, 30], [200, 170, 90], [150, 150, 150]], dtype=np.float32)
NUM_CAMERAS = 6


@dataclass(frozen=True)
class SyntheticSpec:
    """Size of the generated set; the defaults fit the few-minute CPU budget of ``distill run``."""

    train_ids: int = 100
    test_ids: int = 50
    images_per_id: int = 12
    height: int = 64
    width: int = 32
    seed: int = 0
    version: int = 1

    def key(self) -> str:
        return hashlib.sha1(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


def _identity(rng: np.random.Generator) -> dict:
    """Random attributes of one person (indices into the palettes plus build parameters)."""
    upper, lower = rng.choice(len(PALETTE), size=2, replace=False)
    return {
        "skin": SKIN[rng.integers(len(SKIN))],
        "hair": HAIR[rng.integers(len(HAIR))],
        "upper": PALETTE[upper],
        "lower": PALETTE[lower],
        "accent": PALETTE[rng.integers(len(PALETTE))],
        "pattern": int(rng.integers(4)),  # 0 solid, 1 horizontal stripes, 2 vertical split, 3 chest band
        "bag": int(rng.integers(3)),  # 0 none, 1 backpack on the left, 2 on the right
        "bag_colour": PALETTE[rng.integers(len(PALETTE))],
        "shoes": PALETTE[rng.integers(len(PALETTE))],
        "build": float(rng.uniform(0.8, 1.2)),
        "legs_long": float(rng.uniform(0.9, 1.1)),
    }


def _camera(rng: np.random.Generator) -> dict:
    return {
        "gain": rng.uniform(0.7, 1.3, size=3).astype(np.float32),
        "bias": float(rng.uniform(-25, 25)),
        "bg": rng.uniform(40, 220, size=(2, 3)).astype(np.float32),
    }


def _render(person: dict, camera: dict, rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """One sighting of ``person`` by ``camera`` as an ``[h, w, 3]`` uint8 image."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    yy, xx = yy / h, xx / w  # normalised coordinates in [0, 1)
    t = yy[..., None]
    img = camera["bg"][0] * (1 - t) + camera["bg"][1] * t
    for _ in range(rng.integers(0, 4)):  # background clutter
        y0, x0 = rng.uniform(0, 1, 2)
        mask = (abs(yy - y0) < rng.uniform(0.03, 0.15)) & (abs(xx - x0) < rng.uniform(0.05, 0.3))
        img[mask] = rng.uniform(0, 255, 3)

    scale = rng.uniform(0.8, 1.05)
    cx = 0.5 + rng.uniform(-0.12, 0.12)
    top = rng.uniform(0.02, 0.12)
    mirror = rng.random() < 0.5
    u = (xx - cx) / scale * (-1 if mirror else 1)  # body-centred horizontal coordinate
    v = (yy - top) / scale  # 0 at the top of the head
    half = 0.22 * person["build"]

    def paint(mask: np.ndarray, colour: np.ndarray) -> None:
        img[mask] = colour

    legs_end = 0.55 + 0.33 * person["legs_long"]
    leg = (v > 0.52) & (v < legs_end) & (abs(u) < half * 0.9) & (abs(u) > 0.02 + 0.03 * rng.random())
    paint(leg, person["lower"])
    paint((v >= legs_end) & (v < legs_end + 0.05) & (abs(u) < half), person["shoes"])
    torso = (v > 0.17) & (v <= 0.55) & (abs(u) < half)
    paint(torso, person["upper"])
    pattern = person["pattern"]
    if pattern == 1:
        paint(torso & (np.floor((v - 0.17) * 28) % 2 == 0), person["accent"])
    elif pattern == 2:
        paint(torso & (u > 0), person["accent"])
    elif pattern == 3:
        paint(torso & (v > 0.28) & (v < 0.36), person["accent"])
    if person["bag"]:
        side = -1 if person["bag"] == 1 else 1
        paint((v > 0.2) & (v < 0.45) & (u * side > half) & (u * side < half + 0.14), person["bag_colour"])
    head = ((u / 0.11) ** 2 + ((v - 0.09) / 0.08) ** 2) < 1
    paint(head, person["skin"])
    paint(head & (v < 0.07), person["hair"])

    if rng.random() < 0.3:  # occluder (a passer-by, a pole, a car) in the lower or side part
        y0 = rng.uniform(0.4, 0.9)
        x0 = rng.uniform(0, 1)
        mask = (abs(yy - y0) < rng.uniform(0.05, 0.2)) & (abs(xx - x0) < rng.uniform(0.1, 0.3))
        img[mask] = rng.uniform(0, 255, 3)

    light = rng.uniform(0.85, 1.15)
    img = img * camera["gain"] * light + camera["bias"] + rng.normal(0, 8, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def _cache_error(target: Path, err: OSError) -> DistillError:
    return DistillError(
        f"cannot write the embedded data set to {target}: {err.strerror or err} "
        "(free disk space, or set DISTILL_CACHE to a directory with room)",
        exit_code=1,
    )


def generate(spec: SyntheticSpec, root: Path | None = None) -> Path:
    """Render the data set into ``root/synthetic-<key>`` once (atomic rename) and return that directory."""
    target = (root or cache_root()) / f"synthetic-{spec.key()}"
    if (target / "index.json").exists():
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    except OSError as err:
        raise _cache_error(target, err) from None
    try:
        rng = np.random.default_rng(spec.seed)
        cameras = [_camera(rng) for _ in range(NUM_CAMERAS)]
        records = []
        for pid in range(spec.train_ids + spec.test_ids):
            person = _identity(rng)
            cams = rng.permutation(NUM_CAMERAS)[: rng.integers(3, NUM_CAMERAS + 1)]
            for i in range(spec.images_per_id):
                cam = int(cams[i % len(cams)])
                name = f"{pid:04d}_c{cam}_{i:02d}.png"
                Image.fromarray(_render(person, cameras[cam], rng, spec.height, spec.width)).save(tmp / name)
                records.append({"file": name, "pid": pid, "camera": cam})
        (tmp / "index.json").write_text(json.dumps({"spec": asdict(spec), "images": records}))
        try:
            os.replace(tmp, target)
        except OSError:  # another process rendered it first
            if not (target / "index.json").exists():
                raise
    except OSError as err:  # a full disk: one line naming the cache, not PIL's traceback
        raise _cache_error(target, err) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def split(spec: SyntheticSpec, directory: Path) -> Splits:
    """Identity-disjoint split; per test identity one query in each of its first two cameras."""
    records = json.loads((directory / "index.json").read_text())["images"]
    train, query, gallery = [], [], []
    seen: dict[int, set[int]] = {}
    for r in records:
        s = Sample(str(directory / r["file"]), r["pid"], r["camera"])
        if r["pid"] < spec.train_ids:
            train.append(s)
            continue
        cams = seen.setdefault(r["pid"], set())
        if r["camera"] not in cams and len(cams) < 2:
            cams.add(r["camera"])
            query.append(s)
        else:
            gallery.append(s)
    return Splits("synthetic", train, query, gallery, protocol="reid", info={"spec": asdict(spec)})


@register_dataset("synthetic")
def load_synthetic(path: str | None = None, **options) -> Splits:
    """``synthetic`` (the default) or ``synthetic:DIR`` to render into DIR; options override ``SyntheticSpec``.

    ``strict`` is accepted (every image is rendered here, so none is unreadable); an option of another
    loader (``split_file``, ``cuhk03_variant``, ``bbox_crop``) is refused, never silently ignored."""
    fields = SyntheticSpec.__dataclass_fields__
    reject_options("synthetic", {k: v for k, v in options.items() if k not in fields and k != "strict"}, ["strict"])
    spec = SyntheticSpec(**{k: v for k, v in options.items() if k in fields})
    return split(spec, generate(spec, Path(path) if path else None))

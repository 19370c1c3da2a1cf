"""The data of a run: load and check the splits, choose the inputs that fit them, hold out the
validation identities, build the training sets (augmented and plain), read the unlabeled images.

The inputs chosen from the data (input size, augmentation, batch size, DarkRank list size) are
returned as :class:`Inputs`, never written into the given ``Config``: ``Inputs.fill(cfg)`` gives the
copy of the config a run trains with.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch
from rich.markup import escape
from torch import Tensor

from distill.arithmetic import default_amp, default_channels_last
from distill.config import Config
from distill.config_load import label_free
from distill.console import make_console
from distill.data import Sample, Splits, hold_out_identities, load_dataset
from distill.data.dataset import ImageDataset, make_label_map
from distill.data.inputs import choose_augment, choose_image_size
from distill.data.transforms import build_transform
from distill.data.unlabeled import load_unlabeled
from distill.errors import DistillError
from distill.protocols import Protocol, protocol

console = make_console(stderr=True)

CHANNELS_LAST_SAID = "channels_last (faster convolutions at this input on a CPU)"
AMP_SAID = "bf16 autocast (this CPU runs bf16 natively)"


@dataclass(frozen=True)
class Inputs:
    """The inputs a run trains with: those the config sets, the rest chosen from the data.
    ``chosen`` says in words what was chosen (empty when the config set everything)."""

    image_size: tuple[int, int]
    augment: str
    batch_size: int
    darkrank_list_size: int | None
    channels_last: bool
    amp: bool
    chosen: tuple[str, ...] = ()

    def fill(self, cfg: Config) -> Config:
        """A copy of ``cfg`` with these inputs (``cfg`` itself is unchanged)."""
        return replace(cfg, image_size=self.image_size, augment=self.augment, batch_size=self.batch_size,
                       darkrank_list_size=self.darkrank_list_size, channels_last=self.channels_last, amp=self.amp)


def choose_inputs(cfg: Config, splits: Splits, device: torch.device) -> Inputs:
    """What ``cfg`` leaves to the data and the device (input size, augmentation preset, memory format,
    bf16 autocast; a smaller batch, and DarkRank lists that fit it, when the training set has fewer
    identities than a batch asks for)."""
    dataset = cfg.data.partition(":")[0]
    dataset = "imagefolder" if dataset == "none" else dataset  # unlabeled images alone: images of unknown content
    chosen = []
    image_size = cfg.image_size
    if image_size is None:
        image_size = choose_image_size(dataset, splits.train, gpu=device.type == "cuda")
        chosen.append(f"input {image_size[0]}x{image_size[1]}")
    augment = cfg.augment
    if augment is None:
        augment = choose_augment(dataset)
        chosen.append(f"augmentation '{augment}'" + ("" if cfg.flip is None else f" (flip {'on' if cfg.flip else 'off'})"))
    batch_size, list_size = cfg.batch_size, cfg.darkrank_list_size
    ids = len({s.label for s in splits.train if s.label >= 0})
    if 0 < ids < batch_size // cfg.images_per_id:
        batch_size = max(2, ids) * cfg.images_per_id
        chosen.append(f"batch {batch_size} ({ids} identities x {cfg.images_per_id})")
        if list_size is not None and list_size >= batch_size:
            list_size = batch_size - 1
            chosen.append(f"DarkRank lists of {list_size}")
    channels_last = cfg.channels_last
    if channels_last is None:
        channels_last = default_channels_last(device.type == "cuda", image_size)
        if channels_last and device.type != "cuda":
            chosen.append(CHANNELS_LAST_SAID)
    amp = cfg.amp
    if amp is None:
        amp = default_amp(device.type == "cuda", image_size)
        if amp and device.type != "cuda":
            chosen.append(AMP_SAID)
    return Inputs(tuple(image_size), augment, batch_size, list_size, channels_last, amp, tuple(chosen))


@dataclass
class Prepared:
    """The data of a run: splits, the training set (with contiguous labels), the validation images
    (held-out training identities; empty when validation is off) and their data set, the eval transform, the inputs
    chosen and the unlabeled images (``--unlabeled``, given by ``unlabeled_spec``). A run on
    unlabeled images alone has no training set and ``num_classes`` 0."""

    splits: Splits
    train: ImageDataset
    train_plain: ImageDataset
    val: list[Sample]
    val_set: ImageDataset  # ``val`` through the eval transform (decoded once when small)
    eval_transform: Callable
    num_classes: int
    inputs: Inputs
    unlabeled: list[Sample] = field(default_factory=list)
    unlabeled_spec: str | None = None

    @property
    def protocol(self) -> Protocol:
        """The test protocol of the data set (``distill.protocols``), its validation score too."""
        return protocol(self.splits.protocol)


def prepare_data(cfg: Config, device: torch.device = torch.device("cpu")) -> Prepared:
    """Load the data set (its loader skips unreadable images) and the unlabeled images, choose the
    inputs (printing what was chosen), hold out validation identities, build train (augmented and
    plain) datasets.

    A run on unlabeled images alone (``label_free``) trains on none of ``--data``'s images: its test
    split only evaluates (``--data none``: there is none)."""
    free = label_free(cfg)
    splits = Splits("none", [], [], []) if cfg.data == "none" else load_dataset(cfg.data, **cfg.data_options())
    if not free or splits.query:
        check_splits(splits, cfg.data, train=not free)
    train_samples, val = ([], []) if free else hold_out_identities(splits.train, cfg.val_fraction)
    unlabeled = load_unlabeled(cfg.unlabeled, cfg.strict, exclude=splits.query + splits.gallery) if cfg.unlabeled else []
    inputs = choose_inputs(cfg, replace(splits, train=train_samples or unlabeled), device)
    if inputs.chosen:
        flags = "--image-size, --augment, --batch-size" + (", --no-channels-last" if CHANNELS_LAST_SAID in inputs.chosen else "")
        flags += ", --no-amp" if AMP_SAID in inputs.chosen else ""
        console.print(f"chosen for {escape(splits.name)}: " + ", ".join(inputs.chosen) + f" (set them with {flags})")
    label_map = make_label_map(train_samples)
    size = inputs.image_size
    preload = len(train_samples) <= 20_000 and size[0] * size[1] <= 128 * 64
    eval_tf = build_transform(size, train=False, kind=splits.protocol)
    # Un-augmented training (the embedded default is already varied per image) lets the teacher's
    # outputs be cached once for every epoch.
    augment = inputs.augment != "none" or bool(cfg.flip)
    train_tf = build_transform(size, train=True, kind=splits.protocol, preset=inputs.augment, flip=cfg.flip) if augment else eval_tf
    train = ImageDataset(train_samples, train_tf, label_map, preload=preload, fixed_transform=not augment)
    plain = train.with_transform(eval_tf, fixed_transform=True) if augment else train
    val_set = ImageDataset(val, eval_tf, preload=preload, fixed_transform=True)
    return Prepared(splits, train, plain, val, val_set, eval_tf, len(label_map), inputs, unlabeled, cfg.unlabeled)


def check_splits(splits: Splits, spec: str, train: bool = True) -> None:
    """Fail before any training when the data cannot be trained or evaluated on: P x K batches and
    the triplet/verification losses need 2 training classes with 2+ images; the test protocol needs
    queries that have a match (``Protocol.check_test``; retrieval: a test class with 2+ images, and
    9+ images for Recall@8; re-ID: a query whose person is in the gallery from another camera).
    ``train=False``: the test split alone (a run that trains on unlabeled images)."""
    if (train and not splits.train) or not splits.query:
        raise DistillError(f"data set '{spec}' has no training or no test images")
    scored = protocol(splits.protocol)
    word, unit = scored.words
    train_counts = Counter(s.label for s in splits.train)
    if train and sum(n >= 2 for n in train_counts.values()) < 2:
        raise DistillError(
            f"data set '{spec}': training needs at least 2 {word} with 2 or more images each, got "
            f"{len(train_counts)} {word} and {len(splits.train)} images: add images per {unit}"
        )
    scored.check_test(splits, spec)


def prepare_out_dir(cfg: Config) -> Path:
    """Create ``cfg.out_dir`` and check it is writable (a clear error, not a failure hours later)."""
    out = cfg.out_dir
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise DistillError(f"cannot write to output directory {out}: {err.strerror} (choose another with --out)") from None
    return out


def unlabeled_images(cfg: Config, data: Prepared) -> list[Sample]:
    """The unlabeled images of ``cfg`` (a study recipe may name others than the run's)."""
    if cfg.unlabeled == data.unlabeled_spec:
        return data.unlabeled
    if not cfg.unlabeled:
        return []
    return load_unlabeled(cfg.unlabeled, cfg.strict, exclude=data.splits.query + data.splits.gallery)


def calibration_images(data: Prepared, count: int = 48) -> Tensor:
    """``count`` training images spread evenly over the training set (so over its identities), through
    the eval transform: the calibration set of int8-static quantisation."""
    dataset = ImageDataset(data.splits.train or data.unlabeled, data.eval_transform)
    picks = torch.linspace(0, len(dataset) - 1, min(count, len(dataset))).long().unique()
    return torch.stack([dataset[int(i)][0] for i in picks])

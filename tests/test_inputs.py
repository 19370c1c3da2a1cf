"""Inputs that fit the data: size and augmentation choice, validation identities, the digits set."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from PIL import Image

from distill.data import hold_out_identities, load_dataset
from distill.data.base import Sample, Splits
from distill.data.inputs import choose_augment, choose_image_size
from distill.data.transforms import build_transform


def images(tmp_path, size_wh, n=5):
    paths = []
    for i in range(n):
        path = tmp_path / f"{size_wh[0]}x{size_wh[1]}-{i}.png"
        Image.new("L", size_wh).save(path)
        paths.append(Sample(str(path), i))
    return paths


@pytest.mark.parametrize(
    "dataset, gpu, expected",
    [
        ("market1501", True, (256, 128)), ("market1501", False, (128, 64)), ("cuhk03", False, (128, 64)),
        ("cub200", True, (224, 224)), ("cub200", False, (112, 112)), ("sop", False, (112, 112)),
        ("synthetic", False, (64, 32)), ("synthetic", True, (64, 32)),
    ],
)
def test_benchmarks_get_their_published_size_halved_on_a_cpu(dataset, gpu, expected):
    assert choose_image_size(dataset, [], gpu) == expected


@pytest.mark.parametrize(
    "size_wh, gpu, expected",
    [
        ((320, 243), False, (56, 72)),  # Yale faces: wider than tall, about 64x64 pixels
        ((92, 112), False, (72, 56)),  # AT&T faces: taller than wide
        ((8, 8), False, (32, 32)),  # digits: square, upscaled to the minimum side only
        ((40, 40), False, (40, 40)),  # never above the images' own size
        ((105, 105), True, (104, 104)),  # a GPU would allow 224x224: the images are smaller
        ((1000, 100), False, (32, 200)),  # never below 32 a side
    ],
)
def test_an_image_folder_gets_its_median_aspect_ratio(tmp_path, size_wh, gpu, expected):
    h, w = choose_image_size("imagefolder", images(tmp_path, size_wh), gpu)
    assert (h, w) == expected and h % 8 == 0 and w % 8 == 0


def test_augmentation_presets_per_data_set():
    assert [choose_augment(d) for d in ("synthetic", "imagefolder", "digits", "market1501", "cub200")] == [
        "none", "light", "light", "standard", "standard",
    ]


def asymmetric():
    image = Image.new("RGB", (16, 32), (0, 0, 0))
    image.paste((255, 255, 255), (0, 0, 4, 32))  # a white stripe on the left only
    return image


@pytest.mark.parametrize("kind", ["reid", "retrieval"])
@pytest.mark.parametrize("preset", ["none", "light"])  # standard shifts by up to 10 pixels: checked below
def test_every_preset_gives_the_input_size_and_flips_only_when_asked(kind, preset):
    torch.manual_seed(0)
    for flip in (False, True):
        tf = build_transform((32, 16), train=True, kind=kind, preset=preset, flip=flip)
        outs = [tf(asymmetric()) for _ in range(40)]
        assert all(o.shape == (3, 32, 16) for o in outs)
        left_brighter = [o[:, :, :8].mean() > o[:, :, 8:].mean() for o in outs]
        assert all(left_brighter) != flip  # no flip: the stripe stays left; flip: some images mirror it


def test_the_none_preset_without_flip_is_the_reid_eval_transform():
    train = build_transform((32, 16), train=True, kind="reid", preset="none", flip=False)
    assert torch.equal(train(asymmetric()), build_transform((32, 16), train=False, kind="reid")(asymmetric()))


@pytest.mark.parametrize("kind", ["reid", "retrieval"])
def test_flip_defaults_on_for_standard_only(kind):
    def flips(**kw):
        return "HorizontalFlip" in repr(build_transform((32, 16), train=True, kind=kind, **kw))

    assert flips(preset="standard") and not flips(preset="standard", flip=False)
    assert not flips(preset="light") and flips(preset="light", flip=True) and not flips(preset="none")
    assert build_transform((32, 16), train=True, kind=kind, preset="standard")(asymmetric()).shape == (3, 32, 16)


def samples_of(counts: dict[int, int]) -> list[Sample]:
    return [Sample(f"{label}/{i}.png", label) for label, n in counts.items() for i in range(n)]


def test_validation_identities_are_held_out_whole_spread_and_fixed():
    samples = samples_of({label: 3 for label in range(10)})
    train, val = hold_out_identities(samples, 0.2)
    assert {s.label for s in val} == {2, 7}  # evenly spread over the sorted labels
    assert not {s.label for s in train} & {s.label for s in val}
    assert len(train) + len(val) == len(samples) and Counter(s.label for s in val) == {2: 3, 7: 3}
    assert hold_out_identities(samples, 0.2) == (train, val)


def test_at_least_two_validation_identities_and_three_left_to_train():
    assert len({s.label for s in hold_out_identities(samples_of({i: 2 for i in range(5)}), 0.1)[1]}) == 2
    with pytest.warns(UserWarning, match="validation is off: 4 training identities are too few to hold out 2 and keep 3"):
        train, val = hold_out_identities(samples_of({i: 2 for i in range(4)}), 0.2)
    assert val == [] and len(train) == 8
    assert hold_out_identities(samples_of({i: 2 for i in range(5)}), 0.0)[1] == []


def test_digits_are_real_handwriting_split_by_digit(tmp_path):
    splits = load_dataset(f"digits:{tmp_path}")
    assert (len(splits.train), len(splits.query)) == (901, 896)  # scikit-learn's 1,797 scans
    assert {s.label for s in splits.train} == {0, 1, 2, 3, 4} and {s.label for s in splits.query} == {5, 6, 7, 8, 9}
    with Image.open(splits.train[0].path) as image:
        assert image.mode == "L" and image.size == (8, 8) and image.getextrema()[1] > 200


@pytest.mark.parametrize("size, device, given, expected", [
    ((128, 64), "cpu", None, True),    # a re-ID input on a CPU: channels_last, measured faster there
    ((256, 128), "cpu", None, True),
    ((64, 32), "cpu", None, False),    # the embedded set, Yale, digits: the format their gains were measured in
    ((56, 72), "cpu", None, False),
    ((64, 32), "cuda", None, True),
    ((128, 64), "cpu", False, False),  # a format given is kept
    ((64, 32), "cpu", True, True),
])
def test_channels_last_is_chosen_from_the_input_size_and_the_device(size, device, given, expected):
    from distill.config_load import load_config
    from distill.data.prepare import choose_inputs

    splits = Splits("folder", [Sample(f"/x/{i}.png", i % 4) for i in range(32)], [], [])
    cfg = load_config(None, image_size=f"{size[0]}x{size[1]}", channels_last=given)
    inputs = choose_inputs(cfg, splits, torch.device(device))
    assert inputs.channels_last is expected
    assert inputs.fill(cfg).channels_last is expected
    said = [c for c in inputs.chosen if c.startswith("channels_last")]
    assert said == (["channels_last (faster convolutions at this input on a CPU)"] if expected and given is None and device == "cpu" else [])


@pytest.mark.parametrize("size, native, given, expected", [
    ((128, 64), True, None, True),    # a re-ID input on a CPU with native bf16: measured 1.65x faster there
    ((128, 64), False, None, False),  # without native bf16 autocast is slower than float32
    ((64, 32), True, None, False),    # the embedded set, Yale, digits: float32, as their gains were measured
    ((128, 64), True, False, False),  # autocast given is kept
    ((64, 32), False, True, True),
])
def test_bf16_autocast_is_chosen_from_the_input_size_and_the_cpu(size, native, given, expected, monkeypatch):
    import distill.arithmetic as arithmetic
    from distill.config_load import load_config
    from distill.data.prepare import AMP_SAID, choose_inputs
    from distill.training import train_settings

    monkeypatch.setattr(arithmetic, "cpu_has_native_bf16", lambda: native)
    splits = Splits("folder", [Sample(f"/x/{i}.png", i % 4) for i in range(32)], [], [])
    cfg = load_config(None, image_size=f"{size[0]}x{size[1]}", amp=given)
    inputs = choose_inputs(cfg, splits, torch.device("cpu"))
    assert inputs.amp is expected and inputs.fill(cfg).amp is expected
    assert [c for c in inputs.chosen if c.startswith("bf16")] == ([AMP_SAID] if expected and given is None else [])
    assert train_settings(inputs.fill(cfg), torch.device("cpu")).amp is expected
    assert train_settings(cfg, torch.device("cpu")).amp is expected  # a config not filled follows the same rule
    assert choose_inputs(cfg, splits, torch.device("cuda")).amp is (given is not False)  # with CUDA unless turned off

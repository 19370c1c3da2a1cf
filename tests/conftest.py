"""Shared fixtures: CPU only, one thread, a private data cache per test session."""

from __future__ import annotations

import os

import pytest
import torch

torch.set_num_threads(1)  # tiny tensors: threads only add overhead, and CI has 2 shared cores


def image_folder(root, images_per_class: dict[str, int]):
    """An ImageFolder under ``root``: a folder per class name with that many 16x32 PNGs, a different
    colour per image. Returns ``root``."""
    from PIL import Image

    for c, n in images_per_class.items():
        (root / c).mkdir(parents=True)
        for i in range(n):
            Image.new("RGB", (16, 32), (20 * i, 40, 9 * len(c))).save(root / c / f"{i}.png")
    return root


@pytest.fixture(scope="session")
def timm_r18(tmp_path_factory):
    """A randomly initialised timm resnet18 (the reference) and its state dict saved as .safetensors:
    the local weights file of a library teacher or student."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False).eval()
    path = tmp_path_factory.mktemp("timm") / "r18.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return model, path


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory):
    """Render the embedded data set into a temp dir, never into the user's ~/.cache."""
    os.environ["DISTILL_CACHE"] = str(tmp_path_factory.mktemp("distill-cache"))
    yield

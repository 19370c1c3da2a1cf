"""Shared fixtures: CPU only, one thread, a private data cache per test session."""

from __future__ import annotations

import os

import pytest
import torch

torch.set_num_threads(1)  # tiny tensors: threads only add overhead, and CI has 2 shared cores


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

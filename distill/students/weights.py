"""Student weights: start a student from a state dict or a distill model file, as practitioners
start from pretrained students (``--student-weights``, ``--student-pretrained``).

Accepted files (read with ``safetensors`` or ``torch.load(weights_only=True)``: no pickled code runs):

- a distill model file (``student.pt``, ``teacher.pt``): it must hold the student's architecture
  and width; its backbone is loaded, and its embedding head and classifier where their shapes
  match (another embedding size or class count leaves them fresh);
- a plain state dict of the whole student (keys ``backbone.*``, ``proj.*``...): the same;
- a plain state dict of the backbone alone: a timm/torchvision ImageNet file (its classifier keys
  are dropped) or a builtin's ``backbone``; the heads stay fresh.

Anything else fails before training with the short table of missing / unexpected / misshaped keys.
"""

from __future__ import annotations

import os

from torch import nn

from distill.errors import DistillError
from distill.models import NotAModelFile, parse_spec, read_model_file, read_state_dict
from distill.models.file import check_state_dict, load_backbone_weights
from distill.multiscale import MultiScaleNet

BACKBONE = "backbone."


def load_student_weights(model: nn.Module, path: str | os.PathLike, spec: str, width: float = 1.0) -> None:
    """Load the weights at ``path`` into ``model``, a fresh student built from ``spec`` at ``width``
    (see the module docstring); one DistillError naming the mismatch otherwise."""
    net = model.base if isinstance(model, MultiScaleNet) else model  # the deep path; the shallow ones stay fresh
    hint = f"\n(--student-weights takes weights of the student's own architecture, {spec})"
    try:
        header, state = read_model_file(path)
    except NotAModelFile:
        state = read_state_dict(path)
        if not any(k.startswith(BACKBONE) for k in state):
            load_backbone_weights(net, path, hint)
            return
    else:
        arch, file_width = header["arch"], float(header.get("width", 1.0))
        if arch != spec or file_width != width:
            shown, wanted = (a if ":" in a else f"{a}@{w:g}" for a, w in ((arch, file_width), (spec, width)))
            raise DistillError(f"{path} holds a '{shown}' model, not the student '{wanted}': pass --student {shown}")
        if header.get("multiscale"):
            state = {k[len("base."):]: v for k, v in state.items() if k.startswith("base.")}
    _load_whole(net, state, f"student weights {path}", hint)


def _load_whole(net: nn.Module, state: dict, what: str, hint: str) -> None:
    """The backbone strictly, the heads (every other key) where the file has them in the same shape."""
    backbone = {k[len(BACKBONE):]: v for k, v in state.items() if k.startswith(BACKBONE)}
    check_state_dict(net.backbone, backbone, what, hint)
    own = net.state_dict()
    heads = {k: v for k, v in state.items() if not k.startswith(BACKBONE) and k in own and own[k].shape == v.shape}
    net.load_state_dict({k: v for k, v in state.items() if k.startswith(BACKBONE)} | heads, strict=False)


def pretrained_file(spec: str, cache_dir: str | os.PathLike | None = None) -> str:
    """The local file of timm's pretrained weights for the student ``spec`` (``timm:NAME``), from the
    Hugging Face cache (``cache_dir``: its default). Nothing is downloaded: when the file is not there,
    one DistillError says which file to fetch elsewhere and pass with ``--student-weights``."""
    parsed = parse_spec(spec, "student")
    if parsed.kind != "timm":
        raise DistillError(f"--student-pretrained takes timm students (timm:NAME), not '{spec}': pass --student-weights PATH")
    import timm
    from huggingface_hub import try_to_load_from_cache

    cfg = timm.get_pretrained_cfg(parsed.name)
    repo = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    if not repo:
        raise DistillError(f"timm has no pretrained weights for '{spec}' on the Hugging Face hub: pass --student-weights PATH")
    found = try_to_load_from_cache(repo, "model.safetensors", cache_dir=cache_dir)
    if isinstance(found, str):
        return found
    raise DistillError(
        f"timm's pretrained weights of {spec} are not on this machine (nothing is downloaded): fetch "
        f"https://huggingface.co/{repo}/resolve/main/model.safetensors where there is network and pass it with "
        "--student-weights PATH"
    )


def student_weights_file(student_weights: str | None, pretrained: bool, spec: str) -> str | None:
    """Where the student's initial weights are: the given file, timm's cached file, or None (random)."""
    if student_weights and pretrained:
        raise DistillError("give --student-weights or --student-pretrained, not both")
    if pretrained:
        return pretrained_file(spec)
    if student_weights and not os.path.isfile(student_weights):
        raise DistillError(f"student weights not found: {student_weights}")
    return student_weights

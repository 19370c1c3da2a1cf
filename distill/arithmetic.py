"""How a training computes on its device, when the options leave it open: the memory format and
bf16 autocast, chosen from the device and the input size (``--channels-last``, ``--amp``)."""

from __future__ import annotations

import torch

# channels_last on a CPU trains 1.31-1.37x faster at 128x64 on the AMD EPYC of docs/results.md (1.14-1.29x
# below), where a real re-ID run trains for half an hour; smaller inputs (the embedded set, Yale,
# digits) keep the contiguous format their measured gains were trained in. Always on with CUDA.
CHANNELS_LAST_MIN_PIXELS = 128 * 64


def default_channels_last(cuda: bool, image_size: tuple[int, int] | None) -> bool:
    """The memory format when ``--channels-last`` is left unset: channels_last with CUDA, and on a CPU
    for inputs of at least ``CHANNELS_LAST_MIN_PIXELS`` (an input not chosen yet: contiguous)."""
    return cuda or (image_size is not None and image_size[0] * image_size[1] >= CHANNELS_LAST_MIN_PIXELS)


def cpu_has_native_bf16() -> bool:
    """Whether oneDNN runs bf16 convolutions natively on this CPU (AVX512-BF16 or AMX), as PyTorch's
    own CPU backends ask it."""
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return bool(check is not None and torch.backends.mkldnn.is_available() and check())


# bf16 autocast with channels_last trains BN-Inception 1.65x faster than channels_last alone at 128x64 on
# the Intel Xeon with AMX of docs/results.md (NIN-BN 1.64x); on a CPU without native bf16 it is slower.
# Smaller inputs keep float32, in which the embedded, Yale and digits numbers were measured.
def default_amp(cuda: bool, image_size: tuple[int, int] | None) -> bool:
    """bf16 autocast when ``--amp`` is left unset: with CUDA, and on a CPU with native bf16 for the
    inputs that train in channels_last there (``default_channels_last``)."""
    return cuda or (default_channels_last(False, image_size) and cpu_has_native_bf16())

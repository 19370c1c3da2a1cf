"""Data sets (one module per published layout), the embedded default, samplers and transforms."""

from distill.data import cars196, cub200, cuhk03, digits, imagefolder, market1501, sop, synthetic  # noqa: F401  (register loaders)
from distill.data.base import (
    Sample, Splits, data_fingerprint, dataset_names, hold_out_identities, load_dataset, register_dataset,
)

__all__ = ["Sample", "Splits", "data_fingerprint", "dataset_names", "hold_out_identities", "load_dataset", "register_dataset"]

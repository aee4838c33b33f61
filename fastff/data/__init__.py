"""Datasets for training and experiments (see ``fastff.data.datasets``)."""
from .datasets import (BUILTIN, DataFormatError, Dataset, Split, load_csv, load_dataset, load_idx_dir,
                       load_npz, read_idx, split_indices)

__all__ = ["BUILTIN", "DataFormatError", "Dataset", "Split", "load_dataset", "load_idx_dir", "load_npz",
           "load_csv", "read_idx", "split_indices"]

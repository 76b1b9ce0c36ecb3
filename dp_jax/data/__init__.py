"""Data: dataset sources, validation, class-balanced subsets and preprocessing (standard, ZCA).

``load_dataset(cfg, seed=...)`` returns a ``Dataset`` in model input space; ``preprocess`` holds
the invertible transforms (``to_pixels`` maps model-space images back to [0, 1] pixels).
"""

from dp_jax.data import preprocess
from dp_jax.data.dataset import Dataset, load_dataset, stratified_indices
from dp_jax.data.registry import SOURCES, Source, register
from dp_jax.data.sources import RawData
from dp_jax.data.spec import DataSpec
from dp_jax.data.preprocess import (apply_preprocessing, describe_preprocessing,
                                    fit_preprocessing, to_pixels)


__all__ = [
    "RawData",
    "SOURCES",
    "Source",
    "register",
    "DataSpec",
    "Dataset",
    "apply_preprocessing",
    "describe_preprocessing",
    "fit_preprocessing",
    "load_dataset",
    "preprocess",
    "stratified_indices",
    "to_pixels",
]

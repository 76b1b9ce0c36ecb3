"""The data section's typed settings: :class:`DataSpec`."""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Optional

from dp_jax.config.sections import Section


@dataclasses.dataclass(frozen=True)
class DataSpec(Section):
    """Where the data comes from and how it is prepared (``config.data``)."""
    SECTION: ClassVar[str] = "data"
    augment: str
    classes: tuple
    data_dir: Optional[str]
    eval_split: Optional[str]
    image_size: Optional[int]
    label_cache: Optional[str]
    name: str
    pipeline: str
    preprocess: str
    train_size: int
    zca_eps: float
    plugins: str

"""The model section's typed settings: :class:`ModelSpec` (a registered name and the architecture
fields that are set; a field left out means the model's own default)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Optional

from dp_jax.config import defaults
from dp_jax.config.sections import plain


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A model of the registry (``name``) and its set architecture fields, sorted by name."""
    name: str
    fields: tuple = ()  # ((field, value), ...): only fields that are set
    plugins: str = ""   # modules that register models (model.plugins), imported by the tasks

    @classmethod
    def from_config(cls, section: Optional[Mapping] = None, **overrides) -> "ModelSpec":
        """The spec of a config's model section (fields that are None are left out)."""
        given = dict(plain(section) or {})
        given.update(overrides)
        name = given.pop("name", defaults.section("model")["name"])
        plugins = given.pop("plugins", "") or ""
        return cls(name=name, fields=tuple(sorted((k, v) for k, v in given.items()
                                                  if v is not None)), plugins=plugins)

    def get(self, field: str, default: Any = None) -> Any:
        """The value of architecture field ``field`` (``default`` when not set)."""
        return dict(self.fields).get(field, default)

    def to_dict(self) -> dict:
        """``{"name": ..., field: value, ...}`` (tuples as lists, as JSON holds them)."""
        return {"name": self.name, **{k: list(v) if isinstance(v, tuple) else v
                                      for k, v in self.fields}}

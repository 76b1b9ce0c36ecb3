"""Typed settings: a frozen dataclass per config section, owned by the code that reads it.

A subclass names its section (``SECTION = "train"``) and declares that section's fields; it
gives none of them a default, because config/defaults.py is the one source of defaults:

    @dataclasses.dataclass(frozen=True)
    class TrainSettings(Section):
        SECTION: ClassVar[str] = "train"
        epochs: int
        lr: float

    TrainSettings.from_config(config.train)       # a config section (a ConfigDict or a dict)
    TrainSettings.from_config(lr=0.1)             # the defaults with one field changed

Below the task layer the library reads these objects, never a ConfigDict.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar

from dp_jax.config import defaults


def plain(value: Any) -> Any:
    """``value`` with ConfigDicts and dicts as dicts and lists as tuples (hashable, frozen)."""
    if hasattr(value, "to_dict"):
        value = value.to_dict()
    if isinstance(value, Mapping):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return tuple(plain(v) for v in value)
    return value


@dataclasses.dataclass(frozen=True)
class Section:
    """Base of the typed settings of one config section (see the module doc)."""
    SECTION: ClassVar[str] = ""

    @classmethod
    def field_names(cls) -> tuple:
        """The section's fields, in declaration order."""
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_config(cls, section: Mapping | None = None, **overrides):
        """The settings of ``section`` (missing fields take their defaults); a field the
        section does not have is a ValueError naming it and the valid ones."""
        given = dict(plain(section) or {})
        given.update(overrides)
        names = cls.field_names()
        unknown = sorted(set(given) - set(names))
        if unknown:
            where = f"config.{cls.SECTION}" if cls.SECTION else "config"
            raise ValueError(f"{where} has no field {unknown[0]!r}; valid: {', '.join(names)}")
        values = defaults.section(cls.SECTION)
        values.update(given)
        missing = [n for n in names if n not in values]
        if missing:  # a programming error: a field without a default in config/defaults.py
            raise KeyError(f"config/defaults.py has no default for config.{cls.SECTION}."
                           f"{missing[0]}")
        return cls(**{n: plain(values[n]) for n in names})

    def replace(self, **changes):
        """A copy with ``changes`` applied."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """The fields as a plain dict (what config.json holds for this section)."""
        return {n: getattr(self, n) for n in self.field_names()}

"""The method registry: name -> :class:`~dp_jax.methods.base.Method`, the ``prune.method``
parser and the report's names of run labels. dp_jax.methods registers the built-in methods."""

from __future__ import annotations

import dataclasses

from dp_jax.config import files as config_files

from dp_jax.methods.base import Method
from dp_jax.pruning.plan import DENSE, Spec

REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add ``method`` to the registry under ``method.name``. A name already taken by another
    method (a built-in included) is refused: a plugin cannot change the runs of a workdir
    silently by replacing a method they were made with."""
    if not method.name or ":" in method.name or "," in method.name:
        raise ValueError(f"a method needs a name without ':' or ',', got {method.name!r}")
    if REGISTRY.get(method.name, method) is not method:
        raise ValueError(f"prune.method: a method named {method.name!r} is already registered; "
                         "register yours under another name")
    REGISTRY[method.name] = method
    return method


def get(name: str) -> Method:
    """The registered method ``name``."""
    if name not in REGISTRY:
        raise ValueError(f"prune.method: unknown method {name!r}; allowed: "
                         f"{', '.join(REGISTRY)} ({_syntax()})")
    return REGISTRY[name]


def load_plugins(modules) -> None:
    """Import the modules named in ``prune.plugins`` (they call :func:`register`)."""
    config_files.import_plugins("prune.plugins", modules)


def _syntax() -> str:
    parts = []
    for m in REGISTRY.values():
        opts = ";".join(o.name if o.flag else f"{o.name}=..." for o in m.options)
        parts.append(f"{m.name}:{opts}" if opts else m.name)
    return "entries: " + ", ".join(parts)


def _parse_entry(item: str, config) -> Spec:
    name, _, text = item.partition(":")
    method = get(name.strip())
    allowed = {o.name: o for o in method.options}
    given = {}
    for opt in [o.strip() for o in text.split(";") if o.strip()]:
        key, eq, value = opt.partition("=")
        o = allowed.get(key)
        if o is None or (o.flag == bool(eq)):
            want = ", ".join(x.name if x.flag else f"{x.name}=VALUE" for x in allowed.values())
            raise ValueError(f"prune.method: option {opt!r} is not valid for {method.name!r}; "
                             f"allowed: {want or 'none'}")
        try:
            given[key] = True if o.flag else o.parse(value)
        except ValueError as e:
            raise ValueError(f"prune.method: {method.name}: {e}") from None
    for o in method.options:
        if o.name not in given:
            given[o.name] = o.default(config) if callable(o.default) else o.default
    opts = {k: v for k, v in given.items() if v is not None}
    spec = Spec(name=method.name, label=method.label(opts), options=tuple(sorted(opts.items())))
    start = method.start(spec)
    if start.kind == "rewind" and start.step != spec.rewind_step:  # a borrowed start point
        spec = dataclasses.replace(spec, start_step=int(start.step))
    return spec


def parse(text: str, config, *, check: bool = True) -> list[Spec]:
    """Parse a ``prune.method`` string (e.g. ``'imp,imp:k=200,snip:oneshot'``) into specs.

    Every error names ``prune.method`` and the allowed values; with ``check`` the methods'
    own config checks run too (before any work; off when re-reading a finished workdir).
    """
    specs = []
    for item in [t.strip() for t in str(text).split(",") if t.strip()]:
        specs.append(_parse_entry(item, config))
    if not specs:
        raise ValueError(f"prune.method is empty; allowed: {', '.join(REGISTRY)}")
    labels = [s.label for s in specs]
    if len(set(labels)) != len(labels):
        raise ValueError(f"prune.method lists a run twice: {labels}")
    for i, s in enumerate(specs):
        if check:
            get(s.name).validate(s, config, specs[:i])
    return specs


def pretty(label: str) -> str:
    """The report's name of a run label, e.g. ``imp_k200`` -> ``IMP (k=200)``."""
    if label == DENSE.label:
        return "Dense"
    for m in sorted(REGISTRY.values(), key=lambda m: len(m.name), reverse=True):
        text = m.describe(label)
        if text is not None:
            return text
    return label

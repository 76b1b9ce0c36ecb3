"""The one reader of ``.npz`` files: every array of a file, or a ValueError that names the file.

Kept apart from :mod:`dp_jax.storage.fileio` (which imports orbax) so that light modules can
read arrays without it.
"""

from __future__ import annotations

import numpy as np


def read(path: str, what: str) -> dict[str, np.ndarray]:
    """All arrays of the npz file at ``path`` (no pickles). A missing file raises
    FileNotFoundError; a damaged, truncated or foreign one ValueError naming it as ``what``
    (e.g. ``"mask file"``)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except FileNotFoundError:
        raise
    except Exception as e:  # zipfile, zlib, format and pickle errors alike
        raise ValueError(f"{what} {path} is unreadable or truncated: "
                         f"{type(e).__name__}: {e}") from e

"""Matplotlib figures that need no display backend: every plot of dp_jax is drawn on a
``matplotlib.figure.Figure`` outside pyplot, so the library never switches the backend (a
notebook keeps its inline plots) and a returned figure is shown once."""

from __future__ import annotations


def subplots(*args, figsize=None, **kwargs):
    """``(figure, axes)`` as ``pyplot.subplots`` returns them, on a Figure outside pyplot."""
    from matplotlib.figure import Figure  # matplotlib loads only when something is plotted
    fig = Figure(figsize=figsize)
    return fig, fig.subplots(*args, **kwargs)


def get_cmap(name: str):
    """The registered colormap ``name``."""
    import matplotlib  # matplotlib loads only when something is plotted
    return matplotlib.colormaps[name]

"""Analyses of pruned networks: instability (linear mode connectivity), Hessian, loss landscapes.

  python -m dp_jax.analysis --workdir=DIR [--analyses=instability,hessian,landscape]

Modules: ``family`` (vmapped evaluation of linear weight families), ``instability``,
``hessian``, ``landscape``, ``run`` (the workdir driver), ``report`` and ``plots``.
See docs/analysis.md.
"""

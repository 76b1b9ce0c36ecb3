"""Analyses of pruned networks: instability (linear mode connectivity), Hessian, loss landscapes.

  python -m dp_jax.analysis --workdir=DIR [--analyses=instability,hessian,landscape]

Modules: ``registry`` (the analyses by name: :class:`registry.Analysis`), ``context`` (what
the analyses of a workdir share), ``family`` (vmapped evaluation of linear weight families),
``instability``, ``hessian``, ``landscape``, ``resume`` (per-mask resume, kept checkpoints)
and ``settings``. The workdir driver is :mod:`dp_jax.tasks.analyze`; the report section and
plots are :mod:`dp_jax.reports.analysis`. See docs/analysis.md.
"""

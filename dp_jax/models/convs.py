"""Convolutions whose derivatives of every order stay in XLA:CPU's fast layout.

MTT differentiates through SGD steps, i.e. takes second derivatives of the network. For a
convolution, JAX's transpose rules turn the second-order terms into convolutions with unusual
dimension labels (e.g. ``01fb_o01i->f01b`` with kernel reversal), which XLA:CPU lowers to a
generic loop nest: measured at ~1 GFLOP/s, this one op took half of an MTT step for ConvNet-32.

Here a stride-1 convolution is one of three functions with custom VJPs, closed under
differentiation and each lowered to a canonical NHWC/HWIO convolution:

  conv(x, w)      = x * w                       d/dx -> conv_t,  d/dw -> wgrad
  conv_t(dy, w)   = adjoint of conv in x        d/ddy -> conv,   d/dw -> wgrad (swapped)
  wgrad(x, dy)    = adjoint of conv in w        d/dx -> conv_t,  d/ddy -> conv

``wgrad`` runs as a convolution with the input channels as batch and the examples as
features (the standard weight-gradient formulation, which XLA:CPU executes well). Layers with at
most ``SMALL_CHANNELS`` input channels use patch matrix products instead, and so do the two
adjoints of layers with at least ``WIDE_CHANNELS`` (off by default). Values equal
``lax.conv_general_dilated``'s up to float rounding; only the lowering changes.

``fast_convs()`` routes every eligible ``flax.linen.Conv`` (stride 1, no dilation, one group,
NHWC) through these functions for the calls traced inside it, without touching model code.
"""

from __future__ import annotations

import contextlib
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

_DN = ("NHWC", "HWIO", "NHWC")


# Convolutions with at most this many input channels (the first layer of a grayscale or RGB
# net) run as patch matrix products: XLA:CPU's convolution paths are slow for them (measured
# 1-3 GFLOP/s for the 1-channel layer of ConvNet-32 and its transposes).
SMALL_CHANNELS = 4
# The adjoints (input and kernel gradients) of layers with at least this many input channels
# run as patch matrix products too; None: never. With jaxlib 0.9 that made ConvNet-3 width 128
# training 1.8x faster; with 0.10.x (YNNPACK kernels) XLA's own adjoints are faster: ResNet-18
# width 32 trains 1.3x faster without the rule, ConvNet-3 width 128 within 4 %, and one
# 128-channel layer's adjoints run 3x faster (docs/performance.md, benchmarks/library_kernels.py).
WIDE_CHANNELS = None


def _patch_adjoints(ci: int) -> bool:
    return ci <= SMALL_CHANNELS or (WIDE_CHANNELS is not None and ci >= WIDE_CHANNELS)


def _lax_conv(x, w, pad):
    return lax.conv_general_dilated(x, w, (1, 1), pad, dimension_numbers=_DN)


def _pad(x, pad):
    # lax.pad accepts negative padding (cropping), which the adjoint of a wide pad needs.
    return lax.pad(x, jnp.zeros((), x.dtype),
                   [(0, 0, 0), (pad[0][0], pad[0][1], 0), (pad[1][0], pad[1][1], 0), (0, 0, 0)])


def _patches(x, kh, kw, pad):
    """(B, H, W, C) -> (B, Ho, Wo, kh*kw*C) in HWIO kernel order."""
    xp = _pad(x, pad)
    ho, wo = xp.shape[1] - kh + 1, xp.shape[2] - kw + 1
    return jnp.concatenate([xp[:, i:i + ho, j:j + wo, :] for i in range(kh) for j in range(kw)],
                           axis=-1)


def _transpose_pad(pad, kh, kw):
    return ((kh - 1 - pad[0][0], kh - 1 - pad[0][1]), (kw - 1 - pad[1][0], kw - 1 - pad[1][1]))


def _conv(x, w, pad):
    kh, kw, ci, co = w.shape
    if ci <= SMALL_CHANNELS:
        return _patches(x, kh, kw, pad) @ w.reshape(kh * kw * ci, co)
    return _lax_conv(x, w, pad)


def _conv_t(dy, w, pad):
    # Adjoint in x: correlate dy with the spatially flipped kernel, in/out channels swapped.
    kh, kw, ci, co = w.shape
    tpad = _transpose_pad(pad, kh, kw)
    if _patch_adjoints(ci):
        # Few output channels: one matrix product for every kernel tap, then shifted sums.
        b, h, wd, _ = dy.shape
        z = (dy.reshape(-1, co) @ w.reshape(kh * kw * ci, co).T).reshape(b, h, wd, kh * kw * ci)
        zp = _pad(z, tpad)
        ho, wo = zp.shape[1] - kh + 1, zp.shape[2] - kw + 1
        zp = zp.reshape(zp.shape[:3] + (kh * kw, ci))
        out = None
        for i in range(kh):
            for j in range(kw):
                tap = zp[:, kh - 1 - i:kh - 1 - i + ho, kw - 1 - j:kw - 1 - j + wo, i * kw + j, :]
                out = tap if out is None else out + tap
        return out
    return _lax_conv(dy, jnp.transpose(w[::-1, ::-1], (0, 1, 3, 2)), tpad)


def _wgrad(x, dy, pad):
    # w[i, j, ci, co] = sum_{b, p} xpad[b, p + (i, j), ci] * dy[b, p, co]
    ci = x.shape[-1]
    kh = x.shape[1] + pad[0][0] + pad[0][1] - dy.shape[1] + 1
    kw = x.shape[2] + pad[1][0] + pad[1][1] - dy.shape[2] + 1
    if _patch_adjoints(ci):
        p = _patches(x, kh, kw, pad).reshape(-1, kh * kw * ci)
        return (p.T @ dy.reshape(-1, dy.shape[-1])).reshape(kh, kw, ci, dy.shape[-1])
    xt = jnp.transpose(x, (3, 1, 2, 0))     # (Cin, H, W, B): Cin as batch, B as feature
    dyt = jnp.transpose(dy, (1, 2, 0, 3))   # (Ho, Wo, B, Cout): the "kernel"
    return jnp.transpose(_lax_conv(xt, dyt, pad), (1, 2, 0, 3))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def conv(pad, x, w):
    """Stride-1 NHWC/HWIO convolution with explicit ``pad`` ((top, bottom), (left, right))."""
    return _conv(x, w, pad)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def conv_t(pad, dy, w):
    """Adjoint of :func:`conv` with respect to its input."""
    return _conv_t(dy, w, pad)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def wgrad(pad, x, dy):
    """Adjoint of :func:`conv` with respect to its kernel."""
    return _wgrad(x, dy, pad)


conv.defvjp(lambda pad, x, w: (_conv(x, w, pad), (x, w)),
            lambda pad, res, g: (conv_t(pad, g, res[1]), wgrad(pad, res[0], g)))
conv_t.defvjp(lambda pad, dy, w: (_conv_t(dy, w, pad), (dy, w)),
              lambda pad, res, g: (conv(pad, g, res[1]), wgrad(pad, g, res[0])))
wgrad.defvjp(lambda pad, x, dy: (_wgrad(x, dy, pad), (x, dy)),
             lambda pad, res, g: (conv_t(pad, res[1], g), conv(pad, res[0], g)))


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                         precision=None, **kwargs):
    """Drop-in for ``lax.conv_general_dilated``: the fast path when eligible, else lax."""
    ones = (1,) * (lhs.ndim - 2)
    dn = lax.conv_dimension_numbers(lhs.shape, rhs.shape, _DN) if lhs.ndim == 4 else None
    given = (lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
             if dimension_numbers is not None and lhs.ndim == 4 else None)
    eligible = (lhs.ndim == 4 and dn == given and tuple(window_strides) == ones
                and tuple(lhs_dilation or ones) == ones and tuple(rhs_dilation or ones) == ones
                and feature_group_count == 1 and not kwargs)
    if not eligible:
        return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation,
                                        rhs_dilation, dimension_numbers, feature_group_count,
                                        precision=precision, **kwargs)
    if isinstance(padding, str):
        padding = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], (1, 1), padding)
    pad = tuple((int(lo), int(hi)) for lo, hi in padding)
    return conv(pad, lhs, rhs)


def _interceptor(next_fun, args, kwargs, context):
    m = context.module
    if (type(m) is nn.Conv and context.method_name == "__call__"
            and m.conv_general_dilated is None and m.conv_general_dilated_cls is None
            and m.has_variable("params", "kernel")):
        # Re-run the same module with only the convolution primitive swapped; flax keeps
        # handling padding, bias, masks and dtypes.
        clone = m.clone(parent=None, conv_general_dilated=conv_general_dilated)
        return clone.apply({"params": m.variables["params"]}, *args, **kwargs)
    return next_fun(*args, **kwargs)


@contextlib.contextmanager
def fast_convs(enabled: bool = True):
    """Within this context, ``model.apply`` traces eligible ``nn.Conv`` calls through :func:`conv`.

    Only affects functions *traced* inside the context (jit caches are keyed on the function, so
    build and first call a jitted function in the same context).
    """
    if not enabled:
        yield
        return
    with nn.intercept_methods(_interceptor):
        yield


def _eligible_module(m: nn.Conv) -> bool:
    def ones(v):
        return v is None or all(int(d) == 1 for d in ((v,) if isinstance(v, int) else v))
    return (ones(m.strides) and ones(m.input_dilation) and ones(m.kernel_dilation)
            and m.feature_group_count == 1 and m.conv_general_dilated is None
            and m.conv_general_dilated_cls is None)


def only_fast_convs(model, image_shape) -> bool:
    """True if ``model`` has convolutions and :func:`fast_convs` covers every one of them.

    Traced abstractly (``jax.eval_shape`` of the init): no compute. Models with strided or
    dilated convolutions (ResNets) return False.
    """
    seen = []

    def record(next_fun, args, kwargs, context):
        if type(context.module) is nn.Conv and context.method_name == "__call__":
            seen.append(_eligible_module(context.module))
        return next_fun(*args, **kwargs)
    x = jnp.zeros((1, *tuple(int(d) for d in image_shape)), jnp.float32)
    with nn.intercept_methods(record):
        # A fresh function, so it is traced now (cached init programs would skip the calls).
        jax.eval_shape(lambda k: model.init(k, x, train=False), jax.random.key(0))
    return bool(seen) and all(seen)

"""The stem's 3x3 convolution of 3 channels as one matmul of its patches: a lead that did
not pay in the model (its rounding depends on the program around it), timed by
`benchmarks.bench_conv` (BUILD.md "Speed")."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero


_NHWC = ("NHWC", "HWIO", "NHWC")


def _xla_conv(x, kernel, padding, precision=None):
    return jax.lax.conv_general_dilated(x, kernel, (1, 1), padding, dimension_numbers=_NHWC,
                                        precision=precision)


def _conv_as_matmul(x, kernel, padding, precision=None):
    """The stride-1 conv of an NHWC ``x`` as one matmul of its patches (im2col)."""
    kh, kw, cin, cout = kernel.shape
    (top, bottom), (left, right) = padding
    xp = jnp.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))
    h, w = xp.shape[1] - kh + 1, xp.shape[2] - kw + 1
    patches = jnp.concatenate([xp[:, i:i + h, j:j + w, :] for i in range(kh) for j in range(kw)],
                              axis=-1)  # (i, j, c) order: the kernel's, reshaped
    return jnp.dot(patches, kernel.reshape(kh * kw * cin, cout), precision=precision)


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3))
def _patch_conv(x, kernel, padding, precision):
    return _conv_as_matmul(x, kernel, padding, precision)


def _patch_conv_jvp(padding, precision, primals, tangents):
    # The convolution's own derivative, linear in the tangents: reverse mode transposes
    # it into XLA's weight- and input-gradient convolutions, as without the matmul. A
    # symbolic zero (the images' tangent) costs nothing: no convolution of zeros.
    (x, kernel), (dx, dkernel) = primals, tangents
    y, terms = _conv_as_matmul(x, kernel, padding, precision), []
    if not isinstance(dx, SymbolicZero):
        terms.append(_xla_conv(dx, kernel, padding, precision))
    if not isinstance(dkernel, SymbolicZero):
        terms.append(_xla_conv(x, dkernel, padding, precision))
    return y, sum(terms[1:], terms[0]) if terms else jnp.zeros_like(y)


_patch_conv.defjvp(_patch_conv_jvp, symbolic_zeros=True)


def stem_conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                              rhs_dilation=None, dimension_numbers=None,
                              feature_group_count=1, precision=None):
    """`jax.lax.conv_general_dilated` for the stem (``nn.Conv(conv_general_dilated=...)``):
    a lead `benchmarks.bench_conv` times, **not used by the model** (BUILD.md "Speed").

    Its rounding depends on the program around it: in the model, a run resumed from
    a checkpoint that a differently wrapped step wrote no longer matched the
    uninterrupted run (``tests/test_checkpoint.py``), where XLA's convolution does.

    XLA:CPU runs a convolution of 3 input channels at a few GFLOP/s (8 ms for
    the 32x32x3 -> 64 stem on a batch of 32, BUILD.md "Speed"); the same conv
    as one matmul of its 27-wide patches takes 2 ms, the values the same
    (``tests/test_stem_matmul.py`` checks them against a NumPy convolution). Its
    derivatives are XLA's convolution's (a `jax.custom_jvp`: forward mode works
    too). Measured on XLA:CPU only; on a GPU it is one small matmul and a
    concatenation, not timed there. Stride 1, no dilation, no groups, explicit
    padding, NHWC/HWIO only; anything else is an error.
    """
    trivial = all(s == 1 for s in window_strides) and all(
        d in (None, 1) for d in (*(lhs_dilation or ()), *(rhs_dilation or ())))
    if lhs.ndim != 4 or rhs.ndim != 4:
        raise ValueError(f"stem_conv_general_dilated takes NHWC images and an HWIO kernel; got "
                         f"shapes {lhs.shape} and {rhs.shape}")
    layout = jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC)
    if (not trivial or feature_group_count != 1 or isinstance(padding, str)
            or jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers) != layout):
        raise ValueError("stem_conv_general_dilated takes a stride-1, undilated, ungrouped "
                         f"NHWC/HWIO conv with explicit padding; got strides {window_strides}, "
                         f"padding {padding!r}, dilations {lhs_dilation}/{rhs_dilation}, "
                         f"groups {feature_group_count}, dimension numbers {dimension_numbers}"
                         f" (NHWC/HWIO is {layout})")
    padding = tuple(tuple(int(p) for p in pair) for pair in padding)
    return _patch_conv(lhs, rhs, padding, precision)

"""BatchNorm over NHWC maps with per-channel sums XLA:CPU runs fast.

Flax's `nn.BatchNorm` reduces over the batch and spatial axes with
``x.mean((0, 1, 2))``, and autodiff turns each of its broadcasts into the same
kind of reduction. XLA:CPU runs a reduction whose kept axis is the short minor
one (64-512 channels) at a fraction of the memory speed, and the same sum taken
as a column sum of a wide 2-D view and then a small one at close to it
(docs/performance.md has the figures, from `python -m benchmarks.bench_batchnorm`).
`channel_sums` takes every sum that way, and `batch_norm` writes the backward
pass out (the textbook BatchNorm gradient) so that its sums are taken that way
too.

`BatchNorm` is a drop-in for ``nn.BatchNorm(momentum=..., epsilon=...)`` over
the last axis: the same variables (``params``: scale, bias; ``batch_stats``:
mean, var) and the same statistics (``E[x^2] - E[x]^2`` clipped at zero, as
Flax's fast variance). One difference, on purpose: the running variance takes
the *unbiased* batch variance (times n/(n-1), n = samples x positions), as
PyTorch's ``BatchNorm2d`` and so the authors' LightCL do; Flax's takes the
biased one; with the unbiased update, `benchmarks.side_by_side.lockstep` finds
the running statistics of ours and the authors' model equal to float rounding
(BUILD.md, "How the reference's behaviour is reproduced").
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import flax.linen as nn


def _block(n: int) -> int:
    """How many rows of an (n, C) matrix one row of the wide view holds."""
    return next(k for k in (16, 8, 4, 2, 1) if n % k == 0)


def channel_sums(x: jax.Array) -> jax.Array:
    """Per-channel sums of ``x`` over every axis but the last: ``x.sum(axes[:-1])``.

    Taken as a column sum of the view (n/k, k*C), then of (k, C).
    """
    channels = x.shape[-1]
    n = x.size // channels
    k = _block(n)
    return x.reshape(n // k, k * channels).sum(0).reshape(k, channels).sum(0)


def _lift(v: jax.Array, like: jax.Array) -> jax.Array:
    """A per-channel vector (C,) shaped to broadcast against ``like`` (..., C)."""
    return v.reshape((1,) * (like.ndim - 1) + v.shape)


def _normalise(x, mean, inv, scale, bias):
    """``(x - mean) * inv * scale + bias``, per channel, ``inv = rsqrt(var + epsilon)``
    (Flax's order)."""
    return (x - _lift(mean, x)) * _lift(inv * scale, x) + _lift(bias, x)


def _forward(x, scale, bias, epsilon):
    n = x.size // x.shape[-1]
    mean = channel_sums(x) / n
    raw_var = channel_sums(x * x) / n - mean * mean
    var = jnp.maximum(0.0, raw_var)
    inv = jax.lax.rsqrt(var + epsilon)
    y = _normalise(x, mean, inv, scale, bias)
    return (y, mean, var), (x, mean, inv, raw_var > 0, scale)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _batch_norm(x, scale, bias, epsilon):
    return _forward(x, scale, bias, epsilon)[0]


def _batch_norm_fwd(x, scale, bias, epsilon):
    return _forward(x, scale, bias, epsilon)


def _batch_norm_bwd(epsilon, residuals, cotangents):
    x, mean, inv, unclipped, scale = residuals
    g_y, g_mean, g_var = cotangents
    n = x.size // x.shape[-1]
    centred = x - _lift(mean, x)
    x_hat = centred * _lift(inv, x)
    g_bias = channel_sums(g_y)
    g_scale = channel_sums(g_y * x_hat)
    # y = x_hat * scale + bias; x_hat = (x - mean) * rsqrt(var + eps) with mean and
    # var taken over the n positions: the textbook gradient, plus the paths through
    # the returned mean and var (d mean/dx = 1/n, d var/dx = 2 (x - mean)/n, zero where
    # the variance was clipped).
    through_var = jnp.where(unclipped, 1.0, 0.0)
    g_x_hat = g_y - (_lift(g_bias, x) + x_hat * _lift(g_scale * through_var, x)) / n
    g_x = (_lift(inv * scale, x) * g_x_hat + _lift(g_mean / n, x)
           + centred * _lift((2.0 / n) * through_var * g_var, x))
    return g_x, g_scale, g_bias


_batch_norm.defvjp(_batch_norm_fwd, _batch_norm_bwd)


def batch_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float):
    """``(y, mean, var)``: ``x`` normalised with its own per-channel statistics.

    ``mean`` and ``var`` (biased, ``E[x^2] - E[x]^2`` clipped at zero) are over every
    axis but the last; ``y = (x - mean) * rsqrt(var + epsilon) * scale + bias``.
    Differentiable in ``x``, ``scale`` and ``bias`` (`channel_sums` in both passes).
    """
    if x.ndim < 2 or scale.shape != (x.shape[-1],) or bias.shape != (x.shape[-1],):
        raise ValueError(f"batch_norm wants x (..., C) and scale, bias (C,); got x "
                         f"{x.shape}, scale {scale.shape}, bias {bias.shape}")
    return _batch_norm(x, scale, bias, float(epsilon))


class BatchNorm(nn.Module):
    """`nn.BatchNorm` over the last axis, with `batch_norm`'s fast sums and PyTorch's
    running variance (the unbiased batch variance).

    Attributes:
      use_running_average: normalise with the running statistics (evaluation, or
        frozen statistics) instead of the batch's, and leave them unchanged.
      momentum: ``running = momentum * running + (1 - momentum) * batch`` (for the
        variance, the batch's unbiased one).
      epsilon: added to the variance.
    """

    use_running_average: bool | None = None
    momentum: float = 0.99
    epsilon: float = 1e-5

    @nn.compact
    def __call__(self, x, use_running_average: bool | None = None):
        use_running_average = nn.merge_param(
            "use_running_average", self.use_running_average, use_running_average)
        channels = (x.shape[-1],)
        running_mean = self.variable("batch_stats", "mean", jnp.zeros, channels, jnp.float32)
        running_var = self.variable("batch_stats", "var", jnp.ones, channels, jnp.float32)
        scale = self.param("scale", nn.initializers.ones, channels, jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, channels, jnp.float32)
        if use_running_average:
            inv = jax.lax.rsqrt(running_var.value + self.epsilon)
            return _normalise(x, running_mean.value, inv, scale, bias)
        y, mean, var = batch_norm(x, scale, bias, self.epsilon)
        if not self.is_initializing():
            n = x.size // x.shape[-1]
            unbiased = var * (n / max(n - 1, 1))       # PyTorch's running variance
            running_mean.value = self.momentum * running_mean.value + (1 - self.momentum) * mean
            running_var.value = self.momentum * running_var.value + (1 - self.momentum) * unbiased
        return y

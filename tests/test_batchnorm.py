"""The model's BatchNorm against NumPy and against plain autodiff of the textbook formula."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lightcl_jax.model.batchnorm import BatchNorm, batch_norm, channel_sums

# (n = samples x positions) divisible by 16, by 2 only, and by nothing.
SHAPES = [(4, 4, 4, 8), (3, 2, 1, 5), (5, 1, 1, 3)]


def _data(shape, seed=0):
    rng = np.random.default_rng(seed)
    x = (rng.normal(size=shape) * 3 + 1).astype(np.float32)
    channels = shape[-1]
    scale = np.linspace(0.5, 2.0, channels, dtype=np.float32)
    bias = np.linspace(-1.0, 1.0, channels, dtype=np.float32)
    return x, scale, bias


def _numpy_batch_norm(x, scale, bias, eps):
    x = x.astype(np.float64)
    mean = x.reshape(-1, x.shape[-1]).mean(0)
    var = np.maximum(0.0, (x * x).reshape(-1, x.shape[-1]).mean(0) - mean ** 2)
    return (x - mean) / np.sqrt(var + eps) * scale + bias, mean, var


@pytest.mark.parametrize("shape", SHAPES)
def test_channel_sums_is_the_sum_over_leading_axes(shape):
    x, _, _ = _data(shape)
    np.testing.assert_allclose(np.asarray(channel_sums(jnp.asarray(x))),
                               x.astype(np.float64).sum(axis=(0, 1, 2)), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("shape", SHAPES)
def test_forward_matches_numpy(shape):
    x, scale, bias = _data(shape)
    y, mean, var = jax.jit(batch_norm, static_argnums=3)(x, scale, bias, 1e-5)
    want = _numpy_batch_norm(x, scale, bias, 1e-5)
    for got, expected in zip((y, mean, var), want):
        np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-4, atol=1e-4)


def _plain(x, scale, bias, eps):
    """The same statistics written with jnp reductions, differentiated by JAX."""
    mean = x.mean((0, 1, 2))
    var = jnp.maximum(0.0, (x * x).mean((0, 1, 2)) - mean * mean)
    y = (x - mean[None, None, None]) * (jax.lax.rsqrt(var + eps) * scale)[None, None, None]
    return y + bias[None, None, None], mean, var


@pytest.mark.parametrize("shape", SHAPES)
def test_gradient_matches_autodiff_of_the_formula(shape):
    x, scale, bias = _data(shape, seed=1)
    rng = np.random.default_rng(2)
    g_y = rng.normal(size=shape).astype(np.float32)
    g_mean, g_var = rng.normal(size=(2, shape[-1])).astype(np.float32)
    x[..., 0] = 2.5  # a constant channel: its variance is clipped at zero

    def loss(fn):
        def value(x, scale, bias):
            y, mean, var = fn(x, scale, bias, 1e-5)
            return jnp.sum(jax.nn.relu(y) * g_y) + jnp.sum(mean * g_mean) + jnp.sum(var * g_var)
        return jax.jit(jax.grad(value, argnums=(0, 1, 2)))

    got = loss(batch_norm)(x, scale, bias)
    want = loss(_plain)(x, scale, bias)
    chex.assert_trees_all_close(got, want, rtol=2e-4, atol=2e-4)
    assert np.all(np.isfinite(np.asarray(got[0])))


def test_module_has_flax_variables_and_updates_running_statistics_as_pytorch():
    x, scale, bias = _data((4, 2, 2, 6))
    ours = BatchNorm(momentum=0.9, epsilon=1e-5)
    theirs = nn.BatchNorm(momentum=0.9, epsilon=1e-5)
    variables = ours.init(jax.random.PRNGKey(0), x, use_running_average=False)
    reference = theirs.init(jax.random.PRNGKey(0), x, use_running_average=False)
    chex.assert_trees_all_equal(variables, reference)

    running = {"mean": np.full(6, 0.5, np.float32), "var": np.full(6, 2.0, np.float32)}
    params = {"scale": scale, "bias": bias}
    y, state = ours.apply({"params": params, "batch_stats": running}, x,
                          use_running_average=False, mutable=["batch_stats"])
    want_y, mean, var = _numpy_batch_norm(x, scale, bias, 1e-5)
    np.testing.assert_allclose(np.asarray(y), want_y, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(state["batch_stats"]["mean"]), 0.9 * 0.5 + 0.1 * mean,
                               rtol=1e-5, atol=1e-6)
    # PyTorch's running variance: the unbiased batch variance, n = 4 x 2 x 2 values a channel.
    np.testing.assert_allclose(np.asarray(state["batch_stats"]["var"]),
                               0.9 * 2.0 + 0.1 * var * 16 / 15, rtol=1e-5, atol=1e-6)

    frozen = ours.apply({"params": params, "batch_stats": running}, x, use_running_average=True)
    np.testing.assert_allclose(np.asarray(frozen), (x - 0.5) / np.sqrt(2.0 + 1e-5) * scale + bias,
                               rtol=1e-5, atol=1e-5)


def test_wrong_parameter_shapes_are_refused():
    x, scale, bias = _data((2, 2, 2, 4))
    with pytest.raises(ValueError, match=r"scale, bias \(C,\)"):
        batch_norm(x, scale[:3], bias, 1e-5)

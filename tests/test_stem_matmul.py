"""experiments.stem_matmul: the stem's convolution as a matmul against NumPy, its
derivatives, inside flax's Conv, its refusals."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import stem_matmul


def _numpy_conv(x, k, padding):
    (top, bottom), (left, right) = padding
    xp = np.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0))).astype(np.float64)
    kh, kw = k.shape[:2]
    h, w = xp.shape[1] - kh + 1, xp.shape[2] - kw + 1
    out = np.zeros((x.shape[0], h, w, k.shape[3]))
    for i in range(kh):
        for j in range(kw):
            out += np.einsum("nhwc,co->nhwo", xp[:, i:i + h, j:j + w], k[i, j])
    return out, xp


@pytest.mark.parametrize("padding", [((1, 1), (1, 1)), ((0, 2), (1, 0))])
def test_stem_conv_as_matmul_matches_a_numpy_convolution_and_its_gradients(padding):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 5, 6, 3)).astype(np.float32)
    k = rng.normal(size=(3, 3, 3, 4)).astype(np.float32)
    conv = stem_matmul.stem_conv_general_dilated
    dn = jax.lax.conv_dimension_numbers(x.shape, k.shape, ("NHWC", "HWIO", "NHWC"))
    want, xp = _numpy_conv(x, k, padding)
    got = jax.jit(lambda x, k: conv(x, k, (1, 1), padding, dimension_numbers=dn))(x, k)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
    g = rng.normal(size=want.shape).astype(np.float32)
    dx, dk = jax.jit(jax.grad(lambda x, k: (conv(x, k, (1, 1), padding, dimension_numbers=dn)
                                             * g).sum(), argnums=(0, 1)))(x, k)
    h, w = want.shape[1:3]
    want_dk = np.stack([np.stack([np.einsum("nhwc,nhwo->co", xp[:, i:i + h, j:j + w], g)
                                  for j in range(3)]) for i in range(3)])
    np.testing.assert_allclose(np.asarray(dk), want_dk, rtol=1e-4, atol=1e-4)
    want_dxp = np.zeros_like(xp)
    for i in range(3):
        for j in range(3):
            want_dxp[:, i:i + h, j:j + w] += np.einsum("nhwo,co->nhwc", g, k[i, j])
    (top, _), (left, _) = padding
    want_dx = want_dxp[:, top:top + x.shape[1], left:left + x.shape[2]]
    np.testing.assert_allclose(np.asarray(dx), want_dx, rtol=1e-4, atol=1e-4)


def test_stem_conv_refuses_what_it_does_not_compute():
    x, k = jnp.zeros((1, 4, 4, 3)), jnp.zeros((3, 3, 3, 2))
    dn = jax.lax.conv_dimension_numbers(x.shape, k.shape, ("NHWC", "HWIO", "NHWC"))
    conv = stem_matmul.stem_conv_general_dilated
    with pytest.raises(ValueError, match="stride-1.*strides \\(2, 2\\)"):
        conv(x, k, (2, 2), ((1, 1), (1, 1)), dimension_numbers=dn)
    with pytest.raises(ValueError, match="padding 'SAME'"):
        conv(x, k, (1, 1), "SAME", dimension_numbers=dn)
    with pytest.raises(ValueError, match="groups 3"):
        conv(x, jnp.zeros((3, 3, 1, 3)), (1, 1), ((1, 1), (1, 1)), feature_group_count=3,
             dimension_numbers=dn)


def test_stem_conv_inside_flax_conv_forward_mode_and_string_dimension_numbers():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, 6, 5, 3)).astype(np.float32)
    k = rng.normal(size=(3, 3, 3, 4)).astype(np.float32)
    pad = ((1, 1), (1, 1))
    # nn.Conv hands it the padding as a list of pairs and its own dimension numbers
    ours = nn.Conv(4, (3, 3), padding=pad, use_bias=False,
                   conv_general_dilated=stem_matmul.stem_conv_general_dilated)
    params = {"params": {"kernel": k}}
    np.testing.assert_allclose(np.asarray(ours.apply(params, x)), _numpy_conv(x, k, pad)[0],
                               rtol=1e-5, atol=1e-5)
    # forward mode: the tangent is conv(dx, k) + conv(x, dk), by linearity
    conv = stem_matmul.stem_conv_general_dilated
    dx = rng.normal(size=x.shape).astype(np.float32)
    dk = rng.normal(size=k.shape).astype(np.float32)
    _, tangent = jax.jvp(lambda x, k: conv(x, k, (1, 1), pad,
                                           dimension_numbers=("NHWC", "HWIO", "NHWC")),
                         (x, k), (dx, dk))
    want = _numpy_conv(dx, k, pad)[0] + _numpy_conv(x, dk, pad)[0]
    np.testing.assert_allclose(np.asarray(tangent), want, rtol=1e-4, atol=1e-4)


def test_stem_conv_refuses_dilation_and_another_layout():
    x, k = jnp.zeros((1, 4, 4, 3)), jnp.zeros((3, 3, 3, 2))
    conv = stem_matmul.stem_conv_general_dilated
    with pytest.raises(ValueError, match="dilations None/\\(2, 2\\)"):
        conv(x, k, (1, 1), ((1, 1), (1, 1)), rhs_dilation=(2, 2),
             dimension_numbers=("NHWC", "HWIO", "NHWC"))
    with pytest.raises(ValueError, match="dimension numbers \\('NCHW', 'OIHW', 'NCHW'\\)"):
        conv(x, k, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NCHW", "OIHW", "NCHW"))
    with pytest.raises(ValueError, match="NHWC images and an HWIO kernel; got shapes"):
        conv(jnp.zeros((4, 4, 3)), k, (1,), ((1, 1),), dimension_numbers=None)

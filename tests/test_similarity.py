import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lightcl_jax.metrics.generalizability import choose_freeze
from lightcl_jax.metrics.similarity import (SIMILARITIES, cosine_similarity, get_similarity,
                                            linear_cka, linear_cka_debiased, param_similarity,
                                            register_similarity)
from lightcl_jax.model.layers import LAYER_NAMES


def _numpy_cka(x, y):
    """Linear CKA from HSIC with the centering matrix H = I - 11^T / n (Kornblith et al.)."""
    n = x.shape[0]
    h = np.eye(n) - np.ones((n, n)) / n
    k, l = x @ x.T, y @ y.T

    def hsic(a, b):
        return np.trace(a @ h @ b @ h) / (n - 1) ** 2
    return hsic(k, l) / np.sqrt(hsic(k, k) * hsic(l, l))


@pytest.fixture
def xy():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 12))
    y = x @ rng.normal(size=(12, 7)) + 0.5 * rng.normal(size=(40, 7))
    return x.astype(np.float32), y.astype(np.float32)


def test_cka_matches_numpy_hsic(xy):
    x, y = xy
    np.testing.assert_allclose(float(linear_cka(jnp.asarray(x), jnp.asarray(y))),
                               _numpy_cka(x.astype(np.float64), y.astype(np.float64)), rtol=1e-4)
    z = np.random.default_rng(1).normal(size=(40, 30)).astype(np.float32)
    np.testing.assert_allclose(float(linear_cka(x, z)), _numpy_cka(x.astype(np.float64),
                                                                   z.astype(np.float64)), rtol=1e-4)


def test_cka_properties(xy):
    x, y = (jnp.asarray(a) for a in xy)
    np.testing.assert_allclose(float(linear_cka(x, x)), 1.0, rtol=1e-5)
    q, _ = np.linalg.qr(np.random.default_rng(2).normal(size=(12, 12)))
    rotated = x @ jnp.asarray(q.astype(np.float32))
    np.testing.assert_allclose(float(linear_cka(rotated, y)), float(linear_cka(x, y)), rtol=1e-4)
    np.testing.assert_allclose(float(linear_cka(7.5 * x, y)), float(linear_cka(x, y)), rtol=1e-5)
    np.testing.assert_allclose(float(linear_cka(x, y)), float(linear_cka(y, x)), rtol=1e-6)
    for seed in range(5):
        a = jax.random.normal(jax.random.PRNGKey(seed), (16, 5))
        b = jax.random.normal(jax.random.PRNGKey(seed + 10), (16, 9))
        assert 0.0 <= float(linear_cka(a, b)) <= 1.0
    assert float(linear_cka(jnp.ones((5, 3)), x[:5])) == 0.0  # one side has no variance
    assert float(linear_cka(jnp.ones((5, 3)), jnp.ones((5, 2)))) == 1.0  # neither has
    assert float(jax.jit(linear_cka)(x, y)) == pytest.approx(float(linear_cka(x, y)), rel=1e-6)
    with pytest.raises(ValueError, match="same samples"):
        linear_cka(x, y[:10])


def _numpy_debiased_cka(x, y):
    """Unbiased HSIC (Song et al. 2012) with plain loops over the formula's terms."""
    n = x.shape[0]

    def hsic_u(k, l):
        k, l = k.copy(), l.copy()
        np.fill_diagonal(k, 0.0)
        np.fill_diagonal(l, 0.0)
        ones = np.ones(n)
        return (np.trace(k @ l) + (ones @ k @ ones) * (ones @ l @ ones) / ((n - 1) * (n - 2))
                - 2.0 / (n - 2) * (ones @ k @ l @ ones)) / (n * (n - 3))
    k, l = x @ x.T, y @ y.T
    return hsic_u(k, l) / np.sqrt(hsic_u(k, k) * hsic_u(l, l))


def test_debiased_cka_matches_numpy_and_removes_the_width_bias(xy):
    x, y = xy
    np.testing.assert_allclose(float(linear_cka_debiased(x, y)),
                               _numpy_debiased_cka(x.astype(np.float64), y.astype(np.float64)),
                               rtol=1e-3)
    np.testing.assert_allclose(float(linear_cka_debiased(x, 3.0 * x)), 1.0, rtol=1e-5)
    # Independent Gaussians, 36 samples x 1024 features: the plain estimator reads high.
    a = jax.random.normal(jax.random.PRNGKey(0), (36, 1024))
    b = jax.random.normal(jax.random.PRNGKey(1), (36, 1024))
    assert float(linear_cka(a, b)) > 0.9
    assert abs(float(linear_cka_debiased(a, b))) < 0.15
    with pytest.raises(ValueError, match="at least 4 samples"):
        linear_cka_debiased(a[:3], b[:3])


def test_cosine_and_param_similarity_by_hand():
    a = jnp.asarray([[3.0, 4.0]])
    assert float(cosine_similarity(a, jnp.asarray([[4.0, 3.0]]))) == pytest.approx(24 / 25)
    assert float(cosine_similarity(a, -a)) == pytest.approx(-1.0)
    # ||w_new - w_old|| / ||w_old|| = ||(0, 1)|| / 5 = 0.2
    assert float(param_similarity(a, jnp.asarray([[3.0, 5.0]]))) == pytest.approx(0.8)
    assert float(param_similarity(a, a)) == 1.0


def test_registry_add_lookup_and_unknown_name():
    def negative_distance(a, b):
        return -jnp.linalg.norm(a - b)

    try:
        registered = register_similarity("neg_distance", negative_distance)
        assert get_similarity("neg_distance") is registered
        assert registered.fn is negative_distance and registered.on == "features"
        assert get_similarity("linear_cka").fn is linear_cka
        with pytest.raises(ValueError, match=r"unknown similarity 'nope'; known: .*linear_cka"):
            get_similarity("nope")
        with pytest.raises(ValueError, match="on must be one of"):
            register_similarity("bad", negative_distance, on="weights")
    finally:
        SIMILARITIES.pop("neg_distance", None)


def _metrics(lp_by_layer, ms=1.0):
    return {layer: {"lp": lp_by_layer.get(layer, 1.0), "ms": ms} for layer in LAYER_NAMES}


def test_choose_freeze_on_hand_made_values():
    assert choose_freeze(_metrics({}), 0.9) == "all-but-head"  # the head is never frozen
    assert choose_freeze(_metrics({"stem": 0.5}), 0.9) == "none"
    assert choose_freeze(_metrics({"stage1_block2": 0.89}), 0.9) == "stem"
    assert choose_freeze(_metrics({"stage3_block1": 0.7, "stage4_block2": 0.1}), 0.9) == "stage2"
    # A deep generalized group does not count past a non-generalized one.
    assert choose_freeze(_metrics({"stage2_block1": 0.2}), 0.9) == "stage1"
    assert choose_freeze(_metrics({"stage4_block1": 0.8, "head": 0.0}), 0.9) == "stage3"
    # MS counts too; None (not measured) does not.
    ms_low = _metrics({})
    ms_low["stage3_block2"]["ms"] = 0.5
    assert choose_freeze(ms_low, 0.9) == "stage2"
    assert choose_freeze(_metrics({"stage4_block1": 0.8}, ms=None), 0.9) == "stage3"
    with pytest.raises(ValueError, match="missing"):
        choose_freeze({"stem": {"lp": 1.0, "ms": 1.0}}, 0.9)


def test_build_similarity_example_registers_and_runs():
    import os
    import re
    build = open(os.path.join(os.path.dirname(__file__), "..", "BUILD.md")).read()
    section = build[build.index("### Adding a similarity"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    try:
        exec(code, {})
        fn = get_similarity("mean_agreement").fn
        x = jnp.asarray(np.random.default_rng(0).normal(size=(6, 4)).astype(np.float32))
        assert float(fn(x, x)) == pytest.approx(1.0)
    finally:
        SIMILARITIES.pop("mean_agreement", None)

import chex
import jax.numpy as jnp
import numpy as np

from lightcl_jax.memory.feature_memory import (FeatureMemory, build_memory, num_vital,
                                               regulation_loss, update_vital_masks,
                                               vital_channel_mask)

TAPS = ("a", "b")


def _random_memory(rng, masks):
    ref_taps = {k: rng.normal(size=(5, 2, 2, 6)).astype(np.float32) for k in TAPS}
    ref_logits = rng.normal(size=(5, 4)).astype(np.float32)
    return build_memory(jnp.zeros((5, 8, 8, 1)), jnp.asarray(ref_logits),
                        {k: jnp.asarray(v) for k, v in ref_taps.items()}, masks)


def test_regulation_loss_matches_numpy():
    rng = np.random.default_rng(0)
    masks = {k: jnp.asarray(rng.random(6) < 0.5) for k in TAPS}
    memory = _random_memory(rng, masks)
    taps = {k: rng.normal(size=(5, 2, 2, 6)).astype(np.float32) for k in TAPS}
    logits = rng.normal(size=(5, 4)).astype(np.float32)
    beta = 2e-4
    expected = np.sum((logits - np.asarray(memory.ref_logits)) ** 2)
    for k in TAPS:
        m = np.asarray(masks[k], np.float32)[None, None, None, :]
        expected += np.sum((m * (taps[k] - np.asarray(memory.ref_taps[k]))) ** 2)
    expected *= beta
    got = regulation_loss({k: jnp.asarray(v) for k, v in taps.items()}, jnp.asarray(logits),
                          memory, beta)
    np.testing.assert_allclose(float(got), expected, rtol=1e-5)


def test_regulation_loss_is_zero_for_identical_features():
    rng = np.random.default_rng(1)
    memory = _random_memory(rng, {k: jnp.ones(6, bool) for k in TAPS})
    got = regulation_loss(dict(memory.ref_taps), memory.ref_logits, memory, 2e-4)
    assert float(got) == 0.0


def test_regulation_loss_ignores_masked_out_channels():
    rng = np.random.default_rng(2)
    mask = jnp.asarray([True, False, True, False, False, True])
    memory = _random_memory(rng, {k: mask for k in TAPS})
    taps = {k: np.array(v) for k, v in memory.ref_taps.items()}
    for k in TAPS:
        taps[k][..., ~np.asarray(mask)] += 100.0  # change only masked-out channels
    got = regulation_loss({k: jnp.asarray(v) for k, v in taps.items()}, memory.ref_logits,
                          memory, 1.0)
    assert float(got) == 0.0
    taps["a"][..., 0] += 1.0  # a vital channel: 5 samples x 2 x 2 positions, each (1.0)^2
    got = regulation_loss({k: jnp.asarray(v) for k, v in taps.items()}, memory.ref_logits,
                          memory, 0.5)
    np.testing.assert_allclose(float(got), 0.5 * 20.0, rtol=1e-6)


def test_vital_selection_keeps_n_plus_one_channels():
    # 512 channels at ratio 0.15: n = int(76.8 + 0.5) = 77, the reference keeps 78.
    assert num_vital(512, 0.15) == 77
    rng = np.random.default_rng(3)
    features = jnp.asarray(rng.normal(size=(32, 4, 4, 512)).astype(np.float32))
    mask = np.asarray(vital_channel_mask(features, 0.15))
    assert mask.dtype == bool and mask.shape == (512,)
    assert mask.sum() == 78
    scores = np.abs(np.asarray(features)).sum(axis=(0, 1, 2))
    np.testing.assert_array_equal(np.sort(np.flatnonzero(mask)), np.sort(np.argsort(scores)[-78:]))


def test_vital_selection_small_widths_and_ratio_one():
    features = jnp.asarray(np.arange(1, 11, dtype=np.float32).reshape(1, 1, 1, 10))
    # C=10, ratio 0.3: n = int(3.5) = 3 -> threshold is the 7th smallest -> channels 6..9.
    np.testing.assert_array_equal(np.asarray(vital_channel_mask(features, 0.3)),
                                  np.arange(10) >= 6)
    assert bool(np.all(vital_channel_mask(features, 1.0)))


def test_vital_masks_or_accumulate():
    first = {"a": jnp.asarray(np.array([[[[5.0, 0.0, 0.0, 1.0]]]], np.float32))}
    second = {"a": jnp.asarray(np.array([[[[0.0, 0.0, 5.0, 1.0]]]], np.float32))}
    # C=4, ratio 0.25: n = 1 -> threshold is the 3rd smallest -> 2 channels per task.
    masks = update_vital_masks(None, first, 0.25)
    np.testing.assert_array_equal(masks["a"], [True, False, False, True])
    masks = update_vital_masks(masks, second, 0.25)
    np.testing.assert_array_equal(masks["a"], [True, False, True, True])


def test_memory_is_a_small_pytree():
    memory = FeatureMemory(jnp.zeros((15, 8, 8, 1)), {"a": jnp.zeros((15, 1, 1, 4))},
                           jnp.zeros((15, 10)), {"a": jnp.zeros((4,), bool)})
    chex.assert_tree_shape_prefix(memory, ())
    assert len(__import__("jax").tree_util.tree_leaves(memory)) == 4

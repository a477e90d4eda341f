import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lightcl_jax.model.layers import FREEZE_POINTS, frozen_groups
from lightcl_jax.model.resnet import ResNet18
from lightcl_jax.training.step import FROZEN, TRAINABLE, freeze_labels, masked_optimizer


@pytest.fixture(scope="module")
def params():
    model = ResNet18(num_classes=4, nf=4)
    return model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 1)), train=False)["params"]


def test_every_leaf_gets_exactly_one_label(params):
    for freeze in FREEZE_POINTS:
        labels = freeze_labels(params, frozen_groups(freeze))
        leaves = jax.tree_util.tree_leaves(labels)
        assert len(leaves) == len(jax.tree_util.tree_leaves(params))
        assert set(leaves) <= {FROZEN, TRAINABLE}


def test_stage3_freezes_stem_and_stages_1_to_3_only(params):
    labels = freeze_labels(params, frozen_groups("stage3"))
    for top, sub in labels.items():
        expected = TRAINABLE if top.startswith(("stage4", "head")) else FROZEN
        assert set(jax.tree_util.tree_leaves(sub)) == {expected}, top
    labels = freeze_labels(params, frozen_groups("none"))
    assert set(jax.tree_util.tree_leaves(labels)) == {TRAINABLE}


def test_unknown_paths_and_freeze_points_are_errors(params):
    with pytest.raises(ValueError, match="exactly one of"):
        freeze_labels({**params, "extra": {"kernel": jnp.zeros(2)}}, ())
    with pytest.raises(ValueError, match="unknown freeze point 'stage5'; known: none"):
        frozen_groups("stage5")


def test_masked_optimizer_zeroes_frozen_updates_and_keeps_no_state_for_them(params):
    tx = masked_optimizer(optax.sgd(0.1, momentum=0.9), params, frozen_groups("stage3"))
    state = tx.init(params)
    grads = jax.tree_util.tree_map(jnp.ones_like, params)
    updates, _ = tx.update(grads, state, params)
    assert float(jnp.abs(updates["stage3_block2"]["conv1"]["kernel"]).max()) == 0.0
    np.testing.assert_allclose(updates["head"]["bias"], -0.1 * np.ones(4), rtol=1e-6)
    # Momentum buffers exist only for trainable leaves.
    trainable = sum(x.size for k, v in params.items() if k.startswith(("stage4", "head"))
                    for x in jax.tree_util.tree_leaves(v))
    state_size = sum(x.size for x in jax.tree_util.tree_leaves(state)
                     if hasattr(x, "size") and getattr(x, "ndim", 0) > 0)
    assert state_size == trainable

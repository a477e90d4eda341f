"""Freezing layers with masked optax updates.

A freeze point (`lightcl_jax.model.layers.FREEZE_POINTS`) names the deepest
layer group that is frozen; every group up to it in network order is frozen. Labels are built from parameter
paths, every leaf gets exactly one label (asserted), and
`optax.multi_transform` sends the frozen label to `optax.set_to_zero()`, so
frozen leaves get no update and no optimizer state. Because nothing reads
their gradients, XLA does not compute them, nor keep the activations their
backward pass would need.
"""

from __future__ import annotations

from typing import Any

import jax
import optax

from lightcl_jax.model.layers import layer_group

TRAINABLE = "trainable"
FROZEN = "frozen"


def _path_string(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def freeze_labels(params: Any, frozen: tuple[str, ...]) -> Any:
    """Labels every parameter leaf ``"frozen"`` or ``"trainable"`` from its path.

    Args:
      params: the model's parameter pytree.
      frozen: layer groups to freeze (see `lightcl_jax.model.layers.FREEZE_POINTS`), or single blocks
        such as ``stage3_block1`` (the sparse variant's task 0).

    Returns:
      A pytree of the same structure with one label string per leaf.

    Raises:
      ValueError: a leaf path belongs to no layer group, or to several.
    """
    def label(path, _):
        path = _path_string(path)
        group = layer_group(path)  # raises unless exactly one group matches
        return FROZEN if group in frozen or path.split("/", 1)[0] in frozen else TRAINABLE

    labels = jax.tree_util.tree_map_with_path(label, params)
    num_leaves = len(jax.tree_util.tree_leaves(params))
    num_labels = sum(1 for leaf in jax.tree_util.tree_leaves(labels) if leaf in (FROZEN, TRAINABLE))
    assert num_labels == num_leaves, (num_labels, num_leaves)
    return labels


def masked_optimizer(inner: optax.GradientTransformation, params: Any,
                     frozen: tuple[str, ...]) -> optax.GradientTransformation:
    """``inner`` for trainable leaves, `optax.set_to_zero` for frozen ones."""
    labels = freeze_labels(params, frozen)
    return optax.multi_transform({TRAINABLE: inner, FROZEN: optax.set_to_zero()}, labels)

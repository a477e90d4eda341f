"""Per-layer generalizability: learning plasticity (LP) and memory stability (MS).

The LightCL paper names LP and MS but its formulas are not public; these
definitions are lightcl_jax's own (SPEC section 4). For a layer l (the stem,
each BasicBlock, the head), a similarity sim (default linear CKA) of the
layer's outputs on the same probe samples:

  MS_l(t) = sim(F_l(theta_{t-1}, X_old), F_l(theta_t, X_old))
      does layer l still represent earlier tasks' probe samples as before task t?
  LP_l(t) = sim(F_l(theta_{t-1}, X_new), F_l(theta_t, X_new))
      did layer l already serve the new task, needing little change to learn it?

A layer is generalized when both are high. `choose_freeze` freezes the
deepest prefix of layer groups whose layers are all generalized.
"""

from __future__ import annotations

import functools
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from lightcl_jax.metrics.similarity import get_similarity
from lightcl_jax.model.layers import (FREEZABLE_GROUPS, LAYER_NAMES, freeze_point_at_depth,
                                      layer_group)
from lightcl_jax.model.resnet import layer_features


@functools.partial(jax.jit, static_argnames=("model", "fn"))
def _feature_similarities(model, fn, old_variables, new_variables, x):
    old = layer_features(model, old_variables, x)
    new = layer_features(model, new_variables, x)
    return {name: fn(old[name], new[name]) for name in old}


def _layer_params(params, layer: str):
    if layer == "stem":
        return {"stem_conv": params["stem_conv"], "stem_bn": params["stem_bn"]}
    return params[layer]


@functools.partial(jax.jit, static_argnames=("fn",))
def _param_similarities(fn, old_params, new_params):
    def flat(tree):
        return jnp.concatenate([jnp.ravel(leaf) for leaf in jax.tree_util.tree_leaves(tree)])[None]
    return {layer: fn(flat(_layer_params(old_params, layer)), flat(_layer_params(new_params, layer)))
            for layer in LAYER_NAMES}


def layer_similarities(model, old_variables, new_variables, x, similarity: str = "linear_cka"
                       ) -> dict[str, float]:
    """sim(F_l(old, x), F_l(new, x)) for every layer, in one jitted call.

    Args:
      model: the `ResNet`.
      old_variables, new_variables: ``{"params", "batch_stats"}`` snapshots.
      x: (N, H, W, C) probe samples (unused by parameter similarities).
      similarity: a registered similarity name.

    Returns:
      {layer name: float} in `LAYER_NAMES` order.
    """
    sim = get_similarity(similarity)
    if sim.on == "params":
        values = _param_similarities(sim.fn, old_variables["params"], new_variables["params"])
    else:
        values = _feature_similarities(model, sim.fn, old_variables, new_variables,
                                       jnp.asarray(x))
    return {layer: float(values[layer]) for layer in LAYER_NAMES}


def memory_stability(model, old_variables, new_variables, x_old,
                     similarity: str = "linear_cka") -> dict[str, float]:
    """MS per layer: similarity on probe samples of earlier tasks."""
    return layer_similarities(model, old_variables, new_variables, x_old, similarity)


def learning_plasticity(model, old_variables, new_variables, x_new,
                        similarity: str = "linear_cka") -> dict[str, float]:
    """LP per layer: similarity on probe samples of the new task."""
    return layer_similarities(model, old_variables, new_variables, x_new, similarity)


def generalizability(model, old_variables, new_variables, x_old, x_new,
                     similarity: str = "linear_cka") -> dict[str, dict[str, float | None]]:
    """{layer: {"lp": LP, "ms": MS}}; ``ms`` is None when there is no ``x_old``."""
    lp = learning_plasticity(model, old_variables, new_variables, x_new, similarity)
    ms = (None if x_old is None or len(x_old) == 0
          else memory_stability(model, old_variables, new_variables, x_old, similarity))
    return {layer: {"lp": lp[layer], "ms": None if ms is None else ms[layer]}
            for layer in LAYER_NAMES}


def choose_freeze(metrics: Mapping[str, Mapping[str, float | None]], threshold: float) -> str:
    """The freeze point that freezes the deepest prefix of generalized layer groups.

    A layer is generalized when its LP and its MS (when measured, not None)
    are >= ``threshold``; a group (stem, stage1, ..., stage4) when all its
    layers are. The head is never frozen.

    Args:
      metrics: {layer: {"lp": float, "ms": float | None}} for every layer of
        the groups stem..stage4 (as `generalizability` returns).
      threshold: the level both metrics must reach.

    Returns:
      One of "none", "stem", "stage1", "stage2", "stage3", "all-but-head".

    Raises:
      ValueError: a layer of a freezable group is missing, or a value is NaN.
    """
    depth = 0
    for group in FREEZABLE_GROUPS:
        layers = [name for name in LAYER_NAMES if layer_group(name) == group]
        missing = [name for name in layers if name not in metrics]
        if missing:
            raise ValueError(f"choose_freeze needs LP/MS for every layer; missing {missing}")
        values = [v for name in layers for v in (metrics[name]["lp"], metrics[name]["ms"])
                  if v is not None]
        if any(np.isnan(v) for v in values):
            raise ValueError(f"choose_freeze got NaN metrics for group {group!r}")
        if not all(v >= threshold for v in values):
            break
        depth += 1
    return freeze_point_at_depth(depth)

"""The train state: what a train step changes, and how a run's first one is made."""

from __future__ import annotations

import functools
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np

from lightcl_jax import compiler
from lightcl_jax.process import release_free_memory
from lightcl_jax.model.resnet import ResNet18, fresh_head
from lightcl_jax.training.sparsity import (apply_masks, channel_prune_masks, compact_variables,
                                           expand_variables, pruning_from_masks)


@flax.struct.dataclass
class TrainState:
    """Everything a train step changes, as one pytree."""

    params: Any        # model parameters (pytree of float32 arrays)
    batch_stats: Any   # BatchNorm running means and variances
    opt_state: Any     # optax state of the current phase's optimizer
    step: jax.Array    # () int32, train steps taken so far in the run


def random_variables(model, image_shape: tuple[int, ...], key: jax.Array) -> dict:
    """``{"params", "batch_stats"}`` of a randomly initialised ``model`` for ``image_shape`` inputs.

    One compiled program (op-by-op initialisation would compile every layer's
    ops), compiled with `compiler.RUN_ONCE`: it runs once, compiling is its cost.
    The program is compiled ahead of time and called as an executable, so a
    caller inside another trace (``jax.eval_shape``, a jitted function) gets its
    values too; a key that is itself traced is traced into the caller's program
    (JAX takes compiler options on top-level programs only).
    """
    image_shape = tuple(image_shape)
    if isinstance(key, jax.core.Tracer):
        return _init(model, image_shape, key)
    return _compiled_init(model, image_shape, jax.ShapeDtypeStruct(key.shape, key.dtype))(key)


def _init(model, image_shape, key):
    return model.init(key, jnp.zeros((1, *image_shape), jnp.float32), train=False)


@functools.lru_cache(maxsize=8)
def _compiled_init(model, image_shape, key):
    """The compiled initialisation, as an executable: callable inside a trace too."""
    return compiler.jit(functools.partial(_init, model, image_shape), run_once=True).lower(
        key).compile()


def train_state(params, batch_stats, opt_state=None) -> TrainState:
    """A `TrainState` at step 0."""
    return TrainState(params=params, batch_stats=batch_stats, opt_state=opt_state,
                      step=jnp.zeros((), jnp.int32))


def create_train_state(model, image_shape, key, *, init_variables=None) -> TrainState:
    """Initialises the model; ``init_variables`` (params, batch_stats) replaces the random init.

    With ``init_variables`` (a pre-trained backbone) the head is replaced by a
    fresh one (Xavier-uniform, zero bias), as SPEC section 2 says.

    Raises:
      ValueError: ``init_variables`` does not fit the model (names the first
        parameter whose path or shape differs).
    """
    init_key, head_key = jax.random.split(key)
    variables = random_variables(model, tuple(image_shape), init_key)
    params, batch_stats = variables["params"], variables["batch_stats"]
    if init_variables is not None:
        params, batch_stats = _from_backbone(model, image_shape, params, batch_stats,
                                             init_variables, head_key)
    return train_state(params, batch_stats)


def _from_backbone(model, image_shape, params, batch_stats, backbone, head_key):
    """The backbone's params and statistics with a fresh head, checked against ``params``."""
    backbone = flax.core.unfreeze(backbone)
    if set(backbone) != {"params", "batch_stats"}:
        raise ValueError("init_variables must hold exactly 'params' and 'batch_stats'; got "
                         f"{sorted(backbone)}")
    expected = {"params": {k: v for k, v in params.items() if k != "head"},
                "batch_stats": batch_stats}
    given = {"params": {k: v for k, v in backbone["params"].items() if k != "head"},
             "batch_stats": backbone["batch_stats"]}
    _check_same_shapes(expected, given, f"a ResNet-18 with nf={model.nf} on {image_shape}")
    params = fresh_head({**given["params"], "head": params["head"]}, model.num_classes, head_key)
    return (jax.tree_util.tree_map(jnp.asarray, params),
            jax.tree_util.tree_map(jnp.asarray, given["batch_stats"]))


def _check_same_shapes(expected, given, what: str) -> None:
    want = {jax.tree_util.keystr(p): tuple(np.shape(v))
            for p, v in jax.tree_util.tree_leaves_with_path(expected)}
    got = {jax.tree_util.keystr(p): tuple(np.shape(v))
           for p, v in jax.tree_util.tree_leaves_with_path(given)}
    for path in sorted(set(want) | set(got)):
        if want.get(path) != got.get(path):
            raise ValueError(f"init_variables do not fit {what}: {path} is "
                             f"{got.get(path, 'missing')}, expected {want.get(path, 'absent')}")


def create_lane_states(model, image_shape, seeds, *, init_variables=None, sparse: bool = False
                       ) -> tuple[list[TrainState], list[Any]]:
    """Each seed's first train state, and its sparse masks (None each without ``sparse``).

    The masks are fixed once from the starting weights (the pre-trained ones
    when given), and the weights are pruned with them
    (`lightcl_jax.training.sparsity`). A compact ``model`` (`run_model`)
    gets the kept channels' variables, and no masks: nothing is left to mask.

    Raises:
      ValueError: a seed's pruning differs from the compact ``model``'s.
    """
    full = model.clone(pruning=None)
    states = [create_train_state(full, image_shape, jax.random.PRNGKey(s),
                                 init_variables=init_variables) for s in seeds]
    release_free_memory()  # the initialisation's compiler memory (accounting.process)
    if not sparse:
        return states, [None] * len(states)
    masks = [channel_prune_masks(s.params) for s in states]
    states = [s.replace(params=apply_masks(s.params, m)) for s, m in zip(states, masks)]
    if model.pruning is None:
        return states, masks
    for seed, lane_masks in zip(seeds, masks):
        if pruning_from_masks(lane_masks) != model.pruning:
            raise ValueError(
                f"seed {seed} prunes other channels than seed {seeds[0]}: compact sparse "
                "execution trains seeds together only when they prune alike (from one "
                "pre-trained backbone); use sparse_execution='masked', or one seed at a time")
    return [s.replace(params=compact_variables(s.params, model.pruning),
                      batch_stats=compact_variables(s.batch_stats, model.pruning))
            for s in states], [None] * len(states)


def run_model(config, num_classes: int, image_shape, seed: int, *, init_variables=None):
    """The ResNet-18 a run of ``config`` trains: of width ``config.nf``, and with
    ``--sparse --sparse-execution compact`` run compactly with the channel pruning of
    the weights seed ``seed`` starts with (`lightcl_jax.model.resnet`, ``pruning``)."""
    model = ResNet18(num_classes=num_classes, nf=config.nf)
    if not (config.sparse and config.sparse_execution == "compact"):
        return model
    state = create_train_state(model, image_shape, jax.random.PRNGKey(seed),
                               init_variables=init_variables)
    return model.clone(pruning=pruning_from_masks(channel_prune_masks(state.params)))


def full_width_params(model, image_shape, params):
    """``params`` at the full widths (pruned channels zero) for a compact ``model``;
    unchanged for a dense one."""
    if model.pruning is None:
        return params
    full = model.clone(pruning=None)
    shapes = jax.eval_shape(lambda: full.init(jax.random.PRNGKey(0),
                                              jnp.zeros((1, *image_shape)), train=False))
    return expand_variables(params, model.pruning, shapes["params"])


def copy_variables(state: TrainState) -> dict:
    """A copy of the model's variables (a train step donates the originals)."""
    return jax.tree_util.tree_map(jnp.copy, {"params": state.params,
                                             "batch_stats": state.batch_stats})

"""The train state (what a train step changes, and how a run's first one is made) and
the reference's sparse variant: channel pruning fixed once, kept by masked updates.

The sparse variant follows the authors' ``ChannelPruner`` does it:

  * masks are computed once, from the weights the run starts with (the
    pre-trained backbone in the paper), before task 0;
  * every conv kernel keeps the output channels with the largest *signed*
    mean weight: with n = int(C x (1 - s) + 0.5) and the same ``>=``
    threshold at the (C - n)-th smallest mean as the vital channels, n + 1
    channels survive when means are distinct (`kept_output_channels`);
  * sparsity s is 0.2 for the stem and stages 1-2, 0.7 for stage 3 and 0.8
    for stage 4 (`REFERENCE_SPARSITY`);
  * a kernel's input channels follow the kept outputs of the conv before it
    in PyTorch's parameter order (stem, then per block conv1, conv2,
    shortcut), so a block's conv1 reads the previous block's *shortcut* mask
    where it has one; shortcut convs and the stem get no input mask;
  * BatchNorm scale and bias follow their conv's kept outputs; the head's
    weight rows follow the last conv's; the head's bias is not pruned.

The masks are applied to the weights once and to every update after
(`keep_pruned`), so pruned weights stay exactly zero: plain SGD adds zero to
zero. Tensors stay dense; XLA's figures for a sparse step are those of the
dense step (see BUILD.md), the theoretical accounting counts kept weights.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from lightcl_jax import compiler
from lightcl_jax.model.layers import REFERENCE_SPARSITY, layer_group
from lightcl_jax.model.resnet import ResNet18, fresh_head
from lightcl_jax.process import release_free_memory


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
    (`lightcl_jax.training.state`). A compact ``model`` (`run_model`)
    gets the kept channels' variables, and no masks: nothing is left to mask.

    Raises:
      ValueError: a seed's pruning differs from the compact ``model``'s.
    """
    full = model.clone(pruning=None)
    states = [create_train_state(full, image_shape, jax.random.PRNGKey(s),
                                 init_variables=init_variables) for s in seeds]
    release_free_memory()  # the initialisation's compiler memory (lightcl_jax.process)
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


# Sparsity: the reference's channel pruning.

def kept_output_channels(kernel: np.ndarray, sparsity: float) -> np.ndarray:
    """(C_out,) bool: the output channels of an HWIO kernel that survive pruning.

    Channels score their mean weight (signed, over height, width and inputs);
    those ``>=`` the (C - n)-th smallest score survive, n = int(C(1 - s) + 0.5).
    Sparsity 0 keeps every channel.
    """
    num_out = kernel.shape[-1]
    if sparsity == 0.0:
        return np.ones(num_out, bool)
    scores = kernel.reshape(-1, num_out).mean(axis=0)
    keep = int(num_out * (1.0 - sparsity) + 0.5)
    kth = max(1, num_out - keep)  # 1-based, as torch.kthvalue
    return scores >= np.sort(scores)[kth - 1]


def _reference_order(params: dict) -> list[str]:
    """Top-level modules in PyTorch's named_parameters order, stem first, head last."""
    blocks = sorted((k for k in params if k.startswith("stage")),
                    key=lambda k: tuple(int(p) for p in k.replace("stage", "").split("_block")))
    return ["stem"] + blocks + ["head"]


def channel_prune_masks(params: Any, sparsity: dict[str, float] | None = None) -> Any:
    """Boolean masks of the reference's channel pruning, one per parameter leaf.

    Args:
      params: the model's parameters (concrete arrays), e.g. the pre-trained ones.
      sparsity: layer group -> fraction of output channels to prune
        (default `REFERENCE_SPARSITY`); groups not named are not pruned.

    Returns:
      A pytree like ``params`` of bool arrays of the same shapes.
    """
    sparsity = REFERENCE_SPARSITY if sparsity is None else sparsity
    unknown = set(sparsity) - set(REFERENCE_SPARSITY)
    if unknown or not all(0.0 <= s < 1.0 for s in sparsity.values()):
        raise ValueError(f"sparsity must map layer groups among {list(REFERENCE_SPARSITY)} to "
                         f"fractions in [0, 1); got {sparsity}")
    params = jax.tree_util.tree_map(np.asarray, params)
    masks: dict = {}
    last = None  # kept output channels of the previous conv, in the reference's order

    def conv(kernel: np.ndarray, group: str, input_mask: np.ndarray | None):
        nonlocal last
        out = kept_output_channels(kernel, sparsity.get(group, 0.0))
        mask = np.broadcast_to(out, kernel.shape).copy()
        if input_mask is not None:
            mask &= input_mask[None, None, :, None]
        last = mask.reshape(-1, kernel.shape[-1]).any(axis=0)
        return mask

    def batch_norm(bn: dict):
        return {name: last.copy() for name in bn}

    for module in _reference_order(params):
        if module == "stem":
            masks["stem_conv"] = {"kernel": conv(params["stem_conv"]["kernel"], "stem", None)}
            masks["stem_bn"] = batch_norm(params["stem_bn"])
        elif module == "head":
            head = params["head"]
            masks["head"] = {"kernel": np.broadcast_to(last[:, None], head["kernel"].shape).copy(),
                             "bias": np.ones(head["bias"].shape, bool)}
        else:
            block, group = params[module], layer_group(module)
            out = {"conv1": {"kernel": conv(block["conv1"]["kernel"], group, last)}}
            out["bn1"] = batch_norm(block["bn1"])
            out["conv2"] = {"kernel": conv(block["conv2"]["kernel"], group, last)}
            out["bn2"] = batch_norm(block["bn2"])
            if "shortcut_conv" in block:
                out["shortcut_conv"] = {"kernel": conv(block["shortcut_conv"]["kernel"], group,
                                                       None)}
                out["shortcut_bn"] = batch_norm(block["shortcut_bn"])
            masks[module] = out
    missing = set(params) - set(masks)
    if missing:
        raise ValueError(f"channel pruning does not know the modules {sorted(missing)}")
    return jax.tree_util.tree_map(jnp.asarray, masks)


def apply_masks(params: Any, masks: Any) -> Any:
    """``params`` with pruned entries set to exactly zero."""
    return jax.tree_util.tree_map(lambda p, m: jnp.where(m, p, jnp.zeros_like(p)), params, masks)


# A BatchNorm (or a head) follows the conv whose outputs it normalises (reads).
_BN_OF = {"stem_bn": "stem_conv", "bn1": "conv1", "bn2": "conv2", "shortcut_bn": "shortcut_conv"}


def _kept(values: np.ndarray) -> tuple[int, ...] | None:
    """The True positions of a bool vector; None when all are True."""
    return None if values.all() else tuple(int(i) for i in np.flatnonzero(values))


def pruning_from_masks(masks: Any) -> tuple:
    """The kept channels that `channel_prune_masks`' masks describe, as `ResNet`'s ``pruning``.

    A conv keeps the output channels whose kernel has any kept entry and reads
    the input channels that any kept entry reads; the head reads the features
    whose rows are kept. A model built with it (``ResNet18(..., pruning=...)``)
    runs the pruned network compactly; `compact_variables` narrows the weights.
    """
    masks = jax.tree_util.tree_map(np.asarray, masks)
    entries = []

    def conv(path: str, mask: np.ndarray):
        entries.append((path, _kept(mask.any(axis=(0, 1, 3))), _kept(mask.any(axis=(0, 1, 2)))))

    for module, sub in masks.items():
        if module == "stem_conv":
            conv(module, sub["kernel"])
        elif module == "head":
            entries.append((module, _kept(sub["kernel"].any(axis=1)), None))
        elif module.startswith("stage"):
            for name in ("conv1", "conv2", "shortcut_conv"):
                if name in sub:
                    conv(f"{module}/{name}", sub[name]["kernel"])
    return tuple(sorted(entries))


def _narrowings(pruning: tuple) -> dict:
    """(module, submodule or None) -> (kept input channels, kept output channels)."""
    out = {}
    for path, kept_in, kept_out in pruning:
        module, _, name = path.partition("/")
        out[(module, name or None)] = (kept_in, kept_out)
    return out


def _leaf_channels(narrowing: dict, path: tuple[str, ...]):
    """(kept input channels, kept output channels) of the leaf at ``path`` (axes -2, -1
    of a kernel; the last axis of a BatchNorm vector or head bias)."""
    module, *rest = path
    if module == "head":
        kept_in = narrowing.get(("head", None), (None, None))[0]
        return (kept_in, None) if rest[-1] == "kernel" else (None, None)
    if module in _BN_OF:  # the stem's BatchNorm
        return None, narrowing.get((_BN_OF[module], None), (None, None))[1]
    if module == "stem_conv":
        return narrowing.get((module, None), (None, None))
    name = rest[0]
    if name in _BN_OF:
        return None, narrowing.get((module, _BN_OF[name]), (None, None))[1]
    return narrowing.get((module, name), (None, None))


def _path(key_path) -> tuple[str, ...]:
    return tuple(str(getattr(k, "key", k)) for k in key_path)


def compact_variables(variables: Any, pruning: tuple) -> Any:
    """Full-width ``{"params", "batch_stats"}`` (or a params tree) narrowed to the kept
    channels of ``pruning``: the variables of ``ResNet18(..., pruning=pruning)``."""
    narrowing = _narrowings(pruning)

    def narrow(key_path, leaf):
        path = _path(key_path)
        path = path[1:] if path[0] in ("params", "batch_stats") else path
        kept_in, kept_out = _leaf_channels(narrowing, path)
        leaf = jnp.asarray(leaf)
        if kept_out is not None:
            leaf = jnp.take(leaf, np.asarray(kept_out), axis=-1)
        if kept_in is not None:
            leaf = jnp.take(leaf, np.asarray(kept_in), axis=-2 if leaf.ndim > 1 else -1)
        return leaf
    return jax.tree_util.tree_map_with_path(narrow, variables)


def expand_variables(compact: Any, pruning: tuple, full: Any) -> Any:
    """`compact_variables` undone: ``compact``'s values at their full-width places in a
    tree shaped like ``full`` (arrays or shapes), zeros where channels were pruned."""
    narrowing = _narrowings(pruning)

    def widen(key_path, leaf, like):
        path = _path(key_path)
        path = path[1:] if path[0] in ("params", "batch_stats") else path
        kept_in, kept_out = _leaf_channels(narrowing, path)
        index = [slice(None)] * len(like.shape)
        if kept_out is not None:
            index[-1] = np.asarray(kept_out)
        if kept_in is not None:
            index[-2 if len(like.shape) > 1 else -1] = np.asarray(kept_in)
        if kept_in is not None and kept_out is not None:  # an outer product of the two
            index[-2], index[-1] = np.ix_(index[-2], index[-1])
        return jnp.zeros(like.shape, jnp.asarray(leaf).dtype).at[tuple(index)].set(leaf)
    return jax.tree_util.tree_map_with_path(widen, compact, full)


class PruneState(NamedTuple):
    """The masks `keep_pruned` applies (bool; a () True stands for an unmasked leaf)."""

    masks: Any


def keep_pruned(masks: Any) -> optax.GradientTransformation:
    """Zeroes the updates of pruned entries, so they stay zero after every step.

    The masks live in the optimizer state (an argument of the jitted step, not
    a constant folded into it). Chain it after the optimizer.
    """
    def init(params):
        del params
        # A copy: the train step donates its optimizer state, and the next phase
        # builds its own from the same masks.
        return PruneState(jax.tree_util.tree_map(jnp.copy, masks))

    def update(updates, state, params=None):
        del params
        updates = jax.tree_util.tree_map(lambda u, m: jnp.where(m, u, jnp.zeros_like(u)),
                                         updates, state.masks)
        return updates, state

    return optax.GradientTransformation(init, update)


def sparsity_report(params: Any) -> dict:
    """Achieved sparsity: zeros over all parameters (the reference's measure) and per group."""
    total = nonzero = 0
    groups: dict[str, list[int]] = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        top = str(getattr(path[0], "key", path[0]))
        count, nz = int(np.size(leaf)), int(np.count_nonzero(np.asarray(leaf)))
        total, nonzero = total + count, nonzero + nz
        entry = groups.setdefault(layer_group(top), [0, 0])
        entry[0], entry[1] = entry[0] + count, entry[1] + nz
    return {
        "sparsity": 1.0 - nonzero / total,
        "params": total,
        "nonzero_params": nonzero,
        "nonzero_mb": nonzero * 4 / 2 ** 20,
        "by_group": {g: 1.0 - nz / count for g, (count, nz) in groups.items()},
    }

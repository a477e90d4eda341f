"""CIFAR-style ResNet-18 in Flax Linen, with the last stage's feature taps.

The network follows SPEC section 2: a 3x3 stride-1 stem conv + BN + ReLU (no
max-pool), four stages of two BasicBlocks with widths nf, 2nf, 4nf, 8nf and
strides 1, 2, 2, 2, a 1x1 conv + BN shortcut where the shape changes, global
average pooling and one linear head over all classes.

Parameter paths read by stage and block::

    stem_conv/kernel, stem_bn/{scale,bias}
    stage{1..4}_block{1,2}/{conv1,bn1,conv2,bn2}/...
    stage{2,3,4}_block1/{shortcut_conv,shortcut_bn}/...
    head/{kernel,bias}

`apply` returns ``(logits, taps)`` where ``taps`` maps the names in
`TAP_NAMES` to the four last-stage feature maps LightCL regularises:

    stage4_block1_conv1  after block 1's first conv + BN + ReLU   (N, h, w, 8nf)
    stage4_block1_out    block 1's output, after residual add + ReLU
    stage4_block2_conv1  after block 2's first conv + BN + ReLU
    stage4_block2_out    block 2's output (what is pooled for the head)

At 32x32 input these are (N, 4, 4, 512) for nf=64.

A forward pass can start or stop at a layer group (``start``/``stop``): a
frozen prefix's output on fixed inputs can be computed once and reused, which
is how LightCL avoids passing its buffer through the frozen layers every step.

With ``pruning`` (`lightcl_jax.training.state.pruning_from_masks`), the
model is the channel-pruned network run compactly: each conv reads only its
kept input channels and computes only its kept output channels (narrower
dense convolutions, narrower parameters and BatchNorm statistics); a block's
output, the stem's and the taps are widened back to the full width (pruned
channels zero), as the residual adds and LightCL's regulation need them. It
computes what the masked dense model computes, with the zeros left out.
"""

from __future__ import annotations

import functools
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lightcl_jax.model.batchnorm import BatchNorm
from lightcl_jax.model.layers import LAYER_GROUPS, LAYER_NAMES

# PyTorch's default conv init (kaiming_uniform with a=sqrt(5)) is a uniform
# variance scaling of 1/3 over fan-in; the reference model uses it.
_torch_conv_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def _torch_linear_bias_init(fan_in: int):
    """PyTorch's default nn.Linear bias: uniform in [-1/sqrt(fan_in), 1/sqrt(fan_in)]."""
    bound = 1.0 / fan_in ** 0.5

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)
    return init


# PyTorch BatchNorm2d defaults: momentum 0.1 (= Flax 0.9), eps 1e-5, and, as PyTorch,
# the running variance takes the unbiased batch variance (Flax's takes the biased one).
# `BatchNorm` is Flax's with its per-channel sums taken in a layout XLA:CPU runs fast
# (`lightcl_jax.model.batchnorm`).
BN_MOMENTUM = 0.9
_BatchNorm = functools.partial(BatchNorm, momentum=BN_MOMENTUM, epsilon=1e-5)
_Conv = functools.partial(nn.Conv, use_bias=False, kernel_init=_torch_conv_init)


# A conv's kept channels: ((kept input channels), (kept output channels)), indices into
# the full widths; None for all of them.
Kept = tuple[tuple[int, ...] | None, tuple[int, ...] | None]
NOT_PRUNED: Kept = (None, None)


def _divide_by_one(x):
    return x / (x == x).astype(x.dtype)


@jax.custom_vjp
def materialised(x):
    """``x`` unchanged, computed once and stored: how the model hands a map to its convs.

    A conv's input is also read, transposed, by its weight-gradient
    convolution. XLA:CPU fuses the elementwise chain that produces the map
    (BatchNorm, ReLU, a residual add and the chains before it) into that
    transpose, recomputing it in the transposed order, which ran 3-18x slower
    than transposing the stored map (BUILD.md "Speed"). Dividing by one
    stops it: a full-size floating-point divide is an instruction XLA does not
    duplicate into a second consumer, and ``x / (x == x)`` is ``x`` exactly
    (NaN stays NaN; the one is computed, so XLA cannot fold it; a subnormal
    is flushed to zero on XLA:CPU, as by any arithmetic there). The gradient
    is the identity. XLA fuses the program around it differently, which may
    move the last bits elsewhere: a full step's results are bit for bit
    those without it, a LightCL frozen-phase step's within 3e-6. On other
    backends it costs one elementwise divide inside a fusion.
    """
    return _divide_by_one(x)


materialised.defvjp(lambda x: (_divide_by_one(x), None), lambda _, g: (g,))


def _take(x, channels: tuple[int, ...] | None):
    """The given channels (last axis) of ``x``; None: all."""
    return x if channels is None else jnp.take(x, np.asarray(channels), axis=-1)


def _widen(h, channels: tuple[int, ...] | None, width: int):
    """``h``'s channels placed at ``channels`` of a ``width``-channel map, zeros elsewhere.

    A product with a one-hot matrix (exact: each output is one input times 1, at
    full precision): on XLA:CPU it held less memory and ran faster than a
    scatter or a gather (`benchmarks.bench_memory`'s compact row; BUILD.md).
    """
    if channels is None:
        return h
    placement = np.zeros((len(channels), width), np.float32)
    placement[np.arange(len(channels)), np.asarray(channels)] = 1.0
    return jnp.einsum("...c,cw->...w", h, placement.astype(h.dtype),
                      precision=jax.lax.Precision.HIGHEST)


def _within(inner: tuple[int, ...] | None, outer: tuple[int, ...] | None):
    """Where the channels ``inner`` sit in a map that holds only the channels ``outer``."""
    if inner is None or outer is None:
        return inner
    positions = np.searchsorted(outer, inner)
    if np.any(np.asarray(outer)[np.minimum(positions, len(outer) - 1)] != inner):
        raise ValueError("a conv reads channels its input does not hold")
    return tuple(int(p) for p in positions)


def _width(kept: tuple[int, ...] | None, full: int) -> int:
    return full if kept is None else len(kept)


class BasicBlock(nn.Module):
    """Two 3x3 conv + BN layers with an identity or 1x1 conv + BN shortcut.

    ``pruning``: ``(conv1, conv2, shortcut_conv)`` `Kept` channels (see `ResNet`).
    """

    features: int
    strides: int = 1
    pruning: tuple[Kept, Kept, Kept] = (NOT_PRUNED, NOT_PRUNED, NOT_PRUNED)

    @nn.compact
    def __call__(self, x, *, use_running_average: bool):
        (in1, out1), (in2, out2), (in_short, out_short) = self.pruning
        conv1 = _Conv(_width(out1, self.features), (3, 3), (self.strides, self.strides),
                      padding=((1, 1), (1, 1)), name="conv1")
        h = materialised(nn.relu(_BatchNorm(use_running_average=use_running_average,
                                            name="bn1")(conv1(_take(x, in1)))))
        first = _widen(h, out1, self.features)
        h = _Conv(_width(out2, self.features), (3, 3), padding=((1, 1), (1, 1)),
                  name="conv2")(_take(h, _within(in2, out1)))
        h = _widen(_BatchNorm(use_running_average=use_running_average, name="bn2")(h),
                   out2, self.features)
        shortcut = x
        if self.strides != 1 or x.shape[-1] != self.features:
            shortcut = _Conv(_width(out_short, self.features), (1, 1),
                             (self.strides, self.strides), name="shortcut_conv")(
                                 _take(x, in_short))
            shortcut = _widen(_BatchNorm(use_running_average=use_running_average,
                                         name="shortcut_bn")(shortcut), out_short, self.features)
        return materialised(nn.relu(h + shortcut)), first


class ResNet(nn.Module):
    """CIFAR-style ResNet with one linear head over all classes.

    Attributes:
      num_classes: outputs of the head (all classes of the stream).
      nf: width of the first stage (64 in the paper).
      stage_sizes: BasicBlocks per stage ((2, 2, 2, 2) is ResNet-18).
      pruning: None (dense), or the kept channels of a channel-pruned model,
        run compactly: ``((path, kept_in, kept_out), ...)`` for the convs
        (``stem_conv``, ``stage1_block1/conv1``, ...) and the head (``head``,
        its kept input features), indices into the full widths, None for all
        (`lightcl_jax.training.state.pruning_from_masks`). Parameters and
        statistics then have the kept widths (`compact_variables`).
    """

    num_classes: int
    nf: int = 64
    stage_sizes: Sequence[int] = (2, 2, 2, 2)
    pruning: tuple | None = None

    @nn.compact
    def __call__(self, x, *, train: bool, fixed_bn: Sequence[str] = (), start: str = "stem",
                 stop: str | None = None):
        """Returns ``(logits, taps)``, or with ``stop`` the features entering that group.

        Args:
          x: images, (N, H, W, C) float32; with ``start`` the features entering
            that layer group (what ``stop=start`` returns).
          train: BatchNorm uses batch statistics and updates its running
            statistics (the ``batch_stats`` collection must be mutable).
          fixed_bn: layer groups (names from `LAYER_GROUPS`) or blocks (from
            `LAYER_NAMES`) whose BatchNorm uses its running statistics even
            when ``train`` is set, so their statistics stay fixed. Static:
            changing it recompiles.
          start: the layer group to begin at (default: the stem, on images).
            Only the layers from ``start`` on run, and only their statistics change.
          stop: a layer group after ``start``: return the features entering it.
            Taps come only from the last stage, so they are empty unless it runs.
        """
        unknown = set(fixed_bn) - set(LAYER_GROUPS) - set(LAYER_NAMES)
        if unknown:
            raise ValueError(f"fixed_bn names unknown layer groups or blocks {sorted(unknown)}; "
                             f"known: {list(LAYER_GROUPS)} and blocks such as stage3_block1")
        for name, value in (("start", start), ("stop", stop)):
            if value is not None and value not in LAYER_GROUPS:
                raise ValueError(f"{name}={value!r} is not a layer group; "
                                 f"known: {list(LAYER_GROUPS)}")
        first = LAYER_GROUPS.index(start)
        last = len(LAYER_GROUPS) if stop is None else LAYER_GROUPS.index(stop)
        if last <= first:
            raise ValueError(f"stop={stop!r} must come after start={start!r} in {LAYER_GROUPS}")

        def runs(group):
            return first <= LAYER_GROUPS.index(group) < last

        def running(group):
            return (not train) or (group in fixed_bn)

        kept = {path: (kept_in, kept_out) for path, kept_in, kept_out in self.pruning or ()}
        h = x
        if runs("stem"):
            stem_in, stem_out = kept.get("stem_conv", NOT_PRUNED)
            h = _Conv(_width(stem_out, self.nf), (3, 3), padding=((1, 1), (1, 1)),
                      name="stem_conv")(_take(h, stem_in))
            h = materialised(nn.relu(_widen(_BatchNorm(use_running_average=running("stem"),
                                                       name="stem_bn")(h), stem_out, self.nf)))
            # Block outputs go to the "intermediates" collection when it is mutable
            # (`layer_features`); otherwise sow is a no-op and costs nothing.
            self.sow("intermediates", "out_stem", h)
        taps = {}
        last_stage = len(self.stage_sizes)
        for stage, num_blocks in enumerate(self.stage_sizes, start=1):
            if not runs(f"stage{stage}"):
                continue
            features = self.nf * 2 ** (stage - 1)
            for block in range(1, num_blocks + 1):
                strides = 2 if (stage > 1 and block == 1) else 1
                name = f"stage{stage}_block{block}"
                pruning = tuple(kept.get(f"{name}/{conv}", NOT_PRUNED)
                                for conv in ("conv1", "conv2", "shortcut_conv"))
                h, first_act = BasicBlock(features, strides, pruning, name=name)(
                    h, use_running_average=running(f"stage{stage}") or name in fixed_bn)
                self.sow("intermediates", f"out_{name}", h)
                if stage == last_stage:
                    taps[f"{name}_conv1"] = first_act
                    taps[f"{name}_out"] = h
        if stop is not None:
            return h
        pooled = _take(jnp.mean(h, axis=(1, 2)), kept.get("head", NOT_PRUNED)[0])
        # A randomly initialised model gets PyTorch's default Linear init, as the
        # reference; a pre-trained backbone gets a fresh Xavier head (`fresh_head`).
        logits = nn.Dense(self.num_classes, kernel_init=_torch_conv_init,
                          bias_init=_torch_linear_bias_init(h.shape[-1]), name="head")(pooled)
        self.sow("intermediates", "out_head", logits)
        return logits, taps


ResNet18 = functools.partial(ResNet, stage_sizes=(2, 2, 2, 2))


def layer_features(model: ResNet, variables, x) -> dict[str, jax.Array]:
    """Every block's output in evaluation mode, flattened to (samples, features).

    Keys are `LAYER_NAMES` (for the default four stages of two blocks).
    """
    _, state = model.apply(variables, x, train=False, mutable=["intermediates"])
    return {name.removeprefix("out_"): value[0].reshape(x.shape[0], -1)
            for name, value in state["intermediates"].items()}


def fresh_head(params, num_classes: int, key: jax.Array):
    """Returns ``params`` with a new head: Xavier-uniform weights, zero bias (SPEC)."""
    in_features = params["head"]["kernel"].shape[0]
    kernel = nn.initializers.xavier_uniform()(key, (in_features, num_classes), jnp.float32)
    return {**params, "head": {"kernel": kernel, "bias": jnp.zeros((num_classes,), jnp.float32)}}


def fold_statistics(batch_stats, increments):
    """Folds precomputed batch statistics into running ones, as a train-mode forward would.

    A train-mode BatchNorm sets ``running = BN_MOMENTUM * running + (1 -
    BN_MOMENTUM) * batch_statistic``. ``increments`` holds the second term for
    some top-level modules (what `ResNet` writes when it runs from zeroed
    running statistics); the other modules are returned unchanged.
    """
    return {**batch_stats, **{
        name: jax.tree_util.tree_map(lambda r, d: BN_MOMENTUM * r + d, batch_stats[name], inc)
        for name, inc in increments.items()}}

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
"""

from __future__ import annotations

import functools
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

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


# PyTorch BatchNorm2d defaults: momentum 0.1 (= Flax 0.9), eps 1e-5. One difference
# remains: PyTorch's running variance uses the unbiased batch variance, Flax's the
# biased one (a factor n/(n-1) per update, n = samples x positions: 512/511 at the
# paper's last stage, 32/31 for digits' 1x1 maps).
BN_MOMENTUM = 0.9
_BatchNorm = functools.partial(nn.BatchNorm, momentum=BN_MOMENTUM, epsilon=1e-5)
_Conv = functools.partial(nn.Conv, use_bias=False, kernel_init=_torch_conv_init)


class BasicBlock(nn.Module):
    """Two 3x3 conv + BN layers with an identity or 1x1 conv + BN shortcut."""

    features: int
    strides: int = 1

    @nn.compact
    def __call__(self, x, *, use_running_average: bool):
        conv1 = _Conv(self.features, (3, 3), (self.strides, self.strides),
                      padding=((1, 1), (1, 1)), name="conv1")
        h = nn.relu(_BatchNorm(use_running_average=use_running_average, name="bn1")(conv1(x)))
        first = h
        h = _Conv(self.features, (3, 3), padding=((1, 1), (1, 1)), name="conv2")(h)
        h = _BatchNorm(use_running_average=use_running_average, name="bn2")(h)
        shortcut = x
        if self.strides != 1 or x.shape[-1] != self.features:
            shortcut = _Conv(self.features, (1, 1), (self.strides, self.strides),
                             name="shortcut_conv")(x)
            shortcut = _BatchNorm(use_running_average=use_running_average,
                                  name="shortcut_bn")(shortcut)
        return nn.relu(h + shortcut), first


class ResNet(nn.Module):
    """CIFAR-style ResNet with one linear head over all classes.

    Attributes:
      num_classes: outputs of the head (all classes of the stream).
      nf: width of the first stage (64 in the paper).
      stage_sizes: BasicBlocks per stage ((2, 2, 2, 2) is ResNet-18).
    """

    num_classes: int
    nf: int = 64
    stage_sizes: Sequence[int] = (2, 2, 2, 2)

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

        h = x
        if runs("stem"):
            h = _Conv(self.nf, (3, 3), padding=((1, 1), (1, 1)), name="stem_conv")(h)
            h = nn.relu(_BatchNorm(use_running_average=running("stem"), name="stem_bn")(h))
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
                h, first_act = BasicBlock(features, strides, name=name)(
                    h, use_running_average=running(f"stage{stage}") or name in fixed_bn)
                self.sow("intermediates", f"out_{name}", h)
                if stage == last_stage:
                    taps[f"{name}_conv1"] = first_act
                    taps[f"{name}_out"] = h
        if stop is not None:
            return h
        pooled = jnp.mean(h, axis=(1, 2))
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

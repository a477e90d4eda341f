"""LightCL's compact functional memory: buffer, reference features, vital channels.

Everything here is a pure function over `FeatureMemory`, a small pytree that
the jitted train step takes and returns. Its life over a stream (SPEC 2):

  * end of every task: `update_vital_masks` scores each tap channel on one
    training batch and ORs the top ones into the masks (`vital_channel_mask`);
  * start of task t >= 1: `build_memory` stores the first ``buffer_size``
    samples of the new task's first batch with the taps and logits that the
    model left by task t-1 produces on them;
  * every step of task t >= 1: `regulation_loss` pulls the current model's
    taps (on vital channels) and logits on the buffer toward the stored ones.
"""

from __future__ import annotations

from typing import Mapping, NamedTuple

import jax
import jax.numpy as jnp


class FeatureMemory(NamedTuple):
    """LightCL's memory state carried from one task to the next.

    B = buffer size, K = number of classes, C_tap = channels of a tap.
    """

    buffer_x: jax.Array                  # (B, H, W, C) float32 images of the buffer
    ref_taps: Mapping[str, jax.Array]    # tap name -> (B, h, w, C_tap) float32, old model
    ref_logits: jax.Array                # (B, K) float32, old model's logits on the buffer
    vital_masks: Mapping[str, jax.Array]  # tap name -> (C_tap,) bool, vital channels
    # The frozen prefix's output on the buffer, (B, h', w', C') float32, or None when
    # nothing is frozen. Frozen weights do not change within a task and train-mode
    # BatchNorm normalises by the buffer's own statistics, so this is what every step's
    # buffer forward would compute there: the step starts the buffer at the first
    # trainable layer instead, with the same results and fewer FLOPs per step.
    buffer_features: jax.Array | None = None
    # The batch statistics the prefix's BatchNorms fold in per buffer forward
    # (`make_forward` increments; empty when their statistics are fixed).
    prefix_stats: Mapping[str, object] | None = None


def num_vital(num_channels: int, ratio: float) -> int:
    """SPEC's n = int(ratio x C + 0.5): channels meant to be vital."""
    return int(ratio * num_channels + 0.5)


def vital_channel_mask(features: jax.Array, ratio: float) -> jax.Array:
    """Marks the channels with the largest summed |activation| as vital.

    Each channel scores sum(|features|) over samples and positions. With
    n = `num_vital`(C, ratio), the reference keeps channels whose score is
    ``>=`` the (C - n)-th smallest score (1-based, torch.kthvalue). That keeps
    n + 1 channels when scores are distinct (78 of 512 at ratio 0.15), not n:
    we reproduce this quirk. When n >= C every channel is vital.

    Args:
      features: (N, ..., C) activations of one tap.
      ratio: fraction of channels meant to be vital, in (0, 1].

    Returns:
      (C,) bool mask.
    """
    num_channels = features.shape[-1]
    scores = jnp.sum(jnp.abs(features).reshape(-1, num_channels), axis=0)
    kth = max(num_channels - num_vital(num_channels, ratio), 1)  # 1-based k of torch.kthvalue
    threshold = jnp.sort(scores)[kth - 1]
    return scores >= threshold


def update_vital_masks(masks: Mapping[str, jax.Array] | None, taps: Mapping[str, jax.Array],
                       ratio: float) -> dict[str, jax.Array]:
    """ORs this task's vital channels into the masks of earlier tasks.

    Args:
      masks: tap name -> (C,) bool from earlier tasks, or None before the first.
      taps: tap name -> (N, ..., C) activations on one training batch.
      ratio: see `vital_channel_mask`.
    """
    new = {name: vital_channel_mask(feat, ratio) for name, feat in taps.items()}
    if masks is None:
        return new
    return {name: jnp.logical_or(masks[name], new[name]) for name in new}


def build_memory(buffer_x: jax.Array, ref_logits: jax.Array, ref_taps: Mapping[str, jax.Array],
                 vital_masks: Mapping[str, jax.Array], buffer_features: jax.Array | None = None,
                 prefix_stats: Mapping[str, object] | None = None) -> FeatureMemory:
    """Assembles the memory at a task boundary; the reference outputs carry no gradient."""
    return FeatureMemory(
        buffer_x=buffer_x,
        ref_taps={k: jax.lax.stop_gradient(v) for k, v in ref_taps.items()},
        ref_logits=jax.lax.stop_gradient(ref_logits),
        vital_masks=dict(vital_masks),
        buffer_features=None if buffer_features is None else jax.lax.stop_gradient(
            buffer_features),
        prefix_stats=None if prefix_stats is None else dict(prefix_stats),
    )


def regulation_loss(taps: Mapping[str, jax.Array], logits: jax.Array, memory: FeatureMemory,
                    beta: float) -> jax.Array:
    """beta x [sum over taps of sum((mask x (F - F_ref))^2) + sum((z - z_ref)^2)].

    Sums, not means, as in the reference. The mask broadcasts over the
    channel (last) axis; masked-out channels contribute nothing.

    Args:
      taps: tap name -> (B, h, w, C) features of the current model on the buffer.
      logits: (B, K) current logits on the buffer.
      memory: holds the reference taps, logits and vital masks.
      beta: weight of the term (2e-4 in the reference).

    Returns:
      Scalar float32 loss.
    """
    total = jnp.sum(jnp.square(logits - memory.ref_logits))
    for name, ref in memory.ref_taps.items():
        mask = memory.vital_masks[name].astype(ref.dtype).reshape((1,) * (ref.ndim - 1) + (-1,))
        total = total + jnp.sum(jnp.square(mask * (taps[name] - ref)))
    return beta * total

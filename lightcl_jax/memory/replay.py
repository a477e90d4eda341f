"""A fixed-size replay buffer filled by reservoir sampling, as pure functions.

After n samples have streamed past, every one of them is in the buffer with
probability size / n (Vitter's algorithm R). The buffer has fixed shapes, so
the jitted step that inserts into it compiles once; slots not yet filled are
marked by `valid_mask`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class ReplayBuffer(NamedTuple):
    """Reservoir buffer. B = size, K = classes."""

    x: jax.Array            # (B, H, W, C) float32 stored inputs
    y: jax.Array            # (B,) int32 stored labels
    logits: jax.Array | None  # (B, K) float32 logits at insertion (DER++), or None
    num_seen: jax.Array     # () int32 samples offered so far
    key: jax.Array          # PRNG key; draws are folded in by stream position


def empty_buffer(size: int, x_shape, *, num_classes: int | None, key: jax.Array,
                 dtype=jnp.float32) -> ReplayBuffer:
    """An empty buffer of ``size`` slots for inputs of shape ``x_shape`` (without batch)."""
    return ReplayBuffer(
        x=jnp.zeros((size, *x_shape), dtype),
        y=jnp.zeros((size,), jnp.int32),
        logits=None if num_classes is None else jnp.zeros((size, num_classes), jnp.float32),
        num_seen=jnp.zeros((), jnp.int32),
        key=key,
    )


def valid_mask(buffer: ReplayBuffer) -> jax.Array:
    """(B,) bool: slots that hold a sample."""
    size = buffer.y.shape[0]
    return jnp.arange(size) < jnp.minimum(buffer.num_seen, size)


def reservoir_add(buffer: ReplayBuffer, x: jax.Array, y: jax.Array,
                  logits: jax.Array | None = None) -> ReplayBuffer:
    """Offers a batch to the buffer, one sample after the other (algorithm R).

    Sample number n (0-based over the whole stream) goes to slot n while the
    buffer is filling; afterwards to a uniform slot j in [0, n] if j < size,
    and is dropped otherwise.
    """
    size = buffer.y.shape[0]

    def offer(i, buf):
        n = buf.num_seen + i
        j = jax.random.randint(jax.random.fold_in(buf.key, n), (), 0, n + 1)
        slot = jnp.where(n < size, n, j)
        keep = slot < size
        slot = jnp.minimum(slot, size - 1)

        def put(stored, new):
            return stored.at[slot].set(jnp.where(keep, new, stored[slot]))
        return buf._replace(
            x=put(buf.x, x[i]), y=put(buf.y, y[i].astype(jnp.int32)),
            logits=None if buf.logits is None else put(buf.logits, logits[i]))

    buffer = jax.lax.fori_loop(0, x.shape[0], offer, buffer)
    return buffer._replace(num_seen=buffer.num_seen + x.shape[0])


def replay_batch(buffer: ReplayBuffer, max_size: int):
    """Indices (M,) of the samples to replay this step and their validity (M,).

    The whole buffer when it has at most ``max_size`` slots; otherwise
    ``max_size`` distinct filled slots drawn uniformly (fresh each step).
    """
    size = buffer.y.shape[0]
    valid = valid_mask(buffer)
    if size <= max_size:
        return jnp.arange(size), valid
    # A second stream of draws, apart from the insertion draws folded in by position.
    key = jax.random.fold_in(jax.random.fold_in(buffer.key, 2**31 - 1), buffer.num_seen)
    scores = jnp.where(valid, jax.random.uniform(key, (size,)), -1.0)
    _, index = jax.lax.top_k(scores, max_size)
    return index, valid[index]

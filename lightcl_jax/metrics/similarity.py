"""Representation similarities and their registry.

A similarity maps two matrices of the same shape to a scalar that is high
when they agree. Feature similarities take (samples, features) matrices of
the same samples; parameter similarities take a layer's flattened weights as
(1, P) matrices. All are jittable.

Built in:
  * ``linear_cka`` (default): linear centered kernel alignment (Kornblith et
    al. 2019), in [0, 1], invariant to orthogonal transforms and isotropic
    scaling of either side.
  * ``cosine``: cosine of the flattened matrices, in [-1, 1].
  * ``param_similarity``: one minus the relative drift of a layer's weights,
    1 - ||w_new - w_old|| / ||w_old||, at most 1 (weights, not features).

`register_similarity(name, fn)` adds one; `get_similarity(name)` looks it up.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

SIMILARITY_KINDS = ("features", "params")


@dataclasses.dataclass(frozen=True)
class Similarity:
    """A registered similarity.

    Attributes:
      name: registry key.
      fn: ``fn(a, b) -> scalar``, jittable.
      on: ``"features"`` (compares a layer's outputs on probe samples) or
        ``"params"`` (compares a layer's weights; LP and MS then coincide).
    """

    name: str
    fn: Callable[[jax.Array, jax.Array], jax.Array]
    on: str = "features"


def _centered_gram(x: jax.Array) -> jax.Array:
    x = x - jnp.mean(x, axis=0, keepdims=True)
    return x @ x.T


def linear_cka(x: jax.Array, y: jax.Array) -> jax.Array:
    """Linear CKA of two (samples, features) matrices of the same samples.

    Computed from the (n, n) centered Gram matrices, so it costs O(n^2 p) and
    never forms a (p, p) matrix. 0 when either side has no variance.

    Example:
      >>> import jax.numpy as jnp
      >>> x = jnp.arange(12.0).reshape(4, 3) ** 2
      >>> float(linear_cka(x, 3.0 * x))
      1.0
    """
    if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f"linear_cka takes (samples, features) matrices of the same samples; "
                         f"got {x.shape} and {y.shape}")
    k, l = _centered_gram(x.astype(jnp.float32)), _centered_gram(y.astype(jnp.float32))
    hsic_xy = jnp.sum(k * l)
    denom = jnp.sqrt(jnp.sum(k * k) * jnp.sum(l * l))
    return jnp.where(denom > 0, hsic_xy / jnp.where(denom > 0, denom, 1.0), 0.0)


def cosine_similarity(x: jax.Array, y: jax.Array) -> jax.Array:
    """Cosine of the two matrices flattened; 0 when either is all zeros."""
    a, b = jnp.ravel(x).astype(jnp.float32), jnp.ravel(y).astype(jnp.float32)
    denom = jnp.linalg.norm(a) * jnp.linalg.norm(b)
    return jnp.where(denom > 0, jnp.dot(a, b) / jnp.where(denom > 0, denom, 1.0), 0.0)


def param_similarity(w_old: jax.Array, w_new: jax.Array) -> jax.Array:
    """1 - ||w_new - w_old|| / ||w_old||: 1 for unchanged weights, lower as they drift."""
    a, b = jnp.ravel(w_old).astype(jnp.float32), jnp.ravel(w_new).astype(jnp.float32)
    norm = jnp.linalg.norm(a)
    drift = jnp.linalg.norm(b - a) / jnp.where(norm > 0, norm, 1.0)
    return 1.0 - drift


SIMILARITIES: dict[str, Similarity] = {
    "linear_cka": Similarity("linear_cka", linear_cka),
    "cosine": Similarity("cosine", cosine_similarity),
    "param_similarity": Similarity("param_similarity", param_similarity, on="params"),
}


def register_similarity(name: str, fn: Callable[[jax.Array, jax.Array], jax.Array], *,
                        on: str = "features") -> Similarity:
    """Adds a similarity under ``name`` (replacing one of the same name).

    Args:
      name: the key for `get_similarity`, ``--layer-metrics`` and
        ``--similarity``.
      fn: ``fn(a, b) -> scalar``, jittable; high when ``a`` and ``b`` agree.
      on: ``"features"`` or ``"params"`` (see `Similarity`).
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"a similarity needs a non-empty string name; got {name!r}")
    if not callable(fn):
        raise TypeError(f"similarity {name!r}: fn must be callable, got {type(fn).__name__}")
    if on not in SIMILARITY_KINDS:
        raise ValueError(f"similarity {name!r}: on must be one of {SIMILARITY_KINDS}; got {on!r}")
    similarity = Similarity(name, fn, on)
    SIMILARITIES[name] = similarity
    return similarity


def get_similarity(name: str) -> Similarity:
    """The registered similarity called ``name``.

    Raises:
      ValueError: unknown name; the message lists the known ones.
    """
    if name not in SIMILARITIES:
        raise ValueError(f"unknown similarity {name!r}; known: {', '.join(sorted(SIMILARITIES))}")
    return SIMILARITIES[name]

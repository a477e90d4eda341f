"""Representation similarities and their registry.

A similarity maps two matrices of the same shape to a scalar that is high
when they agree. Feature similarities take (samples, features) matrices of
the same samples; parameter similarities take a layer's flattened weights as
(1, P) matrices. All are jittable.

Built in:
  * ``linear_cka`` (default): linear centered kernel alignment (Kornblith et
    al. 2019), in [0, 1], invariant to orthogonal transforms and isotropic
    scaling of either side.
  * ``linear_cka_debiased``: the same from the unbiased HSIC estimator, which
    does not read high for wide layers probed on few samples.
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

from lightcl_jax.registry import SIMILARITIES

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


def _centered_gram(x: jax.Array, debiased: bool) -> jax.Array:
    x = x.astype(jnp.float32)
    if not debiased:
        x = x - jnp.mean(x, axis=0, keepdims=True)
        return x @ x.T
    # U-centering (Song et al. 2012; Kornblith et al. 2019's unbiased HSIC).
    n = x.shape[0]
    off_diagonal = 1.0 - jnp.eye(n, dtype=jnp.float32)
    gram = (x @ x.T) * off_diagonal
    means = jnp.sum(gram, axis=0) / (n - 2)
    means = means - jnp.sum(means) / (2 * (n - 1))
    return (gram - means[:, None] - means[None, :]) * off_diagonal


def _cka(x: jax.Array, y: jax.Array, debiased: bool) -> jax.Array:
    if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f"linear_cka takes (samples, features) matrices of the same samples; "
                         f"got {x.shape} and {y.shape}")
    if debiased and x.shape[0] < 4:
        raise ValueError(f"debiased linear CKA needs at least 4 samples; got {x.shape[0]}")
    k, l = _centered_gram(x, debiased), _centered_gram(y, debiased)
    hsic_xy = jnp.sum(k * l)
    kk, ll = jnp.sum(k * k), jnp.sum(l * l)
    denom = jnp.sqrt(jnp.maximum(kk * ll, 0.0))
    # Both sides constant: nothing changed that CKA can see, 1. One side constant: 0.
    both_constant = (kk <= 0) & (ll <= 0)
    value = jnp.where(denom > 0, hsic_xy / jnp.where(denom > 0, denom, 1.0), 0.0)
    return jnp.where(both_constant, 1.0, value)


def linear_cka(x: jax.Array, y: jax.Array) -> jax.Array:
    """Linear CKA of two (samples, features) matrices of the same samples.

    Computed from the (n, n) centered Gram matrices, so it costs O(n^2 p) and
    never forms a (p, p) matrix. 1 when both sides are constant, 0 when only
    one is. This is the standard (biased) estimator: with far more features
    than samples it reads high even for unrelated matrices (about 0.8 for
    independent Gaussians at 36 samples x 128 features); see
    `linear_cka_debiased`.

    Example:
      >>> import jax.numpy as jnp
      >>> x = jnp.arange(12.0).reshape(4, 3) ** 2
      >>> float(linear_cka(x, 3.0 * x))
      1.0
    """
    return _cka(x, y, debiased=False)


def linear_cka_debiased(x: jax.Array, y: jax.Array) -> jax.Array:
    """Linear CKA from the unbiased HSIC estimator (Song et al. 2012).

    Near 0 for unrelated matrices whatever their width, 1 for identical ones;
    can fall slightly below 0 or (rarely) above 1 from sampling noise. Needs
    at least 4 samples. Use it to compare layers of very different widths on
    few probe samples.
    """
    return _cka(x, y, debiased=True)


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


# The built-in entries of `SIMILARITIES` (`lightcl_jax.registry` names them without JAX).
LINEAR_CKA = Similarity("linear_cka", linear_cka)
LINEAR_CKA_DEBIASED = Similarity("linear_cka_debiased", linear_cka_debiased)
COSINE = Similarity("cosine", cosine_similarity)
PARAM_SIMILARITY = Similarity("param_similarity", param_similarity, on="params")


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
    return SIMILARITIES.lookup(name)

"""Several seeds of one run trained side by side in one compiled program.

A `Lanes` is the set of runs the training loop carries at once: one run
(``stacked`` False: arrays as they are), or N seeds ``seed, seed+1, ...``
whose train states, memories and batches are stacked on a new leading axis,
with the train and eval steps `jax.vmap`-ped over it. Everything random --
initialisation, data order, augmentation, the strategies' PRNG keys -- comes
from each lane's own seed, so lane i computes what a single run with seed
``seed + i`` computes, up to the order of floating-point sums inside XLA's
batched kernels.

The host side (task-boundary hooks, probes, layer metrics) runs lane by lane
on `split` slices and `join`-s the results again
(`lightcl_jax.training.placement.Placement.map_lanes`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class Lanes:
    """The seeds trained together, and how their arrays are laid out."""

    seeds: tuple[int, ...]

    @classmethod
    def of(cls, seed: int, num_seeds: int = 1) -> "Lanes":
        """Seeds ``seed, ..., seed + num_seeds - 1``.

        Raises:
          ValueError: ``num_seeds`` is not an integer >= 1.
        """
        if isinstance(num_seeds, bool) or not isinstance(num_seeds, int) or num_seeds < 1:
            raise ValueError(f"seeds must be an integer >= 1 (runs trained together); "
                             f"got {num_seeds!r}")
        return cls(tuple(seed + i for i in range(num_seeds)))

    @property
    def size(self) -> int:
        return len(self.seeds)

    @property
    def stacked(self) -> bool:
        """Whether arrays carry a leading seed axis (more than one seed)."""
        return self.size > 1

    @property
    def batch_axis(self) -> int:
        """The axis of a training batch that holds its samples."""
        return 1 if self.stacked else 0

    def split(self, tree) -> list:
        """Per-lane trees of a (stacked) tree; ``[tree]`` for a single run."""
        if not self.stacked:
            return [tree]
        return [jax.tree_util.tree_map(lambda a, i=i: a[i], tree) for i in range(self.size)]

    def join(self, trees: Sequence) -> Any:
        """The stacked tree of per-lane trees (inverse of `split`)."""
        if not self.stacked:
            (tree,) = trees
            return tree
        stack = np.stack if all(isinstance(leaf, np.ndarray)
                                for leaf in jax.tree_util.tree_leaves(trees)) else jnp.stack
        return jax.tree_util.tree_map(lambda *leaves: stack(leaves), *trees)

    def abstract(self, tree):
        """`jax.ShapeDtypeStruct`-s of a stacked tree, given one lane's."""
        if not self.stacked:
            return tree
        return jax.tree_util.tree_map(
            lambda s: jax.ShapeDtypeStruct((self.size, *s.shape), s.dtype), tree)

    def vmap(self, fn: Callable, in_axes) -> Callable:
        """``fn`` mapped over the lanes (``fn`` itself for a single run)."""
        return jax.vmap(fn, in_axes=in_axes) if self.stacked else fn

    def values(self, per_lane: list):
        """A JSON value holding per-lane values: the value itself for a single run."""
        return list(per_lane) if self.stacked else per_lane[0]

    def from_values(self, value) -> list:
        """Inverse of `values`."""
        return list(value) if self.stacked else [value]

    def zip_batches(self, iterators: list[Iterator]) -> Iterator:
        """Batches of every lane, stacked (the one lane's batches as they are)."""
        if not self.stacked:
            (iterator,) = iterators
            return iterator
        return (tuple(np.stack(parts) for parts in zip(*lane_batches))
                for lane_batches in zip(*iterators))


def seed_statistics(values: Sequence[float]) -> tuple[float, float]:
    """(mean, standard deviation) of per-seed values.

    The population standard deviation (ddof=0), as `experiments.compare`
    reports it.
    """
    values = np.asarray(values, np.float64)
    return float(np.mean(values)), float(np.std(values))

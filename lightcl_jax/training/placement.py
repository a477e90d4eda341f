"""Where a run's arrays live: seeds as lanes, batches split over devices and processes.

A `Placement` is the one object the training loop asks how to lay out and
compile things: the train and eval steps are vmapped over the lanes and
sharded over the devices; host-side work (task-boundary hooks, probes, layer
metrics, results) runs lane by lane through `Placement.map_lanes`.

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

The train and eval steps are the same jitted functions on one device or many:
`DataParallel` gives them shardings -- params, BatchNorm statistics,
optimizer state and the strategy's memory replicated on every device, each
batch split along its first axis -- and XLA inserts the cross-device sums
(of gradients, of BatchNorm's batch statistics, of correct predictions). The
numbers are those of one device up to the order of floating-point sums.

Several processes (``jax.distributed.initialize``, see BUILD.md): every
process draws the same global batch order and augmentation from the same
seed, reads only its own contiguous part of each batch (`DataParallel.part`)
and hands it in (`DataParallel.batch`);
``jax.make_array_from_process_local_data`` assembles the global array.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lightcl_jax import compiler
from lightcl_jax.config import Config

# Config fields whose value differs between the lanes (each lane is its own seed's run).
PER_LANE_FIELDS = ("seed",)


class LaneSharedConfig:
    """A config as the one compiled step of several lanes sees it.

    The step of all lanes is traced once, with lane 0's config; a traced
    strategy hook that read a per-lane field (`PER_LANE_FIELDS`) would give
    every lane lane 0's value, so reading one raises instead.
    """

    def __init__(self, config: Config):
        self._config = config

    def __getattr__(self, name):
        if name in PER_LANE_FIELDS:
            raise AttributeError(
                f"a traced strategy hook read config.{name}, which differs between the seeds "
                "trained together: the step of all seeds is compiled once, so it would see seed "
                f"{self._config.seed}'s value for every seed. Read it in begin_task or end_task "
                "(run per seed on the host) and keep what the step needs in the memory")
        return getattr(self._config, name)


@dataclasses.dataclass(frozen=True)
class Placement:
    """The seeds trained together and the devices each batch is split over."""

    lanes: Lanes
    parallel: DataParallel

    @classmethod
    def of(cls, seed: int, seeds: int, devices: int | None,
           batch_sizes: dict[str, int]) -> "Placement":
        """Seeds ``seed .. seed + seeds - 1`` over the first ``devices`` devices (None: all).

        Raises:
          ValueError: bad seed count or device count, or a batch size in
            ``batch_sizes`` that does not split over the devices.
        """
        return cls(Lanes.of(seed, seeds), data_parallel(devices, batch_sizes))

    def map_lanes(self, fn: Callable, *trees, join: bool = True):
        """``fn(lane, *lane_trees)`` for every lane; the results stacked again (``join``)
        or as a list."""
        parts = [self.lanes.split(tree) for tree in trees]
        out = [fn(lane, *(p[lane] for p in parts)) for lane in range(self.lanes.size)]
        return self.lanes.join(out) if join else out

    def lane_configs(self, config: Config) -> list[Config]:
        """Each lane's config: ``config`` with that lane's seed."""
        return [dataclasses.replace(config, seed=s) for s in self.lanes.seeds]

    def step_config(self, config: Config):
        """The config a compiled step of all lanes is built with (see `LaneSharedConfig`)."""
        return LaneSharedConfig(config) if self.lanes.stacked else config

    def replicate(self, tree):
        """``tree`` on every device (state and memory, as the compiled steps take them)."""
        return self.parallel.replicate(tree)

    def train_batch(self, batch):
        """A (lane-stacked) training batch ``(x, y)`` split over the devices."""
        return self.parallel.batch(*batch, axis=self.lanes.batch_axis)

    def eval_batch(self, batch):
        """An evaluation batch ``(x, y, valid)`` (shared by the lanes) split over the devices."""
        return self.parallel.batch(*batch)

    def jit_train_step(self, step: Callable, memory_scheduler: bool = False):
        """``step(state, memory, x, y, class_offset)`` vmapped over the lanes, jitted with
        donated state and memory, the batch split over the devices (`compiler.jit`'s
        ``memory_scheduler``)."""
        rep, split = self.parallel.replicated, self.parallel.split_along(self.lanes.batch_axis)
        return compiler.jit(self.lanes.vmap(step, in_axes=(0, 0, 0, 0, None)),
                            donate_argnums=(0, 1), in_shardings=(rep, rep, split, split, rep),
                            out_shardings=rep, memory_scheduler=memory_scheduler)

    def jit_eval_step(self, step: Callable):
        """``step(params, batch_stats, x, y, valid, class_offset)`` vmapped over the lanes'
        model, the batch shared by all lanes and split over the devices."""
        rep, split = self.parallel.replicated, self.parallel.split
        return compiler.jit(self.lanes.vmap(step, in_axes=(0, 0, None, None, None, None)),
                            in_shardings=(rep, rep, split, split, split, rep), out_shardings=rep)

    def abstract(self, tree) -> Any:
        """The stacked shapes of one lane's abstract tree."""
        return self.lanes.abstract(tree)


# Seeds as lanes.

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


# Data parallel over devices.

DATA_AXIS = "data"


@dataclasses.dataclass(frozen=True)
class DataParallel:
    """Shardings of a data-parallel run over ``mesh``'s ``data`` axis."""

    mesh: Mesh

    @property
    def num_devices(self) -> int:
        return self.mesh.devices.size

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec())

    @property
    def split(self) -> NamedSharding:
        """Split along the first axis: a batch."""
        return self.split_along(0)

    def split_along(self, axis: int) -> NamedSharding:
        """Split along ``axis`` (1: the samples of seed-stacked batches)."""
        return NamedSharding(self.mesh, PartitionSpec(*(None,) * axis, DATA_AXIS))

    def replicate(self, tree):
        """``tree``'s arrays on every device of the mesh."""
        return jax.device_put(tree, self.replicated)

    @property
    def part(self) -> tuple[int, int]:
        """(this process's index, the process count): which contiguous part of every
        batch this process reads (`lightcl_jax.data.pipeline.epoch_batches`)."""
        return jax.process_index(), jax.process_count()

    def batch(self, *arrays: np.ndarray, axis: int = 0):
        """Global batch arrays, split along ``axis`` (their samples) over the mesh, from
        this process's part of them (its `part`; the whole batch for one process)."""
        count, sharding = jax.process_count(), self.split_along(axis)
        out = []
        for local in arrays:
            shape = list(np.shape(local))
            shape[axis] *= count
            out.append(jax.make_array_from_process_local_data(sharding, local, tuple(shape)))
        return tuple(out)


def data_parallel(devices: int | None, batch_sizes: dict[str, int]) -> DataParallel:
    """A `DataParallel` over the first ``devices`` visible devices (None: all of them).

    Args:
      devices: how many devices to use, or None for every visible one.
      batch_sizes: {flag name: batch size}; each must split evenly over the devices.

    Raises:
      ValueError: ``devices`` is not in [1, visible devices] (every device when
        several processes share the run), or a batch size is not a multiple of it.
    """
    available = jax.devices()
    count = len(available) if devices is None else devices
    if not (isinstance(count, int) and not isinstance(count, bool)
            and 1 <= count <= len(available)):
        raise ValueError(f"devices must be an integer in [1, {len(available)}] (the visible "
                         f"{jax.default_backend()} devices); got {devices!r}")
    if jax.process_count() > 1 and count != len(available):
        raise ValueError(f"with {jax.process_count()} processes the batch is split over every "
                         f"process's devices: devices must be all {len(available)} (or not "
                         f"given); got {devices!r}")
    for name, size in batch_sizes.items():
        if size % count:
            raise ValueError(f"{name}={size} does not split over {count} devices; use a "
                             f"multiple of {count} or fewer devices")
    return DataParallel(Mesh(np.array(available[:count]), (DATA_AXIS,)))

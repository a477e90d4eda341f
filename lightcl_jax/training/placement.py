"""Where a run's arrays live: seeds as lanes (`lanes`), batches split over devices (`parallel`).

A `Placement` is the one object the training loop asks how to lay out and
compile things: the train and eval steps are vmapped over the lanes and
sharded over the devices; host-side work (task-boundary hooks, probes, layer
metrics, results) runs lane by lane through `Placement.map_lanes`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from lightcl_jax import compiler
from lightcl_jax.config import Config
from lightcl_jax.training.lanes import Lanes
from lightcl_jax.training.parallel import DataParallel, data_parallel

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

"""``--freeze auto``: choose the freeze point from LP and MS measured by a one-epoch probe.

Before the first task a strategy freezes in, a throwaway copy of each lane's
model trains every layer on that task for one epoch; the deepest prefix of
layer groups whose LP and MS stay above the threshold is frozen
(`lightcl_jax.metrics.generalizability.choose_freeze`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from lightcl_jax import compiler
from lightcl_jax.config import Config
from lightcl_jax.data.pipeline import epoch_batches
from lightcl_jax.data.streams import TaskStream
from lightcl_jax.metrics.generalizability import choose_freeze, generalizability
from lightcl_jax.strategies import Strategy
from lightcl_jax.training.epochs import check_finite
from lightcl_jax.training.evaluation import probe_set
from lightcl_jax.training.placement import Placement
from lightcl_jax.training.record import RunRecord
from lightcl_jax.training.state import TrainState, copy_variables, train_state
from lightcl_jax.training.steps import Phase, make_train_step, phase_optimizer

# The probe trains every layer, without the strategy's memory.
PROBE_PHASE = Phase(frozen=(), fixed_bn=(), uses_memory=False)


def make_probe_step(model, tx, config, classes_per_task: int):
    """The probe's jitted train step (state donated).

    One step serves every seed: its optimizer's update reads the sparse masks
    from the optimizer state, which each seed initialises with its own.
    """
    return compiler.jit(make_train_step(model, tx, Strategy(), config, PROBE_PHASE,
                                        classes_per_task), donate_argnums=(0,))


def probe_freeze(model, state: TrainState, stream: TaskStream, task_index: int, config: Config,
                 *, augment: bool, masks=None, step=None) -> tuple[str, dict]:
    """What ``--freeze auto`` freezes, decided before training task ``task_index``.

    A throwaway copy of the model trains every layer on task ``task_index``
    for one epoch (same SGD, batch size and augmentation, its own seeded
    order). LP is measured on up to `PROBE_SIZE` training samples of that task,
    MS on up to `PROBE_SIZE` training samples of the earlier tasks (none when
    a pre-trained run decides at task 0: MS is then not measured), with
    ``config.similarity``, between the model before and after the probe.
    `choose_freeze` with ``config.freeze_threshold`` picks the freeze point.
    Evaluation data is never used. The model itself is not changed.

    Args:
      step: the probe's compiled step (`make_probe_step`) when several models
        share one; None builds it.

    Returns:
      (freeze point name, {layer: {"lp": float, "ms": float | None}}).
    """
    task = stream.tasks[task_index]
    tx = phase_optimizer(config, state.params, (), masks)
    if step is None:
        step = make_probe_step(model, tx, config, stream.classes_per_task)
    before = copy_variables(state)
    probe = jax.tree_util.tree_map(jnp.copy, train_state(before["params"], before["batch_stats"],
                                                         tx.init(before["params"])))
    rng = np.random.default_rng([config.seed, task_index, 1])
    offset = jnp.asarray(task.class_offset, jnp.int32)
    for x, y in epoch_batches(task.x_train, task.y_train, config.batch_size, rng,
                              augment=augment, fill=stream.pad_value):
        probe, _, metrics = step(probe, None, x, y, offset)
    check_finite([metrics], 0, task_index)
    after = {"params": probe.params, "batch_stats": probe.batch_stats}
    x_old = probe_set([t.x_train for t in stream.tasks[:task_index]])
    metrics = generalizability(model, before, after, x_old, probe_set([task.x_train]),
                               config.similarity)
    return choose_freeze(metrics, config.freeze_threshold), metrics


def needs_probe(strategy: Strategy, config: Config, task_index: int, pretrained: bool,
                record: RunRecord) -> bool:
    """Whether ``--freeze auto`` decides now: nothing chosen yet, and the strategy
    would freeze something in this task."""
    return (config.freeze == "auto" and record.chosen_freeze is None and bool(
        strategy.frozen_groups(dataclasses.replace(config, freeze="all-but-head"), task_index,
                               pretrained)))


def freeze_auto(model, placement: Placement, state: TrainState, stream: TaskStream,
                task_index: int, configs: list[Config], masks: list, *, augment: bool
                ) -> list[dict]:
    """Every lane's `probe_freeze` record: ``{"task", "chosen", "threshold", "similarity",
    "metrics"}``. The probe step compiles once for all lanes.

    Raises:
      ValueError: the lanes chose different freeze points (they share one
        compiled train step, so they must freeze the same layers).
    """
    first = placement.lanes.split(state)[0]
    step = make_probe_step(model, phase_optimizer(configs[0], first.params, (), masks[0]),
                           placement.step_config(configs[0]), stream.classes_per_task)

    def probe(lane, lane_state):
        config = configs[lane]
        chosen, metrics = probe_freeze(model, lane_state, stream, task_index, config,
                                       augment=augment, masks=masks[lane], step=step)
        return {"task": task_index, "chosen": chosen, "threshold": config.freeze_threshold,
                "similarity": config.similarity, "metrics": metrics}
    choices = placement.map_lanes(probe, state, join=False)
    if len({c["chosen"] for c in choices}) > 1:
        each = ", ".join(f"seed {s}: {c['chosen']}" for s, c in zip(placement.lanes.seeds, choices))
        raise ValueError(f"--freeze auto chose different freeze points for the seeds trained "
                         f"together ({each}); seeds share one compiled step, so run them "
                         "separately or give --freeze explicitly")
    return choices

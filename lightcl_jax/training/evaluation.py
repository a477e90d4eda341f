"""After a task: accuracy on every task seen so far, and LP/MS per layer.

`evaluate` runs the compiled eval step over each seen task's evaluation split
and returns TIL and CIL accuracy and the run's evaluation metrics per task and
lane; `layer_metrics` measures
each layer's learning plasticity and memory stability between the models
before and after the task (`lightcl_jax.metrics.generalizability`).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lightcl_jax.data.pipeline import eval_batches, prefetch
from lightcl_jax.data.streams import TaskStream
from lightcl_jax.metrics.continual import EvalMetric
from lightcl_jax.metrics.generalizability import generalizability
from lightcl_jax.training.placement import Placement
from lightcl_jax.training.state import TrainState

# Evaluation batches read and sent to the devices ahead of the step.
PREFETCH = 2

# Probe samples per set for LP/MS: enough for a stable CKA, cheap to compare.
PROBE_SIZE = 256


class Evaluation(NamedTuple):
    """What one evaluation after a task measured, per seen task and lane."""

    til: np.ndarray        # (tasks seen, lanes) float64: TIL accuracy, %
    cil: np.ndarray        # (tasks seen, lanes) float64: CIL accuracy, %
    metrics: dict          # evaluation metric name -> (tasks seen, lanes) float64


def correct_counts(eval_step, state: TrainState, stream: TaskStream, num_seen: int,
                   batch_size: int, placement: Placement | None = None):
    """Correct TIL and CIL predictions, and the evaluation metrics' sums, on each of the
    first ``num_seen`` tasks.

    Returns:
      ``(til, cil, sums)``: two int64 arrays of shape (num_seen, *E), E being the shape
      of what ``eval_step`` counts: () for one model, (lanes,) for a vmapped one; and per
      task, the ``eval_step``'s sums added over its batches (float64).
      With ``placement``, each batch is split over its devices (this process reading
      only its part of it).
    """
    transform = None if placement is None else placement.eval_batch
    part = (0, 1) if placement is None else placement.parallel.part
    til_counts, cil_counts, task_sums = [], [], []
    for task in stream.tasks[:num_seen]:
        til_correct = cil_correct = 0
        sums = None
        offset = jnp.asarray(task.class_offset, jnp.int32)
        batches = eval_batches(task.x_eval, task.y_eval, batch_size, part)
        for x, y, valid in prefetch(batches, PREFETCH, transform):
            til, cil, batch_sums = eval_step(state.params, state.batch_stats, x, y, valid, offset)
            til_correct = til_correct + np.asarray(til, np.int64)
            cil_correct = cil_correct + np.asarray(cil, np.int64)
            batch_sums = jax.tree_util.tree_map(lambda v: np.asarray(v, np.float64), batch_sums)
            sums = batch_sums if sums is None else jax.tree_util.tree_map(np.add, sums,
                                                                         batch_sums)
        til_counts.append(til_correct)
        cil_counts.append(cil_correct)
        task_sums.append(sums)
    return np.stack(til_counts), np.stack(cil_counts), task_sums


def evaluate(eval_step, state: TrainState, stream: TaskStream, num_seen: int, batch_size: int,
             placement: Placement | None = None,
             eval_metrics: tuple[EvalMetric, ...] = ()) -> Evaluation:
    """TIL and CIL accuracy in percent, and ``eval_metrics`` (those the ``eval_step`` sums),
    on each of the first ``num_seen`` tasks.

    Returns:
      An `Evaluation`: arrays of shape (num_seen, lanes), row j task j, column i the model
      of lane i (one column for a single model).
    """
    til, cil, task_sums = correct_counts(eval_step, state, stream, num_seen, batch_size,
                                         placement)
    sizes = np.array([len(t.y_eval) for t in stream.tasks[:num_seen]], np.float64)
    lanes = til.reshape(num_seen, -1).shape[1]
    stacked = til.ndim > 1

    def value(metric, sums, lane):
        total = sums[metric.name]
        if stacked:
            total = jax.tree_util.tree_map(lambda v: v[lane], total)
        return float(metric.compute(total))
    metrics = {m.name: np.array([[value(m, sums, lane) for lane in range(lanes)]
                                 for sums in task_sums], np.float64) for m in eval_metrics}
    return Evaluation(100.0 * til.reshape(num_seen, -1) / sizes[:, None],
                      100.0 * cil.reshape(num_seen, -1) / sizes[:, None], metrics)


def probe_set(arrays: list[np.ndarray], size: int = PROBE_SIZE) -> np.ndarray | None:
    """Up to ``size`` samples taken evenly from the start of each array (None: no arrays)."""
    if not arrays:
        return None
    per = -(-size // len(arrays))  # ceil
    return np.concatenate([a[:per] for a in arrays])[:size]


def layer_metrics(model, placement: Placement, before, state: TrainState, stream: TaskStream,
                  task_index: int, similarity: str) -> list[dict]:
    """Per lane, LP and MS per layer between the models before and after task ``task_index``.

    Measured on held-out samples of the task (LP) and of the earlier tasks
    (MS): as many per set as the smallest task's evaluation split holds, at
    most `PROBE_SIZE` (one size for every task and both sets, so the
    measurement compiles once).

    Args:
      before: ``{"params", "batch_stats"}`` of the model before the task.
      state: the train state after it.
    """
    size = min(PROBE_SIZE, min(len(p.x_eval) for p in stream.tasks))
    old = probe_set([p.x_eval for p in stream.tasks[:task_index]], size)
    new = probe_set([stream.tasks[task_index].x_eval], size)

    def measure(lane, lane_before, lane_state):
        after = {"params": lane_state.params, "batch_stats": lane_state.batch_stats}
        return generalizability(model, lane_before, after, old, new, similarity)
    return placement.map_lanes(measure, before, state, join=False)

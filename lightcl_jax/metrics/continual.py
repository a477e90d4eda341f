"""Continual-learning metrics: predictions, run summaries and evaluation metrics.

An accuracy matrix is a list of rows; row i (after training task i) has
i + 1 entries, entry j the accuracy in percent on task j.

Two kinds of metric plug into a run (`lightcl_jax.registry` lists them by name;
a user's own is registered with one call, or named by its import path):

  * a `Summary` turns an accuracy matrix into one number (average accuracy,
    forgetting, ...); a run reports each for the TIL and the CIL matrix as
    ``<name>_til`` and ``<name>_cil``.
  * an `EvalMetric` is computed on each seen task's evaluation data after each
    task, from the logits and labels, batch by batch: ``update`` (jittable)
    gives a pytree of sums over a batch, the sums are added over the batches,
    and ``compute`` turns the total into the value. A run reports the matrix
    ``eval_<name>`` (shaped like the accuracy matrices) and the mean of its last
    row, ``avg_eval_<name>``.

Built in: summaries ``avg``, ``forgetting``, ``bwt``, ``avg_incremental``; the
evaluation metric ``loss``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lightcl_jax.registry import EVAL_METRICS, SUMMARIES, is_import_path, load_path

Matrix = Sequence[Sequence[float]]


def task_cross_entropy(logits: jax.Array, labels: jax.Array, classes_per_task: int) -> jax.Array:
    """Per-sample cross-entropy over each sample's own task's logits.

    Tasks are consecutive class groups of ``classes_per_task``; a sample of
    class y belongs to the task starting at y - y % classes_per_task, and its
    label is shifted to 0..classes_per_task-1. Every loss of the library is this
    one (the reference's task-masked training loss).

    Args:
      logits: (N, K) logits over all classes.
      labels: (N,) int global class ids.
      classes_per_task: classes in each task (static).

    Returns:
      (N,) float32 losses.
    """
    first = labels - labels % classes_per_task
    columns = first[:, None] + jnp.arange(classes_per_task, dtype=labels.dtype)[None, :]
    task_logits = jnp.take_along_axis(logits, columns, axis=1)
    return optax.softmax_cross_entropy_with_integer_labels(task_logits, labels - first)


def til_predictions(logits: jax.Array, class_offset: jax.Array, classes_per_task: int) -> jax.Array:
    """Task-incremental prediction: argmax over the task's own logits, as a global class id.

    Args:
      logits: (N, K) logits over all classes.
      class_offset: scalar int, the task's first class (may be traced).
      classes_per_task: width of the task's class range (static).
    """
    task_logits = jax.lax.dynamic_slice_in_dim(logits, class_offset, classes_per_task, axis=1)
    return jnp.argmax(task_logits, axis=1) + class_offset


def cil_predictions(logits: jax.Array) -> jax.Array:
    """Class-incremental prediction: argmax over all logits."""
    return jnp.argmax(logits, axis=1)


def average_accuracy(matrix: Sequence[Sequence[float]]) -> float:
    """Mean accuracy over all tasks after the last task (the last row)."""
    return float(np.mean(matrix[-1]))


def forgetting(matrix: Sequence[Sequence[float]]) -> float:
    """Average forgetting (Chaudhry et al. 2018), in percentage points.

    For each task j but the last: the best accuracy it had after any earlier
    training step i < T-1 (i >= j) minus its final accuracy; averaged over j.
    0.0 for a single task.
    """
    num_tasks = len(matrix)
    if num_tasks < 2:
        return 0.0
    drops = [max(matrix[i][j] for i in range(j, num_tasks - 1)) - matrix[-1][j]
             for j in range(num_tasks - 1)]
    return float(np.mean(drops))


def backward_transfer(matrix: Sequence[Sequence[float]]) -> float:
    """Backward transfer (Lopez-Paz & Ranzato 2017): mean of final minus just-learned accuracy.

    Negative when learning later tasks hurt earlier ones. 0.0 for a single task.
    """
    num_tasks = len(matrix)
    if num_tasks < 2:
        return 0.0
    return float(np.mean([matrix[-1][j] - matrix[j][j] for j in range(num_tasks - 1)]))


def average_incremental_accuracy(matrix: Matrix) -> float:
    """Average incremental accuracy (Rebuffi et al. 2017): the mean over tasks t of the
    average accuracy over the tasks seen after training task t (each row's mean)."""
    return float(np.mean([np.mean(row) for row in matrix]))


@dataclasses.dataclass(frozen=True)
class Summary:
    """A run summary: one number from an accuracy matrix.

    Attributes:
      name: the registry key; results hold ``<name>_til`` and ``<name>_cil``.
      fn: ``fn(matrix) -> float`` (a pure function of the list of rows).
      description: one line for ``--help`` and the docs.
    """

    name: str
    fn: Callable[[Matrix], float]
    description: str = ""

    def __call__(self, matrix: Matrix) -> float:
        return float(self.fn(matrix))


@dataclasses.dataclass(frozen=True)
class EvalMetric:
    """A metric of each seen task's evaluation data, computed after each task.

    Attributes:
      name: the registry key; results hold the matrix ``eval_<name>`` and the mean of
        its last row ``avg_eval_<name>``.
      update: ``update(logits, labels, valid, *, class_offset, classes_per_task)`` ->
        a pytree of sums over one batch, jittable. ``logits`` (N, K) over all classes,
        ``labels`` (N,) int, ``valid`` (N,) bool (False on the padding of a task's last
        batch: leave those rows out), ``class_offset`` the task's first class (a traced
        int32 scalar), ``classes_per_task`` a Python int.
      compute: ``compute(total) -> float``: the value from the sums over all of a
        task's batches (NumPy float64 arrays of ``update``'s structure).
      description: one line for ``--help`` and the docs.
    """

    name: str
    update: Callable[..., Any]
    compute: Callable[[Any], float]
    description: str = ""


def _loss_update(logits, labels, valid, *, class_offset, classes_per_task):
    losses = task_cross_entropy(logits, labels, classes_per_task)
    return {"sum": jnp.sum(jnp.where(valid, losses, 0.0)),
            "count": jnp.sum(valid, dtype=jnp.float32)}


def _loss_compute(total) -> float:
    return float(total["sum"] / total["count"])


# The built-in entries of `SUMMARIES` and `EVAL_METRICS` (`lightcl_jax.registry` names
# them without JAX). ``avg``, ``forgetting`` and ``bwt`` give the results' ``avg_til``,
# ``forgetting_cil``, ``bwt_til``, ...
AVERAGE_ACCURACY = Summary("avg", average_accuracy,
                           "average accuracy over all tasks after the last one")
FORGETTING = Summary("forgetting", forgetting,
                     "average forgetting, percentage points (Chaudhry et al. 2018)")
BACKWARD_TRANSFER = Summary("bwt", backward_transfer,
                            "backward transfer (Lopez-Paz & Ranzato 2017)")
AVERAGE_INCREMENTAL_ACCURACY = Summary(
    "avg_incremental", average_incremental_accuracy,
    "mean over tasks t of the average accuracy after task t (Rebuffi et al. 2017)")
EVAL_LOSS = EvalMetric("loss", _loss_update, _loss_compute,
                       "the training loss (task-masked cross-entropy) on each seen task")


def _check_name(kind: str, name) -> None:
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"a {kind} needs a name that is a Python identifier (it becomes a "
                         f"results key); got {name!r}")


def register_summary(name: str, fn: Callable[[Matrix], float], description: str = "") -> Summary:
    """Adds a run summary under ``name`` (replacing one of the same name).

    Example (learning accuracy: each task's accuracy right after it was learned)::

        lcl.register_summary("learning", lambda m: float(np.mean([m[t][t] for t in range(len(m))])))
    """
    _check_name("summary metric", name)
    if not callable(fn):
        raise TypeError(f"summary metric {name!r}: fn must be callable, got {type(fn).__name__}")
    if name in EVAL_METRICS:
        raise ValueError(f"{name!r} already names an evaluation metric; choose another name")
    SUMMARIES[name] = summary = Summary(name, fn, description)
    return summary


def register_eval_metric(name: str, update: Callable[..., Any], compute: Callable[[Any], float],
                         description: str = "") -> EvalMetric:
    """Adds an evaluation metric under ``name`` (replacing one of the same name); see
    `EvalMetric` for what ``update`` and ``compute`` take."""
    _check_name("evaluation metric", name)
    for part, fn in (("update", update), ("compute", compute)):
        if not callable(fn):
            raise TypeError(f"evaluation metric {name!r}: {part} must be callable, got "
                            f"{type(fn).__name__}")
    if name in SUMMARIES:
        raise ValueError(f"{name!r} already names a summary metric; choose another name")
    EVAL_METRICS[name] = metric = EvalMetric(name, update, compute, description)
    return metric


def get_metric(name: str) -> Summary | EvalMetric:
    """The summary or evaluation metric called ``name``, or at the import path ``name``.

    Raises:
      ValueError: unknown name (the message lists the known ones), or a path that holds
        neither kind.
    """
    if name in SUMMARIES:
        return SUMMARIES[name]
    if name in EVAL_METRICS:
        return EVAL_METRICS[name]
    if is_import_path(name):
        metric = load_path(name)
        if isinstance(metric, (Summary, EvalMetric)):
            return metric
        raise ValueError(f"{name} is {metric!r}, neither a lightcl_jax Summary nor an EvalMetric")
    raise ValueError(f"unknown metric {name!r}; known: "
                     f"{', '.join(sorted(SUMMARIES) + sorted(EVAL_METRICS))}, or the import path "
                     "of your own (package.module:NAME or path/to/file.py:NAME)")


def split_metrics(names) -> tuple[tuple[Summary, ...], tuple[EvalMetric, ...]]:
    """The summaries and evaluation metrics called ``names`` (a run's ``metrics``), in order.

    Raises:
      ValueError: an unknown name or path (`get_metric`), or two metrics with one name
        (their results keys would collide).
    """
    metrics = [get_metric(name) for name in names]
    seen = {}
    for given, metric in zip(names, metrics):
        if metric.name in seen:
            raise ValueError(f"metrics {seen[metric.name]!r} and {given!r} are both called "
                             f"{metric.name!r}; their results would collide")
        seen[metric.name] = given
    return (tuple(m for m in metrics if isinstance(m, Summary)),
            tuple(m for m in metrics if isinstance(m, EvalMetric)))

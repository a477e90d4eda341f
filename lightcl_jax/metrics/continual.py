"""Continual-learning accuracy: TIL/CIL predictions and accuracy-matrix summaries.

An accuracy matrix is a list of rows; row i (after training task i) has
i + 1 entries, entry j the accuracy in percent on task j.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np


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

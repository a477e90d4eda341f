"""Metrics of your own, in one file: a run summary and an evaluation metric.

* ``LEARNING_ACCURACY``, a summary of an accuracy matrix: each task's accuracy
  right after it was learned, averaged (Riemer et al. 2019's learning
  accuracy). A run reports ``learning_til`` and ``learning_cil``.
* ``CALIBRATION_ERROR``, an evaluation metric: the expected calibration error
  (15 equal-width confidence bins) of the class-incremental prediction on each
  seen task's evaluation data after each task. A run reports the matrix
  ``eval_ece`` and ``avg_eval_ece``. ``ece_update`` gives a batch's sums per bin
  (jittable), the run adds them over the batches, ``ece_compute`` turns the
  total into the value: both are pure functions to test with chex.

From the command line, by the file's path (``+`` adds to the built-in metrics)::

    python -m experiments.run --metrics \\
        +docs/examples/my_metrics.py:LEARNING_ACCURACY,docs/examples/my_metrics.py:CALIBRATION_ERROR

From Python, registered under their names (or named by path in ``metrics``)::

    import lightcl_jax as lcl
    import my_metrics

    lcl.register_summary("learning", my_metrics.learning_accuracy)
    lcl.register_eval_metric("ece", my_metrics.ece_update, my_metrics.ece_compute)
    results = lcl.train_and_evaluate(
        lcl.Config(metrics=lcl.DEFAULT_METRICS + ("learning", "ece")))
    results["learning_til"], results["eval_ece"]
"""

import jax
import jax.numpy as jnp
import numpy as np

import lightcl_jax as lcl

BINS = 15


def learning_accuracy(matrix) -> float:
    """Mean over tasks t of the accuracy on task t after training task t."""
    return float(np.mean([matrix[t][t] for t in range(len(matrix))]))


def ece_update(logits, labels, valid, *, class_offset, classes_per_task):
    """Per confidence bin: how many samples, their summed confidence and how many are right."""
    probabilities = jax.nn.softmax(logits, axis=1)
    confidence = jnp.max(probabilities, axis=1)
    correct = (jnp.argmax(logits, axis=1) == labels) & valid
    bins = jnp.clip((confidence * BINS).astype(jnp.int32), 0, BINS - 1)
    in_bin = (bins[:, None] == jnp.arange(BINS)[None, :]) & valid[:, None]
    return {"count": jnp.sum(in_bin, axis=0, dtype=jnp.float32),
            "confidence": jnp.sum(jnp.where(in_bin, confidence[:, None], 0.0), axis=0),
            "correct": jnp.sum(in_bin & correct[:, None], axis=0, dtype=jnp.float32)}


def ece_compute(total) -> float:
    """sum over bins of |correct - confidence| / all samples (the bins' gap, weighted)."""
    return float(np.sum(np.abs(total["correct"] - total["confidence"])) / np.sum(total["count"]))


LEARNING_ACCURACY = lcl.Summary("learning", learning_accuracy,
                                "each task's accuracy right after learning it, averaged")
CALIBRATION_ERROR = lcl.EvalMetric("ece", ece_update, ece_compute,
                                   "expected calibration error (15 bins) of the CIL prediction")

import jax.numpy as jnp
import numpy as np

from lightcl_jax.metrics.continual import (average_accuracy, backward_transfer, cil_predictions,
                                           forgetting, til_predictions)


def test_til_and_cil_predictions_on_constructed_logits():
    # 6 classes, 3 tasks of 2. Sample 0: the largest logit is in task 2, but within task 1
    # class 3 wins. Sample 1: within task 1 class 2 wins, and it is the global max.
    logits = jnp.asarray([[0.0, 0.0, 1.0, 2.0, 9.0, 0.0],
                          [0.0, 0.0, 7.0, 3.0, 1.0, 0.0]], jnp.float32)
    np.testing.assert_array_equal(til_predictions(logits, jnp.asarray(2, jnp.int32), 2), [3, 2])
    np.testing.assert_array_equal(cil_predictions(logits), [4, 2])
    labels = np.array([3, 2])
    til_acc = np.mean(np.asarray(til_predictions(logits, jnp.asarray(2, jnp.int32), 2)) == labels)
    cil_acc = np.mean(np.asarray(cil_predictions(logits)) == labels)
    assert (til_acc, cil_acc) == (1.0, 0.5)


def test_summaries_by_hand():
    matrix = [[90.0],
              [80.0, 95.0],
              [60.0, 85.0, 70.0]]
    assert average_accuracy(matrix) == (60 + 85 + 70) / 3
    # task 0: best earlier 90 -> 60 (30); task 1: best earlier 95 -> 85 (10).
    assert forgetting(matrix) == 20.0
    # bwt: (60 - 90 + 85 - 95) / 2
    assert backward_transfer(matrix) == -20.0
    assert forgetting([[50.0]]) == 0.0 and backward_transfer([[50.0]]) == 0.0

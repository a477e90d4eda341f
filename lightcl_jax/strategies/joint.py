"""``joint``: at task t, train on all the data of tasks 0..t (the upper bound)."""

from __future__ import annotations

import numpy as np

from lightcl_jax.data.sources import concatenate
from lightcl_jax.strategies.base import Strategy


class Joint(Strategy):
    name = "joint"

    def training_arrays(self, stream, task_index):
        seen = stream.tasks[:task_index + 1]
        return (concatenate([t.x_train for t in seen]),
                np.concatenate([t.y_train for t in seen]))

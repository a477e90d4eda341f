"""`SequentialCIFAR10` as LightCL.py uses it, serving the tasks of an exported stream.

LightCL.py calls ``SequentialCIFAR10(None).get_data_loaders()`` once per task
and reads ``(train_loader, test_loader)``: here the next task of the stream
in the ``.npz`` file that ``$LIGHTCL_STREAM`` names (written by
`benchmarks.vs_reference.export_stream`). As the authors' loaders: batches
of 32, the training ones shuffled (torch's generator, which the script
seeds), the last smaller batch kept; images NCHW float32, labels the global
class ids. The images are served as they were exported (normalised, not
augmented).

Diagnostic: with ``$LIGHTCL_DROP_LAST=1`` the training loaders drop the last
smaller batch, as lightcl_jax does with ``last_batch="drop"`` (``vs_reference
--last-batch drop``); the script itself is unchanged.
"""

import os

import numpy as np

STREAM_ENV = "LIGHTCL_STREAM"
BATCH_SIZE = 32
DROP_LAST_ENV = "LIGHTCL_DROP_LAST"


class SequentialCIFAR10:
    NAME = "seq-cifar10"
    N_CLASSES_PER_TASK = 2
    N_TASKS = 5

    def __init__(self, args=None):
        path = os.environ.get(STREAM_ENV)
        if not path or not os.path.isfile(path):
            raise RuntimeError(f"${STREAM_ENV} must name an exported stream (.npz); got {path!r}")
        self.stream = np.load(path)
        self.i = 0

    def get_data_loaders(self):
        task = self.i
        if task >= int(self.stream["num_tasks"]):
            raise RuntimeError(f"the exported stream has {int(self.stream['num_tasks'])} tasks; "
                               f"task {task} was asked for")
        self.i += 1
        part = {key: self.stream[f"task{task}_{key}"]
                for key in ("x_train", "y_train", "x_eval", "y_eval")}
        drop_last = os.environ.get(DROP_LAST_ENV) == "1"
        return (_loader(part["x_train"], part["y_train"], shuffle=True, drop_last=drop_last),
                _loader(part["x_eval"], part["y_eval"], shuffle=False, drop_last=False))


def _loader(x: np.ndarray, y: np.ndarray, *, shuffle: bool, drop_last: bool):
    x = np.ascontiguousarray(x.transpose(0, 3, 1, 2), np.float32)  # NHWC -> NCHW
    try:
        import torch
        from torch.utils.data import DataLoader, TensorDataset
    except ImportError:  # the harness's tests run stub scripts without torch
        return _NumpyLoader(x, y.astype(np.int64), shuffle, drop_last)
    return DataLoader(TensorDataset(torch.from_numpy(x), torch.from_numpy(y.astype(np.int64))),
                      batch_size=BATCH_SIZE, shuffle=shuffle, drop_last=drop_last)


class _NumpyLoader:
    """A DataLoader's interface over NumPy arrays: ``len``, ``dataset`` and batches."""

    def __init__(self, x, y, shuffle: bool, drop_last: bool):
        self.x, self.y, self.shuffle, self.drop_last = x, y, shuffle, drop_last
        self.dataset = y  # what LightCL.py takes len() of

    def __len__(self):
        if self.drop_last:
            return len(self.y) // BATCH_SIZE
        return -(-len(self.y) // BATCH_SIZE)

    def __iter__(self):
        order = np.random.permutation(len(self.y)) if self.shuffle else np.arange(len(self.y))
        stop = len(self) * BATCH_SIZE if self.drop_last else len(order)
        for start in range(0, stop, BATCH_SIZE):
            index = order[start:start + BATCH_SIZE]
            yield self.x[index], self.y[index]

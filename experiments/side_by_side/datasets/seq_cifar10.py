"""`SequentialCIFAR10` as LightCL.py uses it, serving the tasks of an exported stream.

LightCL.py calls ``SequentialCIFAR10(None).get_data_loaders()`` once per task
and reads ``(train_loader, test_loader)``: here the next task of the stream
in the ``.npz`` file that ``$LIGHTCL_STREAM`` names (written by
`experiments.vs_reference.export_stream`). As the authors' loaders: batches
of 32, the training ones shuffled (torch's generator, which the script
seeds), the last smaller batch kept; images NCHW float32, labels the global
class ids. The images are served as they were exported (normalised, not
augmented).
"""

import os

import numpy as np

STREAM_ENV = "LIGHTCL_STREAM"
BATCH_SIZE = 32


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
        return (_loader(part["x_train"], part["y_train"], shuffle=True),
                _loader(part["x_eval"], part["y_eval"], shuffle=False))


def _loader(x: np.ndarray, y: np.ndarray, *, shuffle: bool):
    x = np.ascontiguousarray(x.transpose(0, 3, 1, 2), np.float32)  # NHWC -> NCHW
    try:
        import torch
        from torch.utils.data import DataLoader, TensorDataset
    except ImportError:  # the harness's tests run stub scripts without torch
        return _NumpyLoader(x, y.astype(np.int64), shuffle)
    return DataLoader(TensorDataset(torch.from_numpy(x), torch.from_numpy(y.astype(np.int64))),
                      batch_size=BATCH_SIZE, shuffle=shuffle)


class _NumpyLoader:
    """A DataLoader's interface over NumPy arrays: ``len``, ``dataset`` and batches."""

    def __init__(self, x, y, shuffle: bool):
        self.x, self.y, self.shuffle = x, y, shuffle
        self.dataset = y  # what LightCL.py takes len() of

    def __len__(self):
        return -(-len(self.y) // BATCH_SIZE)

    def __iter__(self):
        order = np.random.permutation(len(self.y)) if self.shuffle else np.arange(len(self.y))
        for start in range(0, len(order), BATCH_SIZE):
            index = order[start:start + BATCH_SIZE]
            yield self.x[index], self.y[index]

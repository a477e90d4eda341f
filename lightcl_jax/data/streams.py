"""Class-incremental task streams: disjoint class groups, one after another.

`make_stream(name, ...)` is the one entry point. It returns a `TaskStream`
whose `tasks` each hold training and evaluation images (normalised, NHWC
float32), their labels, and the contiguous class range of the task. The
digits' images are NumPy arrays; a TFDS dataset's are `RecordImages`, read
from its ``data_source`` batch by batch (only labels and record indices are
held in memory).

Sources:
  * ``digits`` -- scikit-learn's bundled handwritten digits (1,797 real 8x8
    grey images, 10 classes), 5 tasks x 2 classes. No download, runs anywhere.
    It has no test split: evaluation always uses the held-out 10%.
  * ``digits32`` -- the same digits at the input size of the paper's CIFAR
    backbone: the normalised ``digits`` images (the training part's mean and
    standard deviation), each pixel repeated 4 x 4 (nearest-neighbour, 32x32)
    and the grey channel 3 times. The reference's own script runs on it
    unchanged (`benchmarks.vs_reference`).
  * ``cifar10`` -- TFDS ``cifar10`` through `tfds.data_source` (no TensorFlow
    needed), 5 tasks x 2 classes.
  * ``cifar100`` -- TFDS ``cifar100`` fine labels, ``num_tasks`` tasks
    (default 10 x 10 classes).
  * ``tinyimagenet`` -- Split TinyImageNet: 200 classes at 64x64, 10 tasks x
    20 classes, from a local copy of the standard ``tiny-imagenet-200``
    folder (``data_dir``), turned into a TFDS dataset on first use
    (`lightcl_jax.data.tiny_imagenet`). Its labelled ``val/`` images are the
    ``test`` split.

Evaluation split (``eval_split``):
  * ``holdout`` -- the reference's protocol: a fixed permutation of the
    training split (NumPy, seed 0, the same for every run seed; the reference
    ships its own torch permutation, which we do not have), its first
    int(0.1 x N) samples held out for evaluation and never trained on.
  * ``test`` -- the dataset's official test split; training uses all of train.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os

import numpy as np

from lightcl_jax.data.sources import RecordImages, read_labels, skip_image_decoding, take

HOLDOUT_FRACTION = 0.1
_SPLIT_SEED = 0

# Per-channel normalisation constants (SPEC section 2).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2615)
# SPEC section 2.
TINYIMAGENET_MEAN = (0.4802, 0.4480, 0.3975)
TINYIMAGENET_STD = (0.2770, 0.2691, 0.2821)
# The CIFAR-100 training set's statistics, as commonly used.
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)


@dataclasses.dataclass(frozen=True)
class Task:
    """One task of a stream.

    Attributes:
      index: position of the task in the stream, from 0.
      classes: the task's global class ids, a contiguous range.
      x_train: (N, H, W, C) float32, normalised: an array, or `RecordImages`
        that read them from a TFDS source when indexed.
      y_train: (N,) int32, global class ids.
      x_eval: (M, H, W, C) float32, normalised (array or `RecordImages`).
      y_eval: (M,) int32, global class ids.
    """

    index: int
    classes: tuple[int, ...]
    x_train: np.ndarray
    y_train: np.ndarray
    x_eval: np.ndarray
    y_eval: np.ndarray

    @property
    def class_offset(self) -> int:
        return self.classes[0]


@dataclasses.dataclass(frozen=True)
class TaskStream:
    """A sequence of tasks over disjoint, equally sized class groups.

    Attributes:
      name: dataset name as `make_stream` takes it.
      num_classes: classes over all tasks (the head's width).
      image_shape: (H, W, C) of every image.
      tasks: the tasks in order.
      eval_split: ``"holdout"`` or ``"test"``: what the evaluation arrays are.
      augment: whether training batches get random crop + flip by default.
      pad_value: (C,) the normalised value of a black pixel, what random-crop
        padding fills with (the reference pads before normalising).
    """

    name: str
    num_classes: int
    image_shape: tuple[int, int, int]
    tasks: tuple[Task, ...]
    eval_split: str
    augment: bool
    pad_value: tuple[float, ...] = ()

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    @property
    def classes_per_task(self) -> int:
        return len(self.tasks[0].classes)

    def __iter__(self):
        return iter(self.tasks)

    def __len__(self):
        return len(self.tasks)


DATASETS = ("digits", "digits32", "cifar10", "cifar100", "tinyimagenet")
EVAL_SPLITS = ("holdout", "test")
_DEFAULT_NUM_TASKS = {"digits": 5, "digits32": 5, "cifar10": 5, "cifar100": 10,
                      "tinyimagenet": 10}
# Each dataset's image shape and number of classes, known without loading it (for planning).
DATASET_SHAPES = {"digits": ((8, 8, 1), 10), "digits32": ((32, 32, 3), 10),
                  "cifar10": ((32, 32, 3), 10), "cifar100": ((32, 32, 3), 100),
                  "tinyimagenet": ((64, 64, 3), 200)}
# digits32: each digits pixel becomes a 4 x 4 block, the grey channel three channels.
DIGITS32_SCALE, DIGITS32_CHANNELS = 4, 3


def make_stream(name: str, *, data_dir: str | None = None, num_tasks: int | None = None,
                eval_split: str = "holdout") -> TaskStream:
    """Builds the task stream of a dataset.

    Args:
      name: one of `DATASETS`.
      data_dir: TFDS data directory holding the prepared dataset (TFDS sources
        only; ``None`` uses TFDS's default location); for ``tinyimagenet``, the
        Tiny ImageNet folder (required).
      num_tasks: how many tasks to split the classes into; must divide the
        number of classes. Default: 5 for digits and cifar10, 10 for cifar100
        and tinyimagenet.
      eval_split: one of `EVAL_SPLITS`.

    Raises:
      ValueError: unknown name or split, a bad ``num_tasks``, missing data.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    if eval_split not in EVAL_SPLITS:
        raise ValueError(f"unknown eval split {eval_split!r}; known: {', '.join(EVAL_SPLITS)}")
    num_tasks = _DEFAULT_NUM_TASKS[name] if num_tasks is None else num_tasks
    if name in ("digits", "digits32"):
        if eval_split != "holdout":
            raise ValueError(f"dataset {name!r} has no test split; use eval split 'holdout'")
        if data_dir is not None:
            raise ValueError(f"dataset {name!r} is bundled with scikit-learn and takes no data_dir")
        x, y, num_classes = _load_digits()
        (x_train, y_train), (x_eval, y_eval) = _holdout(x, y)
        # Statistics of its own training part (a fixed split, so fixed numbers).
        mean, std = x_train.mean(axis=(0, 1, 2)), x_train.std(axis=(0, 1, 2))
        x_train = ((x_train - mean) / std).astype(np.float32)
        x_eval = ((x_eval - mean) / std).astype(np.float32)
        if name == "digits32":  # the normalised 8x8 pixels, each a 4x4 block of 3 channels
            x_train, x_eval = _upscale(x_train), _upscale(x_eval)
            mean, std = (np.repeat(v, DIGITS32_CHANNELS) for v in (mean, std))
        augment = False
    else:
        mean, std = _NORMALISATION[name]
        mean, std = np.array(mean, np.float32), np.array(std, np.float32)
        # Images stay in the TFDS source and are read (and normalised) batch by batch.
        (x_train, y_train), (x_eval, y_eval), num_classes = _load_tfds(
            name, data_dir, eval_split, mean, std)
        augment = True
    return split_into_tasks(name, x_train, y_train, x_eval, y_eval, num_classes, num_tasks,
                            eval_split=eval_split, augment=augment,
                            pad_value=tuple(float(v) for v in np.ravel(-mean / std)))


def split_into_tasks(name: str, x_train, y_train, x_eval, y_eval, num_classes: int,
                     num_tasks: int, *, eval_split: str = "holdout",
                     augment: bool = False, pad_value: tuple[float, ...] | None = None
                     ) -> TaskStream:
    """Splits labelled arrays into tasks of consecutive class groups.

    Task t holds classes [t*C, (t+1)*C) with C = num_classes // num_tasks.
    ``pad_value`` (per channel) is what crop padding fills with; default 0.

    Raises:
      ValueError: ``num_tasks`` does not divide ``num_classes``, labels outside
        [0, num_classes), mismatched shapes, or a task without samples.
    """
    if not isinstance(num_tasks, (int, np.integer)) or num_tasks < 1 or num_classes % num_tasks:
        raise ValueError(f"num_tasks={num_tasks!r} must be a positive divisor of the "
                         f"{num_classes} classes of {name!r}")
    for split, x, y in (("train", x_train, y_train), ("eval", x_eval, y_eval)):
        if x.ndim != 4 or y.shape != (x.shape[0],):
            raise ValueError(f"{name} {split} images must be (N, H, W, C) with (N,) labels; "
                             f"got {x.shape} and {y.shape}")
        if y.size and (y.min() < 0 or y.max() >= num_classes):
            raise ValueError(f"{name} {split} labels must lie in [0, {num_classes}); "
                             f"got [{y.min()}, {y.max()}]")
        if isinstance(x, np.ndarray) and not np.all(np.isfinite(x)):
            raise ValueError(f"{name} {split} images contain NaN or Inf pixels")
    if tuple(x_train.shape[1:]) != tuple(x_eval.shape[1:]):
        raise ValueError(f"{name}: train images {x_train.shape[1:]} and eval images "
                         f"{x_eval.shape[1:]} differ in shape")
    per_task = num_classes // num_tasks
    tasks = []
    for t in range(num_tasks):
        classes = tuple(range(t * per_task, (t + 1) * per_task))
        train_idx = np.flatnonzero((y_train >= classes[0]) & (y_train <= classes[-1]))
        eval_idx = np.flatnonzero((y_eval >= classes[0]) & (y_eval <= classes[-1]))
        if train_idx.size == 0 or eval_idx.size == 0:
            raise ValueError(f"{name}: task {t} (classes {classes[0]}..{classes[-1]}) has "
                             f"{train_idx.size} training and {eval_idx.size} evaluation samples; "
                             "every task needs both")
        tasks.append(Task(t, classes, take(x_train, train_idx), y_train[train_idx].astype(np.int32),
                          take(x_eval, eval_idx), y_eval[eval_idx].astype(np.int32)))
    if pad_value is None:
        pad_value = (0.0,) * x_train.shape[-1]
    if len(pad_value) != x_train.shape[-1]:
        raise ValueError(f"{name}: pad_value has {len(pad_value)} entries for "
                         f"{x_train.shape[-1]} channels")
    return TaskStream(name, num_classes, tuple(x_train.shape[1:]), tuple(tasks), eval_split,
                      augment, tuple(pad_value))


def _load_digits():
    """scikit-learn's bundled digits: its ``datasets/data/digits.csv.gz``, read as
    ``sklearn.datasets.load_digits`` reads it (64 pixels and the label per row), without
    importing scikit-learn, whose import (SciPy with it) added 70 MB to a run's peak
    resident memory. A test compares it with ``load_digits``."""
    spec = importlib.util.find_spec("sklearn")
    path = None if spec is None else os.path.join(spec.submodule_search_locations[0],
                                                 "datasets", "data", "digits.csv.gz")
    if path is None or not os.path.isfile(path):
        raise ValueError("the digits datasets are scikit-learn's bundled digits, and no "
                         "scikit-learn with its data is installed: pip install scikit-learn")
    data = np.loadtxt(path, delimiter=",", dtype=np.float64)
    images = data[:, :-1].reshape(-1, 8, 8)
    x = (images.astype(np.float32) / 16.0)[..., None]  # (1797, 8, 8, 1) in [0, 1]
    return x, data[:, -1].astype(np.int32), 10


def _upscale(x: np.ndarray) -> np.ndarray:
    """digits32's images: every pixel a DIGITS32_SCALE-square block, on DIGITS32_CHANNELS."""
    x = np.repeat(np.repeat(x, DIGITS32_SCALE, axis=1), DIGITS32_SCALE, axis=2)
    return np.repeat(x, DIGITS32_CHANNELS, axis=3)


def _holdout(x, y):
    """The reference's evaluation split: the first int(10% x N) of a fixed permutation."""
    perm = np.random.default_rng(_SPLIT_SEED).permutation(len(y))
    num_eval = int(HOLDOUT_FRACTION * len(y))
    held, train = perm[:num_eval], perm[num_eval:]
    return (take(x, train), y[train]), (take(x, held), y[held])


_NORMALISATION = {"cifar10": (CIFAR10_MEAN, CIFAR10_STD), "cifar100": (CIFAR100_MEAN, CIFAR100_STD),
                  "tinyimagenet": (TINYIMAGENET_MEAN, TINYIMAGENET_STD)}


def _load_tfds(name, data_dir, eval_split, mean, std):
    """Train and evaluation (`RecordImages`, labels) of a TFDS dataset, and its classes."""
    import tensorflow_datasets as tfds

    if name == "tinyimagenet":
        from lightcl_jax.data.tiny_imagenet import tiny_imagenet_builder
        if data_dir is None:
            raise ValueError("dataset 'tinyimagenet' needs --data-dir: the unpacked Tiny "
                             "ImageNet folder (tiny-imagenet-200/, with wnids.txt, train/ and "
                             "val/)")
        builder = tiny_imagenet_builder(data_dir)
        num_classes = builder.info.features["label"].num_classes

        def split_of(split):
            return _record_split(builder.as_data_source(split=split), name, split, mean, std,
                                 builder.as_data_source(split=split,
                                                        decoders=skip_image_decoding()))
        train = split_of("train")
        if eval_split == "holdout":
            return (*_holdout(*train), num_classes)
        return train, split_of("test"), num_classes
    if data_dir is not None and (not os.path.isdir(data_dir) or not os.listdir(data_dir)):
        raise ValueError(f"data_dir {data_dir!r} is missing or empty; it must hold the "
                         f"prepared TFDS dataset {name!r} (e.g. `tfds build {name} "
                         f"--file_format=array_record --data_dir {data_dir}` on a machine "
                         "with network)")
    if data_dir is not None:
        problem = data_dir_problem(name, data_dir)
        if problem:
            raise ValueError(problem)

    def open_split(split, **kwargs):
        return tfds.data_source(name, split=split, data_dir=data_dir, download=False, **kwargs)

    try:
        train_source = open_split("train")
        test_source = open_split("test") if eval_split == "test" else None
    except Exception as err:  # TFDS raises several types for "not prepared".
        where = data_dir or "TFDS's default data_dir"
        raise ValueError(f"dataset {name!r} is not available in {where}: {err}. Prepare it "
                         f"with `tfds build {name} --file_format=array_record` and pass "
                         "--data-dir") from err
    num_classes = {"cifar10": 10, "cifar100": 100}[name]
    train = _record_split(train_source, name, "train", mean, std,
                          open_split("train", decoders=skip_image_decoding()))
    if test_source is None:
        return (*_holdout(*train), num_classes)
    return train, _record_split(test_source, name, "test", mean, std,
                                open_split("test", decoders=skip_image_decoding())), num_classes


def _prepared_versions(folder: str) -> list[str]:
    """The versions prepared under a dataset's folder (``<version>/dataset_info.json``,
    or one level deeper for a dataset with configs), as ``config/version`` there."""
    found = []
    for entry in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        path = os.path.join(folder, entry)
        if os.path.isfile(os.path.join(path, "dataset_info.json")):
            found.append(entry)
        elif os.path.isdir(path):
            found += [f"{entry}/{v}" for v in _prepared_versions(path) if "/" not in v]
    return found


def data_dir_problem(name: str, data_dir: str) -> str | None:
    """What keeps TFDS dataset ``name`` from being read from ``data_dir``, in words, when
    the folder shows it: another version prepared, another dataset, a version folder
    given instead of the data_dir. None when ``name``'s version is there (or nothing is
    known; TFDS then says what it finds)."""
    import tensorflow_datasets as tfds

    version = str(tfds.builder_cls(name).VERSION)
    versions = _prepared_versions(os.path.join(data_dir, name))
    if version in versions:
        return None
    rebuild = (f"prepare it with this TFDS (`tfds build {name} --file_format=array_record "
               f"--data_dir {data_dir}`)")
    if versions:
        return (f"data_dir {data_dir!r} holds {name} version {', '.join(versions)}, not "
                f"{version}, the version tensorflow-datasets {tfds.__version__} reads; "
                f"{rebuild}, or install the tensorflow-datasets that prepared it")
    if os.path.isfile(os.path.join(data_dir, "dataset_info.json")):
        return (f"data_dir {data_dir!r} is one prepared version's folder (it holds "
                "dataset_info.json); pass the folder above the dataset's name, the one "
                f"holding {name}/{version}/")
    others = [d for d in sorted(os.listdir(data_dir))
              if _prepared_versions(os.path.join(data_dir, d))]
    if others:
        return (f"data_dir {data_dir!r} holds no prepared {name!r} (it holds "
                f"{', '.join(others)}); {rebuild}, or pass the data_dir that holds it")
    return None


def _record_split(source, name, split, mean, std, label_source=None):
    """(`RecordImages` of every record, labels) of one split.

    Labels are read from ``label_source`` (the same split, images left
    encoded) when given, else from ``source``.
    """
    labels = read_labels(source, undecoded=label_source)
    shape = np.shape(source[0]["image"])
    version = getattr(getattr(source, "dataset_info", None), "version", "unknown")
    images = RecordImages(source, np.arange(len(labels)), mean, std, shape,
                          f"{name}:{version}/{split}")
    return images, labels


def validate_stream(stream: TaskStream, batch_size: int) -> None:
    """Raises ValueError naming the first problem of a stream, built here or by hand.

    Checked: every task has training and evaluation samples, at least one
    training batch of ``batch_size`` of them; images have the stream's shape
    and finite pixels; labels lie in their task's classes; tasks' class groups
    are disjoint and within the head's ``num_classes``.
    """
    seen: dict[int, int] = {}
    for task in stream.tasks:
        where = f"task {task.index}"
        if task.classes:
            where += f" (classes {task.classes[0]}..{task.classes[-1]})"
        if not task.classes:
            raise ValueError(f"{where} has no classes; every task needs at least one")
        for c in task.classes:
            if not 0 <= c < stream.num_classes:
                raise ValueError(f"{where}: class {c} lies outside the head's "
                                 f"{stream.num_classes} classes [0, {stream.num_classes})")
            if c in seen:
                raise ValueError(f"{where}: class {c} also belongs to task {seen[c]}; class "
                                 "groups must not overlap")
            seen[c] = task.index
        for split, x, y in (("training", task.x_train, task.y_train),
                            ("evaluation", task.x_eval, task.y_eval)):
            _validate_split(where, split, x, y, task.classes, stream.image_shape)
        if len(task.x_train) < batch_size:
            raise ValueError(f"task {task.index} has {len(task.x_train)} training samples, fewer "
                             f"than one batch of {batch_size}; lower --batch-size")


def _validate_split(where: str, split: str, x, y, classes, image_shape) -> None:
    if len(y) == 0:
        raise ValueError(f"{where} has no {split} samples; every task needs both")
    if tuple(x.shape[1:]) != tuple(image_shape) or len(x) != len(y):
        expected = ", ".join(map(str, image_shape))
        raise ValueError(f"{where}: {split} images are {tuple(x.shape)} with "
                         f"{len(y)} labels; expected (N, {expected}) with N labels")
    if isinstance(x, np.ndarray) and not np.all(np.isfinite(x)):
        # (`RecordImages` are decoded uint8 pixels: finite.)
        raise ValueError(f"{where}: {split} images contain NaN or Inf pixels")
    outside = ~np.isin(y, classes)
    if outside.any():
        raise ValueError(f"{where}: {split} label {int(y[outside][0])} is not one of "
                         f"the task's classes {list(classes)}")

"""Batching and augmentation in NumPy, deterministic from a seed; prefetching.

Every batch has exactly ``batch_size`` samples (the remainder of an epoch is
dropped), so a jitted step sees one shape and compiles once -- unless the
remainder is kept as a smaller last batch, as PyTorch's DataLoader does
(``keep_remainder``; a second shape). The images may
be an array or a `lightcl_jax.data.sources.RecordImages` (read when indexed).
`prefetch` moves reading, augmentation and the transfer to the device into
a background thread, a few batches ahead of the train step.
"""

from __future__ import annotations

import queue
import threading
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np


def augment_batch(x: np.ndarray, rng: np.random.Generator, padding: int = 4,
                  fill: Sequence[float] | None = None) -> np.ndarray:
    """Random crop with ``padding`` pixels on each side, then a random horizontal flip.

    Args:
      x: (N, H, W, C) images.
      rng: the generator that draws the crop offsets and flips (`draw_augmentation`).
      padding: padding before cropping back to (H, W).
      fill: (C,) value of the padding per channel; None pads with 0. For
        normalised images pass the normalised black pixel (the stream's
        ``pad_value``), since the reference pads before normalising.

    Returns:
      (N, H, W, C) augmented images, a new array.
    """
    return apply_augmentation(x, draw_augmentation(len(x), rng, padding), padding, fill)


def draw_augmentation(n: int, rng: np.random.Generator, padding: int = 4
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``n`` samples' crop offsets (dy, dx in [0, 2 * padding]) and flips, drawn from ``rng``."""
    dy = rng.integers(0, 2 * padding + 1, size=n)
    dx = rng.integers(0, 2 * padding + 1, size=n)
    return dy, dx, rng.random(n) < 0.5


def apply_augmentation(x: np.ndarray, draws: tuple[np.ndarray, np.ndarray, np.ndarray],
                       padding: int = 4, fill: Sequence[float] | None = None) -> np.ndarray:
    """`augment_batch` with the crops and flips ``draws`` (`draw_augmentation`) of ``x``."""
    n, h, w, _ = x.shape
    dy, dx, flip = draws
    padded = np.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    if fill is not None:
        border = np.ones((h + 2 * padding, w + 2 * padding), bool)
        border[padding:padding + h, padding:padding + w] = False
        padded[:, border] = np.asarray(fill, x.dtype)
    rows = dy[:, None] + np.arange(h)[None, :]                  # (N, H)
    cols = dx[:, None] + np.arange(w)[None, :]                  # (N, W)
    cols = np.where(flip[:, None], cols[:, ::-1], cols)
    return padded[np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]


def part_of(size: int, part: tuple[int, int]) -> slice:
    """The contiguous slice of ``size`` samples that part ``part = (index, count)`` holds.

    Raises:
      ValueError: ``size`` does not split into ``count`` equal parts.
    """
    index, count = part
    if size % count:
        raise ValueError(f"a batch of {size} does not split over {count} processes")
    return slice(index * (size // count), (index + 1) * (size // count))


def epoch_batches(x: np.ndarray, y: np.ndarray, batch_size: int, rng: np.random.Generator,
                  *, augment: bool, fill: Sequence[float] | None = None,
                  keep_remainder: bool = False, part: tuple[int, int] = (0, 1)
                  ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yields shuffled full batches of one epoch; the remainder is dropped, or with
    ``keep_remainder`` yielded last as a smaller batch.

    With ``augment``, each batch gets `augment_batch` with ``fill`` padding.
    ``part = (index, count)``: only that contiguous part of every batch is read
    and augmented (one process's share of a multi-process run); the draws are
    those of the whole batch, so every part comes from the same order and
    augmentation and the generator ends where the whole batches leave it.

    Raises:
      ValueError: fewer samples than one batch, or a batch that does not
        split into ``count`` parts.
    """
    if len(x) < batch_size:
        raise ValueError(f"a task has {len(x)} training samples, fewer than one batch of "
                         f"{batch_size}; lower --batch-size")
    perm = rng.permutation(len(x))
    for start in range(0, steps_per_epoch(len(x), batch_size, keep_remainder) * batch_size,
                       batch_size):
        idx = perm[start:start + batch_size]
        mine = part_of(len(idx), part)
        draws = draw_augmentation(len(idx), rng) if augment else None
        xb = x[idx[mine]]
        if augment:
            xb = apply_augmentation(xb, tuple(d[mine] for d in draws), fill=fill)
        yield xb, y[idx[mine]]


def steps_per_epoch(num_samples: int, batch_size: int, keep_remainder: bool = False) -> int:
    if keep_remainder:
        return -(-num_samples // batch_size)
    return num_samples // batch_size


def eval_batches(x: np.ndarray, y: np.ndarray, batch_size: int, part: tuple[int, int] = (0, 1)):
    """Yields ``(x, y, valid)`` batches of fixed size; the last is zero-padded.

    ``valid`` is a (batch_size,) bool mask of the real samples. ``part = (index,
    count)``: only that contiguous part of every batch (see `epoch_batches`).
    """
    mine = part_of(batch_size, part)
    for start in range(0, len(x), batch_size):
        lo, hi = start + mine.start, min(start + mine.stop, len(x))
        xb, yb = x[lo:hi], y[lo:hi]
        valid = np.zeros(mine.stop - mine.start, bool)
        valid[:len(xb)] = True
        if len(xb) < len(valid):
            pad = len(valid) - len(xb)
            xb = np.concatenate([xb, np.zeros((pad, *x.shape[1:]), x.dtype)])
            yb = np.concatenate([yb, np.zeros((pad,), y.dtype)])
        yield xb, yb, valid


def prefetch(batches: Iterable, size: int = 2, transform: Callable[[Any], Any] | None = None
             ) -> Iterator:
    """Yields ``transform(batch)`` for each batch, computed in a background thread.

    The thread runs at most ``size`` batches ahead, so while the device trains
    on one batch the next ones are read, augmented and (with a ``transform``
    such as `DataParallel.batch`) already on their way to the device. The
    order, and every random draw of ``batches``, is that of iterating it
    directly -- provided nothing else draws from its generator until this
    iterator is exhausted or closed. An exception in the thread is raised
    here, at the batch it happened on. Closing (or dropping) this iterator
    stops the thread.

    Raises:
      ValueError: ``size`` < 1.
    """
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"prefetch size must be an integer >= 1; got {size!r}")
    ready: queue.Queue = queue.Queue(maxsize=size)
    stop = threading.Event()

    def put(entry) -> bool:
        while not stop.is_set():
            try:
                ready.put(entry, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def produce():
        try:
            for batch in batches:
                if not put(("batch", transform(batch) if transform is not None else batch)):
                    return
            put(("end", None))
        except BaseException as err:  # handed to the consumer, raised there
            put(("error", err))

    thread = threading.Thread(target=produce, name="lightcl-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            kind, value = ready.get()
            if kind == "end":
                return
            if kind == "error":
                raise value
            yield value
    finally:
        stop.set()
        thread.join()

"""Images read from a TFDS random-access source when indexed, not held in memory.

`RecordImages` stands where a task's (N, H, W, C) float32 image array
stands: it has ``len``, ``shape``, ``dtype`` and ``ndim``, and indexing it
with an int, a slice or an integer array reads those records from the
``tfds.data_source`` (decoding them) and returns them normalised, as the
in-memory array would hold them. Only the record indices and the labels stay
in memory, so a stream of any size costs its batches, not its dataset.

`lightcl_jax.data.pipeline.prefetch` reads, augments and transfers the next
batches in a background thread while the device trains on the current one.
"""

from __future__ import annotations

import hashlib
from typing import Any, Sequence

import numpy as np


class RecordImages:
    """Normalised float32 images of some records of a random-access source.

    Args:
      source: a ``tfds.data_source`` split (``source[i]["image"]`` is a
        uint8 (H, W, C) array), or any sequence of such examples.
      indices: (N,) the records this holds, in order.
      mean, std: (C,) per-channel normalisation of images scaled to [0, 1].
      image_shape: (H, W, C) of every image.
      name: what the source is (dataset, version, split): part of `fingerprint`.
    """

    dtype = np.dtype(np.float32)
    ndim = 4

    def __init__(self, source: Any, indices: np.ndarray, mean: np.ndarray, std: np.ndarray,
                 image_shape: Sequence[int], name: str):
        self.source, self.name = source, name
        self.indices = np.asarray(indices, np.int64)
        self.mean = np.asarray(mean, np.float32)
        self.std = np.asarray(std, np.float32)
        self.shape = (len(self.indices), *tuple(image_shape))

    def __len__(self) -> int:
        return len(self.indices)

    def __repr__(self) -> str:
        return f"RecordImages({self.name}, {len(self)} records, shape {self.shape})"

    def subset(self, positions: np.ndarray) -> "RecordImages":
        """The images at ``positions`` of this one, still unread."""
        return RecordImages(self.source, self.indices[positions], self.mean, self.std,
                            self.shape[1:], self.name)

    def __getitem__(self, key) -> np.ndarray:
        """Reads and normalises the images at ``key`` (int, slice or int array)."""
        if isinstance(key, (int, np.integer)):
            return self._read(self.indices[[key]])[0]
        return self._read(self.indices[key])

    def __array__(self, dtype=None, copy=None):
        array = self[:]
        return array if dtype is None else array.astype(dtype)

    def _read(self, records: np.ndarray) -> np.ndarray:
        out = np.empty((len(records), *self.shape[1:]), np.uint8)
        for i, record in enumerate(records):
            image = np.asarray(self.source[int(record)]["image"])
            if image.shape != self.shape[1:]:
                raise ValueError(f"{self.name} record {int(record)} is a {image.shape} image; "
                                 f"every image must be {self.shape[1:]}")
            out[i] = image
        return (out.astype(np.float32) / 255.0 - self.mean) / self.std

    def fingerprint(self) -> bytes:
        """What identifies these images without reading them: source name, records,
        normalisation."""
        digest = hashlib.blake2b(digest_size=16)
        digest.update(repr((self.name, self.shape, self.mean.tolist(),
                            self.std.tolist())).encode())
        digest.update(memoryview(np.ascontiguousarray(self.indices)).cast("B"))
        return digest.digest()


def update_digest(digest, images) -> None:
    """Adds ``images`` to a hashlib digest: `RecordImages` by their fingerprint (unread), an
    array by dtype, shape and bytes."""
    if isinstance(images, RecordImages):
        digest.update(images.fingerprint())
        return
    array = np.ascontiguousarray(images)
    digest.update(repr((array.dtype.str, array.shape)).encode())
    digest.update(memoryview(array).cast("B"))


def take(images, positions: np.ndarray):
    """``images[positions]``: a float32 array, or a `RecordImages` still unread."""
    if isinstance(images, RecordImages):
        return images.subset(positions)
    return np.ascontiguousarray(images[positions], np.float32)


def concatenate(parts: Sequence) -> Any:
    """Concatenated images: still unread when every part is a `RecordImages` of one source."""
    if all(isinstance(p, RecordImages) for p in parts) and len({id(p.source) for p in parts}) == 1:
        first = parts[0]
        return RecordImages(first.source, np.concatenate([p.indices for p in parts]),
                            first.mean, first.std, first.shape[1:], first.name)
    return np.concatenate([np.asarray(p) for p in parts])


def read_labels(source: Any, count: int | None = None, *, undecoded: Any = None) -> np.ndarray:
    """(N,) int32 labels of the first ``count`` records of a source (None: all of them).

    ``undecoded``: the same split opened with `skip_image_decoding()`'s
    decoders; labels are read from it when it can be read, so no image is
    decoded. (TFDS's mock data hands out undecoded images by encoding them
    with TensorFlow; without TensorFlow the labels come from ``source``.)

    Raises:
      ValueError: the source is empty.
    """
    if len(source) == 0:
        raise ValueError("the TFDS split is empty")
    if undecoded is not None:
        try:
            undecoded[0]
            source = undecoded
        except ImportError:
            pass
    count = len(source) if count is None else min(count, len(source))
    return np.fromiter((int(source[i]["label"]) for i in range(count)), np.int32, count=count)


def skip_image_decoding() -> dict:
    """TFDS ``decoders`` that leave ``image`` encoded: for sources read only for labels."""
    import tensorflow_datasets as tfds
    return {"image": tfds.decode.SkipDecoding()}

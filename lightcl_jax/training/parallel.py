"""Data-parallel training with jax.sharding: one mesh axis, the batch split along it.

The train and eval steps are the same jitted functions on one device or many:
`DataParallel` gives them shardings -- params, BatchNorm statistics,
optimizer state and the strategy's memory replicated on every device, each
batch split along its first axis -- and XLA inserts the cross-device sums
(of gradients, of BatchNorm's batch statistics, of correct predictions). The
numbers are those of one device up to the order of floating-point sums.

Several processes (``jax.distributed.initialize``, see BUILD.md): every
process draws the same global batch order and augmentation from the same
seed, reads only its own contiguous part of each batch (`DataParallel.part`)
and hands it in (`DataParallel.batch`);
``jax.make_array_from_process_local_data`` assembles the global array.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


@dataclasses.dataclass(frozen=True)
class DataParallel:
    """Shardings of a data-parallel run over ``mesh``'s ``data`` axis."""

    mesh: Mesh

    @property
    def num_devices(self) -> int:
        return self.mesh.devices.size

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec())

    @property
    def split(self) -> NamedSharding:
        """Split along the first axis: a batch."""
        return self.split_along(0)

    def split_along(self, axis: int) -> NamedSharding:
        """Split along ``axis`` (1: the samples of seed-stacked batches)."""
        return NamedSharding(self.mesh, PartitionSpec(*(None,) * axis, DATA_AXIS))

    def replicate(self, tree):
        """``tree``'s arrays on every device of the mesh."""
        return jax.device_put(tree, self.replicated)

    @property
    def part(self) -> tuple[int, int]:
        """(this process's index, the process count): which contiguous part of every
        batch this process reads (`lightcl_jax.data.pipeline.epoch_batches`)."""
        return jax.process_index(), jax.process_count()

    def batch(self, *arrays: np.ndarray, axis: int = 0):
        """Global batch arrays, split along ``axis`` (their samples) over the mesh, from
        this process's part of them (its `part`; the whole batch for one process)."""
        count, sharding = jax.process_count(), self.split_along(axis)
        out = []
        for local in arrays:
            shape = list(np.shape(local))
            shape[axis] *= count
            out.append(jax.make_array_from_process_local_data(sharding, local, tuple(shape)))
        return tuple(out)


def data_parallel(devices: int | None, batch_sizes: dict[str, int]) -> DataParallel:
    """A `DataParallel` over the first ``devices`` visible devices (None: all of them).

    Args:
      devices: how many devices to use, or None for every visible one.
      batch_sizes: {flag name: batch size}; each must split evenly over the devices.

    Raises:
      ValueError: ``devices`` is not in [1, visible devices] (every device when
        several processes share the run), or a batch size is not a multiple of it.
    """
    available = jax.devices()
    count = len(available) if devices is None else devices
    if not (isinstance(count, int) and not isinstance(count, bool)
            and 1 <= count <= len(available)):
        raise ValueError(f"devices must be an integer in [1, {len(available)}] (the visible "
                         f"{jax.default_backend()} devices); got {devices!r}")
    if jax.process_count() > 1 and count != len(available):
        raise ValueError(f"with {jax.process_count()} processes the batch is split over every "
                         f"process's devices: devices must be all {len(available)} (or not "
                         f"given); got {devices!r}")
    for name, size in batch_sizes.items():
        if size % count:
            raise ValueError(f"{name}={size} does not split over {count} devices; use a "
                             f"multiple of {count} or fewer devices")
    return DataParallel(Mesh(np.array(available[:count]), (DATA_AXIS,)))

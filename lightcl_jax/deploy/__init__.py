"""Training that leaves this process: a run's steps exported for a device.

`export_run` writes a run's train, task-boundary and evaluation functions
(serialized with `jax.export`) with the state they carry into a folder, with
`runner.py`, which goes on training new tasks there with JAX and NumPy alone.
BUILD.md ("On the device") says what the folder holds and how to run it.
"""

from lightcl_jax.deploy.export import (ARTIFACT_FORMAT, ARTIFACT_VERSION, ExportError,
                                       export_run, task_arrays)

__all__ = ["ARTIFACT_FORMAT", "ARTIFACT_VERSION", "ExportError", "export_run", "task_arrays"]

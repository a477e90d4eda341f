"""Several processes, one run: the flags and the start of JAX's distributed runtime.

``--coordinator HOST:PORT --num-processes N --process-id I`` (the same command
on every host, each with its own index) start ``jax.distributed.initialize``
before anything touches a device; without them, JAX reads a cluster's own
environment where it knows one (SLURM, Open MPI, Kubernetes with JobSet, ...)
when ``--distributed`` is given, and otherwise the run is one process. CPU
hosts exchange their collectives over gloo (set before the runtime starts;
GPU and TPU backends have their own). Every process then sees every
process's devices: the batch is split over all of them, each process reading
only its part of it (`lightcl_jax.training.placement.DataParallel`). When
another process dies, the next collective fails and `exit_lost_process` ends
this one with one line.

Imports JAX only inside `start`, so that a bad flag is refused before JAX loads.
"""

from __future__ import annotations

import argparse
import os
import sys

# Seconds without a heartbeat after which the coordinator declares a process dead and
# every other process stops with an error (JAX's default is 100).
HEARTBEAT_TIMEOUT_S = 30


def add_flags(p: argparse.ArgumentParser) -> None:
    """The multi-process flags (`experiments.run`, `experiments.pretrain`)."""
    p.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                   help="several processes: the address of process 0's coordinator (with "
                        "--num-processes and --process-id)")
    p.add_argument("--num-processes", type=int, default=None, metavar="N",
                   help="several processes: how many take part")
    p.add_argument("--process-id", type=int, default=None, metavar="I",
                   help="several processes: this one's index, 0 .. N-1 (0 writes the files)")
    p.add_argument("--distributed", action="store_true",
                   help="several processes, from the cluster's environment (SLURM, Open MPI, "
                        "...) as jax.distributed.initialize reads it")


def check_flags(args: argparse.Namespace) -> str | None:
    """What is wrong with the multi-process flags, in one line, or None."""
    given = [args.coordinator is not None, args.num_processes is not None,
             args.process_id is not None]
    if any(given) and not all(given):
        return ("--coordinator, --num-processes and --process-id go together (or none of "
                "them: one process, or --distributed for a cluster's environment)")
    if all(given):
        if args.distributed:
            return "--distributed reads the cluster's environment; give it or the three flags"
        host, _, port = args.coordinator.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            return f"--coordinator must be HOST:PORT; got {args.coordinator!r}"
        if args.num_processes < 1:
            return f"--num-processes must be >= 1; got {args.num_processes}"
        if not 0 <= args.process_id < args.num_processes:
            return (f"--process-id must lie in [0, {args.num_processes - 1}] "
                    f"(--num-processes {args.num_processes}); got {args.process_id}")
    return None


def start(args: argparse.Namespace) -> None:
    """Starts JAX's distributed runtime when the flags ask for several processes.

    Raises:
      ValueError: it did not start (no cluster environment with ``--distributed``, JAX
        already running in this process, the coordinator not reached in time).
    """
    if args.coordinator is None and not args.distributed:
        return
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id,
                                   heartbeat_timeout_seconds=HEARTBEAT_TIMEOUT_S)
    except (ValueError, RuntimeError) as err:  # no cluster found, JAX already started, ...
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"JAX's distributed runtime did not start: {first}") from err


def barrier(name: str) -> None:
    """Waits until every process of a multi-process run has come here (none: returns)."""
    import jax

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


def process_index() -> int:
    """This process's index in the run (0 when it is the only one)."""
    import jax

    return jax.process_index()


def is_writer() -> bool:
    """Whether this process writes the run's files and prints its progress (process 0)."""
    return process_index() == 0


def lost_process(err: BaseException) -> bool:
    """Whether ``err`` is a collective with the other processes of a multi-process run
    failing (gloo's "Connection closed by peer" when one of them died)."""
    import jax

    return jax.process_count() > 1 and isinstance(err, jax.errors.JaxRuntimeError)


def exit_lost_process(prog: str, err: BaseException, checkpoints: str) -> None:
    """Prints one line on ``err`` (`lost_process`) and ends this process at once, exit 1.

    A normal exit would wait at JAX's shutdown barrier for the dead process and
    abort once the coordinator notices its missing heartbeats; nothing is
    left to save (what the processes saved together is on disk).
    """
    import jax

    cause = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    print(f"{prog}: error: process {jax.process_index()} of {jax.process_count()} stopped: "
          f"a collective with the other processes failed, so one of them has most likely "
          f"died ({cause}); rerun every process with the same command to resume from the "
          f"last complete checkpoint in {checkpoints}", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)

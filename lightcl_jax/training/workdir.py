"""A run in a directory: one run per workdir, stopping at a signal, the files it writes.

`lock_workdir` takes an exclusive ``fcntl.flock`` on ``<workdir>/.lock``.
While the process that holds it lives, a second one is refused with a
`WorkdirInUse` naming it (its PID and command line, which the holder writes
into the file). The kernel drops the lock when its holder exits, however it
exits (SIGKILL, a crash, power loss: the file outlives it, the lock does
not), so a stale file never blocks the next run. In a run of several
processes (``jax.distributed``) each process locks its own file,
``.lock`` for process 0 and ``.lock.<index>`` for the others: a second
launch of any of them is refused, the run's own processes are not.

Inside `handle_signals`, either signal only sets a flag. The training loop
reads it (`requested`) after every step: it finishes that step, writes a
checkpoint (`lightcl_jax.training.epochs`), and raises `Preempted`, which
the command turns into one line and exit code 128 + the signal (143, 130).
Signals that arrive while it saves set the same flag again and interrupt
nothing, so they cannot leave half a checkpoint. Outside `handle_signals`
(the library called from a user's own program) nothing changes.

A run with a workdir (`lightcl_jax.training.loop.train_and_evaluate`) writes
``results.json`` (atomically: `write_json_atomic`), ``metrics.jsonl``,
``accuracy.png`` and ``checkpoints/`` there; `finished_results` reads a finished
run's results back and refuses another run's.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import sys
import tempfile
from typing import Iterator

from lightcl_jax.figures import accuracy_figure, save_figure

try:
    import fcntl
except ImportError:  # not a POSIX system: no lock, as before
    fcntl = None

LOCK_NAME = ".lock"


class WorkdirInUse(ValueError):
    """Another live process holds the workdir's lock."""


class WorkdirLock:
    """A held lock; `release` (or leaving its ``with`` block, or the process's exit)
    lets the next run in."""

    def __init__(self, path: str, fd: int | None):
        self.path, self._fd = path, fd

    def release(self, *, remove_empty_workdir: bool = False) -> None:
        """Drops the lock; with ``remove_empty_workdir``, also the workdir when it holds
        nothing but the lock file (a run refused before it wrote anything)."""
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None
        if remove_empty_workdir and os.listdir(os.path.dirname(self.path)) == [
                os.path.basename(self.path)]:
            os.unlink(self.path)
            os.rmdir(os.path.dirname(self.path))

    def __enter__(self) -> "WorkdirLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def __del__(self) -> None:
        self.release()


def lock_workdir(workdir: str, process_index: int = 0) -> WorkdirLock:
    """Creates ``workdir`` if needed and takes its lock (that of process ``process_index``
    of a multi-process run), without blocking.

    Raises:
      WorkdirInUse: another live process holds it; the message names that
        process and the workdir. ValueError: the directory cannot be made (a file on its
        path, no permission).
    """
    try:
        os.makedirs(workdir, exist_ok=True)
    except OSError as err:  # a file on the way, no permission, a full disk
        raise ValueError(f"--workdir {workdir} cannot be made ({err.strerror}: "
                         f"{err.filename}); choose another --workdir") from err
    name = LOCK_NAME if process_index == 0 else f"{LOCK_NAME}.{process_index}"
    path = os.path.join(workdir, name)
    if fcntl is None:
        return WorkdirLock(path, None)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise WorkdirInUse(f"--workdir {workdir} is in use by a run that is still alive "
                           f"({holder}); wait for it to finish, stop it, or choose another "
                           "--workdir") from None
    os.ftruncate(fd, 0)  # the holder's name, for the message of whoever comes next
    os.pwrite(fd, f"process {os.getpid()}: {' '.join(sys.argv)}".encode()[:4000], 0)
    return WorkdirLock(path, fd)


# Stopping at a signal.

SIGNALS = (signal.SIGTERM, signal.SIGINT)
_requested: list[int] = []   # the signals received inside `handle_signals`, in order


class Preempted(Exception):
    """A run stopped at a signal after its checkpoint; ``position`` is where it stands."""

    def __init__(self, signum: int, position):
        self.signum, self.position = signum, position
        super().__init__(self.describe())

    def describe(self, *, task: bool = True) -> str:
        """``stopped by SIGTERM at task T, step S`` (without ``task``: ``at step S``)."""
        where = f"task {self.position.task + 1}, " if task else ""  # tasks count from 1
        return (f"stopped by {signal.Signals(self.signum).name} at {where}"
                f"step {self.position.global_step}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def requested() -> int | None:
    """The first signal received inside `handle_signals` (None: none)."""
    return _requested[0] if _requested else None


def _note(signum, frame) -> None:
    _requested.append(signum)


@contextlib.contextmanager
def handle_signals() -> Iterator[None]:
    """SIGTERM and SIGINT only set `requested` inside; the previous handlers after."""
    previous = {s: signal.signal(s, _note) for s in SIGNALS}
    _requested.clear()
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        _requested.clear()


RESULTS = "results.json"
METRICS_LOG = "metrics.jsonl"
CHECKPOINTS = "checkpoints"
ACCURACY_FIGURE = "accuracy.png"


class ResultsWriteError(OSError):
    """results.json could not be written (a full disk, permissions); nothing half-written
    is left, and the run's checkpoints hold the finished run."""

    def __init__(self, path: str, err: OSError):
        super().__init__(err.errno, f"writing {path} failed ({err})")
        self.path = path


def write_json_atomic(path: str, payload: dict) -> None:
    """Writes JSON to a temporary file beside ``path`` and renames it over ``path``."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".results-", suffix=".json")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(payload, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def finished_results(workdir: str, identity: dict) -> dict | None:
    """The results in ``workdir`` when they are those of the run ``identity`` names;
    None when there are none.

    Raises:
      ValueError: the results file is unreadable or holds another run's results.
    """
    from lightcl_jax.training.run import identity_differences  # late: it loads JAX

    path = os.path.join(workdir, RESULTS)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            results = json.load(f)
        stored = results["identity"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        fix = ("delete it and rerun the same command to rebuild it from the run's checkpoints, "
               "pass --overwrite to train again," if os.path.isdir(os.path.join(
                   workdir, CHECKPOINTS)) else "pass --overwrite to replace it,")
        raise ValueError(f"{path} is not a readable results file of this version "
                         f"({type(err).__name__}: {err}); {fix} or choose another "
                         "--workdir") from err
    differences = identity_differences(stored, identity)
    if differences:
        raise ValueError(f"{path} holds another run's results ({differences}); pass "
                         "--overwrite to replace them, or choose another --workdir")
    return results


def write_results(workdir: str, results: dict) -> tuple[str, str]:
    """Writes ``results.json`` (atomically) and ``accuracy.png`` into ``workdir``; returns
    their paths.

    Raises:
      ResultsWriteError: the results file could not be written (nothing of it is left).
    """
    path = os.path.join(workdir, RESULTS)
    try:
        write_json_atomic(path, results)
    except OSError as err:
        raise ResultsWriteError(path, err) from err
    figure = save_figure(accuracy_figure(results), os.path.join(workdir, ACCURACY_FIGURE))
    return path, figure


def discard_run(workdir: str) -> None:
    """Removes a workdir's results file and checkpoints (nothing else in it)."""
    path = os.path.join(workdir, RESULTS)
    if os.path.exists(path):
        os.unlink(path)
    if os.path.isdir(os.path.join(workdir, CHECKPOINTS)):
        shutil.rmtree(os.path.join(workdir, CHECKPOINTS))

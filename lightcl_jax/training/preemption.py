"""Stopping a run cleanly when the machine asks: SIGTERM (a scheduler's preemption), SIGINT.

Inside `handle_signals`, either signal only sets a flag. The training loop
reads it (`requested`) after every step: it finishes that step, writes a
checkpoint (`lightcl_jax.training.epochs`), and raises `Preempted`, which
the command turns into one line and exit code 128 + the signal (143, 130).
Signals that arrive while it saves set the same flag again and interrupt
nothing, so they cannot leave half a checkpoint. Outside `handle_signals`
(the library called from a user's own program) nothing changes.
"""

from __future__ import annotations

import contextlib
import signal
from typing import Iterator

SIGNALS = (signal.SIGTERM, signal.SIGINT)
_requested: list[int] = []   # the signals received inside `handle_signals`, in order


class Preempted(Exception):
    """A run stopped at a signal after its checkpoint; ``position`` is where it stands."""

    def __init__(self, signum: int, position):
        self.signum, self.position = signum, position
        super().__init__(self.describe())

    def describe(self, *, task: bool = True) -> str:
        """``stopped by SIGTERM at task T, step S`` (without ``task``: ``at step S``)."""
        where = f"task {self.position.task}, " if task else ""
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

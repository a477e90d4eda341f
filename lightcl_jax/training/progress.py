"""What a long run reports while it runs: the progress protocol of runs and pre-training.

The library calls these methods and prints nothing; the CLI turns them into
progress bars (`experiments.common.Bars`), tests into probes. Every method
of the base class does nothing, so a subclass overrides what it needs.
"""

from __future__ import annotations


class Progress:
    """Receives a run's progress: one unit (a task, an epoch) at a time.

    A resumed run calls `resumed` once, then `start` with the steps the unit
    already did as ``done``; units finished before the resume get no events.
    """

    def resumed(self, checkpoint: str, where: str) -> None:
        """The run goes on from ``checkpoint``, taken at ``where`` (e.g. "task 2/5, epoch 3/10")."""

    def start(self, name: str, total: int, done: int = 0) -> None:
        """A unit called ``name`` ("task 2/5", "epoch 3/50") of ``total`` steps begins."""

    def advance(self, steps: int, metrics: dict[str, float] | None = None) -> None:
        """``steps`` more train steps are done; ``metrics``: e.g. an epoch's mean loss terms."""

    def end(self, summary: dict[str, float]) -> None:
        """The unit ended; ``summary``: e.g. the task's average TIL and CIL accuracy."""

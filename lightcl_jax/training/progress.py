"""What a long run reports while it runs: the progress protocol of runs and pre-training.

The library calls these methods and prints nothing; the CLI turns them into
progress bars (`experiments.cli.common.Bars`), tests into probes. Every method
of the base class does nothing, so a subclass overrides what it needs.
"""

from __future__ import annotations

import json
import os

import numpy as np


class Progress:
    """Receives a run's progress: one unit (a task, an epoch) at a time.

    A resumed run calls `resumed` once, then `start` with the steps the unit
    already did as ``done``; units finished before the resume get no events.
    """

    def resumed(self, checkpoint: str, where: str, global_step: int | None = None) -> None:
        """The run goes on from ``checkpoint``, taken at ``where`` (e.g. "task 2/5, epoch
        3/10") after ``global_step`` train steps of the run."""

    def start(self, name: str, total: int, done: int = 0) -> None:
        """A unit called ``name`` ("task 2/5", "epoch 3/50") of ``total`` steps begins."""

    def advance(self, steps: int, metrics: dict[str, float] | None = None) -> None:
        """``steps`` more train steps are done; ``metrics``: e.g. an epoch's mean loss terms."""

    def end(self, summary: dict[str, float]) -> None:
        """The unit ended; ``summary``: e.g. the task's average TIL and CIL accuracy."""

    def record(self, kind: str, values: dict) -> None:
        """A structured record of what just happened, for logs (`MetricsLog`).

        ``kind`` "epoch": ``task``, ``epoch`` (1-based), ``global_step`` (run's
        steps after it), ``steps`` trained in it by this process, ``seconds``
        (the first epoch of a phase includes compiling its step),
        ``step_time_s``, ``examples_per_s`` and the mean loss terms. ``kind``
        "task": ``task``, ``global_step``, ``til_row`` and ``cil_row`` (accuracy
        on each task seen so far) with their means ``til`` and ``cil``, each
        evaluation metric's ``eval_<name>_row`` and ``avg_eval_<name>``, and each
        summary of the matrices so far, ``<name>_til`` and ``<name>_cil``
        (`lightcl_jax.training.run.task_record`).
        """


class Fanout(Progress):
    """Passes every event on to each of ``sinks`` (e.g. progress bars and a log)."""

    def __init__(self, *sinks: Progress):
        self.sinks = sinks

    def resumed(self, checkpoint, where, global_step=None):
        for sink in self.sinks:
            sink.resumed(checkpoint, where, global_step)

    def start(self, name, total, done=0):
        for sink in self.sinks:
            sink.start(name, total, done)

    def advance(self, steps, metrics=None):
        for sink in self.sinks:
            sink.advance(steps, metrics)

    def end(self, summary):
        for sink in self.sinks:
            sink.end(summary)

    def record(self, kind, values):
        for sink in self.sinks:
            sink.record(kind, values)


class MetricsLog(Progress):
    """Appends each `Progress.record` as one JSON line (``{"kind": ..., **values}``) to ``path``.

    ``extra`` (e.g. the learning rate) joins every epoch line. A run that
    starts afresh starts the file afresh; a resumed run first drops the lines
    written after its checkpoint's ``global_step`` (the steps it trains
    again), so no step is logged twice. Each line is flushed as it is written.
    """

    def __init__(self, path: str, **extra):
        self.path, self.extra, self.began = path, extra, False

    def _open(self, mode: str):
        # Only once the run trains: a run refused before that leaves no file or folder.
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        return open(self.path, mode)

    def start(self, name, total, done=0):
        if not self.began:  # not resumed: lines already there are another run's
            self._open("w").close()
            self.began = True

    def resumed(self, checkpoint, where, global_step=None):
        self.began = True
        if global_step is None or not os.path.exists(self.path):
            return
        with open(self.path) as f:
            kept = [line for line in f
                    if line.strip() and json.loads(line).get("global_step", 0) <= global_step]
        tmp = f"{self.path}.tmp"
        with open(tmp, "w") as f:
            f.writelines(kept)
        os.replace(tmp, self.path)

    def record(self, kind, values):
        line = {"kind": kind, **values, **(self.extra if kind == "epoch" else {})}
        with self._open("a") as f:
            f.write(json.dumps(line) + "\n")


class TensorBoardLog(Progress):
    """Writes each `Progress.record` as TensorBoard scalars under ``logdir`` (tensorboardX).

    Epochs: ``train/<term>`` for every loss term, ``train/step_time_s``,
    ``train/examples_per_s`` and ``extra`` (e.g. ``train/lr``); tasks:
    ``accuracy/til`` and ``accuracy/cil`` (the average over seen tasks) and
    ``accuracy_til/task<j>``, ``accuracy_cil/task<j>`` (the mean over seeds
    with several), each evaluation metric as ``eval_<name>/task<j>`` and
    ``eval/<name>`` (its average), each summary as ``summary/<name>_til`` and
    ``summary/<name>_cil``; all at the run's global step. Each record is on disk when
    `record` returns (tensorboardX's synchronous `EventsWriter`: its
    `SummaryWriter` queues events for a thread, and a killed run would lose
    the last ones). A fresh run removes the event files already in ``logdir``;
    a resumed one starts its file with TensorBoard's restart marker at its
    checkpoint's step, so that TensorBoard drops what the run trains again.
    Needs ``pip install tensorboardX``; view with ``tensorboard --logdir``.
    """

    def __init__(self, logdir: str, **extra):
        from tensorboardX.event_file_writer import EventsWriter  # noqa: F401  (fail early)
        self.logdir, self.extra, self.writer = logdir, extra, None

    def _open(self, purge_step=None) -> None:
        from tensorboardX.event_file_writer import EventsWriter
        from tensorboardX.proto.event_pb2 import Event, SessionLog
        os.makedirs(self.logdir, exist_ok=True)
        # The pid keeps two processes of one run (killed, resumed) in separate files.
        self.writer = EventsWriter(os.path.join(self.logdir, "events"), f".{os.getpid()}")
        if purge_step is not None:
            self.writer.write_event(Event(step=purge_step,
                                          session_log=SessionLog(status=SessionLog.START)))
            self.writer.flush()

    def resumed(self, checkpoint, where, global_step=None):
        self._open(None if global_step is None else global_step + 1)

    def start(self, name, total, done=0):
        if self.writer is None:
            if os.path.isdir(self.logdir):
                for entry in os.listdir(self.logdir):
                    if entry.startswith("events.out.tfevents."):
                        os.remove(os.path.join(self.logdir, entry))
            self._open()

    def record(self, kind, values):
        import time

        from tensorboardX.proto.event_pb2 import Event
        from tensorboardX.summary import scalar
        scalars = {}
        if kind == "epoch":
            skip = {"task", "epoch", "global_step", "steps", "seconds"}
            scalars = {f"train/{k}": v for k, v in {**values, **self.extra}.items()
                       if k not in skip}
        elif kind == "task":
            for name in ("til", "cil"):
                scalars[f"accuracy/{name}"] = values[name]
            for key, value in values.items():
                if key.endswith("_row"):
                    per_task = np.mean(value, axis=0) if np.ndim(value) == 2 else value
                    tag = {"til_row": "accuracy_til", "cil_row": "accuracy_cil"}.get(key,
                                                                                    key[:-4])
                    scalars.update({f"{tag}/task{j}": float(a) for j, a in enumerate(per_task)})
                elif key.startswith("avg_eval_"):
                    scalars[f"eval/{key[len('avg_eval_'):]}"] = value
                elif key.endswith(("_til", "_cil")):
                    scalars[f"summary/{key}"] = value
        for tag, value in scalars.items():
            self.writer.write_event(Event(wall_time=time.time(), step=values["global_step"],
                                          summary=scalar(tag, float(value))))
        self.writer.flush()

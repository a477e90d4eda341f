"""Passes over the data: a task's epochs of train steps, and evaluation passes.

`Steps` runs train steps over batches and does what comes around each: progress,
the NaN check, mid-task checkpoints, a stop at a signal. A continual-learning
task steps with it (`train_epochs`) and so does pre-training
(`lightcl_jax.training.pretrain`). Each lane draws its own batches
(`TaskBatches`: its seed's order and augmentation); a background thread reads,
augments and sends the next batches to the devices while the current step
runs. Losses stay on the device and are checked for NaN/Inf every `CHECK_EVERY`
steps, at each epoch's end and before every checkpoint, so a checkpoint only
ever holds a state whose losses were all finite.

After a task, `evaluate` runs the compiled eval step over each seen task's
evaluation split and returns TIL and CIL accuracy and the run's evaluation
metrics per task and lane; `layer_metrics` measures each layer's learning
plasticity and memory stability between the models before and after the task
(`lightcl_jax.metrics.generalizability`).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Callable, Iterator, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lightcl_jax.compiler import CompiledStep
from lightcl_jax.data.pipeline import epoch_batches, eval_batches, prefetch, steps_per_epoch
from lightcl_jax.data.streams import TaskStream
from lightcl_jax.metrics.continual import EvalMetric
from lightcl_jax.metrics.generalizability import generalizability
from lightcl_jax.training.checkpoint import Position
from lightcl_jax.training.placement import Lanes, Placement
from lightcl_jax.training.progress import Progress
from lightcl_jax.training.state import TrainState
from lightcl_jax.training.workdir import Preempted, requested

# Training batches read, augmented and sent to the devices ahead of the step.
PREFETCH = 2

# Losses stay on the device and are checked for NaN/Inf every this many steps
# (and at the end of each epoch): often enough not to train long on a
# diverged model, rarely enough not to stall the device.
CHECK_EVERY = 50


class DivergenceError(FloatingPointError):
    """The training loss became NaN or Inf. The commands exit with `exit_code`."""

    exit_code = 3


def check_finite(losses: list[dict], first_step: int, where: int | str,
                 seeds: tuple[int, ...] | None = None) -> dict[str, np.ndarray]:
    """Raises DivergenceError at the first non-finite loss; returns the terms as host arrays.

    Args:
      losses: the steps' metrics dicts (device scalars, or (lanes,) arrays).
      first_step: the step number of ``losses[0]`` (in the task, counted from 0).
      where: the task index, or what else trains (e.g. "pre-training"), for the message.
      seeds: the lanes' seeds when the terms are (lanes,) arrays; the message
        names the seed.

    Returns:
      {term: array of shape (len(losses), *lanes)}.
    """
    stacked = {k: np.asarray(jnp.stack([m[k] for m in losses])) for k in losses[0]}
    finite = np.all([np.isfinite(v) for v in stacked.values()], axis=0)
    bad = ~finite.reshape(len(losses), -1)
    if bad.any():
        i, lane = (int(v) for v in np.unravel_index(np.argmax(bad), bad.shape))
        terms = ", ".join(f"{k}={np.reshape(v[i], -1)[lane]:.4g}" for k, v in stacked.items())
        seed = f" (seed {seeds[lane]})" if seeds is not None else ""
        # Tasks and steps count from 1 in messages.
        at = (f"task {where + 1}, step {first_step + i + 1} of the task" if isinstance(where, int)
              else f"{where} step {first_step + i + 1}")
        raise DivergenceError(f"training diverged: the loss became non-finite at {at}{seed} "
                              f"({terms})")
    return stacked


class TaskBatches:
    """A task's training batches for every lane, each from its own seed's generator.

    Lane i's generator is seeded with (seed_i, task), so its order and
    augmentation are those of a single run of that seed. An `epoch` reads
    only this process's ``part`` of every batch (``(index, count)`` of the
    processes of the run; see `lightcl_jax.data.pipeline.epoch_batches`).
    """

    def __init__(self, x, y, batch_size: int, lanes: Lanes, task_index: int, *,
                 augment: bool, fill, keep_remainder: bool = False,
                 part: tuple[int, int] = (0, 1)):
        self.x, self.y, self.batch_size, self.lanes = x, y, batch_size, lanes
        self.augment, self.fill, self.keep_remainder = augment, fill, keep_remainder
        self.part = part
        self.rngs = [np.random.default_rng([s, task_index]) for s in lanes.seeds]

    @classmethod
    def of(cls, run, task_index: int) -> "TaskBatches":
        """The batches a `lightcl_jax.training.run.Run` trains on in ``task_index``
        (its strategy's `training_arrays`)."""
        x, y = run.strategy.training_arrays(run.stream, task_index)
        return cls(x, y, run.config.batch_size, run.placement.lanes, task_index,
                   augment=run.augment, fill=run.stream.pad_value,
                   keep_remainder=run.config.last_batch == "keep",
                   part=run.placement.parallel.part)

    @property
    def steps_per_epoch(self) -> int:
        return steps_per_epoch(len(self.x), self.batch_size, self.keep_remainder)

    def epoch(self, whole: bool = False) -> Iterator:
        """One epoch of lane-stacked ``(x, y)`` batches (drawn as they are read): this
        process's part of each, or the ``whole`` batches."""
        return self.lanes.zip_batches([
            epoch_batches(self.x, self.y, self.batch_size, rng, augment=self.augment,
                          fill=self.fill, keep_remainder=self.keep_remainder,
                          part=(0, 1) if whole else self.part)
            for rng in self.rngs])

    def one(self):
        """A fresh shuffled whole batch, as the reference's ``next(iter(loader))`` (for
        the task-boundary hooks, which every process runs on the host alike)."""
        return next(self.epoch(whole=True))

    def rng_states(self) -> list[dict]:
        return [rng.bit_generator.state for rng in self.rngs]

    def restore(self, states: list[dict]) -> None:
        for rng, state in zip(self.rngs, states):
            rng.bit_generator.state = state


class EpochMeans:
    """Running means of the loss terms over every step (and lane) of an epoch."""

    def __init__(self, sums: dict[str, float] | None = None,
                 counts: dict[str, int] | None = None):
        self.sums: dict[str, float] = dict(sums or {})
        self.counts: dict[str, int] = dict(counts or {})

    def to_meta(self) -> dict:
        """JSON values: what a checkpoint mid-epoch keeps of the epoch so far."""
        return {"sums": self.sums, "counts": self.counts}

    def add(self, terms: dict[str, np.ndarray]) -> None:
        for k, v in terms.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(np.sum(v, dtype=np.float64))
            self.counts[k] = self.counts.get(k, 0) + int(np.size(v))

    def means(self) -> dict[str, float]:
        return {k: self.sums[k] / self.counts[k] for k in self.sums}


@dataclasses.dataclass(frozen=True)
class Steps:
    """A loop's train steps and what happens around each: progress, the NaN check every
    `CHECK_EVERY` steps, a checkpoint every ``every`` steps of the run, a stop at a
    signal. Continual learning's tasks (`train_epochs`) and pre-training
    (`lightcl_jax.training.pretrain`) both step with it.
    """

    step: Callable                      # (carry, x, y) -> (carry, metrics): one train step
    progress: Progress
    where: int | str                    # the task, or what else trains, for messages
    every: int = 0                      # checkpoint every this many steps of the run (0: never)
    checkpoint: Callable | None = None  # checkpoint(position, carry)
    seeds: tuple[int, ...] | None = None  # the lanes' seeds when the terms are per lane

    def run(self, carry, batches: Iterator, position: Position, *, end: int,
            means: EpochMeans):
        """Steps over ``batches`` from ``position``, adding the loss terms to ``means``;
        returns (carry, the position after the last step).

        ``end`` is the step of the task (``position.step_in_task``) after which the caller
        checkpoints itself: no mid-task checkpoint or stop comes there.

        Raises:
          DivergenceError: a loss became NaN or Inf. Preempted: a signal arrived
            (`lightcl_jax.training.workdir`); the step it arrived in finished, and was
            checkpointed.
        """
        losses = []
        for x, y in batches:
            carry, metrics = self.step(carry, x, y)
            losses.append(metrics)
            position = dataclasses.replace(position, batch=position.batch + 1,
                                           step_in_task=position.step_in_task + 1,
                                           global_step=position.global_step + 1)
            self.progress.advance(1)
            # A signal stops the run here, after a checkpoint; at the end the caller's
            # checkpoint comes first.
            stop = requested() if position.step_in_task < end else None
            checkpoint_now = (self.every and position.global_step % self.every == 0
                              and position.step_in_task < end) or stop is not None
            if len(losses) == CHECK_EVERY or (checkpoint_now and losses):
                means.add(check_finite(losses, position.step_in_task - len(losses), self.where,
                                       self.seeds))
                losses = []
            if checkpoint_now and self.checkpoint is not None:
                self.checkpoint(position, carry)
            if stop is not None:
                raise Preempted(stop, position)
        if losses:
            means.add(check_finite(losses, position.step_in_task - len(losses), self.where,
                                   self.seeds))
        return carry, position


def train_epochs(train_step: CompiledStep, carry: tuple, batches: TaskBatches, start: Position,
                 *, task: TaskLoop):
    """Trains a task from ``start`` to its last epoch's last batch.

    Args:
      train_step: the phase's compiled step.
      carry: the (replicated) train state and strategy memory.
      batches: the task's batches; when resuming mid-task, with the generator
        state of ``start.epoch``'s beginning restored.
      start: where the task starts: epoch, batches done in it, steps done in
        the task and in the run (a fresh task: zeros but the run's steps).
      task: the rest of what the task's loop needs (`TaskLoop`).

    Returns:
      ((state, memory), the `Position` after the task's last step).

    Raises:
      DivergenceError: a loss became NaN or Inf.
      Preempted: a signal arrived (`lightcl_jax.training.workdir`); the step it
        arrived in finished, and was checkpointed.
    """
    position, placement, progress = start, task.placement, task.progress
    offset = jnp.asarray(task.class_offset, jnp.int32)
    seeds = placement.lanes.seeds if placement.lanes.stacked else None
    state, memory = carry
    _compile_ahead(train_step, state, memory if task.uses_memory else None, offset, batches,
                   placement)

    def step(carry, x, y):
        state, memory = carry
        state, step_memory, metrics = train_step(state, memory if task.uses_memory else None,
                                                 x, y, offset)
        return (state, step_memory if task.uses_memory else memory), metrics

    last_step = batches.steps_per_epoch * task.epochs
    for epoch in range(start.epoch, task.epochs):
        rng_states = batches.rng_states()
        # Read, augment and send to the devices in a background thread, ahead of
        # the steps; the epoch is drawn in full before anything else draws again.
        epoch_iter = prefetch(batches.epoch(), PREFETCH, placement.train_batch)
        skip = start.batch if epoch == start.epoch else 0
        for _ in range(skip):  # batches a resumed run already trained on: same draws
            next(epoch_iter)
        position = dataclasses.replace(position, epoch=epoch, batch=skip)
        began, steps_before, means = time.perf_counter(), position.global_step, EpochMeans()
        stepper = Steps(step, progress, position.task, task.checkpoint_every,
                        None if task.checkpoint is None else functools.partial(
                            _checkpoint_carry, task.checkpoint, rng_states=rng_states), seeds)
        carry, position = stepper.run(carry, epoch_iter, position, end=last_step, means=means)
        progress.advance(0, {"epoch": epoch + 1, **means.means()})
        steps = position.global_step - steps_before
        # Samples in batches skip..position.batch of the epoch (its last may be smaller).
        examples = min(position.batch * batches.batch_size, len(batches.x)) \
            - skip * batches.batch_size
        if steps:
            seconds = time.perf_counter() - began
            progress.record("epoch", {
                "task": position.task, "epoch": epoch + 1, "global_step": position.global_step,
                "steps": steps, "seconds": seconds, "step_time_s": seconds / steps,
                "examples_per_s": examples * placement.lanes.size / seconds,
                **means.means()})
    return carry, position


@dataclasses.dataclass(frozen=True)
class TaskLoop:
    """What a task's epochs need besides its step and batches."""

    epochs: int                 # epochs per task
    uses_memory: bool           # whether the step reads and updates the strategy's memory
    class_offset: int           # the task's first class
    placement: Placement        # how batches are laid out over lanes and devices
    progress: Progress          # gets a step at a time, and each epoch's mean loss terms
    checkpoint_every: int = 0   # a mid-task checkpoint every this many steps of the run
    # checkpoint(position, state, memory, rng_states): rng_states are the generators'
    # states at the start of the epoch.
    checkpoint: Callable | None = None


def _checkpoint_carry(checkpoint: Callable, position: Position, carry, *, rng_states):
    state, memory = carry
    checkpoint(position, state, memory, rng_states)


def _compile_ahead(train_step, state, memory, offset, batches: TaskBatches,
                   placement: Placement) -> None:
    """Compiles the step for a full batch and, when an epoch ends on a smaller kept batch,
    for that one too, before any step runs (not at the first epoch's end, mid-training)."""
    sizes = [batches.batch_size]
    if batches.keep_remainder and len(batches.x) % batches.batch_size:
        sizes.append(len(batches.x) % batches.batch_size)
    lanes = (placement.lanes.size,) if placement.lanes.stacked else ()
    split = placement.parallel.split_along(placement.lanes.batch_axis)
    image = tuple(batches.x.shape[1:])
    for size in sizes:
        x = jax.ShapeDtypeStruct((*lanes, size, *image), batches.x.dtype, sharding=split)
        y = jax.ShapeDtypeStruct((*lanes, size), batches.y.dtype, sharding=split)
        train_step.prepare(state, memory, x, y, offset)


# Evaluation after a task.


# Probe samples per set for LP/MS: enough for a stable CKA, cheap to compare.
PROBE_SIZE = 256


class Evaluation(NamedTuple):
    """What one evaluation after a task measured, per seen task and lane."""

    til: np.ndarray        # (tasks seen, lanes) float64: TIL accuracy, %
    cil: np.ndarray        # (tasks seen, lanes) float64: CIL accuracy, %
    metrics: dict          # evaluation metric name -> (tasks seen, lanes) float64


def correct_counts(eval_step, state: TrainState, stream: TaskStream, num_seen: int,
                   batch_size: int, placement: Placement | None = None):
    """Correct TIL and CIL predictions, and the evaluation metrics' sums, on each of the
    first ``num_seen`` tasks.

    Returns:
      ``(til, cil, sums)``: two int64 arrays of shape (num_seen, *E), E being the shape
      of what ``eval_step`` counts: () for one model, (lanes,) for a vmapped one; and per
      task, the ``eval_step``'s sums added over its batches (float64).
      With ``placement``, each batch is split over its devices (this process reading
      only its part of it).
    """
    til_counts, cil_counts, task_sums = [], [], []
    for task in stream.tasks[:num_seen]:
        til, cil, sums = counts_on(eval_step, state, (task.x_eval, task.y_eval),
                                   task.class_offset, batch_size, placement)
        til_counts.append(til)
        cil_counts.append(cil)
        task_sums.append(sums)
    return np.stack(til_counts), np.stack(cil_counts), task_sums


def counts_on(eval_step, state: TrainState, data: tuple, class_offset: int, batch_size: int,
              placement: Placement | None = None):
    """``(til, cil, sums)`` of ``eval_step`` over the evaluation set ``data`` = (x, y) whose
    classes start at ``class_offset``: correct TIL and CIL predictions (int64) and the
    evaluation metrics' sums (float64), added over its batches (see `correct_counts`).
    Pre-training's top-1 accuracy is the CIL count of an eval step over every class."""
    transform = None if placement is None else placement.eval_batch
    part = (0, 1) if placement is None else placement.parallel.part
    til_correct = cil_correct = 0
    sums = None
    offset = jnp.asarray(class_offset, jnp.int32)
    for x, y, valid in prefetch(eval_batches(*data, batch_size, part), PREFETCH, transform):
        til, cil, batch_sums = eval_step(state.params, state.batch_stats, x, y, valid, offset)
        til_correct = til_correct + np.asarray(til, np.int64)
        cil_correct = cil_correct + np.asarray(cil, np.int64)
        batch_sums = jax.tree_util.tree_map(lambda v: np.asarray(v, np.float64), batch_sums)
        sums = batch_sums if sums is None else jax.tree_util.tree_map(np.add, sums, batch_sums)
    return til_correct, cil_correct, sums


def evaluate(eval_step, state: TrainState, stream: TaskStream, num_seen: int, batch_size: int,
             placement: Placement | None = None,
             eval_metrics: tuple[EvalMetric, ...] = ()) -> Evaluation:
    """TIL and CIL accuracy in percent, and ``eval_metrics`` (those the ``eval_step`` sums),
    on each of the first ``num_seen`` tasks.

    Returns:
      An `Evaluation`: arrays of shape (num_seen, lanes), row j task j, column i the model
      of lane i (one column for a single model).
    """
    til, cil, task_sums = correct_counts(eval_step, state, stream, num_seen, batch_size,
                                         placement)
    sizes = np.array([len(t.y_eval) for t in stream.tasks[:num_seen]], np.float64)
    lanes = til.reshape(num_seen, -1).shape[1]
    stacked = til.ndim > 1

    def value(metric, sums, lane):
        total = sums[metric.name]
        if stacked:
            total = jax.tree_util.tree_map(lambda v: v[lane], total)
        return float(metric.compute(total))
    metrics = {m.name: np.array([[value(m, sums, lane) for lane in range(lanes)]
                                 for sums in task_sums], np.float64) for m in eval_metrics}
    return Evaluation(100.0 * til.reshape(num_seen, -1) / sizes[:, None],
                      100.0 * cil.reshape(num_seen, -1) / sizes[:, None], metrics)


def probe_set(arrays: list[np.ndarray], size: int = PROBE_SIZE) -> np.ndarray | None:
    """Up to ``size`` samples taken evenly from the start of each array (None: no arrays)."""
    if not arrays:
        return None
    per = -(-size // len(arrays))  # ceil
    return np.concatenate([a[:per] for a in arrays])[:size]


def layer_metrics(model, placement: Placement, before, state: TrainState, stream: TaskStream,
                  task_index: int, similarity: str) -> list[dict]:
    """Per lane, LP and MS per layer between the models before and after task ``task_index``.

    Measured on held-out samples of the task (LP) and of the earlier tasks
    (MS): as many per set as the smallest task's evaluation split holds, at
    most `PROBE_SIZE` (one size for every task and both sets, so the
    measurement compiles once).

    Args:
      before: ``{"params", "batch_stats"}`` of the model before the task.
      state: the train state after it.
    """
    size = min(PROBE_SIZE, min(len(p.x_eval) for p in stream.tasks))
    old = probe_set([p.x_eval for p in stream.tasks[:task_index]], size)
    new = probe_set([stream.tasks[task_index].x_eval], size)

    def measure(lane, lane_before, lane_state):
        after = {"params": lane_state.params, "batch_stats": lane_state.batch_stats}
        return generalizability(model, lane_before, after, old, new, similarity)
    return placement.map_lanes(measure, before, state, join=False)

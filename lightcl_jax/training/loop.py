"""The continual-learning loop: task after task, train, evaluate, record, save.

`train_and_evaluate` reads top to bottom; each step it takes lives in a
module named for it:

    setup        the run: config, stream, strategy, model, placement, identity
    state        the train state and a run's first one
    resume       the run's identity, its newest checkpoint, saving
    probe        --freeze auto's one-epoch probe
    steps        phases, optimizers, the pure train and eval steps
    programs     the compiled steps of each phase, their counts and XLA figures
    boundaries   the strategy's begin_task / end_task hooks, on the host
    epochs       a task's epochs of batches, the NaN check, mid-task checkpoints
    evaluation   accuracy on the tasks seen so far, LP/MS per layer
    record       the accuracy matrices, phases, freeze choice and layer metrics so far
    results      the results dict
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Callable

from lightcl_jax.config import Config
from lightcl_jax.data.streams import TaskStream
from lightcl_jax.training.boundaries import begin_task, end_task
from lightcl_jax.training.checkpoint import Position, RunCheckpoints
from lightcl_jax.training.epochs import TaskBatches, train_epochs
from lightcl_jax.training.evaluation import evaluate, layer_metrics
from lightcl_jax.training.preemption import Preempted, requested
from lightcl_jax.training.probe import freeze_auto, needs_probe
from lightcl_jax.training.programs import Programs
from lightcl_jax.training.progress import Progress
from lightcl_jax.training.record import RunRecord
from lightcl_jax.training.resume import (Clock, Saver, find_resume_point, payload,
                                         restore_run)
from lightcl_jax.training.results import assemble_results, task_record
from lightcl_jax.training.setup import Run, setup_run
from lightcl_jax.training.state import TrainState, copy_variables, create_lane_states
from lightcl_jax.training.steps import phase_step


def train_and_evaluate(config: Config | Run, stream: TaskStream | None = None, *,
                       init_variables: dict | None = None, devices: int | None = None,
                       seeds: int = 1, checkpoints: RunCheckpoints | None = None,
                       progress: Progress | None = None,
                       step_wrapper: Callable[[Callable], Callable] | None = None,
                       on_task_end: Callable[[int, TrainState], None] | None = None) -> dict:
    """Runs a strategy over a task stream and evaluates after every task.

    Args:
      config: the run's settings, or a `Run` from `setup_run`, which then holds
        ``stream``, ``init_variables``, ``devices`` and ``seeds`` (see there).
      checkpoints: where the run saves its state (after every task, every
        ``checkpoints.every`` steps) and resumes from, to the uninterrupted numbers.
      progress: receives progress events (`lightcl_jax.training.progress`).
      step_wrapper: wraps each phase's pure train step before jit.
      on_task_end: ``on_task_end(task_index, state)`` after each task trained here.

    Returns:
      The results (listed by `lightcl_jax.training.results.assemble_results`).

    Raises:
      ValueError (CheckpointError too): bad settings, data or checkpoint, or seeds whose
        ``--freeze auto`` probes disagree. DivergenceError: a loss became NaN or Inf.
    """
    start_time = time.perf_counter()
    run = config if isinstance(config, Run) else setup_run(
        config, stream, init_variables=init_variables, devices=devices, seeds=seeds)
    progress, lanes, placement = progress or Progress(), run.placement.lanes, run.placement
    resume = find_resume_point(checkpoints, run.identity)
    states, masks = create_lane_states(run.model, run.stream.image_shape, lanes.seeds,
                                       init_variables=run.init_variables, sparse=run.config.sparse)
    programs = Programs.of_run(run, step_wrapper)
    (state, memory, before), record, clock = _restore(
        run, resume, checkpoints, states, masks, programs, progress, start_time)
    save = _Checkpointer(Saver(checkpoints, run.identity), lanes, record, programs, clock)
    global_step = 0 if resume is None else resume.step
    for task in run.stream.tasks[0 if resume is None else resume.first_task:]:
        t, mid = task.index, resume is not None and resume.within(task.index)
        if not mid and needs_probe(run.strategy, run.config, t, run.pretrained, record):
            record.freeze_auto = freeze_auto(run.model, placement, state, run.stream, t,
                                             run.lane_configs, masks, augment=run.augment)
        configs = record.configs(run.lane_configs)
        phase, _, step = phase_step(run.model, run.strategy, placement.step_config(configs[0]),
                                    states[0].params, t, run.pretrained,
                                    run.stream.classes_per_task, masks[0])
        batches = TaskBatches.of(run, t)
        if mid:
            start = resume.position
            batches.restore(lanes.from_values(resume.meta["rng_state"]))
        else:
            before = copy_variables(state) if _measures_layers(run, t) else None
            programs.add_task(phase, t)
            record.add_phase(t, phase)
            state, memory = begin_task(run, state, memory, batches, task_index=t, phase=phase,
                                       configs=configs, masks=masks)
            start = Position(task=t, task_done=False, epoch=0, batch=0, step_in_task=0,
                             global_step=global_step)
        progress.start(f"task {t + 1}/{run.stream.num_tasks}",
                       batches.steps_per_epoch * run.config.epochs, start.step_in_task)
        state, memory, end = train_epochs(
            programs.train_step(phase, step), placement.replicate(state),
            placement.replicate(memory), batches, start, epochs=run.config.epochs,
            uses_memory=phase.uses_memory, class_offset=task.class_offset, placement=placement,
            progress=progress, checkpoint_every=save.every,
            checkpoint=functools.partial(save, before=before))
        state, memory = end_task(run, state, memory, batches, task_index=t, phase=phase,
                                 configs=configs)
        state, global_step = placement.replicate(state), end.global_step
        record.add_evaluation(*evaluate(programs.eval, state, run.stream, t + 1,
                                        run.eval_batch_size, placement, run.eval_metrics))
        if _measures_layers(run, t):
            record.add_layer_metrics(t, layer_metrics(run.model, placement, before, state,
                                                      run.stream, t, run.config.layer_metrics))
        save(end := dataclasses.replace(end, task_done=True), state, memory)
        _task_done(progress, end, record, run.summaries, lanes.seeds,
                   last=t + 1 == run.stream.num_tasks)
        if on_task_end is not None:
            on_task_end(t, state)
    return assemble_results(run, record, state, programs, resumed_at=list(clock.resumed_at),
                            wall_time_s=clock.elapsed())


def _task_done(progress: Progress, done: Position, record: RunRecord, summaries, seeds, *,
               last: bool) -> None:
    """Reports a trained, evaluated and checkpointed task (``done``): its rows of accuracy
    and of each evaluation metric (per seed when several), and the summaries of the
    accuracy matrices so far (`task_record`). A signal received by now stops the run here
    (`Preempted`), unless this was its last task."""
    values = task_record(record, summaries, len(seeds))
    progress.record("task", {"task": done.task, "global_step": done.global_step, **values,
                             **({"seeds": list(seeds)} if len(seeds) > 1 else {})})
    progress.end({"til": values["til"], "cil": values["cil"]})
    if requested() is not None and not last:
        raise Preempted(requested(), done)


def _restore(run: Run, resume, checkpoints, states: list, masks: list, programs: Programs,
             progress: Progress, start_time: float):
    """((state, memory, model before the task), record, clock) where the run starts:
    its first state, or the checkpoint at ``resume`` (None: none)."""
    if resume is None:
        return ((run.placement.lanes.join(states), None, None), RunRecord.new(run.placement.lanes),
                Clock(start_time))
    progress.resumed(resume.path, resume.position.describe(run.stream.num_tasks,
                                                           run.config.epochs),
                     resume.position.global_step)
    arrays, record = restore_run(run, resume, checkpoints, states[0], masks, programs)
    clock = Clock(start_time, resume.meta["elapsed_s"],
                  (*resume.meta["resumed_at_steps"], resume.step))
    return (arrays["state"], arrays["memory"], arrays["before_task"]), record, clock


def _measures_layers(run: Run, task_index: int) -> bool:
    """Whether LP/MS per layer are recorded after ``task_index`` (``--layer-metrics``)."""
    return run.config.layer_metrics is not None and task_index >= 1


class _Checkpointer:
    """Saves where a run stands (`lightcl_jax.training.resume.Saver`: nothing without
    checkpoints): the arrays, and the record, compiled-step counts and time so far."""

    def __init__(self, saver: Saver, lanes, record: RunRecord, programs: Programs,
                 clock: Clock):
        self.saver, self.lanes, self.record = saver, lanes, record
        self.programs, self.clock = programs, clock
        self.every = saver.every

    def __call__(self, position: Position, state, memory, rng_states=None, *, before=None):
        self.saver.save(position, payload(state, memory, before), {
            "rng_state": None if rng_states is None else self.lanes.values(rng_states),
            "results": self.record.to_meta(self.lanes),
            **self.programs.to_meta(),
            "elapsed_s": self.clock.elapsed(),
            "resumed_at_steps": list(self.clock.resumed_at),
        })

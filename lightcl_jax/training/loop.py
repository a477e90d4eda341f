"""The run's spine: task after task, train, evaluate, record, save.

`train_and_evaluate(config, workdir)` is the entry point: it takes a run's
settings (or a `Run`), and with a workdir writes there what
``python -m experiments.run`` writes and resumes from its checkpoints (the files
are `lightcl_jax.training.workdir`'s). `train` is the loop itself, readable top
to bottom; what it calls lives in the module named for each idea:

    run          what a run is (`Run`, `setup_run`), what it has measured, its results
    state        the train state, a run's first one, sparsity
    step         phases, their optimizers, forward passes, train and eval steps, programs
    placement    seeds as lanes, devices, processes
    epochs       a task's epochs of steps, evaluation passes, LP/MS per layer
    checkpoint   orbax checkpoints, resuming, saving where a run stands
    workdir      the workdir lock, signals, the files a run writes
    progress     what a long run reports while it runs

Task boundaries run the strategy's `begin_task` and `end_task` hooks on the host,
between the compiled steps of two tasks: each lane's hook on its own state and
memory with its own config (its seed). LightCL stores its buffer and reference
features and scores vital channels; EWC computes its Fisher; replay strategies
make their buffers. As in the reference, the hooks' train-mode forwards fold
their batch statistics into BatchNorm's running ones, which the hooks hand back
through a `BatchStatsChain`.

``--freeze auto`` decides before the first task a strategy freezes in: a
throwaway copy of each lane's model trains every layer on that task for one
epoch; the deepest prefix of layer groups whose LP and MS stay above the
threshold is frozen (`lightcl_jax.metrics.generalizability.choose_freeze`).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from lightcl_jax import compiler
from lightcl_jax.config import Config
from lightcl_jax.data.pipeline import epoch_batches
from lightcl_jax.data.streams import TaskStream
from lightcl_jax.metrics.generalizability import choose_freeze, generalizability
from lightcl_jax.strategies import Strategy
from lightcl_jax.training.checkpoint import (Clock, Position, RunCheckpoints, Saver,
                                             find_resume_point, payload, restore_run)
from lightcl_jax.training.epochs import (TaskBatches, TaskLoop, check_finite, evaluate,
                                         layer_metrics, probe_set, train_epochs)
from lightcl_jax.training.progress import Fanout, MetricsLog, Progress
from lightcl_jax.training.run import Run, RunRecord, assemble_results, setup_run, task_record
from lightcl_jax.training.state import TrainState, copy_variables, create_lane_states, train_state
from lightcl_jax.training.step import (BatchStatsChain, Phase, Programs, TaskPhase, jitted_forward,
                                       make_train_step, phase_optimizer)
from lightcl_jax.training.workdir import (CHECKPOINTS, METRICS_LOG, Preempted, finished_results,
                                          lock_workdir, requested, write_results)


@dataclasses.dataclass(frozen=True)
class Hooks:
    """Calls into the loop, for tests and analyses."""

    # Wraps each phase's pure train step before jit (tests pass `chex.assert_max_traces`).
    step_wrapper: Callable[[Callable], Callable] | None = None
    # ``on_task_end(task_index, state)`` after each task trained in this call.
    on_task_end: Callable[[int, TrainState], None] | None = None


def train_and_evaluate(config: Config | Run, workdir: str | None = None, *,
                       stream: TaskStream | None = None, seeds: int = 1,
                       progress: Progress | None = None, checkpoint_every: int = 500) -> dict:
    """Runs a strategy over a task stream, evaluating after every task.

    With a ``workdir``, writes there what ``python -m experiments.run`` writes
    (`lightcl_jax.training.workdir`): ``results.json``, ``metrics.jsonl`` (a line per
    epoch and task), ``accuracy.png`` and ``checkpoints/`` (after every task and every
    ``checkpoint_every`` train steps). Called again on the same workdir, it resumes from
    the newest checkpoint to the uninterrupted numbers, or returns the finished run's
    results without training.

    Args:
      config: the run's settings, or a `Run` from `setup_run` (a backbone to start
        from, devices), which then holds the stream and the seeds.
      workdir: where the run writes; None: it trains in memory and writes nothing.
      stream: the task stream; None: ``config.dataset``'s.
      seeds: train seeds ``config.seed, ..., config.seed + seeds - 1`` together.
      progress: receives progress events (`lightcl_jax.training.progress`).
      checkpoint_every: train steps between mid-task checkpoints (0: after each task only).

    Returns:
      The results (listed by `lightcl_jax.training.run.assemble_results`).

    Raises:
      ValueError: bad settings or data; a workdir in use (`WorkdirInUse`), or holding
        another run's results or checkpoints (`CheckpointError`). DivergenceError: a
        loss became NaN or Inf. `Preempted`: a signal inside `handle_signals`, after a
        checkpoint. OSError: a checkpoint could not be written; `ResultsWriteError`:
        results.json could not (the checkpoints hold the finished run).
    """
    if workdir is not None and not isinstance(workdir, (str, os.PathLike)):
        raise TypeError(f"train_and_evaluate's second argument is the workdir, a path; got "
                        f"{type(workdir).__name__} (a stream goes in as stream=...)")
    run = config if isinstance(config, Run) else setup_run(config, stream, seeds=seeds)
    if workdir is None:
        return train(run, progress=progress)
    fresh = not os.path.exists(workdir)
    lock = lock_workdir(workdir, jax.process_index())  # one run per workdir
    try:
        return train_in_workdir(run, workdir, progress=progress,
                                checkpoint_every=checkpoint_every)
    finally:
        lock.release(remove_empty_workdir=fresh)  # a run refused at its start leaves none


def train_in_workdir(run: Run, workdir: str, *, progress: Progress | None = None,
                     checkpoint_every: int = 500) -> dict:
    """`train_and_evaluate` with a workdir whose lock the caller holds
    (`lightcl_jax.training.workdir.lock_workdir`): a finished run's results, or the
    run trained, resumed from the workdir's checkpoints and its files written there
    (by process 0 of several)."""
    finished = finished_results(workdir, run.identity)
    if finished is not None:
        return finished
    writer = jax.process_index() == 0  # of several processes, the first writes
    sinks = [progress or Progress()]
    if writer:
        sinks.append(MetricsLog(os.path.join(workdir, METRICS_LOG), lr=run.config.lr))
    checkpoints = RunCheckpoints(os.path.join(workdir, CHECKPOINTS), every=checkpoint_every)
    try:
        results = train(run, checkpoints=checkpoints, progress=Fanout(*sinks))
    finally:
        checkpoints.close()
    if writer:
        write_results(workdir, results)
    return results


def train(run: Run, *, checkpoints: RunCheckpoints | None = None,
          progress: Progress | None = None, hooks: Hooks | None = None) -> dict:
    """The run's spine: task after task, train, evaluate, record, save.

    ``checkpoints``: where the run saves its state and resumes from (None: nowhere);
    ``hooks``: calls into the loop, for tests and analyses (`Hooks`). Returns and
    raises as `train_and_evaluate`.
    """
    start_time = time.perf_counter()
    progress, hooks = progress or Progress(), hooks or Hooks()
    lanes, placement = run.placement.lanes, run.placement
    resume = find_resume_point(checkpoints, run.identity)
    states, masks = create_lane_states(run.model, run.stream.image_shape, lanes.seeds,
                                       init_variables=run.init_variables, sparse=run.config.sparse)
    programs = Programs.of_run(run, hooks.step_wrapper)
    clock = Clock.of(start_time, resume)
    (state, memory, before), record = _restore(run, resume, checkpoints, (states, masks),
                                               programs, progress)
    save = _Checkpointer(Saver(checkpoints, run.identity), lanes, record, programs, clock)
    global_step = 0 if resume is None else resume.step
    for task in run.stream.tasks[0 if resume is None else resume.first_task:]:
        t, mid = task.index, resume is not None and resume.within(task.index)
        if not mid and needs_probe(run.strategy, run.config, t, run.pretrained, record):
            record.freeze_auto = freeze_auto(run, state, t, masks)
        task_phase = run.task_phase(t, record.configs(run.lane_configs), states[0].params,
                                    masks)
        phase = task_phase.phase
        batches = TaskBatches.of(run, t)
        if mid:
            start = resume.position
            batches.restore(lanes.from_values(resume.meta["rng_state"]))
        else:
            before = copy_variables(state) if _measures_layers(run, t) else None
            programs.add_task(phase, t)
            record.add_phase(t, phase)
            state, memory = begin_task(run, task_phase, state, memory, batches.one())
            start = Position(task=t, task_done=False, epoch=0, batch=0, step_in_task=0,
                             global_step=global_step)
        progress.start(f"task {t + 1}/{run.stream.num_tasks}",
                       batches.steps_per_epoch * run.config.epochs, start.step_in_task)
        (state, memory), end = train_epochs(
            programs.train_step(phase, task_phase.step),
            (placement.replicate(state), placement.replicate(memory)), batches, start,
            task=TaskLoop(run.config.epochs, phase.uses_memory, task.class_offset, placement,
                          progress, save.every, functools.partial(save, before=before)))
        state, memory = end_task(run, task_phase, state, memory, batches.one())
        state, global_step = placement.replicate(state), end.global_step
        record.add_evaluation(*evaluate(programs.eval, state, run.stream, t + 1,
                                        run.eval_batch_size, placement, run.eval_metrics))
        if _measures_layers(run, t):
            record.add_layer_metrics(t, layer_metrics(run.model, placement, before, state,
                                                      run.stream, t, run.config.layer_metrics))
        save(end := dataclasses.replace(end, task_done=True), state, memory)
        _task_done(progress, end, record, run.summaries, lanes.seeds,
                   last=t + 1 == run.stream.num_tasks)
        if hooks.on_task_end is not None:
            hooks.on_task_end(t, state)
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


def _restore(run: Run, resume, checkpoints, first: tuple, programs: Programs,
             progress: Progress):
    """((state, memory, model before the task), record) where the run starts: its first
    state (``first``: each lane's first state, and sparse masks), or the checkpoint at
    ``resume`` (None: none)."""
    states, masks = first
    if resume is None:
        return (run.placement.lanes.join(states), None, None), RunRecord.new(run.placement.lanes)
    progress.resumed(resume.path, resume.position.describe(run.stream.num_tasks,
                                                           run.config.epochs),
                     resume.position.global_step)
    arrays, record = restore_run(run, resume, checkpoints, states[0], masks, programs)
    return (arrays["state"], arrays["memory"], arrays["before_task"]), record


def _measures_layers(run: Run, task_index: int) -> bool:
    """Whether LP/MS per layer are recorded after ``task_index`` (``--layer-metrics``)."""
    return run.config.layer_metrics is not None and task_index >= 1


class _Checkpointer:
    """Saves where a run stands (`lightcl_jax.training.checkpoint.Saver`: nothing without
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


# Task boundaries: the strategy's hooks, on the host.

def run_hook(hook: Callable, run, task_phase: TaskPhase, state, memory, batch):
    """``hook`` (a strategy's `begin_task` or `end_task`) on every lane, in ``task_phase``.

    Args:
      hook: the bound strategy method.
      run: the `lightcl_jax.training.run.Run`.
      task_phase: the task's phase and each lane's config.
      state, memory: the (lane-stacked) train state and strategy memory.
      batch: a (lane-stacked) training batch ``(x, y)`` of the task.

    Returns:
      (state with the hook's BatchNorm updates, the hook's memory).
    """
    fixed_bn = task_phase.phase.fixed_bn

    def per_lane(lane, lane_state, lane_memory, lane_batch):
        chain = BatchStatsChain(lane_state.batch_stats)
        lane_memory = hook(lane_memory, config=task_phase.configs[lane],
                           task_index=task_phase.task_index, batch=lane_batch,
                           forward=jitted_forward(run.model, chain, fixed_bn),
                           eval_forward=run.eval_forward, params=lane_state.params,
                           batch_stats=lane_state.batch_stats,
                           classes_per_task=run.stream.classes_per_task)
        return lane_state.replace(batch_stats=chain.latest), lane_memory

    lanes = run.placement.lanes
    states, memories = zip(*run.placement.map_lanes(per_lane, state, memory, batch, join=False))
    return lanes.join(states), lanes.join(memories)


def begin_task(run, task_phase: TaskPhase, state, memory, batch):
    """A task begins: each lane's optimizer state for the phase (SGD keeps none, but the
    masked optimizer's structure follows the phase, and with ``--sparse`` it holds the
    lane's masks), then `begin_task` on ``batch``, a fresh training batch (as the
    reference's ``next(iter(loader))``). Returns (state, memory)."""
    state = task_phase.init_optimizers(run.placement, state)
    return run_hook(run.strategy.begin_task, run, task_phase, state, memory, batch)


def end_task(run, task_phase: TaskPhase, state, memory, batch):
    """A task's training ended: `end_task` on ``batch``, a fresh training batch of it.
    Returns (state, memory)."""
    return run_hook(run.strategy.end_task, run, task_phase, state, memory, batch)


# --freeze auto's probe.

# The probe trains every layer, without the strategy's memory.
PROBE_PHASE = Phase(frozen=(), fixed_bn=(), uses_memory=False)


def make_probe_step(model, tx, config, classes_per_task: int):
    """The probe's jitted train step (state donated).

    One step serves every seed: its optimizer's update reads the sparse masks
    from the optimizer state, which each seed initialises with its own.
    """
    return compiler.jit(make_train_step(model, tx, Strategy(), config, PROBE_PHASE,
                                        classes_per_task), donate_argnums=(0,))


def probe_freeze(model, state: TrainState, stream: TaskStream, task_index: int, config: Config,
                 *, augment: bool, masks=None, step=None) -> tuple[str, dict]:
    """What ``--freeze auto`` freezes, decided before training task ``task_index``.

    A throwaway copy of the model trains every layer on task ``task_index``
    for one epoch (same SGD, batch size and augmentation, its own seeded
    order). LP is measured on up to `PROBE_SIZE` training samples of that task,
    MS on up to `PROBE_SIZE` training samples of the earlier tasks (none when
    a pre-trained run decides at task 0: MS is then not measured), with
    ``config.similarity``, between the model before and after the probe.
    `choose_freeze` with ``config.freeze_threshold`` picks the freeze point.
    Evaluation data is never used. The model itself is not changed.

    Args:
      step: the probe's compiled step (`make_probe_step`) when several models
        share one; None builds it.

    Returns:
      (freeze point name, {layer: {"lp": float, "ms": float | None}}).
    """
    task = stream.tasks[task_index]
    tx = phase_optimizer(config, state.params, (), masks)
    if step is None:
        step = make_probe_step(model, tx, config, stream.classes_per_task)
    before = copy_variables(state)
    probe = jax.tree_util.tree_map(jnp.copy, train_state(before["params"], before["batch_stats"],
                                                         tx.init(before["params"])))
    rng = np.random.default_rng([config.seed, task_index, 1])
    offset = jnp.asarray(task.class_offset, jnp.int32)
    for x, y in epoch_batches(task.x_train, task.y_train, config.batch_size, rng,
                              augment=augment, fill=stream.pad_value):
        probe, _, metrics = step(probe, None, x, y, offset)
    check_finite([metrics], 0, task_index)
    after = {"params": probe.params, "batch_stats": probe.batch_stats}
    x_old = probe_set([t.x_train for t in stream.tasks[:task_index]])
    metrics = generalizability(model, before, after, x_old, probe_set([task.x_train]),
                               config.similarity)
    return choose_freeze(metrics, config.freeze_threshold), metrics


def needs_probe(strategy: Strategy, config: Config, task_index: int, pretrained: bool,
                record: RunRecord) -> bool:
    """Whether ``--freeze auto`` decides now: nothing chosen yet, and the strategy
    would freeze something in this task."""
    return (config.freeze == "auto" and record.chosen_freeze is None and bool(
        strategy.frozen_groups(dataclasses.replace(config, freeze="all-but-head"), task_index,
                               pretrained)))


def freeze_auto(run, state: TrainState, task_index: int, masks: list) -> list[dict]:
    """Every lane's `probe_freeze` record before ``task_index``: ``{"task", "chosen",
    "threshold", "similarity", "metrics"}``. The probe step compiles once for all lanes.

    Raises:
      ValueError: the lanes chose different freeze points (they share one
        compiled train step, so they must freeze the same layers).
    """
    model, placement, stream, configs = run.model, run.placement, run.stream, run.lane_configs
    first = placement.lanes.split(state)[0]
    step = make_probe_step(model, phase_optimizer(configs[0], first.params, (), masks[0]),
                           placement.step_config(configs[0]), stream.classes_per_task)

    def probe(lane, lane_state):
        config = configs[lane]
        chosen, metrics = probe_freeze(model, lane_state, stream, task_index, config,
                                       augment=run.augment, masks=masks[lane], step=step)
        return {"task": task_index, "chosen": chosen, "threshold": config.freeze_threshold,
                "similarity": config.similarity, "metrics": metrics}
    choices = placement.map_lanes(probe, state, join=False)
    if len({c["chosen"] for c in choices}) > 1:
        each = ", ".join(f"seed {s}: {c['chosen']}" for s, c in zip(placement.lanes.seeds, choices))
        raise ValueError(f"--freeze auto chose different freeze points for the seeds trained "
                         f"together ({each}); seeds share one compiled step, so run them "
                         "separately or give --freeze explicitly")
    return choices

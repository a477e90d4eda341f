"""Task boundaries: the strategy's `begin_task` and `end_task` hooks, run on the host.

Between the compiled steps of two tasks, each lane's hook runs on its own
state and memory with its own config (its seed): LightCL stores its buffer
and reference features, scores vital channels; EWC computes its Fisher;
replay strategies make their buffers. As in the reference, the hooks'
train-mode forwards fold their batch statistics into BatchNorm's running
ones, which the hooks hand back through a `BatchStatsChain`.
"""

from __future__ import annotations

from typing import Callable

from lightcl_jax.config import Config
from lightcl_jax.training.forward import BatchStatsChain, jitted_forward
from lightcl_jax.training.steps import Phase, phase_optimizer


def run_hook(hook: Callable, run, state, memory, batch, *, task_index: int,
             configs: list[Config], fixed_bn: tuple[str, ...]):
    """``hook`` (a strategy's `begin_task` or `end_task`) on every lane.

    Args:
      hook: the bound strategy method.
      run: the `lightcl_jax.training.setup.Run`.
      state, memory: the (lane-stacked) train state and strategy memory.
      batch: a (lane-stacked) training batch ``(x, y)`` of the task.
      task_index: the task.
      configs: each lane's config.
      fixed_bn: layer groups whose BatchNorm statistics stay fixed.

    Returns:
      (state with the hook's BatchNorm updates, the hook's memory).
    """
    def per_lane(lane, lane_state, lane_memory, lane_batch):
        chain = BatchStatsChain(lane_state.batch_stats)
        lane_memory = hook(lane_memory, config=configs[lane], task_index=task_index,
                           batch=lane_batch, forward=jitted_forward(run.model, chain, fixed_bn),
                           eval_forward=run.eval_forward, params=lane_state.params,
                           batch_stats=lane_state.batch_stats,
                           classes_per_task=run.stream.classes_per_task)
        return lane_state.replace(batch_stats=chain.latest), lane_memory

    lanes = run.placement.lanes
    states, memories = zip(*run.placement.map_lanes(per_lane, state, memory, batch, join=False))
    return lanes.join(states), lanes.join(memories)


def begin_task(run, state, memory, batches, *, task_index: int, phase: Phase,
               configs: list[Config], masks: list):
    """A task begins: each lane's optimizer state for the phase, then `begin_task`
    on a fresh training batch (as the reference's ``next(iter(loader))``).

    Returns:
      (state, memory).
    """
    # SGD keeps no state, but the masked optimizer's structure follows the phase
    # (and with --sparse it holds the lane's masks).
    def init(lane, lane_state):
        tx = phase_optimizer(configs[lane], lane_state.params, phase.frozen, masks[lane])
        return tx.init(lane_state.params)
    state = state.replace(opt_state=run.placement.map_lanes(init, state))
    return run_hook(run.strategy.begin_task, run, state, memory, batches.one(),
                    task_index=task_index, configs=configs, fixed_bn=phase.fixed_bn)


def end_task(run, state, memory, batches, *, task_index: int, phase: Phase,
             configs: list[Config]):
    """A task's training ended: `end_task` on a fresh training batch. Returns (state, memory)."""
    return run_hook(run.strategy.end_task, run, state, memory, batches.one(),
                    task_index=task_index, configs=configs, fixed_bn=phase.fixed_bn)

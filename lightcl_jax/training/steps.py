"""Phases, their optimizers, and the pure train and eval steps.

A *phase* is what the compiled train step depends on: the frozen layer groups
(they shape the optimizer), which BatchNorms keep fixed statistics, and
whether the strategy's memory enters the loss. The step is jitted once per
phase and reused for every step, epoch and task of that phase; the task's
class offset is a traced argument, so moving to the next task of the same
phase does not recompile. LightCL without pre-training has two phases (task
0: all layers, no memory; tasks 1+: frozen prefix + regulation).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import optax

from lightcl_jax.config import Config
from lightcl_jax.metrics.continual import (EvalMetric, cil_predictions, task_cross_entropy,
                                           til_predictions)
from lightcl_jax.strategies import Strategy
from lightcl_jax.training.forward import BatchStatsChain, make_eval_forward, make_forward
from lightcl_jax.training.freezing import TRAINABLE, freeze_labels, masked_optimizer
from lightcl_jax.training.sparsity import keep_pruned
from lightcl_jax.training.state import TrainState


@dataclasses.dataclass(frozen=True)
class Phase:
    """What a compiled train step depends on (hashable: the jit cache key)."""

    frozen: tuple[str, ...]     # frozen layer groups
    fixed_bn: tuple[str, ...]   # layer groups whose BatchNorm statistics stay fixed
    uses_memory: bool           # the strategy's extra loss is part of the step


def phase_for_task(strategy: Strategy, config: Config, task_index: int, pretrained: bool) -> Phase:
    frozen = tuple(strategy.frozen_groups(config, task_index, pretrained))
    return Phase(frozen=frozen,
                 fixed_bn=frozen if config.frozen_bn == "fixed" else (),
                 uses_memory=strategy.uses_memory(task_index))


def memory_scheduled(config: Config, phase: Phase) -> bool:
    """Whether ``phase``'s train step compiles with XLA's memory-optimized scheduler
    (``config.xla_scheduler``; ``auto``: when the phase freezes layers)."""
    return config.xla_scheduler == "memory" or (config.xla_scheduler == "auto"
                                                and bool(phase.frozen))


def phase_optimizer(config: Config, params, frozen: tuple[str, ...], masks=None):
    """SGD on the trainable leaves; with sparse ``masks``, pruned entries get no update.

    Frozen leaves' masks are replaced by a scalar: they get no update anyway,
    and the optimizer state carries only the masks that matter.
    """
    tx = masked_optimizer(optax.sgd(config.lr), params, frozen)
    if masks is None:
        return tx
    labels = freeze_labels(params, frozen)
    masks = jax.tree_util.tree_map(lambda m, label: m if label == TRAINABLE else jnp.ones((), bool),
                                   masks, labels)
    return optax.chain(tx, keep_pruned(masks))


def make_train_step(model, tx: optax.GradientTransformation, strategy: Strategy, config: Config,
                    phase: Phase, classes_per_task: int) -> Callable:
    """Returns the pure train step of one phase (jit it with donated state).

    ``train_step(state, memory, x, y, class_offset) -> (state, memory, metrics)``:
    cross-entropy over each sample's own task's logits (labels shifted to
    0..C-1; `task_cross_entropy`) plus the strategy's extra loss, one optax
    update of the gradient the strategy's `gradient_projection` returns, then
    the strategy's `after_step` on its memory. As in the reference, the
    strategy's forward passes (LightCL: the buffer) run first, then the
    batch's, and each folds its statistics into BatchNorm's running ones.
    ``metrics`` holds scalar ``loss``, ``ce`` and the strategy's terms.
    """
    hooks = dict(config=config, classes_per_task=classes_per_task)

    def train_step(state: TrainState, memory, x, y, class_offset):
        def loss_fn(params):
            chain = BatchStatsChain(state.batch_stats)
            forward = make_forward(model, chain, phase.fixed_bn)
            loss = jnp.zeros((), jnp.float32)
            terms = {}
            if phase.uses_memory:
                loss, terms = strategy.extra_loss(forward, make_eval_forward(model), params,
                                                  memory, x=x, y=y, class_offset=class_offset,
                                                  **hooks)
            logits, _ = forward(params, x)
            ce = jnp.mean(task_cross_entropy(logits, y, classes_per_task))
            if phase.uses_memory:
                after, after_terms = strategy.batch_loss(
                    logits, make_eval_forward(model), memory, x=x, y=y,
                    class_offset=class_offset, **hooks)
                loss = loss + after
                terms = {**terms, **after_terms}
            return ce + loss, (chain.latest, logits, {"ce": ce, **terms})

        (loss, (batch_stats, logits, terms)), grads = jax.value_and_grad(
            loss_fn, has_aux=True)(state.params)
        if phase.uses_memory:
            chain = BatchStatsChain(batch_stats)
            trainable = jax.tree_util.tree_map(lambda label: label == TRAINABLE,
                                               freeze_labels(state.params, phase.frozen))
            grads, projection_terms = strategy.gradient_projection(
                grads, value_and_grad=_chained_value_and_grad(model, chain, phase, state.params),
                memory=memory, trainable=trainable, **hooks)
            batch_stats = chain.latest
            terms = {**terms, **projection_terms}
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new_state = TrainState(params=params, batch_stats=batch_stats, opt_state=opt_state,
                               step=state.step + 1)
        if phase.uses_memory:
            memory = strategy.after_step(memory, x=x, y=y, logits=jax.lax.stop_gradient(logits),
                                         config=config)
        return new_state, memory, {"loss": loss, **terms}

    return train_step


def _chained_value_and_grad(model, chain: BatchStatsChain, phase: Phase, params) -> Callable:
    """``value_and_grad(fn) -> (fn(forward, params), gradient)`` for `Strategy.gradient_projection`:
    its training-mode forwards continue ``chain`` (read ``chain.latest`` after)."""
    def value_and_grad(fn):
        def wrapped(params):
            inner = BatchStatsChain(chain.latest)
            value = fn(make_forward(model, inner, phase.fixed_bn), params)
            return value, inner.latest
        (value, chain.latest), grad = jax.value_and_grad(wrapped, has_aux=True)(params)
        return value, grad
    return value_and_grad


def make_eval_step(model, classes_per_task: int, eval_metrics: tuple[EvalMetric, ...] = ()
                   ) -> Callable:
    """``eval_step(params, batch_stats, x, y, valid, class_offset) -> (til_correct,
    cil_correct, sums)``: ``sums`` maps each of ``eval_metrics`` to its ``update`` of the
    batch (`lightcl_jax.metrics.continual.EvalMetric`)."""
    def eval_step(params, batch_stats, x, y, valid, class_offset):
        logits, _ = model.apply({"params": params, "batch_stats": batch_stats}, x, train=False)
        til = (til_predictions(logits, class_offset, classes_per_task) == y) & valid
        cil = (cil_predictions(logits) == y) & valid
        sums = {metric.name: metric.update(logits, y, valid, class_offset=class_offset,
                                           classes_per_task=classes_per_task)
                for metric in eval_metrics}
        return jnp.sum(til, dtype=jnp.int32), jnp.sum(cil, dtype=jnp.int32), sums
    return eval_step


def phase_step(model, strategy: Strategy, config: Config, params, task_index: int,
               pretrained: bool, classes_per_task: int, masks=None):
    """The phase of a task, its optimizer (`phase_optimizer`) and its pure train step."""
    phase = phase_for_task(strategy, config, task_index, pretrained)
    tx = phase_optimizer(config, params, phase.frozen, masks)
    return phase, tx, make_train_step(model, tx, strategy, config, phase, classes_per_task)


def memory_at_task_start(strategy: Strategy, config: Config, task_index: int, batch,
                         forward, eval_forward, params, batch_stats, classes_per_task: int,
                         *, task_ended: bool = False):
    """The strategy's memory at the start of ``task_index`` if every earlier task
    ended, and this one began, on ``batch`` = (x, y) (with ``task_ended``: once
    this task has ended too): the right shapes for compiling or timing a step
    without training a stream first, or for restoring a checkpoint (usable
    under `jax.eval_shape`)."""
    memory = None
    kwargs = dict(config=config, batch=batch, forward=forward, eval_forward=eval_forward,
                  params=params, batch_stats=batch_stats, classes_per_task=classes_per_task)
    for t in range(task_index):
        memory = strategy.begin_task(memory, task_index=t, **kwargs)
        memory = strategy.end_task(memory, task_index=t, **kwargs)
    memory = strategy.begin_task(memory, task_index=task_index, **kwargs)
    if task_ended:
        memory = strategy.end_task(memory, task_index=task_index, **kwargs)
    return memory


def abstract_memory(model, strategy: Strategy, config: Config, phase: Phase, task_index: int,
                    params, batch_stats, image_shape, classes_per_task: int, *,
                    task_ended: bool = False):
    """`memory_at_task_start`'s shapes and dtypes (`jax.ShapeDtypeStruct`s), nothing computed.

    ``params`` and ``batch_stats`` may be abstract too.
    """
    x = jax.ShapeDtypeStruct((config.batch_size, *image_shape), jnp.float32)
    y = jax.ShapeDtypeStruct((config.batch_size,), jnp.int32)
    return jax.eval_shape(
        lambda params, batch_stats, x, y: memory_at_task_start(
            strategy, config, task_index, (x, y),
            make_forward(model, BatchStatsChain(batch_stats), phase.fixed_bn),
            make_eval_forward(model), params, batch_stats, classes_per_task,
            task_ended=task_ended),
        params, batch_stats, x, y)

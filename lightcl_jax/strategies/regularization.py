"""``ewc`` (online EWC) and ``lwf`` (Learning without Forgetting).

Online EWC (Schwarz et al. 2018), diagonal Fisher:
  * end of task t: F_t = mean over one training batch of (d log p(y|x) / d theta)^2
    (the empirical Fisher of the task-masked log-likelihood, per sample, in
    evaluation mode), accumulated F = gamma x F + F_t; theta* = theta.
  * tasks t >= 1: + lam x sum(F x (theta - theta*)^2).

LwF (Li & Hoiem 2016), as a class-incremental distillation:
  * start of task t >= 1: keep a copy of the model (parameters and BatchNorm
    statistics).
  * tasks t >= 1: + alpha x cross-entropy between the old model's and the
    current model's softened (temperature ``temperature``) distributions over
    the classes of earlier tasks, on the current batch. The old model runs in
    evaluation mode.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from lightcl_jax.metrics.continual import task_cross_entropy
from lightcl_jax.strategies.base import Strategy
from lightcl_jax.strategies.hyperparameters import hyperparameter


class EWCMemory(NamedTuple):
    fisher: Any   # pytree like params: accumulated diagonal Fisher
    anchor: Any   # pytree like params: parameters at the end of the last task


def diagonal_fisher(log_likelihood: Callable, params: Any, xs: jax.Array, ys: jax.Array) -> Any:
    """Mean over samples of the squared gradient of ``log_likelihood(params, x, y)``.

    Per-sample gradients are taken one at a time (a scan that accumulates
    their squares), so the pass needs the memory of one gradient, not one per
    sample.

    Args:
      log_likelihood: ``(params, x, y) -> scalar`` for one sample.
      params: the pytree to differentiate.
      xs, ys: samples, stacked on the first axis.

    Returns:
      A pytree like ``params``.
    """
    grad = jax.grad(log_likelihood)

    def add(total, sample):
        g = grad(params, *sample)
        return jax.tree_util.tree_map(lambda t, gi: t + jnp.square(gi), total, g), None

    zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
    total, _ = jax.lax.scan(add, zeros, (xs, ys))
    return jax.tree_util.tree_map(lambda t: t / xs.shape[0], total)


def ewc_penalty(params: Any, memory: EWCMemory) -> jax.Array:
    """sum over all parameters of F x (theta - theta*)^2."""
    terms = jax.tree_util.tree_map(lambda f, p, a: jnp.sum(f * jnp.square(p - a)),
                                   memory.fisher, params, memory.anchor)
    return sum(jax.tree_util.tree_leaves(terms))


class OnlineEWC(Strategy):
    name = "ewc"
    lam: float = hyperparameter(10.0, "weight of the penalty", minimum=0)
    gamma: float = hyperparameter(1.0, "decay of the accumulated Fisher", minimum=0, maximum=1)

    def uses_memory(self, task_index):
        return task_index >= 1

    def extra_loss(self, forward, eval_forward, params, memory, *, x, y, class_offset, config,
                   classes_per_task):
        penalty = ewc_penalty(params, memory)
        return self.lam * penalty, {"ewc_penalty": penalty}

    def end_task(self, memory, *, config, task_index, batch, forward, eval_forward, params,
                 batch_stats, classes_per_task):
        x, y = jnp.asarray(batch[0]), jnp.asarray(batch[1])
        fisher = _fisher_fn(eval_forward, classes_per_task)(params, batch_stats, x, y)
        if memory is not None:
            fisher = jax.tree_util.tree_map(lambda old, new: self.gamma * old + new,
                                            memory.fisher, fisher)
        return EWCMemory(fisher=fisher, anchor=jax.tree_util.tree_map(jnp.copy, params))


@functools.lru_cache(maxsize=8)
def _fisher_fn(eval_forward, classes_per_task: int):
    """The jitted Fisher of one run's model: compiled once, reused at every task end."""
    def fisher(params, batch_stats, x, y):
        def log_likelihood(p, xi, yi):
            logits, _ = eval_forward(p, batch_stats, xi[None])
            return -task_cross_entropy(logits, yi[None], classes_per_task)[0]
        return diagonal_fisher(log_likelihood, params, x, y)
    return jax.jit(fisher)


class LwFMemory(NamedTuple):
    params: Any        # the old model's parameters
    batch_stats: Any   # the old model's BatchNorm statistics


def distillation_loss(new_logits: jax.Array, old_logits: jax.Array, num_old_classes: jax.Array,
                      temperature: float) -> jax.Array:
    """Mean over samples of -sum_c p_old(c) log p_new(c) over the first classes.

    Both distributions are softmaxes at ``temperature`` over classes
    [0, num_old_classes) only (a traced count).
    """
    old_mask = jnp.arange(new_logits.shape[1])[None, :] < num_old_classes
    neg = jnp.finfo(new_logits.dtype).min
    p_old = jax.nn.softmax(jnp.where(old_mask, old_logits / temperature, neg), axis=1)
    log_p_new = jax.nn.log_softmax(jnp.where(old_mask, new_logits / temperature, neg), axis=1)
    return -jnp.mean(jnp.sum(jnp.where(old_mask, p_old * log_p_new, 0.0), axis=1))


class LearningWithoutForgetting(Strategy):
    name = "lwf"
    alpha: float = hyperparameter(1.0, "weight of the distillation loss", minimum=0)
    temperature: float = hyperparameter(2.0, "distillation temperature", above=0)

    def uses_memory(self, task_index):
        return task_index >= 1

    def begin_task(self, memory, *, config, task_index, batch, forward, eval_forward, params,
                   batch_stats, classes_per_task):
        if task_index == 0:
            return None
        copy = jax.tree_util.tree_map(jnp.copy, (params, batch_stats))
        return LwFMemory(params=copy[0], batch_stats=copy[1])

    def batch_loss(self, logits, eval_forward, memory, *, x, y, class_offset, config,
                   classes_per_task):
        old_logits, _ = eval_forward(memory.params, memory.batch_stats, x)
        kd = distillation_loss(logits, jax.lax.stop_gradient(old_logits), class_offset,
                               self.temperature)
        return self.alpha * kd, {"distillation": kd}

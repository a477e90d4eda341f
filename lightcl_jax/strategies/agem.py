"""``agem``: Averaged Gradient Episodic Memory (Chaudhry et al., ICLR 2019).

A-GEM keeps an episodic memory of earlier tasks' samples and never lets a
step increase the loss on it, to first order: with g the batch's gradient
and g_ref the gradient of the memory's loss,

    g~ = g - (g . g_ref / g_ref . g_ref) g_ref   when g . g_ref < 0,   g otherwise,

and the optimizer applies g~ (`project_gradient`; the dot products run over
the trainable leaves only). Here the memory is ``buffer_size``
samples, filled at the end of every task with ``buffer_size // num_tasks``
samples of a fresh training batch of that task (at least one; by reservoir
sampling once it is full, `lightcl_jax.memory.replay`), so task t trains
against the memories of tasks 0..t-1. g_ref comes from the whole memory (at
most ``batch_size`` samples of it per step, `replay_batch`) through the
model in training mode, after the batch, as Mammoth's A-GEM does; its
BatchNorm statistics are folded into the running ones like every forward
here. Its loss is the task-masked cross-entropy every loss here uses. Task 0
has no memory yet and trains as finetune does.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lightcl_jax.memory.replay import empty_buffer, replay_batch, reservoir_add
from lightcl_jax.metrics.continual import task_cross_entropy
from lightcl_jax.strategies.base import Strategy
from lightcl_jax.strategies.hyperparameters import hyperparameter
from lightcl_jax.strategies.replay import masked_mean


def project_gradient(grads, reference, trainable):
    """A-GEM's projection of ``grads`` against ``reference`` (pytrees of one structure).

    Args:
      grads: the batch's gradient g.
      reference: the episodic memory's gradient g_ref.
      trainable: a pytree of Python bools, the same structure: leaves the
        optimizer updates. Dot products sum over these only; other leaves of
        ``grads`` are returned as they are.

    Returns:
      ``(projected, was_projected)``: g - (g.g_ref / g_ref.g_ref) g_ref where
      g.g_ref < 0, else g; and a float32 scalar, 1.0 when the projection
      applied. A zero g_ref (an empty memory) leaves g as it is.
    """
    pairs = [(g, r) for g, r, keep in zip(jax.tree_util.tree_leaves(grads),
                                          jax.tree_util.tree_leaves(reference),
                                          jax.tree_util.tree_leaves(trainable)) if keep]
    dot = sum((jnp.vdot(g, r) for g, r in pairs), jnp.zeros((), jnp.float32))
    norm = sum((jnp.vdot(r, r) for _, r in pairs), jnp.zeros((), jnp.float32))
    project = (dot < 0) & (norm > 0)
    scale = jnp.where(project, dot / jnp.where(norm > 0, norm, 1.0), 0.0)
    projected = jax.tree_util.tree_map(lambda g, r, keep: g - scale * r if keep else g,
                                       grads, reference, trainable)
    return projected, project.astype(jnp.float32)


class AGEM(Strategy):
    name = "agem"
    buffer_size: int = hyperparameter(15, "samples in the episodic memory", minimum=1)

    def uses_memory(self, task_index):
        return task_index >= 1

    def begin_task(self, memory, *, config, task_index, batch, forward, eval_forward, params,
                   batch_stats, classes_per_task):
        if memory is not None:
            return memory
        return empty_buffer(self.buffer_size, batch[0].shape[1:], num_classes=None,
                            key=jax.random.PRNGKey(config.seed + 7919))

    def end_task(self, memory, *, config, task_index, batch, forward, eval_forward, params,
                 batch_stats, classes_per_task):
        x, y = batch
        num_classes = jax.eval_shape(eval_forward, params, batch_stats, x[:1])[0].shape[-1]
        per_task = max(1, self.buffer_size // (num_classes // classes_per_task))
        return reservoir_add(memory, jnp.asarray(x[:per_task]), jnp.asarray(y[:per_task]))

    def gradient_projection(self, grads, *, value_and_grad, memory, trainable, config,
                            classes_per_task):
        index, valid = replay_batch(memory, config.batch_size)

        def memory_loss(forward, params):
            logits, _ = forward(params, memory.x[index])
            return masked_mean(task_cross_entropy(logits, memory.y[index], classes_per_task),
                               valid)

        loss, reference = value_and_grad(memory_loss)
        projected, was_projected = project_gradient(grads, reference, trainable)
        return projected, {"memory_ce": loss, "projected": was_projected}

"""``er`` (experience replay) and ``derpp`` (DER++), on a reservoir buffer.

Both keep ``buffer_size`` samples of the stream by reservoir sampling
(`lightcl_jax.memory.replay`): every training batch is offered to the buffer
after its step. Each step replays the whole buffer (or ``batch_size`` samples
of it when it is larger) through the model as its own batch:

  * ER: + mean task-masked cross-entropy on the replayed samples.
  * DER++ (Buzzega et al. 2020): + ``alpha`` x MSE between the current
    logits and the logits stored at insertion, + ``beta`` x the replayed
    samples' task-masked cross-entropy (Mammoth's CIFAR-10 values by default).

The buffer stores the inputs as they were trained on (augmented when
augmentation is on). Slots not yet filled are masked out of the losses; at
the very first step the buffer is still empty, so its zero images pass
through the model once and fold their statistics into BatchNorm's running
ones (one momentum update). DER++ uses the same replayed samples for both of
its terms (Buzzega et al. draw two minibatches; with a buffer no larger than
a batch, both are the whole buffer anyway). The replayed cross-entropy is
task-masked like every loss here, so old samples do not compete with other
tasks' logits as in class-incremental ER implementations such as Mammoth's.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lightcl_jax.memory.replay import empty_buffer, replay_batch, reservoir_add
from lightcl_jax.metrics.continual import task_cross_entropy
from lightcl_jax.strategies.base import Strategy
from lightcl_jax.strategies.hyperparameters import hyperparameter


def masked_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean of ``values`` over the rows where ``mask`` is set; 0 when none is."""
    mask = mask.astype(values.dtype)
    return jnp.sum(values * mask) / jnp.maximum(jnp.sum(mask), 1.0)


class ExperienceReplay(Strategy):
    name = "er"
    stores_logits = False
    buffer_size: int = hyperparameter(15, "samples in the reservoir buffer", minimum=1)

    def uses_memory(self, task_index):
        return True

    def begin_task(self, memory, *, config, task_index, batch, forward, eval_forward, params,
                   batch_stats, classes_per_task):
        if memory is not None:
            return memory
        x = batch[0]
        num_classes = None
        if self.stores_logits:
            num_classes = eval_forward(params, batch_stats, x[:1])[0].shape[-1]
        return empty_buffer(self.buffer_size, x.shape[1:], num_classes=num_classes,
                            key=jax.random.PRNGKey(config.seed + 7919))

    def _replayed(self, forward, params, memory, config):
        index, valid = replay_batch(memory, config.batch_size)
        logits, _ = forward(params, memory.x[index])
        return index, valid, logits

    def extra_loss(self, forward, eval_forward, params, memory, *, x, y, class_offset, config,
                   classes_per_task):
        index, valid, logits = self._replayed(forward, params, memory, config)
        ce = masked_mean(task_cross_entropy(logits, memory.y[index], classes_per_task), valid)
        return ce, {"replay_ce": ce}

    def after_step(self, memory, *, x, y, logits, config):
        return reservoir_add(memory, x, y, logits if self.stores_logits else None)


class DERPlusPlus(ExperienceReplay):
    name = "derpp"
    stores_logits = True
    alpha: float = hyperparameter(0.1, "weight of the logit MSE", minimum=0)
    beta: float = hyperparameter(0.5, "weight of the replayed cross-entropy", minimum=0)

    def extra_loss(self, forward, eval_forward, params, memory, *, x, y, class_offset, config,
                   classes_per_task):
        index, valid, logits = self._replayed(forward, params, memory, config)
        mse = masked_mean(jnp.mean(jnp.square(logits - memory.logits[index]), axis=1), valid)
        ce = masked_mean(task_cross_entropy(logits, memory.y[index], classes_per_task), valid)
        loss = self.alpha * mse + self.beta * ce
        return loss, {"logit_mse": mse, "replay_ce": ce}

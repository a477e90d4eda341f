"""``lightcl``: freeze the generalised layers, regulate the rest on vital channels.

SPEC section 2:
  * Freezing: the layer groups of ``config.freeze`` (default stem + stages 1-3)
    are frozen in every task when the backbone is pre-trained; without
    pre-training task 0 trains every layer and freezing starts at task 1.
  * End of every task: vital channels of the four taps are scored on one
    training batch and OR-ed into the masks.
  * Start of task t >= 1: the first ``buffer_size`` samples of a fresh
    training batch of the new task are stored with the old model's taps and
    logits on them (no old-task image is kept).
  * Task t >= 1: the regulation loss on the buffer joins the cross-entropy.
"""

from __future__ import annotations

from lightcl_jax.memory.feature_memory import (FeatureMemory, build_memory,
                                               regulation_loss, update_vital_masks)
from lightcl_jax.strategies.base import Strategy
from lightcl_jax.training.freezing import frozen_groups


class LightCL(Strategy):
    name = "lightcl"

    def frozen_groups(self, config, task_index, pretrained):
        if task_index == 0 and not pretrained:
            return ()
        return frozen_groups(config.freeze)

    def uses_memory(self, task_index):
        return task_index >= 1

    def extra_loss(self, forward, eval_forward, params, memory: FeatureMemory, *, x, y,
                   class_offset, config, classes_per_task):
        logits, taps = forward(params, memory.buffer_x)
        loss = regulation_loss(taps, logits, memory, config.beta)
        return loss, {"regulation": loss}

    def begin_task(self, memory, *, config, task_index, batch, forward, eval_forward, params,
                   batch_stats, classes_per_task):
        if task_index == 0:
            return memory
        buffer_x = batch[0][:config.buffer_size]
        ref_logits, ref_taps = forward(params, buffer_x)
        return build_memory(buffer_x, ref_logits, ref_taps, memory.vital_masks)

    def end_task(self, memory, *, config, task_index, batch, forward, eval_forward, params,
                 batch_stats, classes_per_task):
        _, taps = forward(params, batch[0])
        masks = update_vital_masks(None if memory is None else memory.vital_masks, taps,
                                   config.ratio)
        if memory is None:
            return FeatureMemory(buffer_x=None, ref_taps=None, ref_logits=None, vital_masks=masks)
        return memory._replace(vital_masks=masks)

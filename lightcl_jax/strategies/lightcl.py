"""``lightcl``: freeze the generalised layers, regulate the rest on vital channels.

SPEC section 2:
  * Freezing: the layer groups of ``config.freeze`` (default stem + stages 1-3)
    are frozen in every task when the backbone is pre-trained; without
    pre-training task 0 trains every layer and freezing starts at task 1.
  * End of every task: vital channels of the four taps are scored on one
    training batch and OR-ed into the masks (``ratio`` of each tap's channels).
  * Start of task t >= 1: the first ``buffer_size`` samples of a fresh
    training batch of the new task are stored with the old model's taps and
    logits on them (no old-task image is kept).
  * Task t >= 1: the regulation loss on the buffer, weighted by ``beta``, joins
    the cross-entropy.

The frozen prefix's output on the buffer does not change within a task (its
weights are frozen, and train-mode BatchNorm normalises by the buffer's own
statistics), so `begin_task` stores it and every step runs the buffer from
the first trainable stage only, folding the prefix's stored batch statistics
into the running ones as the reference's full forward would. The numbers are
those of the reference's step; the cost is what the paper's accounting of a
frozen prefix implies.
"""

from __future__ import annotations

from lightcl_jax.memory.feature_memory import (FeatureMemory, build_memory,
                                               regulation_loss, update_vital_masks)
from lightcl_jax.model.layers import LAYER_GROUPS, LAYER_NAMES, frozen_groups
from lightcl_jax.strategies.base import Strategy
from lightcl_jax.strategies.hyperparameters import hyperparameter


def buffer_start(config) -> str | None:
    """The layer group the buffer's step forward starts at (None: at the images).

    The first trainable group, but never past the last stage, whose taps the
    regulation loss needs.
    """
    frozen = frozen_groups(config.freeze)
    if not frozen:
        return None
    return LAYER_GROUPS[min(len(frozen), LAYER_GROUPS.index("stage4"))]


class LightCL(Strategy):
    name = "lightcl"
    beta: float = hyperparameter(2e-4, "weight of the regulation loss", minimum=0)
    buffer_size: int = hyperparameter(15, "samples of a new task's first batch kept as the "
                                      "buffer (at most the batch size)", minimum=1)
    ratio: float = hyperparameter(0.15, "fraction of each tap's channels made vital per task",
                                  above=0, maximum=1)

    def validate_run(self, config):
        if self.buffer_size > config.batch_size:
            raise ValueError(f"strategy lightcl: buffer_size must be at most batch_size="
                             f"{config.batch_size} (LightCL takes its buffer from one batch of a "
                             f"task); got {self.buffer_size}")

    def frozen_groups(self, config, task_index, pretrained):
        if task_index == 0 and not pretrained:
            return ()
        frozen = frozen_groups(config.freeze)
        if task_index == 0 and config.sparse and frozen and frozen[-1] != "stem":
            # The sparse reference retrains its pruned backbone's last frozen block
            # ("3.1") in task 0: freeze that group's other blocks only.
            blocks = [n for n in LAYER_NAMES if n.startswith(frozen[-1] + "_")]
            frozen = frozen[:-1] + tuple(blocks[:-1])
        return frozen

    def uses_memory(self, task_index):
        return task_index >= 1

    def extra_loss(self, forward, eval_forward, params, memory: FeatureMemory, *, x, y,
                   class_offset, config, classes_per_task):
        if memory.buffer_features is None:
            logits, taps = forward(params, memory.buffer_x)
        else:
            logits, taps = forward(params, memory.buffer_features, start=buffer_start(config),
                                   prefix_stats=memory.prefix_stats)
        loss = regulation_loss(taps, logits, memory, self.beta)
        return loss, {"regulation": loss}

    def begin_task(self, memory, *, config, task_index, batch, forward, eval_forward, params,
                   batch_stats, classes_per_task):
        if task_index == 0:
            return memory
        buffer_x = batch[0][:self.buffer_size]
        start = buffer_start(config)
        if start is None:
            ref_logits, ref_taps = forward(params, buffer_x)
            return build_memory(buffer_x, ref_logits, ref_taps, memory.vital_masks)
        # One forward from the images, in two parts: the prefix's output is kept.
        features, prefix_stats = forward(params, buffer_x, stop=start)
        ref_logits, ref_taps = forward(params, features, start=start)
        return build_memory(buffer_x, ref_logits, ref_taps, memory.vital_masks, features,
                            prefix_stats)

    def end_task(self, memory, *, config, task_index, batch, forward, eval_forward, params,
                 batch_stats, classes_per_task):
        _, taps = forward(params, batch[0])
        masks = update_vital_masks(None if memory is None else memory.vital_masks, taps,
                                   self.ratio)
        if memory is None:
            return FeatureMemory(buffer_x=None, ref_taps=None, ref_logits=None, vital_masks=masks)
        return memory._replace(vital_masks=masks)

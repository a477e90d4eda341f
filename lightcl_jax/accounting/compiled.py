"""Compiler-exact cost of a strategy's jitted train step.

XLA reports, for the compiled step on the real shapes, its FLOPs (cost
analysis) and its buffers (memory analysis): arguments, outputs,
temporaries, and the bytes by which donated outputs alias their inputs.
Nothing is run: the step is lowered on abstract shapes and compiled.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lightcl_jax.config import Config
from lightcl_jax.model.resnet import ResNet18
from lightcl_jax.strategies import get_strategy
from lightcl_jax.training.loop import (BatchStatsChain, create_train_state, make_eval_forward,
                                       make_forward, memory_at_task_start, phase_step)


def compiled_train_step_cost(config: Config, image_shape: tuple[int, int, int],
                             num_classes: int, classes_per_task: int, *, task_index: int = 1,
                             pretrained: bool = False) -> dict:
    """Compiles the train step a strategy runs in ``task_index`` and reads XLA's figures.

    Args:
      config: run settings (strategy, nf, batch size, buffer size, freeze, ...).
      image_shape: (H, W, C) of the inputs.
      num_classes: width of the head.
      classes_per_task: classes in one task.
      task_index: which task's phase to compile (LightCL: 0 trains every layer
        without pre-training, 1+ freezes and regularises).
      pretrained: whether the run starts from a pre-trained backbone.

    Returns:
      ``flops``, ``argument_bytes``, ``output_bytes``, ``temp_bytes``,
      ``alias_bytes`` and ``train_bytes`` (arguments + temporaries + outputs
      not aliased to donated arguments), plus the ``phase`` compiled.
    """
    config = config.resolved()
    strategy = get_strategy(config.strategy)
    model = ResNet18(num_classes=num_classes, nf=config.nf)
    state = jax.eval_shape(lambda: create_train_state(model, image_shape, jax.random.PRNGKey(0)))
    phase, tx, step = phase_step(model, strategy, config, state.params, task_index, pretrained,
                                 classes_per_task)
    state = state.replace(opt_state=jax.eval_shape(tx.init, state.params))
    x = jax.ShapeDtypeStruct((config.batch_size, *image_shape), jnp.float32)
    y = jax.ShapeDtypeStruct((config.batch_size,), jnp.int32)
    offset = jax.ShapeDtypeStruct((), jnp.int32)
    memory = None
    if phase.uses_memory:
        memory = jax.eval_shape(
            lambda params, batch_stats, x, y: memory_at_task_start(
                strategy, config, task_index, (x, y),
                make_forward(model, BatchStatsChain(batch_stats), phase.fixed_bn),
                make_eval_forward(model), params, batch_stats, classes_per_task),
            state.params, state.batch_stats, x, y)
    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(state, memory, x, y, offset).compile()
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    figures = {
        "flops": float(cost["flops"]),
        "argument_bytes": int(mem.argument_size_in_bytes),
        "output_bytes": int(mem.output_size_in_bytes),
        "temp_bytes": int(mem.temp_size_in_bytes),
        "alias_bytes": int(mem.alias_size_in_bytes),
    }
    figures["train_bytes"] = (figures["argument_bytes"] + figures["temp_bytes"]
                              + figures["output_bytes"] - figures["alias_bytes"])
    figures["phase"] = {"frozen": list(phase.frozen), "memory": phase.uses_memory}
    return figures

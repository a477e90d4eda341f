"""Compiler-exact cost of a strategy's jitted train step, compiled without a run.

XLA reports, for the compiled step on the real shapes, its FLOPs (cost
analysis) and its buffers (memory analysis): arguments, outputs,
temporaries, and the bytes by which donated outputs alias their inputs.
Nothing is run: the step is lowered on abstract shapes and compiled.
"""

from __future__ import annotations

import dataclasses
import itertools

import jax
import jax.numpy as jnp

from lightcl_jax import compiler
from lightcl_jax.accounting.theory import STRATEGIES as THEORY_STRATEGIES
from lightcl_jax.accounting.theory import theoretical_cost
from lightcl_jax.compiler import compiled_cost
from lightcl_jax.config import Config
from lightcl_jax.model.layers import FREEZE_POINTS
from lightcl_jax.model.resnet import ResNet18
from lightcl_jax.metrics.continual import split_metrics
from lightcl_jax.strategies import get_strategy, strategy_of
from lightcl_jax.training.state import create_lane_states, create_train_state, run_model
from lightcl_jax.training.step import abstract_memory, make_eval_step, memory_scheduled, phase_step


def lowered_train_step(config: Config, image_shape: tuple[int, int, int], num_classes: int,
                       classes_per_task: int, *, task_index: int = 1, pretrained: bool = False,
                       quick: bool = False):
    """The train step a strategy runs in ``task_index``, lowered on abstract shapes.

    Args:
      config: run settings (strategy and its arguments, nf, batch size, freeze, ...).
      image_shape: (H, W, C) of the inputs.
      num_classes: width of the head.
      classes_per_task: classes in one task.
      task_index: which task's phase to compile (LightCL: 0 trains every layer
        without pre-training, 1+ freezes and regularises).
      pretrained: whether the run starts from a pre-trained backbone.
      quick: compile without LLVM's optimisations (`compiler.MEASURE_ONLY`):
        the same figures in about half the time.

    Returns:
      ``(lowered, phase)``: a `jax.stages.Lowered` with the run's compiler
      options (``.compile()`` it) and the `Phase` it trains.
    """
    config = config.resolved()
    strategy = strategy_of(config)
    model = run_model(config, num_classes, image_shape, 0)
    state = jax.eval_shape(lambda: create_train_state(model, image_shape, jax.random.PRNGKey(0)))
    masks = None
    if config.sparse:  # the masks come from real weights (what is kept decides the shapes)
        (concrete,), (masks,) = create_lane_states(model, image_shape, [0], sparse=True)
        state = jax.eval_shape(lambda: concrete)
    phase, tx, step = phase_step(model, strategy, config, state.params, task_index, pretrained,
                                 classes_per_task, masks)
    state = state.replace(opt_state=jax.eval_shape(tx.init, state.params))
    x = jax.ShapeDtypeStruct((config.batch_size, *image_shape), jnp.float32)
    y = jax.ShapeDtypeStruct((config.batch_size,), jnp.int32)
    offset = jax.ShapeDtypeStruct((), jnp.int32)
    memory = None
    if phase.uses_memory:
        memory = abstract_memory(model, strategy, config, phase, task_index, state.params,
                                 state.batch_stats, image_shape, classes_per_task)
    lowered = compiler.jit(step, donate_argnums=(0, 1),
                           memory_scheduler=memory_scheduled(config), measure_only=quick
                           ).lower(state, memory, x, y, offset)
    return lowered, phase


def compiled_train_step_cost(config: Config, image_shape: tuple[int, int, int],
                             num_classes: int, classes_per_task: int, *, task_index: int = 1,
                             pretrained: bool = False, quick: bool = False) -> dict:
    """Compiles the train step a strategy runs in ``task_index`` and reads XLA's figures.

    Arguments as `lowered_train_step`'s.

    Returns:
      `compiled_cost`'s ``flops``, ``argument_bytes``, ``output_bytes``,
      ``temp_bytes``, ``alias_bytes`` and ``step_bytes`` (arguments +
      temporaries + outputs not aliased to donated arguments; also as
      ``train_bytes``), plus the ``phase`` compiled.
    """
    lowered, phase = lowered_train_step(config, image_shape, num_classes, classes_per_task,
                                        task_index=task_index, pretrained=pretrained,
                                        quick=quick)
    figures = compiled_cost(lowered.compile())
    figures["train_bytes"] = figures["step_bytes"]
    figures["phase"] = {"frozen": list(phase.frozen), "memory": phase.uses_memory}
    return figures


def compiled_eval_step_cost(config: Config, image_shape: tuple[int, int, int], num_classes: int,
                            classes_per_task: int) -> dict:
    """XLA's figures for the jitted eval step on a batch of ``config.eval_batch_size``
    (with the evaluation metrics of ``config.metrics``)."""
    config = config.resolved()
    model = ResNet18(num_classes=num_classes, nf=config.nf)
    state = jax.eval_shape(lambda: create_train_state(model, image_shape, jax.random.PRNGKey(0)))
    batch = config.eval_batch_size
    args = (state.params, state.batch_stats,
            jax.ShapeDtypeStruct((batch, *image_shape), jnp.float32),
            jax.ShapeDtypeStruct((batch,), jnp.int32), jax.ShapeDtypeStruct((batch,), jnp.bool_),
            jax.ShapeDtypeStruct((), jnp.int32))
    eval_metrics = split_metrics(config.metrics)[1]
    compiled = compiler.jit(make_eval_step(model, classes_per_task, eval_metrics)).lower(
        *args).compile()
    return compiled_cost(compiled)


def memory_plan(config: Config, image_shape: tuple[int, int, int], num_classes: int,
                classes_per_task: int, *, budget_mb: float,
                freeze_points: tuple[str, ...] | None = None,
                batch_sizes: tuple[int, ...] = (8, 16, 32),
                buffer_sizes: tuple[int, ...] | None = None,
                sparse: tuple[bool, ...] = (False,), report=None) -> list[dict]:
    """Which settings' train step fits a memory budget: compiled, nothing run, no data.

    For every freeze point x batch size x buffer size x sparse-or-not, the
    train step of a task >= 1 from a pre-trained backbone (the paper's
    protocol: the steady phase of a run on a device) is compiled on abstract
    shapes (`compiled_train_step_cost`) and its XLA step bytes compared with
    ``budget_mb``. A freeze point only matters to strategies that freeze
    (LightCL); a LightCL buffer larger than the batch is skipped (a run
    refuses it).

    Args:
      config: the other settings (strategy, nf, lr, ...).
      image_shape, num_classes, classes_per_task: the stream's shape.
      budget_mb: the memory (MiB) a step may hold.
      freeze_points: default: every point of `FREEZE_POINTS` for LightCL, the
        config's own for other strategies.
      batch_sizes, buffer_sizes: the sizes to try (buffer: the strategy's
        ``buffer_size``; default: the config's, or the strategy's default; a strategy
        without a buffer gets None).
      sparse: whether to try the sparse variant (LightCL; run as
        ``config.sparse_execution`` says), the dense one, or both.
      report: called with each row as it is compiled (e.g. to show progress).

    Returns:
      Every configuration tried, fitting ones first, each ``{"freeze",
      "batch_size", "buffer_size", "sparse", "step_mb", "flops", "theory_mb",
      "fits"}``; among those that fit, the deepest trainable first (fewest
      frozen groups), then the largest batch and buffer.
    """
    lightcl = config.strategy == "lightcl"
    freeze_points = freeze_points or (tuple(FREEZE_POINTS) if lightcl else (config.freeze,))
    own = get_strategy(config.strategy, **config.strategy_args).hyperparameters()
    if "buffer_size" not in own:
        buffer_sizes = (None,)
    rows = []
    for freeze, batch, buffer, pruned in itertools.product(
            freeze_points, batch_sizes, buffer_sizes or (own["buffer_size"],), sparse):
        if lightcl and buffer > batch:
            continue
        args = config.strategy_args if buffer is None else {**config.strategy_args,
                                                             "buffer_size": buffer}
        trial = dataclasses.replace(config, freeze=freeze, batch_size=batch, strategy_args=args,
                                    sparse=pruned).resolved()
        cost = compiled_train_step_cost(trial, image_shape, num_classes, classes_per_task,
                                        pretrained=True, quick=True)
        row = {"freeze": freeze, "batch_size": batch, "buffer_size": buffer, "sparse": pruned,
               "step_mb": cost["step_bytes"] / 2 ** 20, "flops": cost["flops"],
               "theory_mb": None}
        if trial.strategy in THEORY_STRATEGIES and (lightcl or not pruned):
            row["theory_mb"] = theoretical_cost(
                trial.strategy, image_size=image_shape[0], num_classes=num_classes,
                batch_size=batch, buffer_size=buffer or 0, train_samples=1, epochs=1, nf=trial.nf,
                freeze=freeze, sparse=pruned, channels=image_shape[-1])["mem_mb"]
        row["fits"] = row["step_mb"] <= budget_mb
        rows.append(row)
        if report is not None:
            report(row)
    depth = {name: i for i, name in enumerate(FREEZE_POINTS)}
    return sorted(rows, key=lambda r: (not r["fits"], depth.get(r["freeze"], 0),
                                       -r["batch_size"], -(r["buffer_size"] or 0), r["sparse"]))

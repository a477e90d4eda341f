"""The step: phases, their optimizers with freezing, forward passes, the train and
eval steps, and a run's compiled programs.

A *phase* is what the compiled train step depends on: the frozen layer groups
(they shape the optimizer), which BatchNorms keep fixed statistics, and
whether the strategy's memory enters the loss. The step is jitted once per
phase and reused for every step, epoch and task of that phase; the task's
class offset is a traced argument, so moving to the next task of the same
phase does not recompile. LightCL without pre-training has two phases (task
0: all layers, no memory; tasks 1+: frozen prefix + regulation).

A task's phase is built once when it begins (`TaskPhase`, from
`lightcl_jax.training.run.Run.task_phase`): the phase, each lane's optimizer and the
pure train step.

Freezing: A freeze point (`lightcl_jax.model.layers.FREEZE_POINTS`) names the deepest
layer group that is frozen; every group up to it in network order is frozen. Labels are
built from parameter paths, every leaf gets exactly one label (asserted), and
`optax.multi_transform` sends the frozen label to `optax.set_to_zero()`, so frozen
leaves get no update and no optimizer state. Because nothing reads their gradients, XLA
does not compute them, nor keep the activations their backward pass would need.

Forward passes: The reference keeps BatchNorm in training mode, so every forward pass --
of the training batch, of LightCL's buffer, of the batch that scores vital channels --
folds its batch statistics into the running ones, in call order. `make_forward` threads
them through a `BatchStatsChain`; `make_eval_forward` runs in evaluation mode and
changes nothing. Their ``jitted_`` twins serve the host (task boundaries, benchmarks).

`Programs` compiles each phase's step the first time that phase trains
(`lightcl_jax.compiler.CompiledStep`), remembers which tasks each phase
trained, and carries the steps' call counts and XLA figures through a
checkpoint, so that a resumed run reports the whole run's costs.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from lightcl_jax.compiler import CompiledStep, run_resources
from lightcl_jax.config import Config
from lightcl_jax.metrics.continual import (EvalMetric, cil_predictions, task_cross_entropy,
                                           til_predictions)
from lightcl_jax.model.layers import LAYER_GROUPS, layer_group
from lightcl_jax.model.resnet import fold_statistics
from lightcl_jax.strategies import Strategy
from lightcl_jax.training.placement import Placement
from lightcl_jax.training.state import TrainState, keep_pruned


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


@dataclasses.dataclass(frozen=True)
class TaskPhase:
    """A task's phase, built once when the task begins or resumes
    (`lightcl_jax.training.run.Run.task_phase`).

    Each lane's optimizer is SGD with the frozen groups masked out (`phase_optimizer`) and
    that lane's sparse masks kept; the pure train step serves every lane (its update reads
    each lane's masks from the optimizer state).
    """

    task_index: int
    phase: Phase
    configs: tuple[Config, ...]                              # each lane's config
    optimizers: tuple[optax.GradientTransformation, ...]    # each lane's optimizer
    step: Callable                                           # the pure train step

    def init_optimizers(self, placement: Placement, state: TrainState) -> TrainState:
        """``state`` (lane-stacked) with each lane's optimizer state for this phase."""
        def init(lane, lane_state):
            return self.optimizers[lane].init(lane_state.params)
        return state.replace(opt_state=placement.map_lanes(init, state))


def memory_scheduled(config: Config) -> bool:
    """Whether the train steps compile with XLA's memory-optimized scheduler
    (``config.xla_scheduler``: ``auto`` and ``memory`` do, ``default`` does not).

    ``auto`` is the memory-optimized order for every phase's step, full-network ones
    included: it lowered the peak of every step measured at the same speed
    (docs/memory.md)."""
    return config.xla_scheduler != "default"


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


# Freezing layers with masked optax updates.

TRAINABLE = "trainable"
FROZEN = "frozen"


def _path_string(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def freeze_labels(params: Any, frozen: tuple[str, ...]) -> Any:
    """Labels every parameter leaf ``"frozen"`` or ``"trainable"`` from its path.

    Args:
      params: the model's parameter pytree.
      frozen: layer groups to freeze (see `lightcl_jax.model.layers.FREEZE_POINTS`), or single blocks
        such as ``stage3_block1`` (the sparse variant's task 0).

    Returns:
      A pytree of the same structure with one label string per leaf.

    Raises:
      ValueError: a leaf path belongs to no layer group, or to several.
    """
    def label(path, _):
        path = _path_string(path)
        group = layer_group(path)  # raises unless exactly one group matches
        return FROZEN if group in frozen or path.split("/", 1)[0] in frozen else TRAINABLE

    labels = jax.tree_util.tree_map_with_path(label, params)
    num_leaves = len(jax.tree_util.tree_leaves(params))
    num_labels = sum(1 for leaf in jax.tree_util.tree_leaves(labels) if leaf in (FROZEN, TRAINABLE))
    assert num_labels == num_leaves, (num_labels, num_leaves)
    return labels


def masked_optimizer(inner: optax.GradientTransformation, params: Any,
                     frozen: tuple[str, ...]) -> optax.GradientTransformation:
    """``inner`` for trainable leaves, `optax.set_to_zero` for frozen ones."""
    labels = freeze_labels(params, frozen)
    return optax.multi_transform({TRAINABLE: inner, FROZEN: optax.set_to_zero()}, labels)


# Forward passes as strategies see them.

class BatchStatsChain:
    """BatchNorm running statistics threaded through successive train-mode forwards.

    `make_forward` reads ``latest`` and replaces it with what its forward pass
    writes. Layer groups in ``fixed_bn`` are never changed. Use a chain within
    one trace (or on the host); do not let it carry tracers out.
    """

    def __init__(self, batch_stats):
        self.latest = batch_stats


def make_forward(model, chain: BatchStatsChain, fixed_bn: tuple[str, ...]):
    """``forward(params, x, *, start="stem", stop=None, prefix_stats=None)`` in training mode.

    Each call folds its batch statistics into ``chain`` (layer groups in
    ``fixed_bn`` excepted). It returns ``(logits, taps)``, or with ``stop``
    ``(features entering stop, increments)``: ``increments`` are the
    statistics the call folded in, per top-level module. A later call that
    starts at ``stop`` on those features with ``prefix_stats=increments``
    folds the same statistics again for the layers it skips, so together the
    two calls update the running statistics as one forward from the images
    would, without running the prefix again (see `fold_statistics`).
    """
    def forward(params, x, *, start="stem", stop=None, prefix_stats=None):
        stats = chain.latest
        if prefix_stats is not None:
            stats = fold_statistics(stats, prefix_stats)
        if stop is not None:
            # Zeroed running statistics make the update write (1 - momentum) x batch
            # statistic: the increment itself.
            ran = LAYER_GROUPS[LAYER_GROUPS.index(start):LAYER_GROUPS.index(stop)]
            skipped = tuple(k for k in stats
                            if layer_group(k) in ran and layer_group(k) not in fixed_bn)
            zeroed = {k: jax.tree_util.tree_map(jnp.zeros_like, stats[k]) for k in skipped}
            out, updated = model.apply({"params": params, "batch_stats": {**stats, **zeroed}}, x,
                                       train=True, fixed_bn=fixed_bn, start=start, stop=stop,
                                       mutable=["batch_stats"])
            increments = {k: updated["batch_stats"][k] for k in skipped}
            chain.latest = fold_statistics(stats, increments)
            return out, increments
        out, updated = model.apply({"params": params, "batch_stats": stats}, x, train=True,
                                   fixed_bn=fixed_bn, start=start, mutable=["batch_stats"])
        chain.latest = updated["batch_stats"]
        return out
    return forward


def make_eval_forward(model):
    """``eval_forward(params, batch_stats, x) -> (logits, taps)`` in evaluation mode."""
    def eval_forward(params, batch_stats, x):
        return model.apply({"params": params, "batch_stats": batch_stats}, x, train=False)
    return eval_forward


@functools.partial(jax.jit, static_argnames=("model", "fixed_bn", "start", "stop"))
def _train_forward(model, params, batch_stats, x, fixed_bn, start, stop, prefix_stats):
    chain = BatchStatsChain(batch_stats)
    out = make_forward(model, chain, fixed_bn)(params, x, start=start, stop=stop,
                                               prefix_stats=prefix_stats)
    return out, chain.latest


@functools.partial(jax.jit, static_argnames=("model",))
def _eval_forward(model, params, batch_stats, x):
    return make_eval_forward(model)(params, batch_stats, x)


def jitted_eval_forward(model):
    """`make_eval_forward`'s jitted twin for the host."""
    def eval_forward(params, batch_stats, x):
        return _eval_forward(model, params, batch_stats, jnp.asarray(x))
    return eval_forward


def jitted_forward(model, chain: BatchStatsChain, fixed_bn: tuple[str, ...]):
    """`make_forward`'s jitted twin for the host: task boundaries and benchmarks.

    Compiled once per (model, fixed_bn, input shape), whichever chain it serves.
    """
    def forward(params, x, *, start="stem", stop=None, prefix_stats=None):
        out, chain.latest = _train_forward(model, params, chain.latest, jnp.asarray(x), fixed_bn,
                                           start, stop, prefix_stats)
        return out
    return forward


# A run's compiled programs.

class Programs:
    """The compiled steps of one run.

    Args:
      placement: how the steps are vmapped over seeds and sharded over devices.
      model: the model.
      classes_per_task: classes in each task.
      config: the run's settings (``xla_scheduler``: how each phase's step compiles).
      step_wrapper: wraps each phase's pure train step before jit (tests pass
        `chex.assert_max_traces` here); None: none.
      eval_metrics: the evaluation metrics the eval step sums besides the accuracies.
    """

    def __init__(self, placement: Placement, model, classes_per_task: int, config: Config,
                 step_wrapper: Callable[[Callable], Callable] | None = None,
                 eval_metrics: tuple[EvalMetric, ...] = ()):
        self.placement, self.step_wrapper, self.config = placement, step_wrapper, config
        self.train: dict[Phase, CompiledStep] = {}
        self.phase_tasks: dict[Phase, list[int]] = {}
        self.eval = CompiledStep(placement.jit_eval_step(
            make_eval_step(model, classes_per_task, eval_metrics)))

    @classmethod
    def of_run(cls, run, step_wrapper: Callable[[Callable], Callable] | None = None
               ) -> "Programs":
        """The programs of a `lightcl_jax.training.run.Run`."""
        return cls(run.placement, run.model, run.stream.classes_per_task, run.config,
                   step_wrapper, run.eval_metrics)

    def train_step(self, phase: Phase, step: Callable) -> CompiledStep:
        """The compiled step of ``phase``, built from the pure ``step`` unless it already is.

        A phase restored from a checkpoint keeps its counts and figures.
        """
        known = self.train.get(phase)
        if known is None or known.jitted is None:
            if self.step_wrapper is not None:
                step = self.step_wrapper(step)
            self.train[phase] = CompiledStep(
                self.placement.jit_train_step(step, memory_scheduled(self.config)),
                calls=known.calls if known else 0, cost=known.cost if known else None,
                run_flops=known.run_flops if known else None)
        return self.train[phase]

    def add_task(self, phase: Phase, task_index: int) -> None:
        """Records that ``phase`` trains ``task_index``."""
        self.phase_tasks.setdefault(phase, []).append(task_index)

    def to_meta(self) -> dict:
        """Counts, figures and tasks of every step, as JSON (a checkpoint's ``meta``)."""
        return {
            "train_steps": [{"frozen": list(p.frozen), "fixed_bn": list(p.fixed_bn),
                             "memory": p.uses_memory, "tasks": self.phase_tasks[p],
                             "calls": c.calls, "cost": c.cost, "run_flops": c.run_flops}
                            for p, c in self.train.items()],
            "eval_step": {"calls": self.eval.calls, "cost": self.eval.cost,
                          "run_flops": self.eval.run_flops},
        }

    def restore(self, meta: dict) -> None:
        """Takes the counts, figures and tasks of `to_meta` back (steps compile when used)."""
        for entry in meta["train_steps"]:
            phase = Phase(frozen=tuple(entry["frozen"]), fixed_bn=tuple(entry["fixed_bn"]),
                          uses_memory=entry["memory"])
            self.train[phase] = CompiledStep(None, calls=entry["calls"], cost=entry["cost"],
                                             run_flops=entry.get("run_flops"))
            self.phase_tasks[phase] = entry["tasks"]
        evals = meta["eval_step"]
        self.eval = CompiledStep(self.eval.jitted, calls=evals["calls"], cost=evals["cost"],
                                 run_flops=evals.get("run_flops"))

    def resources(self, eval_batch_size: int) -> dict:
        """The ``resources`` entry of the results (`run_resources`)."""
        return run_resources(self.train, self.phase_tasks, self.eval, eval_batch_size)

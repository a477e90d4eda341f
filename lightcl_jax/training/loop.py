"""The shared continual-learning loop: jitted train and eval steps, task by task.

The verbs are plain functions in the flax-examples style:
`create_train_state`, `make_train_step`, `make_eval_step`, `evaluate`,
`train_and_evaluate`. Strategies plug in through `lightcl_jax.strategies`.

Phases. A *phase* is what the compiled train step depends on: the frozen
layer groups (they shape the optimizer), which BatchNorms keep fixed
statistics, and whether the strategy's memory enters the loss. The step is
jitted once per phase and reused for every step, epoch and task of that phase;
the task's class offset is a traced argument, so moving to the next task of
the same phase does not recompile. LightCL without pre-training has two
phases (task 0: all layers, no memory; tasks 1+: frozen prefix + regulation).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import time
from typing import Any, Callable, Protocol

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from lightcl_jax.config import Config
from lightcl_jax.data.pipeline import epoch_batches, eval_batches, prefetch, steps_per_epoch
from lightcl_jax.data.sources import update_digest
from lightcl_jax.data.streams import TaskStream, make_stream
from lightcl_jax.metrics.generalizability import choose_freeze, generalizability
from lightcl_jax.metrics.continual import (average_accuracy, backward_transfer, cil_predictions,
                                           forgetting, til_predictions)
from lightcl_jax.model.backbone import variables_digest
from lightcl_jax.model.resnet import (LAYER_GROUPS, ResNet18, fold_statistics, fresh_head,
                                      layer_group)
from lightcl_jax.strategies import Strategy, get_strategy
from lightcl_jax.strategies.base import task_cross_entropy
from lightcl_jax.training.checkpoint import Position, RunCheckpoints
from lightcl_jax.training.freezing import TRAINABLE, freeze_labels, masked_optimizer
from lightcl_jax.training.lanes import Lanes, seed_statistics
from lightcl_jax.training.parallel import DataParallel, data_parallel
from lightcl_jax.training.sparsity import (apply_masks, channel_prune_masks, keep_pruned,
                                           sparsity_report)


class DivergenceError(FloatingPointError):
    """The training loss became NaN or Inf."""


@flax.struct.dataclass
class TrainState:
    """Everything a train step changes, as one pytree."""

    params: Any        # model parameters (pytree of float32 arrays)
    batch_stats: Any   # BatchNorm running means and variances
    opt_state: Any     # optax state of the current phase's optimizer
    step: jax.Array    # () int32, train steps taken so far in the run


@dataclasses.dataclass(frozen=True)
class Phase:
    """What a compiled train step depends on (hashable: the jit cache key)."""

    frozen: tuple[str, ...]     # frozen layer groups
    fixed_bn: tuple[str, ...]   # layer groups whose BatchNorm statistics stay fixed
    uses_memory: bool           # the strategy's extra loss is part of the step


class Progress(Protocol):
    """Receives progress; the CLI shows it as a bar. All methods may be no-ops.

    A run resumed mid-task calls ``advance`` with the steps already done right
    after ``start_task``; tasks finished before the resume get no events.
    """

    def start_task(self, task_index: int, num_steps: int) -> None: ...
    def advance(self, steps: int, metrics: dict[str, float] | None = None) -> None: ...
    def end_task(self, task_index: int, til: list[float], cil: list[float]) -> None: ...


class _NoProgress:
    def start_task(self, task_index, num_steps):
        pass

    def advance(self, steps, metrics=None):
        pass

    def end_task(self, task_index, til, cil):
        pass


def phase_for_task(strategy: Strategy, config: Config, task_index: int, pretrained: bool) -> Phase:
    frozen = tuple(strategy.frozen_groups(config, task_index, pretrained))
    return Phase(frozen=frozen,
                 fixed_bn=frozen if config.frozen_bn == "fixed" else (),
                 uses_memory=strategy.uses_memory(task_index))


@functools.partial(jax.jit, static_argnames=("model", "image_shape"))
def _init_variables(model, image_shape, key):
    # One compiled program: op-by-op initialisation would compile every layer's ops.
    return model.init(key, jnp.zeros((1, *image_shape), jnp.float32), train=False)


def create_train_state(model, image_shape, key, *, init_variables=None) -> TrainState:
    """Initialises the model; ``init_variables`` (params, batch_stats) replaces the random init.

    With ``init_variables`` (a pre-trained backbone) the head is replaced by a
    fresh one (Xavier-uniform, zero bias), as SPEC section 2 says.

    Raises:
      ValueError: ``init_variables`` does not fit the model (names the first
        parameter whose path or shape differs).
    """
    init_key, head_key = jax.random.split(key)
    variables = _init_variables(model, tuple(image_shape), init_key)
    params, batch_stats = variables["params"], variables["batch_stats"]
    if init_variables is not None:
        init_variables = flax.core.unfreeze(init_variables)
        if set(init_variables) != {"params", "batch_stats"}:
            raise ValueError("init_variables must hold exactly 'params' and 'batch_stats'; got "
                             f"{sorted(init_variables)}")
        expected = {"params": {k: v for k, v in params.items() if k != "head"},
                    "batch_stats": batch_stats}
        given = {"params": {k: v for k, v in init_variables["params"].items() if k != "head"},
                 "batch_stats": init_variables["batch_stats"]}
        _check_same_shapes(expected, given, f"a ResNet-18 with nf={model.nf} on {image_shape}")
        params = fresh_head({**given["params"], "head": params["head"]}, model.num_classes,
                            head_key)
        batch_stats = jax.tree_util.tree_map(jnp.asarray, given["batch_stats"])
        params = jax.tree_util.tree_map(jnp.asarray, params)
    return TrainState(params=params, batch_stats=batch_stats, opt_state=None,
                      step=jnp.zeros((), jnp.int32))


def _check_same_shapes(expected, given, what: str) -> None:
    want = {jax.tree_util.keystr(p): tuple(np.shape(v))
            for p, v in jax.tree_util.tree_leaves_with_path(expected)}
    got = {jax.tree_util.keystr(p): tuple(np.shape(v))
           for p, v in jax.tree_util.tree_leaves_with_path(given)}
    for path in sorted(set(want) | set(got)):
        if want.get(path) != got.get(path):
            raise ValueError(f"init_variables do not fit {what}: {path} is "
                             f"{got.get(path, 'missing')}, expected {want.get(path, 'absent')}")


class BatchStatsChain:
    """BatchNorm running statistics threaded through successive train-mode forwards.

    The reference keeps BatchNorm in training mode, so every forward pass -- of
    the training batch, of LightCL's buffer, of the batch that scores vital
    channels -- folds its batch statistics into the running ones, in call
    order. `make_forward` reads ``latest`` and replaces it with what its
    forward pass writes. Layer groups in ``fixed_bn`` are never changed. Use a
    chain within one trace (or on the host); do not let it carry tracers out.
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


def make_train_step(model, tx: optax.GradientTransformation, strategy: Strategy, config: Config,
                    phase: Phase, classes_per_task: int) -> Callable:
    """Returns the pure train step of one phase (jit it with donated state).

    ``train_step(state, memory, x, y, class_offset) -> (state, memory, metrics)``:
    cross-entropy over each sample's own task's logits (labels shifted to
    0..C-1; `task_cross_entropy`) plus the strategy's extra loss, one optax
    update, then the strategy's `after_step` on its memory. As in the reference, the
    strategy's forward passes (LightCL: the buffer) run first, then the
    batch's, and each folds its statistics into BatchNorm's running ones.
    ``metrics`` holds scalar ``loss``, ``ce`` and the strategy's terms.
    """
    def train_step(state: TrainState, memory, x, y, class_offset):
        def loss_fn(params):
            chain = BatchStatsChain(state.batch_stats)
            forward = make_forward(model, chain, phase.fixed_bn)
            loss = jnp.zeros((), jnp.float32)
            terms = {}
            if phase.uses_memory:
                loss, terms = strategy.extra_loss(
                    forward, make_eval_forward(model), params, memory, x=x, y=y,
                    class_offset=class_offset, config=config, classes_per_task=classes_per_task)
            logits, _ = forward(params, x)
            ce = jnp.mean(task_cross_entropy(logits, y, classes_per_task))
            if phase.uses_memory:
                after, after_terms = strategy.batch_loss(
                    logits, make_eval_forward(model), memory, x=x, y=y,
                    class_offset=class_offset, config=config, classes_per_task=classes_per_task)
                loss = loss + after
                terms = {**terms, **after_terms}
            return ce + loss, (chain.latest, logits, {"ce": ce, **terms})

        (loss, (batch_stats, logits, terms)), grads = jax.value_and_grad(
            loss_fn, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new_state = TrainState(params=params, batch_stats=batch_stats, opt_state=opt_state,
                               step=state.step + 1)
        if phase.uses_memory:
            memory = strategy.after_step(memory, x=x, y=y, logits=jax.lax.stop_gradient(logits),
                                         config=config)
        return new_state, memory, {"loss": loss, **terms}

    return train_step


def compiled_cost(compiled) -> dict:
    """XLA's figures for a compiled function: FLOPs and bytes.

    ``step_bytes`` is what the step holds at once: arguments + temporaries +
    outputs not aliased to donated arguments.
    """
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    figures = {
        "flops": float(cost.get("flops", 0.0)),
        "argument_bytes": int(mem.argument_size_in_bytes),
        "output_bytes": int(mem.output_size_in_bytes),
        "temp_bytes": int(mem.temp_size_in_bytes),
        "alias_bytes": int(mem.alias_size_in_bytes),
    }
    figures["step_bytes"] = (figures["argument_bytes"] + figures["temp_bytes"]
                             + figures["output_bytes"] - figures["alias_bytes"])
    return figures


class CompiledStep:
    """A jitted function compiled ahead of time on its first call's shapes.

    Later calls must have the same shapes (one compilation, as the loop's
    phases guarantee). Keeps XLA's figures (`compiled_cost`) and counts calls,
    so a run can report per-step and whole-run costs.
    """

    def __init__(self, jitted, *, calls: int = 0, cost: dict | None = None):
        # ``calls`` and ``cost`` carry a resumed run's counts and figures over; ``jitted``
        # may then be None until the phase trains again.
        self.jitted, self.compiled, self.cost, self.calls = jitted, None, cost, calls

    def __call__(self, *args):
        if self.compiled is None:
            self.compiled = self.jitted.lower(*args).compile()
            self.cost = compiled_cost(self.compiled)
        self.calls += 1
        return self.compiled(*args)


def run_resources(train_steps: dict[Phase, CompiledStep], phase_tasks: dict[Phase, list[int]],
                  eval_step: CompiledStep, eval_batch_size: int) -> dict:
    """The ``resources`` entry of the results: XLA's per-step figures x step counts."""
    device = jax.devices()[0]
    steps = []
    for phase, step in train_steps.items():
        if step.cost is None:
            continue
        steps.append({"tasks": phase_tasks[phase], "frozen": list(phase.frozen),
                      "memory": phase.uses_memory, "steps": step.calls, **step.cost})
    evals = {"batch_size": eval_batch_size, "steps": eval_step.calls, **(eval_step.cost or {})}
    return {
        "backend": jax.default_backend(),
        "device": device.device_kind,
        "train_steps": steps,
        "eval_step": evals,
        "train_flops": sum(s["steps"] * s["flops"] for s in steps),
        "eval_flops": evals["steps"] * evals.get("flops", 0.0),
        "peak_train_step_bytes": max((s["step_bytes"] for s in steps), default=0),
        "note": ("XLA cost and memory analysis of the compiled train and eval steps on the "
                 "run's shapes; whole-run FLOPs = per-step FLOPs x steps. Work at task "
                 "boundaries (buffers, Fisher, vital channels, probes) is not counted."),
    }


def make_eval_step(model, classes_per_task: int) -> Callable:
    """``eval_step(params, batch_stats, x, y, valid, class_offset) -> (til_correct, cil_correct)``."""
    def eval_step(params, batch_stats, x, y, valid, class_offset):
        logits, _ = model.apply({"params": params, "batch_stats": batch_stats}, x, train=False)
        til = (til_predictions(logits, class_offset, classes_per_task) == y) & valid
        cil = (cil_predictions(logits) == y) & valid
        return jnp.sum(til, dtype=jnp.int32), jnp.sum(cil, dtype=jnp.int32)
    return eval_step


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


def evaluate(eval_step, state: TrainState, stream: TaskStream, num_seen: int,
             batch_size: int, parallel: DataParallel | None = None
             ) -> tuple[list[float], list[float]]:
    """TIL and CIL accuracy in percent on each of the first ``num_seen`` tasks.

    With ``parallel``, each batch is split over its devices.
    """
    til, cil = correct_counts(eval_step, state, stream, num_seen, batch_size, parallel)
    return ([100.0 * float(c) / len(t.y_eval) for c, t in zip(til, stream.tasks)],
            [100.0 * float(c) / len(t.y_eval) for c, t in zip(cil, stream.tasks)])


def correct_counts(eval_step, state: TrainState, stream: TaskStream, num_seen: int,
                   batch_size: int, parallel: DataParallel | None = None
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Correct TIL and CIL predictions on each of the first ``num_seen`` tasks.

    Returns two int64 arrays of shape (num_seen, *E), E being the shape of
    what ``eval_step`` counts: () for one model, (lanes,) for a vmapped one.
    """
    til_counts, cil_counts = [], []
    for task in stream.tasks[:num_seen]:
        til_correct = cil_correct = 0
        offset = jnp.asarray(task.class_offset, jnp.int32)
        batches = eval_batches(task.x_eval, task.y_eval, batch_size)
        for x, y, valid in prefetch(batches, PREFETCH,
                                    None if parallel is None else lambda b: parallel.batch(*b)):
            til, cil = eval_step(state.params, state.batch_stats, x, y, valid, offset)
            til_correct = til_correct + np.asarray(til, np.int64)
            cil_correct = cil_correct + np.asarray(cil, np.int64)
        til_counts.append(til_correct)
        cil_counts.append(cil_correct)
    return np.stack(til_counts), np.stack(cil_counts)


# Training batches read, augmented and sent to the devices ahead of the step.
PREFETCH = 2

# Losses stay on the device and are checked for NaN/Inf every this many steps
# (and at the end of each epoch): often enough not to train long on a
# diverged model, rarely enough not to stall the device.
CHECK_EVERY = 50


def _check_finite(losses: list[dict], first_step: int, task_index: int,
                  seeds: tuple[int, ...] | None = None) -> dict[str, float]:
    """Raises DivergenceError at the first non-finite loss; returns the mean terms.

    With ``seeds`` the terms are (lanes,) arrays, and the message names the seed.
    """
    stacked = {k: np.asarray(jnp.stack([m[k] for m in losses])) for k in losses[0]}
    finite = np.all([np.isfinite(v) for v in stacked.values()], axis=0)
    bad = ~finite.reshape(len(losses), -1)
    if bad.any():
        i, lane = (int(v) for v in np.unravel_index(np.argmax(bad), bad.shape))
        terms = ", ".join(f"{k}={np.reshape(v[i], -1)[lane]:.4g}" for k, v in stacked.items())
        seed = f" (seed {seeds[lane]})" if seeds is not None else ""
        raise DivergenceError(f"training diverged: the loss became non-finite at task "
                              f"{task_index}, step {first_step + i} of the task{seed} ({terms})")
    return {k: float(v.mean()) for k, v in stacked.items()}


def validate_stream(stream: TaskStream, config: Config) -> None:
    """Raises ValueError naming the first problem of a stream, built here or by hand.

    Checked: every task has training and evaluation samples, at least one
    training batch of them; images have the stream's shape and finite pixels;
    labels lie in their task's classes; tasks' class groups are disjoint and
    within the head's ``num_classes``.
    """
    seen: dict[int, int] = {}
    for task in stream.tasks:
        where = f"task {task.index}"
        if task.classes:
            where += f" (classes {task.classes[0]}..{task.classes[-1]})"
        if not task.classes:
            raise ValueError(f"{where} has no classes; every task needs at least one")
        for c in task.classes:
            if not 0 <= c < stream.num_classes:
                raise ValueError(f"{where}: class {c} lies outside the head's "
                                 f"{stream.num_classes} classes [0, {stream.num_classes})")
            if c in seen:
                raise ValueError(f"{where}: class {c} also belongs to task {seen[c]}; class "
                                 "groups must not overlap")
            seen[c] = task.index
        for split, x, y in (("training", task.x_train, task.y_train),
                            ("evaluation", task.x_eval, task.y_eval)):
            if len(y) == 0:
                raise ValueError(f"{where} has no {split} samples; every task needs both")
            if tuple(x.shape[1:]) != tuple(stream.image_shape) or len(x) != len(y):
                expected = ", ".join(map(str, stream.image_shape))
                raise ValueError(f"{where}: {split} images are {tuple(x.shape)} with "
                                 f"{len(y)} labels; expected (N, {expected}) with N labels")
            if isinstance(x, np.ndarray) and not np.all(np.isfinite(x)):
                # (`RecordImages` are decoded uint8 pixels: finite.)
                raise ValueError(f"{where}: {split} images contain NaN or Inf pixels")
            outside = ~np.isin(y, task.classes)
            if outside.any():
                raise ValueError(f"{where}: {split} label {int(y[outside][0])} is not one of "
                                 f"the task's classes {list(task.classes)}")
        if len(task.x_train) < config.batch_size:
            raise ValueError(f"task {task.index} has {len(task.x_train)} training samples, fewer "
                             f"than one batch of {config.batch_size}; lower --batch-size")


# Probe samples per set for LP/MS: enough for a stable CKA, cheap to compare.
PROBE_SIZE = 256


def _variables(state: TrainState) -> dict:
    """A copy of the model's variables (the train step donates the originals)."""
    return jax.tree_util.tree_map(jnp.copy, {"params": state.params,
                                             "batch_stats": state.batch_stats})


def _probe_set(arrays: list[np.ndarray], size: int = PROBE_SIZE) -> np.ndarray | None:
    """Up to ``size`` samples taken evenly from the start of each array (None: no arrays)."""
    if not arrays:
        return None
    per = -(-size // len(arrays))  # ceil
    return np.concatenate([a[:per] for a in arrays])[:size]


def probe_freeze(model, state: TrainState, stream: TaskStream, task_index: int, config: Config,
                 *, augment: bool, masks=None) -> tuple[str, dict]:
    """What ``--freeze auto`` freezes, decided before training task ``task_index``.

    A throwaway copy of the model trains every layer on task ``task_index``
    for one epoch (same SGD, batch size and augmentation, its own seeded
    order). LP is measured on up to `PROBE_SIZE` training samples of that task,
    MS on up to `PROBE_SIZE` training samples of the earlier tasks (none when
    a pre-trained run decides at task 0: MS is then not measured), with
    ``config.similarity``, between the model before and after the probe.
    `choose_freeze` with ``config.freeze_threshold`` picks the freeze point.
    Evaluation data is never used. The model itself is not changed.

    Returns:
      (freeze point name, {layer: {"lp": float, "ms": float | None}}).
    """
    task = stream.tasks[task_index]
    phase = Phase(frozen=(), fixed_bn=(), uses_memory=False)
    tx = phase_optimizer(config, state.params, (), masks)
    step = jax.jit(make_train_step(model, tx, Strategy(), config, phase,
                                   stream.classes_per_task), donate_argnums=(0,))
    before = _variables(state)
    probe = TrainState(params=before["params"], batch_stats=before["batch_stats"],
                       opt_state=tx.init(before["params"]), step=jnp.zeros((), jnp.int32))
    probe = jax.tree_util.tree_map(jnp.copy, probe)
    rng = np.random.default_rng([config.seed, task_index, 1])
    offset = jnp.asarray(task.class_offset, jnp.int32)
    for x, y in epoch_batches(task.x_train, task.y_train, config.batch_size, rng,
                              augment=augment, fill=stream.pad_value):
        probe, _, metrics = step(probe, None, x, y, offset)
    _check_finite([metrics], 0, task_index)
    after = {"params": probe.params, "batch_stats": probe.batch_stats}
    x_old = _probe_set([t.x_train for t in stream.tasks[:task_index]])
    metrics = generalizability(model, before, after, x_old, _probe_set([task.x_train]),
                               config.similarity)
    return choose_freeze(metrics, config.freeze_threshold), metrics


def stream_fingerprint(stream: TaskStream) -> str:
    """A hash of every task's classes, images and labels (BLAKE2b, hex).

    Images a TFDS source holds (`RecordImages`) count by their source's name
    and version, record indices and normalisation, without being read.
    """
    digest = hashlib.blake2b(digest_size=16)
    for task in stream.tasks:
        digest.update(repr((task.index, tuple(task.classes))).encode())
        for array in (task.x_train, task.y_train, task.x_eval, task.y_eval):
            update_digest(digest, array)
    return digest.hexdigest()


def run_identity(config: Config, stream: TaskStream, pretrained: bool,
                 num_devices: int = 1, seeds: int = 1, init_digest: str | None = None) -> dict:
    """What makes two runs the same run: a checkpoint resumes only its own run.

    The resolved config, the stream (name, shapes, and a fingerprint of its
    data), whether it started from a pre-trained backbone and, when it did,
    the digest of that backbone's arrays (``init_digest``,
    `lightcl_jax.model.backbone.variables_digest`), the number of devices the
    batch is split over (which changes the order of float sums), and, for
    more than one, the number of seeds trained together, as JSON values.
    """
    identity = {
        "config": config.resolved().to_dict(),
        "stream": {"name": stream.name, "num_tasks": stream.num_tasks,
                   "num_classes": stream.num_classes, "image_shape": list(stream.image_shape),
                   "eval_split": stream.eval_split, "fingerprint": stream_fingerprint(stream)},
        "pretrained": pretrained,
        **({"init_from": init_digest} if init_digest is not None else {}),
        "devices": num_devices,
        **({"seeds": seeds} if seeds > 1 else {}),
    }
    return json.loads(json.dumps(identity))


def find_resume_point(checkpoints: RunCheckpoints, identity: dict
                      ) -> tuple[str, int, dict] | None:
    """(kind, step, meta) of the newest checkpoint of this run, or None when there is none.

    Raises:
      CheckpointError: the newest checkpoint is unreadable, or of another run.
    """
    latest = checkpoints.latest()
    if latest is None:
        return None
    meta = checkpoints.read_meta(*latest)
    checkpoints.check_identity(meta, identity, *latest)
    return (*latest, meta)


def _abstract(tree):
    return jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(np.shape(a), a.dtype), tree)


def _payload_template(model, strategy: Strategy, config: Config, stream: TaskStream, state,
                      position: Position, pretrained: bool, masks) -> dict:
    """The structure of what a checkpoint at ``position`` holds (see `_payload`)."""
    t = position.task
    phase = phase_for_task(strategy, config, t, pretrained)
    tx = phase_optimizer(config, state.params, phase.frozen, masks)
    params, batch_stats = _abstract(state.params), _abstract(state.batch_stats)
    x = jax.ShapeDtypeStruct((config.batch_size, *stream.image_shape), jnp.float32)
    y = jax.ShapeDtypeStruct((config.batch_size,), jnp.int32)
    memory = jax.eval_shape(
        lambda params, batch_stats, x, y: memory_at_task_start(
            strategy, config, t, (x, y),
            make_forward(model, BatchStatsChain(batch_stats), phase.fixed_bn),
            make_eval_forward(model), params, batch_stats, stream.classes_per_task,
            task_ended=position.task_done),
        params, batch_stats, x, y)
    before = None
    if config.layer_metrics is not None and t >= 1 and not position.task_done:
        before = {"params": params, "batch_stats": batch_stats}
    return _payload(TrainState(params=params, batch_stats=batch_stats,
                               opt_state=jax.eval_shape(tx.init, params),
                               step=jax.ShapeDtypeStruct((), jnp.int32)), memory, before)


def _payload(state: TrainState, memory, before_task) -> dict:
    """The arrays a checkpoint holds: train state, strategy memory, the model before the task."""
    return {"state": state, "memory": memory, "before_task": before_task}


def train_and_evaluate(config: Config, stream: TaskStream | None = None, *,
                       init_variables: dict | None = None, progress: Progress | None = None,
                       step_wrapper: Callable[[Callable], Callable] | None = None,
                       on_task_end: Callable[[int, TrainState], None] | None = None,
                       checkpoints: RunCheckpoints | None = None,
                       devices: int | None = None, seeds: int = 1) -> dict:
    """Runs a strategy over a task stream and evaluates after every task.

    Args:
      config: the run's settings (validated and resolved here).
      stream: the task stream; built from ``config`` when None.
      init_variables: ``{"params", "batch_stats"}`` of a pre-trained backbone;
        the run then counts as pre-trained (LightCL freezes from task 0).
      progress: receives progress events (see `Progress`).
      step_wrapper: wraps each phase's pure train step before jit (tests pass
        `chex.assert_max_traces` here).
      on_task_end: called as ``on_task_end(task_index, state)`` after each
        task's training and evaluation (the state must not be kept: the next
        step donates it; copy what you need). With ``seeds`` > 1 the state's
        arrays carry a leading seed axis. Not called again for tasks that a
        resumed run restored.
      checkpoints: where the run saves its whole state (after every task, and
        every ``checkpoints.every`` steps within one), and resumes from: when
        it holds a checkpoint of this run (`run_identity`), the run goes on
        from the newest one and gives the numbers an uninterrupted run would.
      devices: how many of the visible devices to split each batch over
        (data parallel, `lightcl_jax.training.parallel`); None: all of them.
      seeds: train seeds ``config.seed, ..., config.seed + seeds - 1`` as
        independent runs in one compiled program (`lightcl_jax.training.lanes`:
        the steps are vmapped over a leading seed axis). Every seed must
        train in the same phases: with ``freeze="auto"``, seeds whose probes
        choose different freeze points are refused.

    Returns:
      The results: ``acc_til``/``acc_cil`` accuracy matrices in percent (row
      i after task i, entry j on task j), their final averages, forgetting and
      backward transfer, ``phases`` (which tasks ran in which compiled phase),
      ``freeze_auto`` (the probe's choice and metrics, with ``--freeze auto``),
      ``layer_metrics`` (with ``config.layer_metrics``: per task t >= 1, LP
      and MS per layer between the models before and after task t, on
      held-out samples of task t and of the earlier tasks: as many per set as
      the smallest task's evaluation split holds, at most `PROBE_SIZE`),
      ``identity`` (`run_identity`), ``resumed_at_steps`` (the global steps
      a resumed run went on from; empty when uninterrupted) and
      ``wall_time_s`` (over all the processes that ran it).

      With ``seeds`` > 1, the per-run entries (``seed``, accuracy matrices,
      their averages, forgetting, backward transfer, ``freeze_auto``,
      ``layer_metrics``, ``sparsity``) are in a ``seeds`` list, one entry per
      seed, and ``avg_til_mean``, ``avg_til_std``, ``avg_cil_mean`` and
      ``avg_cil_std`` summarise them (population standard deviation, ddof=0).

    Raises:
      ValueError: bad configuration or data, or seeds whose ``--freeze auto``
        probes disagree.
      CheckpointError: the newest checkpoint is unreadable or of another run.
      DivergenceError: the loss became NaN or Inf (names task and step); the
        checkpoints saved before it hold finite states only.
    """
    start = time.perf_counter()
    config = config.resolved()
    lanes = Lanes.of(config.seed, seeds)
    progress = progress or _NoProgress()
    if stream is None:
        stream = make_stream(config.dataset, data_dir=config.data_dir,
                             num_tasks=config.num_tasks, eval_split=config.eval_split)
    validate_stream(stream, config)
    strategy = get_strategy(config.strategy)
    pretrained = init_variables is not None
    augment = stream.augment if config.augment is None else config.augment
    parallel = data_parallel(devices, {"batch_size": config.batch_size,
                                       "eval_batch_size": config.eval_batch_size})
    identity = run_identity(config, stream, pretrained, parallel.num_devices, lanes.size,
                            init_digest=None if init_variables is None
                            else variables_digest(init_variables))
    resume = find_resume_point(checkpoints, identity) if checkpoints is not None else None

    model = ResNet18(num_classes=stream.num_classes, nf=config.nf)
    # Each lane is the run of its own seed: its config, initialisation and masks.
    lane_configs = [dataclasses.replace(config, seed=s) for s in lanes.seeds]
    states = [create_train_state(model, stream.image_shape, jax.random.PRNGKey(s),
                                 init_variables=init_variables) for s in lanes.seeds]
    masks = [None] * lanes.size
    if config.sparse:
        # Fixed once from the starting weights (the pre-trained ones when given).
        masks = [channel_prune_masks(s.params) for s in states]
        states = [s.replace(params=apply_masks(s.params, m)) for s, m in zip(states, masks)]
    state = lanes.join(states)
    classes_per_task = stream.classes_per_task
    rep, split = parallel.replicated, parallel.split
    eval_step = CompiledStep(jax.jit(
        lanes.vmap(make_eval_step(model, classes_per_task), in_axes=(0, 0, None, None, None, None)),
        in_shardings=(rep, rep, split, split, split, rep), out_shardings=rep))
    eval_forward = jitted_eval_forward(model)
    compiled: dict[Phase, CompiledStep] = {}
    phase_tasks: dict[Phase, list[int]] = {}

    memory = before_task = None
    # Per lane: accuracy matrices, the --freeze auto choice, layer metrics.
    acc_til, acc_cil = [[] for _ in lanes.seeds], [[] for _ in lanes.seeds]
    layer_metrics = [[] for _ in lanes.seeds]
    freeze_auto, phases = [None] * lanes.size, []
    run_configs = lane_configs  # configs with "auto" replaced by the probe's choice
    elapsed_before, resumed_at = 0.0, []
    first_task, position, global_step = 0, None, 0
    if resume is not None:
        kind, ckpt_step, resume_meta = resume
        position = Position(**resume_meta["position"])
        done = resume_meta["results"]
        acc_til, acc_cil = lanes.from_values(done["acc_til"]), lanes.from_values(done["acc_cil"])
        layer_metrics = lanes.from_values(done["layer_metrics"])
        freeze_auto, phases = lanes.from_values(done["freeze_auto"]), done["phases"]
        if freeze_auto[0] is not None:
            run_configs = [dataclasses.replace(c, freeze=freeze_auto[0]["chosen"])
                           for c in lane_configs]
        for entry in resume_meta["train_steps"]:
            phase = Phase(frozen=tuple(entry["frozen"]), fixed_bn=tuple(entry["fixed_bn"]),
                          uses_memory=entry["memory"])
            compiled[phase] = CompiledStep(None, calls=entry["calls"], cost=entry["cost"])
            phase_tasks[phase] = entry["tasks"]
        eval_step.calls = resume_meta["eval_step"]["calls"]
        eval_step.cost = resume_meta["eval_step"]["cost"]
        payload = checkpoints.restore(kind, ckpt_step, lanes.abstract(_payload_template(
            model, strategy, run_configs[0], stream, states[0], position, pretrained, masks[0])))
        state, memory, before_task = (payload["state"], payload["memory"],
                                      payload["before_task"])
        elapsed_before = resume_meta["elapsed_s"]
        resumed_at = resume_meta["resumed_at_steps"] + [position.global_step]
        global_step = position.global_step
        first_task = position.task + 1 if position.task_done else position.task
    del states

    def save(position: Position, rng_states=None):
        meta = {
            "identity": identity,
            "position": dataclasses.asdict(position),
            "rng_state": None if rng_states is None else lanes.values(rng_states),
            "results": {"acc_til": lanes.values(acc_til), "acc_cil": lanes.values(acc_cil),
                        "phases": phases, "layer_metrics": lanes.values(layer_metrics),
                        "freeze_auto": lanes.values(freeze_auto)},
            "train_steps": [{"frozen": list(p.frozen), "fixed_bn": list(p.fixed_bn),
                             "memory": p.uses_memory, "tasks": phase_tasks[p],
                             "calls": c.calls, "cost": c.cost} for p, c in compiled.items()],
            "eval_step": {"calls": eval_step.calls, "cost": eval_step.cost},
            "elapsed_s": elapsed_before + time.perf_counter() - start,
            "resumed_at_steps": resumed_at,
        }
        checkpoints.save(_payload(state, memory, before_task), meta,
                         task_done=position.task_done)

    for task in stream.tasks[first_task:]:
        t = task.index
        # Resuming within this task: its probe, phase bookkeeping and begin_task are done.
        mid = position is not None and not position.task_done and position.task == t
        if not mid and (config.freeze == "auto" and freeze_auto[0] is None and
                        strategy.frozen_groups(dataclasses.replace(config, freeze="all-but-head"),
                                               t, pretrained)):
            for lane, (lane_state, lane_config, lane_masks) in enumerate(
                    zip(lanes.split(state), lane_configs, masks)):
                chosen, probe_metrics = probe_freeze(model, lane_state, stream, t, lane_config,
                                                     augment=augment, masks=lane_masks)
                freeze_auto[lane] = {"task": t, "chosen": chosen,
                                     "threshold": config.freeze_threshold,
                                     "similarity": config.similarity, "metrics": probe_metrics}
            choices = {auto["chosen"] for auto in freeze_auto}
            if len(choices) > 1:
                each = ", ".join(f"seed {s}: {auto['chosen']}"
                                 for s, auto in zip(lanes.seeds, freeze_auto))
                raise ValueError(f"--freeze auto chose different freeze points for the seeds "
                                 f"trained together ({each}); seeds share one compiled step, "
                                 "so run them separately or give --freeze explicitly")
            run_configs = [dataclasses.replace(c, freeze=freeze_auto[0]["chosen"])
                           for c in lane_configs]
        if not mid and config.layer_metrics is not None and t >= 1:
            before_task = _variables(state)
        lane_states = lanes.split(state)
        phase, _, step_fn = phase_step(model, strategy, run_configs[0], lane_states[0].params, t,
                                       pretrained, classes_per_task, masks[0])
        if compiled.get(phase) is None or compiled[phase].jitted is None:
            if step_wrapper is not None:
                step_fn = step_wrapper(step_fn)
            restored = compiled.get(phase)
            batch_split = parallel.split_along(lanes.batch_axis)
            compiled[phase] = CompiledStep(
                jax.jit(lanes.vmap(step_fn, in_axes=(0, 0, 0, 0, None)), donate_argnums=(0, 1),
                        in_shardings=(rep, rep, batch_split, batch_split, rep),
                        out_shardings=rep),
                calls=restored.calls if restored else 0, cost=restored.cost if restored else None)
        train_step = compiled[phase]
        rngs = [np.random.default_rng([s, t]) for s in lanes.seeds]

        x_train, y_train = strategy.training_arrays(stream, t)

        def batches():
            return lanes.zip_batches([
                epoch_batches(x_train, y_train, config.batch_size, rng, augment=augment,
                              fill=stream.pad_value) for rng in rngs])

        def at_boundary(hook, batch):
            """Runs a strategy hook on the host, lane by lane; its forwards update
            BatchNorm statistics."""
            nonlocal state
            lane_states, memories = lanes.split(state), lanes.split(memory)
            for lane, lane_batch in enumerate(lanes.split(batch)):
                chain = BatchStatsChain(lane_states[lane].batch_stats)
                memories[lane] = hook(
                    memories[lane], config=run_configs[lane], task_index=t, batch=lane_batch,
                    forward=jitted_forward(model, chain, phase.fixed_bn),
                    eval_forward=eval_forward, params=lane_states[lane].params,
                    batch_stats=lane_states[lane].batch_stats, classes_per_task=classes_per_task)
                lane_states[lane] = lane_states[lane].replace(batch_stats=chain.latest)
            state = lanes.join(lane_states)
            return lanes.join(memories)

        per_epoch = steps_per_epoch(len(x_train), config.batch_size)
        total_steps = per_epoch * config.epochs
        if mid:
            first_epoch, batches_done, step_in_task = (position.epoch, position.batch,
                                                       position.step_in_task)
            for rng, rng_state in zip(rngs, lanes.from_values(resume_meta["rng_state"])):
                rng.bit_generator.state = rng_state
        else:
            phase_tasks.setdefault(phase, []).append(t)
            phases.append({"task": t, "frozen": list(phase.frozen),
                           "memory": phase.uses_memory})
            # SGD keeps no state, but the masked optimizer's structure follows the phase
            # (and with --sparse it holds the lane's masks).
            state = state.replace(opt_state=lanes.join([
                phase_optimizer(c, s.params, phase.frozen, m).init(s.params)
                for c, s, m in zip(run_configs, lane_states, masks)]))
            # As the reference's next(iter(loader)): a fresh shuffled batch of the new task.
            memory = at_boundary(strategy.begin_task, next(batches()))
            first_epoch, batches_done, step_in_task = 0, 0, 0
        del lane_states
        # The compiled steps take replicated state and memory; host-side work (init,
        # restore, boundary hooks) may leave them elsewhere.
        state, memory = parallel.replicate(state), parallel.replicate(memory)
        progress.start_task(t, total_steps)
        if step_in_task:
            progress.advance(step_in_task)
        offset = jnp.asarray(task.class_offset, jnp.int32)
        check_seeds = lanes.seeds if lanes.stacked else None
        for epoch in range(first_epoch, config.epochs):
            epoch_rng_states = [rng.bit_generator.state for rng in rngs]
            # Read, augment and send to the devices in a background thread, ahead of
            # the steps; the epoch is drawn in full before anything else draws again.
            epoch_iter = prefetch(batches(), PREFETCH,
                                  lambda batch: parallel.batch(*batch, axis=lanes.batch_axis))
            skip = batches_done if epoch == first_epoch else 0
            for _ in range(skip):  # batches a resumed run already trained on: same draws
                next(epoch_iter)
            losses, epoch_metrics = [], {}
            for batch_index, (x, y) in enumerate(epoch_iter, start=skip + 1):
                step_memory = memory if phase.uses_memory else None
                state, step_memory, metrics = train_step(state, step_memory, x, y, offset)
                if phase.uses_memory:
                    memory = step_memory
                losses.append(metrics)
                step_in_task += 1
                global_step += 1
                progress.advance(1)
                checkpoint_now = (checkpoints is not None and checkpoints.every
                                  and global_step % checkpoints.every == 0
                                  and step_in_task < total_steps)
                if len(losses) == CHECK_EVERY or (checkpoint_now and losses):
                    # A checkpoint only ever holds a state whose losses were all finite.
                    epoch_metrics = _check_finite(losses, step_in_task - len(losses), t,
                                                  check_seeds)
                    losses = []
                if checkpoint_now:
                    save(Position(task=t, task_done=False, epoch=epoch, batch=batch_index,
                                  step_in_task=step_in_task, global_step=global_step),
                         epoch_rng_states)
            if losses:
                epoch_metrics = _check_finite(losses, step_in_task - len(losses), t, check_seeds)
            progress.advance(0, {"epoch": epoch + 1, **epoch_metrics})

        memory = at_boundary(strategy.end_task, next(batches()))
        state = parallel.replicate(state)
        til_counts, cil_counts = correct_counts(eval_step, state, stream, t + 1,
                                                config.eval_batch_size, parallel)
        sizes = np.array([len(p.y_eval) for p in stream.tasks[:t + 1]], np.float64)
        til_rows = 100.0 * til_counts.reshape(t + 1, -1) / sizes[:, None]
        cil_rows = 100.0 * cil_counts.reshape(t + 1, -1) / sizes[:, None]
        for lane in range(lanes.size):
            acc_til[lane].append([float(v) for v in til_rows[:, lane]])
            acc_cil[lane].append([float(v) for v in cil_rows[:, lane]])
        if config.layer_metrics is not None and t >= 1:
            # One probe size for every task and both sets, so the measurement compiles once.
            size = min(PROBE_SIZE, min(len(p.x_eval) for p in stream.tasks))
            old, new = (_probe_set([p.x_eval for p in stream.tasks[:t]], size),
                        _probe_set([task.x_eval], size))
            for lane, (lane_before, lane_state) in enumerate(
                    zip(lanes.split(before_task), lanes.split(state))):
                layers = generalizability(
                    model, lane_before,
                    {"params": lane_state.params, "batch_stats": lane_state.batch_stats},
                    old, new, config.layer_metrics)
                layer_metrics[lane].append({"task": t, "layers": layers})
        before_task = None
        if checkpoints is not None:
            save(Position(task=t, task_done=True, epoch=config.epochs - 1, batch=per_epoch,
                          step_in_task=step_in_task, global_step=global_step))
        progress.end_task(t, [float(v) for v in til_rows.mean(axis=1)],
                          [float(v) for v in cil_rows.mean(axis=1)])
        if on_task_end is not None:
            on_task_end(t, state)

    runs = []
    for lane, lane_state in enumerate(lanes.split(state)):
        runs.append({
            "seed": lanes.seeds[lane],
            "acc_til": acc_til[lane],
            "acc_cil": acc_cil[lane],
            "avg_til": average_accuracy(acc_til[lane]),
            "avg_cil": average_accuracy(acc_cil[lane]),
            "forgetting_til": forgetting(acc_til[lane]),
            "forgetting_cil": forgetting(acc_cil[lane]),
            "bwt_til": backward_transfer(acc_til[lane]),
            "bwt_cil": backward_transfer(acc_cil[lane]),
            "freeze_auto": freeze_auto[lane],
            **({"layer_metrics": layer_metrics[lane]} if config.layer_metrics is not None
               else {}),
            **({"sparsity": sparsity_report(lane_state.params)} if config.sparse else {}),
        })
    common = {
        "strategy": config.strategy,
        "dataset": stream.name,
        "num_tasks": stream.num_tasks,
        "seed": config.seed,
        "eval_split": stream.eval_split,
        "pretrained": pretrained,
        "config": config.to_dict(),
    }
    if lanes.stacked:
        til_mean, til_std = seed_statistics([r["avg_til"] for r in runs])
        cil_mean, cil_std = seed_statistics([r["avg_cil"] for r in runs])
        summary = {"seeds": runs, "avg_til_mean": til_mean, "avg_til_std": til_std,
                   "avg_cil_mean": cil_mean, "avg_cil_std": cil_std, "phases": phases}
    else:
        (run,) = runs
        summary = {**{k: v for k, v in run.items() if k not in
                      ("seed", "freeze_auto", "layer_metrics", "sparsity")},
                   "phases": phases, "freeze_auto": run["freeze_auto"],
                   **{k: run[k] for k in ("layer_metrics", "sparsity") if k in run}}
    return {
        **common,
        **summary,
        "resources": run_resources(compiled, phase_tasks, eval_step, config.eval_batch_size),
        "identity": identity,
        "resumed_at_steps": resumed_at,
        "wall_time_s": elapsed_before + time.perf_counter() - start,
    }

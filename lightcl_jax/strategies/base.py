"""What a continual-learning strategy is: the pieces that differ between methods.

Every strategy shares the model, data, jitted train step and evaluation
(`lightcl_jax.training.loop`). A strategy is a frozen dataclass whose fields
are its hyperparameters (every subclass becomes one: no decorator needed),
declared with their types, defaults and allowed ranges
(`lightcl_jax.strategies.hyperparameters.hyperparameter`) and checked when an
instance is made: ``OnlineEWC(lam=100.0)``. Its hooks read them from ``self``;
the ``config`` they receive holds the run's settings (seed, batch size,
freeze point, ...). Besides its hyperparameters, a strategy only says:

  * which layer groups are frozen in a task (`frozen_groups`);
  * what it trains on in a task (`training_arrays`; default: the task's data);
  * whether the train step needs its memory state in a task (`uses_memory`);
  * extra losses added to the batch's cross-entropy, traced inside the
    jitted step: `extra_loss` runs before the batch's forward pass (its own
    forwards, e.g. over a buffer, come first, as LightCL's reference does),
    `batch_loss` after it and sees the batch's logits (e.g. distillation);
  * how the batch's gradient is changed before the optimizer sees it
    (`gradient_projection`, traced inside the jitted step: A-GEM projects it
    against its memory's gradient);
  * how the step changes its memory after the update (`after_step`, traced
    inside the jitted step: replay buffers insert the batch here);
  * how its memory changes at task boundaries (`begin_task`, `end_task`, run
    on the host between jitted phases).

Its memory state is any pytree (None when it has none); it must keep one
structure and shape within a phase, so the step compiles once.

The functions handed to these methods:
  * ``forward(params, x) -> (logits, taps)`` runs the model in training mode;
    as in the reference, each call also folds its batch statistics into
    BatchNorm's running statistics (see `BatchStatsChain`).
  * ``eval_forward(params, batch_stats, x) -> (logits, taps)`` runs it in
    evaluation mode (running statistics, nothing changes): for a frozen copy
    of an old model, or for per-sample quantities such as a Fisher.

Cross-entropy is task-masked everywhere, as in the reference: a sample of
class y is scored over its own task's logits only (`task_cross_entropy`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from lightcl_jax.config import Config
from lightcl_jax.metrics.continual import task_cross_entropy  # noqa: F401  (its home once)
from lightcl_jax.strategies import hyperparameters

Forward = Callable[[Any, jax.Array], tuple[jax.Array, dict]]
EvalForward = Callable[[Any, Any, jax.Array], tuple[jax.Array, dict]]


@dataclasses.dataclass(frozen=True)
class Strategy:
    """Plain training of every layer with no memory: the base of all strategies.

    ``name`` is a plain class attribute (the registry's key, and what the run's
    default workdir is named after), not a field.
    """

    name: ClassVar[str] = "base"

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__.get("__annotations__", {}):
            raise TypeError(f"{cls.__name__}: write name = {cls.__dict__.get('name')!r} "
                            "without an annotation (an annotated name would be a hyperparameter)")
        dataclasses.dataclass(frozen=True)(cls)
        # Strategy's own (below) refuse every assignment; without the generated ones here,
        # a subclass that is also decorated @dataclasses.dataclass(frozen=True) still works.
        del cls.__setattr__, cls.__delattr__

    def __post_init__(self):
        """Checks every hyperparameter against its declaration (a subclass that adds its
        own ``__post_init__`` calls this one)."""
        for field in hyperparameters.fields(type(self)):
            value = hyperparameters.check_value(type(self), field, getattr(self, field.name))
            object.__setattr__(self, field.name, value)

    @classmethod
    def from_args(cls, args: dict | None = None) -> "Strategy":
        """An instance from ``{hyperparameter: value}``; ValueError names an unknown one or a
        bad value, and what is allowed."""
        args = dict(args or {})
        hyperparameters.check_names(cls, args)
        return cls(**args)

    def hyperparameters(self) -> dict[str, Any]:
        """``{name: value}`` of every hyperparameter: what a run records of its strategy."""
        return {f.name: getattr(self, f.name) for f in hyperparameters.fields(type(self))}

    def validate_run(self, config: Config) -> None:
        """Raises ValueError when this strategy cannot run with ``config`` (its run
        settings); e.g. LightCL takes its buffer from one batch. Default: any."""

    def frozen_groups(self, config: Config, task_index: int, pretrained: bool) -> tuple[str, ...]:
        return ()

    def training_arrays(self, stream, task_index: int) -> tuple[np.ndarray, np.ndarray]:
        """(x, y) to train on in task ``task_index``; default: that task's training data."""
        task = stream.tasks[task_index]
        return task.x_train, task.y_train

    def uses_memory(self, task_index: int) -> bool:
        return False

    def extra_loss(self, forward: Forward, eval_forward: EvalForward, params: Any, memory: Any,
                   *, x: jax.Array, y: jax.Array, class_offset: jax.Array, config: Config,
                   classes_per_task: int) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Returns (scalar loss added to the cross-entropy, named terms to report).

        ``x``, ``y`` are the training batch and ``class_offset`` the current
        task's first class (traced scalar).
        """
        return jnp.zeros((), jnp.float32), {}

    def batch_loss(self, logits: jax.Array, eval_forward: EvalForward, memory: Any, *,
                   x: jax.Array, y: jax.Array, class_offset: jax.Array, config: Config,
                   classes_per_task: int) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Like `extra_loss`, given the batch's ``logits`` (differentiable)."""
        return jnp.zeros((), jnp.float32), {}

    def gradient_projection(self, grads: Any, *, value_and_grad: Callable, memory: Any,
                            trainable: Any, config: Config, classes_per_task: int
                            ) -> tuple[Any, dict[str, jax.Array]]:
        """Returns (the gradient the optimizer applies, named terms to report).

        ``grads`` is the gradient of the batch's loss (cross-entropy plus the
        extra losses) with respect to every parameter; ``trainable`` a pytree of
        Python bools of its structure, the leaves the optimizer updates.
        ``value_and_grad(fn)`` returns ``(fn(forward, params), its gradient)``
        at the step's parameters for a scalar ``fn`` of a training-mode
        forward and the parameters; its forwards fold their statistics into
        BatchNorm's running ones after the batch's. Default: ``grads`` as they are.
        """
        return grads, {}

    def after_step(self, memory: Any, *, x: jax.Array, y: jax.Array, logits: jax.Array,
                   config: Config) -> Any:
        """Memory after a step; ``logits`` are the batch's, from before the update."""
        return memory

    def begin_task(self, memory: Any, *, config: Config, task_index: int,
                   batch: tuple[np.ndarray, np.ndarray], forward: Forward,
                   eval_forward: EvalForward, params: Any, batch_stats: Any,
                 classes_per_task: int) -> Any:
        """Memory at the start of a task, before its first step.

        ``batch`` is a fresh shuffled (and augmented) training batch ``(x, y)``
        of the new task, as the reference's ``next(iter(loader))``.
        """
        return memory

    def end_task(self, memory: Any, *, config: Config, task_index: int,
                 batch: tuple[np.ndarray, np.ndarray], forward: Forward,
                 eval_forward: EvalForward, params: Any, batch_stats: Any,
                 classes_per_task: int) -> Any:
        """Memory after the last step of a task; ``batch`` is a fresh training batch of it."""
        return memory


def _refuse_assignment(self, name, value=None):
    raise dataclasses.FrozenInstanceError(
        f"cannot change {type(self).__name__}.{name}: a strategy's hyperparameters are fixed "
        "when it is made (make another: dataclasses.replace(strategy, ...))")


Strategy.__setattr__ = _refuse_assignment
Strategy.__delattr__ = _refuse_assignment

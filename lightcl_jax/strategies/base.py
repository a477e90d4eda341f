"""What a continual-learning strategy is: the pieces that differ between methods.

Every strategy shares the model, data, jitted train step and evaluation
(`lightcl_jax.training.loop`). A strategy only says:

  * which layer groups are frozen in a task (`frozen_groups`);
  * whether the train step needs its memory state in a task (`uses_memory`);
  * an extra loss added to the task's cross-entropy (`extra_loss`, traced
    inside the jitted step);
  * how its memory state changes at task boundaries (`begin_task`,
    `end_task`, run on the host between jitted phases).

Its memory state is any pytree (None when it has none). `forward(params, x)`
handed to these methods runs the model in training mode and returns
``(logits, taps)``; as in the reference, each call also folds its batch
statistics into BatchNorm's running statistics (see `BatchStatsChain`).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from lightcl_jax.config import Config

Forward = Callable[[Any, jax.Array], tuple[jax.Array, dict]]


class Strategy:
    """Plain training of every layer with no memory: the base of all strategies."""

    name = "base"

    def frozen_groups(self, config: Config, task_index: int, pretrained: bool) -> tuple[str, ...]:
        return ()

    def uses_memory(self, task_index: int) -> bool:
        return False

    def extra_loss(self, forward: Forward, params: Any, memory: Any,
                   config: Config) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Returns (scalar loss added to the cross-entropy, named terms to report)."""
        return jnp.zeros((), jnp.float32), {}

    def begin_task(self, memory: Any, *, config: Config, task_index: int, batch: np.ndarray,
                   forward: Forward, params: Any) -> Any:
        """Memory at the start of a task, before its first step.

        ``batch`` is a fresh shuffled (and augmented) training batch of the new
        task, as the reference's ``next(iter(loader))``.
        """
        return memory

    def end_task(self, memory: Any, *, config: Config, task_index: int, batch: np.ndarray,
                 forward: Forward, params: Any) -> Any:
        """Memory after the last step of a task; ``batch`` is a fresh training batch of it."""
        return memory

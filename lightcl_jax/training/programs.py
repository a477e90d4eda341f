"""A run's compiled programs: one train step per phase, one eval step, and their counts.

`Programs` compiles each phase's step the first time that phase trains
(`lightcl_jax.compiler.CompiledStep`), remembers which tasks each phase
trained, and carries the steps' call counts and XLA figures through a
checkpoint, so that a resumed run reports the whole run's costs.
"""

from __future__ import annotations

from typing import Callable

from lightcl_jax.compiler import CompiledStep, run_resources
from lightcl_jax.config import Config
from lightcl_jax.metrics.continual import EvalMetric
from lightcl_jax.training.placement import Placement
from lightcl_jax.training.steps import Phase, make_eval_step, memory_scheduled


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
        """The programs of a `lightcl_jax.training.setup.Run`."""
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
                self.placement.jit_train_step(step, memory_scheduled(self.config, phase)),
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

"""Run configuration: every setting of a run, validated at the boundary.

Plain data: importing this module imports no JAX (strategy, metric and
similarity names come from `lightcl_jax.registry`), so the CLI refuses a bad
flag before JAX loads. A strategy's hyperparameters belong to the strategy
(`lightcl_jax.strategies`): the config holds its name and ``strategy_args``,
which the strategy checks when a run makes it.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from lightcl_jax.data.streams import DATASETS, EVAL_SPLITS
from lightcl_jax.model.layers import FREEZE_POINTS
from lightcl_jax.registry import (EVAL_METRICS, SIMILARITIES, STRATEGIES, SUMMARIES,
                                  is_import_path)

FROZEN_BN_MODES = ("update", "fixed")
# What an epoch does with the samples left after its last full batch: drop them (one
# compiled shape), or keep them as a smaller last batch, as the reference's DataLoader does.
LAST_BATCH_MODES = ("drop", "keep")
# How XLA orders a train step's work (`lightcl_jax.compiler`): ``auto`` = the library's
# choice, today memory-optimized for every train step; ``default`` = XLA's own order.
XLA_SCHEDULERS = ("auto", "memory", "default")
# How the sparse variant runs: the reference's dense layers with pruned weights held at
# zero, or narrower dense layers of the kept channels only (`lightcl_jax.model.resnet`).
SPARSE_EXECUTIONS = ("masked", "compact")
# Settings that change how steps compile, never what they compute (a test holds them to
# it): a checkpoint resumes under another value, so they are not part of a run's identity.
EXECUTION_FIELDS = ("xla_scheduler",)
# Fields added after checkpoints existed, at the value that reproduces those runs: left
# out of a run's identity at that value, so the older checkpoints still resume.
IDENTITY_DEFAULTS = {"sparse_execution": "masked", "last_batch": "drop"}
# The metrics a run computes unless told otherwise: every built-in summary and
# evaluation metric (`lightcl_jax.metrics.continual`). ``avg`` is always among them.
DEFAULT_METRICS = ("avg", "forgetting", "bwt", "avg_incremental", "loss")
# JAX's PRNG keys hold 32 bits of a seed: 2**32 would give seed 0's key.
MAX_SEED = 2**32 - 1
# A ResNet-18 of nf 4096 holds 4.6e10 weights; whether a smaller one fits the device is
# checked against its memory when the run is set up (`lightcl_jax.training.run`).
MAX_NF = 4096
FLOAT_FIELDS = ("lr", "freeze_threshold")

# Settings that depend on the built-in dataset when not given: (epochs, nf). A stream of a
# user's own has no defaults: its config sets both.
# digits32 (the default) and digits: small enough that a run finishes in about a minute
# on 2 CPU cores. benchmarks.vs_reference sets the reference's nf 64 and 50 epochs itself.
DATASET_DEFAULTS = {
    "digits": {"epochs": 10, "nf": 16},
    "digits32": {"epochs": 10, "nf": 16},
    "cifar10": {"epochs": 50, "nf": 64},
    "cifar100": {"epochs": 50, "nf": 64},
    "tinyimagenet": {"epochs": 100, "nf": 64},
}


@dataclasses.dataclass(frozen=True)
class Config:
    """All settings of one continual-learning run.

    Defaults follow the authors' LightCL (lr 0.01, batch 32, seed 0, freeze stem +
    stages 1-3); a strategy's own hyperparameters (LightCL's beta 2e-4, buffer 15,
    ratio 0.15) are its defaults, overridden by ``strategy_args``. ``epochs`` and
    ``nf`` default per built-in dataset (`DATASET_DEFAULTS`) when left as None.

    Attributes:
      strategy: registered strategy name (see `lightcl_jax.strategies`), or the
        import path of a strategy class (``package.module:Name``,
        ``path/to/file.py:Name``).
      strategy_args: the strategy's hyperparameters that differ from its
        defaults, ``{name: value}`` (e.g. ``{"lam": 100.0}`` for ``ewc``). A run
        records all of them, defaults filled in (`lightcl_jax.training.run`).
      dataset: one of `DATASETS`, or the name of a stream of your own (or None)
        handed to `lightcl_jax.training.run.setup_run` with it; such a
        config sets ``epochs`` and ``nf``.
      data_dir: TFDS data directory (TFDS datasets only).
      num_tasks: tasks to split the classes into (None: the dataset's default).
      eval_split: ``holdout`` (the reference's 10% of train) or ``test``.
      epochs: epochs per task.
      batch_size: training batch size.
      lr: SGD learning rate (no momentum, no weight decay).
      nf: width of the ResNet's first stage (64 = paper).
      seed: seed of initialisation, data order and augmentation.
      freeze: freeze point for strategies that freeze (see `FREEZE_POINTS`), or
        ``auto``: chosen from measured LP and MS by a probe at the first task
        that freezes (see `lightcl_jax.training.loop.probe_freeze`).
      freeze_threshold: LP and MS level a layer group must reach to be frozen
        by ``auto``.
      similarity: registered similarity that ``auto`` measures LP and MS with.
      layer_metrics: None, or a registered similarity: record LP and MS per
        layer after every task >= 1 in the results.
      metrics: the run summaries and evaluation metrics the run reports
        (`lightcl_jax.metrics.continual`): registered names or import paths;
        ``avg`` must be one of them.
      frozen_bn: frozen layers' BatchNorm statistics: ``update`` keeps
        updating them from each batch as the reference does, ``fixed`` uses
        and keeps the running statistics.
      last_batch: ``drop`` the samples left after an epoch's last full batch
        (every step has one shape), or ``keep`` them as a smaller last batch,
        as the reference's PyTorch DataLoader does (its step compiles once
        more; one device only). With train-mode BatchNorm a batch of a few
        samples is a noisy step, and its statistics enter the running ones.
      augment: random crop + flip on training batches (None: the dataset's
        default, on for CIFAR and off for digits, whose 8x8 strokes a flip
        or 4-pixel shift would change).
      eval_batch_size: largest batch of evaluation (smaller when no task's
        evaluation split needs that many).
      sparse: the reference's sparse variant: channel pruning fixed once from
        the starting weights, masks kept on weights and updates
        (`lightcl_jax.training.state`); with a pre-trained backbone
        LightCL's task 0 also trains the last block of the frozen prefix.
      sparse_execution: with ``sparse``, ``masked`` runs the dense network
        with pruned weights held at zero (the reference's way); ``compact``
        runs narrower dense layers of the kept channels only (the same
        results within float rounding, fewer bytes and FLOPs). Compact seeds
        trained together must prune alike (e.g. from one pre-trained backbone).
      xla_scheduler: how XLA:CPU orders each train step's work: ``memory``
        (``CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED``: a smaller peak), ``default``
        (XLA's), or ``auto``, the library's choice: today memory-optimized for
        every train step, which lowered every step's peak at the same speed
        (docs/memory.md gives each step's bytes under both). Results are
        bit-identical under all three, so the field is not part of a run's
        identity.
    """

    strategy: str = "lightcl"
    strategy_args: dict[str, Any] = dataclasses.field(default_factory=dict)
    dataset: str | None = "digits32"
    data_dir: str | None = None
    num_tasks: int | None = None
    eval_split: str = "holdout"
    epochs: int | None = None
    batch_size: int = 32
    lr: float = 0.01
    nf: int | None = None
    seed: int = 0
    freeze: str = "stage3"
    freeze_threshold: float = 0.9
    similarity: str = "linear_cka_debiased"
    layer_metrics: str | None = None
    metrics: tuple[str, ...] = DEFAULT_METRICS
    frozen_bn: str = "update"
    last_batch: str = "drop"
    augment: bool | None = None
    eval_batch_size: int = 256
    sparse: bool = False
    sparse_execution: str = "masked"
    xla_scheduler: str = "auto"

    def resolved(self) -> "Config":
        """Validates, and fills the dataset-dependent defaults.

        Raises:
          ValueError: a bad setting, or a dataset that is not built in without
            ``epochs`` and ``nf`` (it has no defaults).
        """
        self.validate()
        defaults = DATASET_DEFAULTS.get(self.dataset)
        if defaults is None:
            missing = [f for f in ("epochs", "nf") if getattr(self, f) is None]
            if missing:
                raise ValueError(f"dataset {self.dataset!r} is not built in, so "
                                 f"{' and '.join(missing)} {'have' if len(missing) > 1 else 'has'}"
                                 f" no default: set {' and '.join(missing)} (the built-in "
                                 f"datasets' defaults: {_defaults_text()})")
            defaults = {}
        return dataclasses.replace(
            self,
            epochs=defaults.get("epochs") if self.epochs is None else self.epochs,
            nf=defaults.get("nf") if self.nf is None else self.nf,
            strategy_args=dict(self.strategy_args), metrics=tuple(self.metrics),
        )

    def validate(self) -> None:
        """Raises ValueError naming the first bad setting and what is allowed."""
        def need(ok: bool, message: str):
            if not ok:
                raise ValueError(message)

        need(STRATEGIES.known(self.strategy), STRATEGIES.unknown(self.strategy))
        need(isinstance(self.strategy_args, dict)
             and all(isinstance(k, str) and k.isidentifier() for k in self.strategy_args),
             f"strategy_args must be a dict of hyperparameter names to values; "
             f"got {self.strategy_args!r}")
        for name, value in self.strategy_args.items():
            need(isinstance(value, (bool, int, float, str)),
                 f"strategy_args: {name} must be a bool, int, float or str; got {value!r}")
        self._validate_metrics(need)
        for field in FLOAT_FIELDS:  # NaN and Inf pass some comparisons below; none is a weight
            value = getattr(self, field)
            need(isinstance(value, (int, float)) and not isinstance(value, bool)
                 and math.isfinite(value), f"{field} must be a finite number; got {value!r}")
        need(self.dataset is None or (isinstance(self.dataset, str) and self.dataset.strip()),
             f"dataset must be a name (one of {', '.join(DATASETS)}, or your own stream's) or "
             f"None; got {self.dataset!r}")
        need(self.eval_split in EVAL_SPLITS,
             f"eval_split must be one of {', '.join(EVAL_SPLITS)}; got {self.eval_split!r}")
        need(self.freeze in FREEZE_POINTS or self.freeze == "auto",
             f"unknown freeze point {self.freeze!r}; known: {', '.join(FREEZE_POINTS)}, auto")
        for field in ("similarity", "layer_metrics"):
            name = getattr(self, field)
            need(name is None and field == "layer_metrics" or SIMILARITIES.known(name),
                 f"{field}: {SIMILARITIES.unknown(name)}")
        need(isinstance(self.freeze_threshold, (int, float)) and -1 <= self.freeze_threshold <= 1,
             f"freeze_threshold must lie in [-1, 1]; got {self.freeze_threshold!r}")
        need(isinstance(self.sparse, bool), f"sparse must be True or False; got {self.sparse!r}")
        need(self.last_batch in LAST_BATCH_MODES,
             f"last_batch must be one of {', '.join(LAST_BATCH_MODES)}; got {self.last_batch!r}")
        need(self.frozen_bn in FROZEN_BN_MODES,
             f"frozen_bn must be one of {', '.join(FROZEN_BN_MODES)}; got {self.frozen_bn!r}")
        need(self.sparse_execution in SPARSE_EXECUTIONS,
             f"sparse_execution must be one of {', '.join(SPARSE_EXECUTIONS)}; "
             f"got {self.sparse_execution!r}")
        need(self.xla_scheduler in XLA_SCHEDULERS,
             f"xla_scheduler must be one of {', '.join(XLA_SCHEDULERS)}; "
             f"got {self.xla_scheduler!r}")
        need(self.epochs is None or (_is_int(self.epochs) and self.epochs >= 1),
             f"epochs must be an integer >= 1; got {self.epochs!r}")
        need(_is_int(self.batch_size) and self.batch_size >= 1,
             f"batch_size must be an integer >= 1; got {self.batch_size!r}")
        need(_is_int(self.eval_batch_size) and self.eval_batch_size >= 1,
             f"eval_batch_size must be an integer >= 1; got {self.eval_batch_size!r}")
        need(self.lr > 0, f"lr must be > 0; got {self.lr!r}")
        need(self.nf is None or (_is_int(self.nf) and 1 <= self.nf <= MAX_NF),
             f"nf must be an integer in [1, {MAX_NF}]; got {self.nf!r}")
        need(self.num_tasks is None or (_is_int(self.num_tasks) and self.num_tasks >= 1),
             f"num_tasks must be an integer >= 1; got {self.num_tasks!r}")
        need(_is_int(self.seed) and 0 <= self.seed <= MAX_SEED,
             f"seed must be an integer in [0, {MAX_SEED}] (JAX's PRNG keys take 32 bits); "
             f"got {self.seed!r}")

    def _validate_metrics(self, need) -> None:
        known = sorted(SUMMARIES) + sorted(EVAL_METRICS)
        need(isinstance(self.metrics, (tuple, list))
             and all(isinstance(m, str) for m in self.metrics),
             f"metrics must be a sequence of metric names; got {self.metrics!r}")
        for name in self.metrics:
            need(name in SUMMARIES or name in EVAL_METRICS or is_import_path(name),
                 f"unknown metric {name!r}; known: {', '.join(known)}, or the import path of "
                 "your own (package.module:NAME or path/to/file.py:NAME)")
        need(len(set(self.metrics)) == len(self.metrics),
             f"metrics names one twice: {list(self.metrics)}")
        need("avg" in self.metrics, f"metrics must include avg (tables, figures and the mean "
                                    f"over seeds read it); got {list(self.metrics)}")

    def to_dict(self) -> dict[str, Any]:
        """The settings as JSON values (``metrics`` a list)."""
        settings = dataclasses.asdict(self)
        settings["metrics"] = list(self.metrics)
        return settings

    def identity_dict(self) -> dict[str, Any]:
        """`to_dict` less what never changes a result (`EXECUTION_FIELDS`) and the
        `IDENTITY_DEFAULTS` at their values: what two runs must share to be the same run."""
        settings = self.to_dict()
        for field in EXECUTION_FIELDS:
            del settings[field]
        for field, value in IDENTITY_DEFAULTS.items():
            if settings[field] == value:
                del settings[field]
        return settings


def _defaults_text() -> str:
    return "; ".join(f"{name} epochs {d['epochs']}, nf {d['nf']}"
                     for name, d in DATASET_DEFAULTS.items())


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)

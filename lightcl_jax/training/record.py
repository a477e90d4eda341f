"""What a run has measured so far: accuracy and evaluation-metric matrices, phases, freeze
choice, layer metrics.

A `RunRecord` grows by one row per task and is saved in every checkpoint, so
a resumed run reports what the interrupted one measured. Per-run entries are
kept per lane (one list entry per seed trained together); the phases are
shared by every lane.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from lightcl_jax.config import Config
from lightcl_jax.training.lanes import Lanes
from lightcl_jax.training.steps import Phase


@dataclasses.dataclass
class RunRecord:
    """The results of the tasks a run has finished, per lane."""

    acc_til: list[list[list[float]]]     # per lane: row i = TIL accuracy (%) after task i
    acc_cil: list[list[list[float]]]     # per lane: row i = CIL accuracy (%) after task i
    layer_metrics: list[list[dict]]      # per lane: {"task", "layers"} per task >= 1
    freeze_auto: list[dict | None]       # per lane: the --freeze auto probe's choice
    phases: list[dict]                   # {"task", "frozen", "memory"} per task begun
    # per lane: evaluation metric name -> its matrix (row i after task i, as acc_til)
    eval_metrics: list[dict[str, list[list[float]]]] = dataclasses.field(default_factory=list)

    @classmethod
    def new(cls, lanes: Lanes) -> "RunRecord":
        size = lanes.size
        return cls([[] for _ in range(size)], [[] for _ in range(size)],
                   [[] for _ in range(size)], [None] * size, [], [{} for _ in range(size)])

    @classmethod
    def from_meta(cls, results: dict, lanes: Lanes) -> "RunRecord":
        """The record a checkpoint's ``meta["results"]`` holds (see `to_meta`; a checkpoint
        of a version without evaluation metrics holds none)."""
        evals = (lanes.from_values(results["eval_metrics"]) if "eval_metrics" in results
                 else [{} for _ in range(lanes.size)])
        return cls(lanes.from_values(results["acc_til"]), lanes.from_values(results["acc_cil"]),
                   lanes.from_values(results["layer_metrics"]),
                   lanes.from_values(results["freeze_auto"]), results["phases"], evals)

    def to_meta(self, lanes: Lanes) -> dict:
        """JSON values: per-lane entries as lists only when several seeds train together."""
        return {"acc_til": lanes.values(self.acc_til), "acc_cil": lanes.values(self.acc_cil),
                "phases": self.phases, "layer_metrics": lanes.values(self.layer_metrics),
                "freeze_auto": lanes.values(self.freeze_auto),
                "eval_metrics": lanes.values(self.eval_metrics)}

    @property
    def chosen_freeze(self) -> str | None:
        """The freeze point ``--freeze auto`` chose (one for all lanes), or None yet."""
        return None if self.freeze_auto[0] is None else self.freeze_auto[0]["chosen"]

    def configs(self, lane_configs: list[Config]) -> list[Config]:
        """The lanes' configs as they train: ``auto`` replaced by the probe's choice."""
        if self.chosen_freeze is None:
            return lane_configs
        return [dataclasses.replace(c, freeze=self.chosen_freeze) for c in lane_configs]

    def add_phase(self, task_index: int, phase: Phase) -> None:
        self.phases.append({"task": task_index, "frozen": list(phase.frozen),
                            "memory": phase.uses_memory})

    def add_evaluation(self, til: np.ndarray, cil: np.ndarray, metrics: dict) -> None:
        """Appends the row of the task just evaluated: ``til``, ``cil`` and each of
        ``metrics`` (name -> array) are (tasks seen, lanes)."""
        for lane in range(til.shape[1]):
            self.acc_til[lane].append([float(v) for v in til[:, lane]])
            self.acc_cil[lane].append([float(v) for v in cil[:, lane]])
            for name, values in metrics.items():
                self.eval_metrics[lane].setdefault(name, []).append(
                    [float(v) for v in values[:, lane]])

    def add_layer_metrics(self, task_index: int, per_lane: list[dict]) -> None:
        for lane, layers in enumerate(per_lane):
            self.layer_metrics[lane].append({"task": task_index, "layers": layers})

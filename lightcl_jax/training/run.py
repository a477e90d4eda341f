"""What a run is, what it has measured, and its results.

`setup_run` validates the settings and the data, places the seeds and
devices, and computes the run's identity (what a checkpoint or results file
must match to belong to it) once; `experiments.run` reads the identity to
find earlier results and hands the same `Run` to `train_and_evaluate`.

A `RunRecord` grows by one row per task and is saved in every checkpoint, so
a resumed run reports what the interrupted one measured. Per-run entries are
kept per lane (one list entry per seed trained together); the phases are
shared by every lane.

`assemble_results` makes the results dict of a finished run: accuracies and their
summaries, costs, identity.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from lightcl_jax.config import MAX_SEED, Config
from lightcl_jax.data.sources import update_digest
from lightcl_jax.data.streams import DATASETS, TaskStream, make_stream, validate_stream
from lightcl_jax.metrics.continual import EvalMetric, Summary, split_metrics
from lightcl_jax.metrics.similarity import get_similarity
from lightcl_jax.model.backbone import variables_digest
from lightcl_jax.model.resnet import ResNet, ResNet18
from lightcl_jax.process import peak_rss_mb
from lightcl_jax.strategies import Strategy, strategy_of
from lightcl_jax.training.placement import Lanes, Placement, seed_statistics
from lightcl_jax.training.state import full_width_params, run_model, sparsity_report
from lightcl_jax.training.step import (Phase, Programs, TaskPhase, jitted_eval_forward,
                                       make_train_step, phase_for_task, phase_optimizer)


@dataclasses.dataclass(frozen=True)
class Run:
    """A validated run, ready to train."""

    config: Config              # resolved: dataset defaults and every strategy argument filled in
    stream: TaskStream
    strategy: Strategy          # made from the config's strategy and strategy_args
    model: ResNet
    placement: Placement        # seeds (lanes) and devices
    pretrained: bool            # starts from a pre-trained backbone
    augment: bool               # random crop + flip on training batches
    identity: dict              # `run_identity`: what a checkpoint of this run must match
    init_variables: Any         # the backbone's {"params", "batch_stats"}, or None
    eval_forward: Callable      # the model's jitted evaluation-mode forward, for the hooks
    eval_batch_size: int        # `eval_batch_size` of the config and the stream
    summaries: tuple[Summary, ...] = ()       # the config's run summaries
    eval_metrics: tuple[EvalMetric, ...] = ()  # the config's evaluation metrics
    # Where the backbone came from ({"path", "source", "digest"}), for the results; None:
    # none, or not said.
    init_from: dict | None = None

    @property
    def lane_configs(self) -> list[Config]:
        """Each seed's config."""
        return self.placement.lane_configs(self.config)

    def task_phase(self, task_index: int, configs: list[Config], params, masks: list
                   ) -> TaskPhase:
        """Task ``task_index``'s phase, each lane's optimizer and the pure train step.

        Args:
          configs: each lane's config as it trains (``--freeze auto`` resolved).
          params: one lane's parameters (their structure names what freezes).
          masks: each lane's sparse masks (None each without ``--sparse``).
        """
        step_config = self.placement.step_config(configs[0])
        phase = phase_for_task(self.strategy, step_config, task_index, self.pretrained)
        optimizers = tuple(phase_optimizer(config, params, phase.frozen, lane_masks)
                           for config, lane_masks in zip(configs, masks))
        step = make_train_step(self.model, optimizers[0], self.strategy, step_config, phase,
                               self.stream.classes_per_task)
        return TaskPhase(task_index, phase, tuple(configs), optimizers, step)


def setup_run(config: Config, stream: TaskStream | None = None, *,
              init_variables: dict | None = None, devices: int | None = None,
              seeds: int = 1) -> Run:
    """Validates a run's settings and data, and places it on the devices.

    Args:
      config: the run's settings (validated and resolved here; its strategy is made
        from ``strategy_args``, and the run's config records every hyperparameter).
      stream: the task stream; built from ``config.dataset`` when None. A stream of
        your own may go with a config whose dataset is None or its name.
      init_variables: ``{"params", "batch_stats"}`` of a pre-trained backbone;
        the run then counts as pre-trained (LightCL freezes from task 0).
      devices: how many of the visible devices to split each batch over
        (data parallel, `lightcl_jax.training.placement`); None: all of them.
      seeds: train seeds ``config.seed, ..., config.seed + seeds - 1`` as
        independent runs in one compiled program (`lightcl_jax.training.placement`).

    Raises:
      ValueError: bad configuration, strategy arguments, metrics, data, seed count or
        device count.
    """
    config = config.resolved()
    strategy = strategy_of(config)
    config = dataclasses.replace(config, strategy_args=strategy.hyperparameters())
    summaries, eval_metrics = split_metrics(config.metrics)
    for similarity in {config.similarity, config.layer_metrics} - {None}:
        get_similarity(similarity)  # a bad name or import path fails here, not mid-run
    if stream is None:
        if config.dataset not in DATASETS:
            raise ValueError(f"dataset {config.dataset!r} is not built in ({', '.join(DATASETS)}):"
                             " pass its stream (lightcl_jax.split_into_tasks) with the config")
        stream = make_stream(config.dataset, data_dir=config.data_dir,
                             num_tasks=config.num_tasks, eval_split=config.eval_split)
    validate_stream(stream, config.batch_size)
    if config.seed + seeds - 1 > MAX_SEED:
        raise ValueError(f"seeds {config.seed}..{config.seed + seeds - 1} go past {MAX_SEED}, "
                         "the largest seed (JAX's PRNG keys take 32 bits); start lower")
    check_weights_fit(config.nf, stream.num_classes, stream.image_shape, seeds)
    placement = Placement.of(config.seed, seeds, devices,
                             {"batch_size": config.batch_size,
                              "eval_batch_size": config.eval_batch_size})
    if config.last_batch == "keep" and placement.parallel.num_devices > 1:
        raise ValueError(f"last_batch keep runs on one device (an epoch's smaller last batch "
                         f"need not split over {placement.parallel.num_devices}); pass "
                         "--devices 1, or last_batch drop")
    pretrained = init_variables is not None
    model = run_model(config, stream.num_classes, stream.image_shape, config.seed,
                      init_variables=init_variables)
    identity = run_identity(config, stream, pretrained, placement.parallel.num_devices,
                            placement.lanes.size,
                            init_digest=variables_digest(init_variables) if pretrained else None)
    return Run(config=config, stream=stream, strategy=strategy, model=model,
               placement=placement, pretrained=pretrained,
               augment=stream.augment if config.augment is None else config.augment,
               identity=identity, init_variables=init_variables,
               eval_forward=jitted_eval_forward(model),
               eval_batch_size=eval_batch_size(config.eval_batch_size, stream,
                                               placement.parallel.num_devices),
               summaries=summaries, eval_metrics=eval_metrics)


def check_weights_fit(nf: int, num_classes: int, image_shape, seeds: int) -> None:
    """Raises ValueError when ``seeds`` ResNet-18s of width ``nf`` could not be trained in
    the first device's memory (its ``bytes_limit``; the machine's RAM where the device
    reports none, as the CPU does): a step holds the weights about three times (weights,
    gradients, updated weights), before any activation. Counted abstractly, nothing is
    allocated."""
    weights = 4 * seeds * _weight_count(nf, num_classes, image_shape[-1])
    device = jax.local_devices()[0]
    limit = (device.memory_stats() or {}).get("bytes_limit") or (
        os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    if 3 * weights > limit:
        raise ValueError(f"{seeds} seed{'s of' if seeds > 1 else ' of'} a ResNet-18 of nf {nf} "
                         f"{'hold' if seeds > 1 else 'holds'} {weights / 2**30:.1f} GiB of weights; a train step holds them "
                         f"about 3 times, more than the {limit / 2**30:.1f} GiB of memory the "
                         f"{device.platform} device has: lower nf or train fewer seeds together")


@functools.lru_cache(maxsize=None)
def _weight_count(nf: int, num_classes: int, channels: int) -> int:
    """Parameters and BatchNorm statistics of a ResNet-18 (traced, not allocated)."""
    shapes = jax.eval_shape(lambda: ResNet18(num_classes=num_classes, nf=nf).init(
        jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, channels)), train=False))
    return sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(shapes))


def eval_batch_size(largest: int, stream: TaskStream, num_devices: int) -> int:
    """The evaluation batch: ``largest``, or fewer when no task's evaluation split needs
    that many (rounded up to split over the devices), so that a small split is not
    padded to a large batch. One compiled shape either way."""
    needed = max(len(task.y_eval) for task in stream.tasks)
    return min(largest, -(-needed // num_devices) * num_devices)


# What a run has measured so far.

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


# The results dict.

# Per-run entries that a single run's results hold at the top level, not per seed.
_PER_SEED_ONLY = ("seed", "freeze_auto", "layer_metrics", "sparsity")
# What the clock and the operating system measured: differs between two runs of the same
# computation (top-level keys, and keys of ``resources``).
MEASURED = ("wall_time_s",)
MEASURED_RESOURCES = ("peak_rss_mb",)


def metric_names(results: dict) -> dict[str, list[str]]:
    """``{"summaries": [...], "evaluation": [...]}``: the metrics a run's results hold
    (results of a version before the metrics were a setting: `LEGACY_METRICS`)."""
    return results.get("metric_names", {"summaries": list(LEGACY_METRICS), "evaluation": []})


def scalar_metric_keys(results: dict) -> list[str]:
    """The keys of a run's results (or one seed's) that hold a number per metric: each
    summary's ``<name>_til`` and ``<name>_cil``, each evaluation metric's
    ``avg_eval_<name>`` (read from its ``metric_names``). Several seeds report each as a
    mean and std; `experiments.compare` tabulates them."""
    names = metric_names(results)
    return ([f"{s}_{kind}" for s in names["summaries"] for kind in ("til", "cil")]
            + [f"avg_eval_{e}" for e in names["evaluation"]])


def without_measurements(results: dict) -> dict:
    """``results`` less `MEASURED` and `MEASURED_RESOURCES`: what two runs of the same
    computation (resumed or not, on this code or another) must agree on exactly."""
    out = {k: v for k, v in results.items() if k not in MEASURED}
    if "resources" in out:
        out["resources"] = {k: v for k, v in out["resources"].items()
                            if k not in MEASURED_RESOURCES}
    return out


def summary_values(summaries, til, cil) -> dict[str, float]:
    """``<name>_til`` and ``<name>_cil`` of each summary of the accuracy matrices."""
    return {f"{summary.name}_{kind}": summary(matrix)
            for summary in summaries for kind, matrix in (("til", til), ("cil", cil))}


def eval_metric_values(matrices: dict) -> dict:
    """``eval_<name>`` (the matrix) and ``avg_eval_<name>`` (its last row's mean) of each
    evaluation metric's matrix."""
    out = {}
    for name, matrix in matrices.items():
        out[f"eval_{name}"] = matrix
        out[f"avg_eval_{name}"] = float(np.mean(matrix[-1]))
    return out


def seed_results(record: RunRecord, lane: int, seed: int, params, *, summaries,
                 layer_metrics: bool, sparse: bool) -> dict:
    """One seed's accuracy matrices and their summaries (average accuracy, forgetting,
    backward transfer, ... as the run's metrics say), and its evaluation metrics."""
    til, cil = record.acc_til[lane], record.acc_cil[lane]
    return {
        "seed": seed,
        "acc_til": til,
        "acc_cil": cil,
        **summary_values(summaries, til, cil),
        **eval_metric_values(record.eval_metrics[lane]),
        "freeze_auto": record.freeze_auto[lane],
        **({"layer_metrics": record.layer_metrics[lane]} if layer_metrics else {}),
        **({"sparsity": sparsity_report(params)} if sparse else {}),
    }


def task_record(record: RunRecord, summaries, num_seeds: int) -> dict:
    """What a run reports after each task (`Progress.record`'s "task"): the last row of
    accuracy (``til_row``, ``cil_row``) and of each evaluation metric (``eval_<name>_row``),
    per seed when there are several, with their means over tasks and seeds (``til``,
    ``cil``, ``avg_eval_<name>``), and each summary of the matrices so far, the mean over
    seeds (``<name>_til``, ``<name>_cil``)."""
    def row(matrices):
        rows = [m[-1] for m in matrices]
        return rows[0] if num_seeds == 1 else rows
    out = {"til_row": row(record.acc_til), "cil_row": row(record.acc_cil),
           "til": float(np.mean([m[-1] for m in record.acc_til])),
           "cil": float(np.mean([m[-1] for m in record.acc_cil]))}
    for name in record.eval_metrics[0]:
        matrices = [lane[name] for lane in record.eval_metrics]
        out[f"eval_{name}_row"] = row(matrices)
        out[f"avg_eval_{name}"] = float(np.mean([m[-1] for m in matrices]))
    per_seed = [summary_values(summaries, til, cil)
                for til, cil in zip(record.acc_til, record.acc_cil)]
    for key in per_seed[0]:
        out[key] = float(np.mean([values[key] for values in per_seed]))
    return out


def assemble_results(run, record: RunRecord, state, programs: Programs, *,
                     resumed_at: list[int], wall_time_s: float) -> dict:
    """The results `lightcl_jax.training.loop.train_and_evaluate` returns (see there)."""
    config, placement = run.config, run.placement
    runs = placement.map_lanes(
        lambda lane, lane_state: seed_results(
            record, lane, placement.lanes.seeds[lane],
            full_width_params(run.model, run.stream.image_shape, lane_state.params),
            summaries=run.summaries, layer_metrics=config.layer_metrics is not None,
            sparse=config.sparse),
        state, join=False)
    common = {
        "strategy": config.strategy,
        "dataset": run.stream.name,
        "num_tasks": run.stream.num_tasks,
        "seed": config.seed,
        "eval_split": run.stream.eval_split,
        "pretrained": run.pretrained,
        "config": config.to_dict(),
        "metric_names": {"summaries": [s.name for s in run.summaries],
                         "evaluation": [e.name for e in run.eval_metrics]},
    }
    if placement.lanes.stacked:
        summary = {"seeds": runs}
        for key in scalar_metric_keys(common):
            mean, std = seed_statistics([r[key] for r in runs])
            summary.update({f"{key}_mean": mean, f"{key}_std": std})
        summary["phases"] = record.phases
    else:
        (one,) = runs
        summary = {**{k: v for k, v in one.items() if k not in _PER_SEED_ONLY},
                   "phases": record.phases, "freeze_auto": one["freeze_auto"],
                   **{k: one[k] for k in ("layer_metrics", "sparsity") if k in one}}
    return {
        **common,
        **summary,
        "resources": {**programs.resources(run.eval_batch_size), "peak_rss_mb": peak_rss_mb()},
        "identity": run.identity,
        "resumed_at_steps": resumed_at,
        "wall_time_s": wall_time_s,
        **({"init_from": run.init_from} if run.init_from is not None else {}),
    }


# Before strategies owned their hyperparameters, the config held them: old field ->
# {strategy: hyperparameter}. `upgrade_identity` reads older runs' identities with it.
LEGACY_STRATEGY_FIELDS = {
    "beta": {"lightcl": "beta"}, "ratio": {"lightcl": "ratio"},
    "buffer_size": {"lightcl": "buffer_size", "er": "buffer_size", "derpp": "buffer_size",
                    "agem": "buffer_size"},
    "derpp_alpha": {"derpp": "alpha"}, "derpp_beta": {"derpp": "beta"},
    "ewc_lambda": {"ewc": "lam"}, "ewc_gamma": {"ewc": "gamma"},
    "lwf_alpha": {"lwf": "alpha"}, "lwf_temperature": {"lwf": "temperature"},
}


# What runs computed before the metrics were a setting.
LEGACY_METRICS = ("avg", "forgetting", "bwt")


def upgrade_identity(identity: dict) -> dict:
    """A run identity as this version writes it, from one an older version wrote (the
    same dict when it is current): a config that held the strategies' hyperparameters
    as fields (`LEGACY_STRATEGY_FIELDS`) gets its strategy's as ``strategy_args`` and the
    metrics those runs computed (`LEGACY_METRICS`)."""
    config = identity.get("config") if isinstance(identity, dict) else None
    if not isinstance(config, dict) or "strategy_args" in config or "beta" not in config:
        return identity
    config = dict(config)
    strategy, args = config.get("strategy"), {}
    for field, owners in LEGACY_STRATEGY_FIELDS.items():
        value = config.pop(field, None)
        if strategy in owners:
            args[owners[strategy]] = value
    config["strategy_args"] = args
    config["metrics"] = list(LEGACY_METRICS)
    return {**identity, "config": config}


def identity_differences(stored: dict, current: dict) -> str:
    """'' when two run identities agree, else the differing entries, one clause each.

    ``stored`` may be an older version's (`upgrade_identity` reads it).
    """
    stored = upgrade_identity(stored)
    out = []
    for section in sorted(set(stored) | set(current)):
        a, b = stored.get(section, "absent"), current.get(section, "absent")
        if isinstance(a, dict) and isinstance(b, dict):
            for key in sorted(set(a) | set(b)):
                if a.get(key, "absent") != b.get(key, "absent"):
                    out.append(f"{key} {a.get(key, 'absent')!r} there, "
                               f"{b.get(key, 'absent')!r} here")
        elif a != b:
            out.append(f"{section} {a!r} there, {b!r} here")
    return "; ".join(out)


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

    The resolved config (its strategy's every hyperparameter), the stream (name, shapes, and a fingerprint of its
    data), whether it started from a pre-trained backbone and, when it did,
    the digest of that backbone's arrays (``init_digest``,
    `lightcl_jax.model.backbone.variables_digest`), the number of devices the
    batch is split over (which changes the order of float sums), and, for
    more than one, the number of seeds trained together, as JSON values. The
    config's `EXECUTION_FIELDS` are left out: they never change a result; so are
    `IDENTITY_DEFAULTS` at their values, as runs made before those fields existed.
    """
    config = config.resolved()
    config = dataclasses.replace(config, strategy_args=strategy_of(config).hyperparameters())
    identity = {
        "config": config.identity_dict(),
        "stream": {"name": stream.name, "num_tasks": stream.num_tasks,
                   "num_classes": stream.num_classes, "image_shape": list(stream.image_shape),
                   "eval_split": stream.eval_split, "fingerprint": stream_fingerprint(stream)},
        "pretrained": pretrained,
        **({"init_from": init_digest} if init_digest is not None else {}),
        "devices": num_devices,
        **({"seeds": seeds} if seeds > 1 else {}),
    }
    return json.loads(json.dumps(identity))

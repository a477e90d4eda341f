"""The results dict of a finished run: accuracies and their summaries, costs, identity."""

from __future__ import annotations

import numpy as np

from lightcl_jax.process import peak_rss_mb
from lightcl_jax.training.checkpoint import LEGACY_METRICS
from lightcl_jax.training.lanes import seed_statistics
from lightcl_jax.training.programs import Programs
from lightcl_jax.training.record import RunRecord
from lightcl_jax.training.sparsity import sparsity_report
from lightcl_jax.training.state import full_width_params

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
    }

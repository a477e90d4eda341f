"""The results dict of a finished run: accuracies and their summaries, costs, identity."""

from __future__ import annotations

from lightcl_jax.accounting.process import peak_rss_mb
from lightcl_jax.metrics.continual import average_accuracy, backward_transfer, forgetting
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


def without_measurements(results: dict) -> dict:
    """``results`` less `MEASURED` and `MEASURED_RESOURCES`: what two runs of the same
    computation (resumed or not, on this code or another) must agree on exactly."""
    out = {k: v for k, v in results.items() if k not in MEASURED}
    if "resources" in out:
        out["resources"] = {k: v for k, v in out["resources"].items()
                            if k not in MEASURED_RESOURCES}
    return out


def seed_results(record: RunRecord, lane: int, seed: int, params, *, layer_metrics: bool,
                 sparse: bool) -> dict:
    """One seed's accuracy matrices, their averages, forgetting and backward transfer."""
    til, cil = record.acc_til[lane], record.acc_cil[lane]
    return {
        "seed": seed,
        "acc_til": til,
        "acc_cil": cil,
        "avg_til": average_accuracy(til),
        "avg_cil": average_accuracy(cil),
        "forgetting_til": forgetting(til),
        "forgetting_cil": forgetting(cil),
        "bwt_til": backward_transfer(til),
        "bwt_cil": backward_transfer(cil),
        "freeze_auto": record.freeze_auto[lane],
        **({"layer_metrics": record.layer_metrics[lane]} if layer_metrics else {}),
        **({"sparsity": sparsity_report(params)} if sparse else {}),
    }


def assemble_results(run, record: RunRecord, state, programs: Programs, *,
                     resumed_at: list[int], wall_time_s: float) -> dict:
    """The results `lightcl_jax.training.loop.train_and_evaluate` returns (see there)."""
    config, placement = run.config, run.placement
    runs = placement.map_lanes(
        lambda lane, lane_state: seed_results(
            record, lane, placement.lanes.seeds[lane],
            full_width_params(run.model, run.stream.image_shape, lane_state.params),
            layer_metrics=config.layer_metrics is not None, sparse=config.sparse),
        state, join=False)
    common = {
        "strategy": config.strategy,
        "dataset": run.stream.name,
        "num_tasks": run.stream.num_tasks,
        "seed": config.seed,
        "eval_split": run.stream.eval_split,
        "pretrained": run.pretrained,
        "config": config.to_dict(),
    }
    if placement.lanes.stacked:
        til_mean, til_std = seed_statistics([r["avg_til"] for r in runs])
        cil_mean, cil_std = seed_statistics([r["avg_cil"] for r in runs])
        summary = {"seeds": runs, "avg_til_mean": til_mean, "avg_til_std": til_std,
                   "avg_cil_mean": cil_mean, "avg_cil_std": cil_std, "phases": record.phases}
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

"""Figures written next to the JSON they come from (matplotlib, Agg: no display needed).

* `accuracy_figure`: a run's TIL and CIL accuracy matrices as annotated heatmaps
  (row: after training task i; column: task j; only j <= i exists), each titled with
  its final average. For a ``--seeds N`` run, the matrices are the seeds' mean and the
  titles give mean +- std over seeds. a run with a workdir writes it as ``accuracy.png``
  (`lightcl_jax.training.loop.train_and_evaluate`).
* `accuracy_curve_figure`: average accuracy over the tasks seen so far after each
  task, a line per strategy with a band of +- one std over seeds, TIL and CIL panels;
  `experiments.compare` writes it as ``accuracy_curve.png``.
* `cost_accuracy_figure`: final CIL and TIL against the XLA bytes of the train step of
  tasks >= 1 (where LightCL freezes and the replay methods replay) and
  against the whole run's FLOPs, a labelled point per strategy (the paper's argument
  in one picture); `experiments.compare` writes it as ``cost_vs_accuracy.png``.
"""

from __future__ import annotations

import os

import numpy as np


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def accuracy_matrices(results: dict) -> dict[str, tuple[np.ndarray, str]]:
    """``{"TIL": (matrix, average label), "CIL": ...}`` of a run's results.

    A matrix is (tasks x tasks), NaN above the diagonal (tasks not yet seen).
    """
    runs = results["seeds"] if "seeds" in results else [results]
    out = {}
    for kind in ("til", "cil"):
        mats = []
        for run in runs:
            rows = run[f"acc_{kind}"]
            mat = np.full((len(rows), len(rows)), np.nan)
            for i, row in enumerate(rows):
                mat[i, :len(row)] = row
            mats.append(mat)
        finals = [run[f"avg_{kind}"] for run in runs]
        label = (f"average {finals[0]:.2f}" if len(runs) == 1 else
                 f"average {np.mean(finals):.2f} ± {np.std(finals):.2f}, {len(runs)} seeds")
        out[kind.upper()] = (np.mean(mats, axis=0), label)
    return out


def accuracy_figure(results: dict):
    """The TIL and CIL accuracy matrices of ``results`` side by side (a matplotlib Figure)."""
    plt = _pyplot()
    matrices = accuracy_matrices(results)
    tasks = len(next(iter(matrices.values()))[0])
    fig, axes = plt.subplots(1, 2, figsize=(4.2 + 1.2 * tasks, 1.6 + 0.6 * tasks),
                             constrained_layout=True)
    title = f"{results.get('strategy', '?')} on {results.get('dataset', '?')}"
    fig.suptitle(f"{title}: accuracy (%) on task j after training task i")
    for ax, (kind, (mat, label)) in zip(axes, matrices.items()):
        image = ax.imshow(np.ma.masked_invalid(mat), vmin=0, vmax=100, cmap="viridis")
        for i in range(tasks):
            for j in range(i + 1):
                ax.text(j, i, f"{mat[i, j]:.1f}", ha="center", va="center", fontsize=8,
                        color="white" if mat[i, j] < 60 else "black")
        ax.set_title(f"{kind} ({label})")
        ax.set_xlabel("task j (evaluated)")
        ax.set_ylabel("after training task i")
        ax.set_xticks(range(tasks), [str(t + 1) for t in range(tasks)])  # tasks count from 1
        ax.set_yticks(range(tasks), [str(t + 1) for t in range(tasks)])
    fig.colorbar(image, ax=axes, shrink=0.8, label="accuracy (%)")
    return fig


def accuracy_curve_figure(runs: dict[str, list[dict]], title: str = ""):
    """Average accuracy over seen tasks after each task: ``runs`` maps a strategy to
    its seeds' results (each with ``acc_til`` and ``acc_cil``)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True, sharey=True)
    fig.suptitle(title or "average accuracy over the tasks seen so far")
    for ax, kind in zip(axes, ("til", "cil")):
        for name, seeds in runs.items():
            curves = np.array([[np.mean(row) for row in r[f"acc_{kind}"]] for r in seeds])
            mean, std = curves.mean(axis=0), curves.std(axis=0)
            x = np.arange(1, len(mean) + 1)
            (line,) = ax.plot(x, mean, marker="o", label=name)
            ax.fill_between(x, mean - std, mean + std, color=line.get_color(), alpha=0.2)
        ax.set_title(f"{kind.upper()} (mean ± std over seeds)")
        ax.set_xlabel("after training task")
        ax.set_xticks(x)
        ax.set_ylim(0, 101)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("average accuracy (%)")
    axes[1].legend(loc="lower left", fontsize=8)
    return fig


def cost_accuracy_figure(rows: list[dict], title: str = ""):
    """Final CIL and TIL (mean over seeds) against the XLA MB of the step of tasks >= 1
    and the run's train FLOPs: ``rows`` as `experiments.compare.summarize` makes them."""
    plt = _pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(10, 7.5), constrained_layout=True)
    fig.suptitle(title or "accuracy against cost")
    costs = (("step_mb_later", "train step from task 1 on, XLA MB"),
             ("train_flops", "whole-run train FLOPs"))
    for i, kind in enumerate(("cil", "til")):
        for j, (key, label) in enumerate(costs):
            ax = axes[i, j]
            for r in rows:
                ax.errorbar(r[key], r[f"{kind}_mean"], yerr=r[f"{kind}_std"], fmt="o", capsize=3)
                ax.annotate(r["strategy"], (r[key], r[f"{kind}_mean"]), fontsize=8,
                            xytext=(4, 4), textcoords="offset points")
            if key == "train_flops":
                ax.set_xscale("log")
            ax.set_title(f"final {kind.upper()} against {label}")
            ax.set_xlabel(label)
            ax.set_ylabel(f"final average {kind.upper()} (%)")
            ax.grid(alpha=0.3)
    return fig


def save_figure(fig, path: str) -> str:
    """Writes ``fig`` as a PNG (atomically: a temporary file, then renamed) and closes it."""
    plt = _pyplot()
    tmp = f"{path}.tmp"
    try:
        fig.savefig(tmp, format="png", dpi=120)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.remove(tmp)
    return path

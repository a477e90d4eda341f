"""Figures written beside results.json (`lightcl_jax.figures`)."""

import numpy as np

from lightcl_jax.figures import accuracy_figure, accuracy_matrices, save_figure


def _run(til, cil, **extra):
    return {"strategy": "lightcl", "dataset": "digits", "acc_til": til, "acc_cil": cil,
            "avg_til": float(np.mean(til[-1])), "avg_cil": float(np.mean(cil[-1])), **extra}


TIL = [[100.0], [98.0, 96.0], [97.0, 90.0, 99.0]]
CIL = [[100.0], [40.0, 96.0], [30.0, 20.0, 99.0]]


def test_accuracy_figure_draws_both_matrices_with_their_averages(tmp_path):
    fig = accuracy_figure(_run(TIL, CIL))
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert titles == ["TIL (average 95.33)", "CIL (average 49.67)"]
    til_ax = fig.axes[0]
    labels = sorted(t.get_text() for t in til_ax.texts)
    assert labels == sorted(f"{v:.1f}" for row in TIL for v in row)  # j <= i only
    path = save_figure(fig, str(tmp_path / "accuracy.png"))
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    assert not (tmp_path / "accuracy.png.tmp").exists()


def test_accuracy_matrices_of_seeds_are_their_mean_with_the_spread_in_the_label():
    other_til = [[100.0], [96.0, 98.0], [95.0, 92.0, 97.0]]
    results = {"seeds": [_run(TIL, CIL), _run(other_til, CIL)]}
    mats = accuracy_matrices(results)
    til, label = mats["TIL"]
    assert np.isnan(til[0, 1]) and til[2, 1] == 91.0 and til[1, 0] == 97.0
    finals = [np.mean(TIL[-1]), np.mean(other_til[-1])]
    assert label == f"average {np.mean(finals):.2f} ± {np.std(finals):.2f}, 2 seeds"


def test_metrics_log_starts_afresh_and_a_resume_drops_what_it_replays(tmp_path):
    import json

    from lightcl_jax.training.progress import MetricsLog
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"kind": "epoch", "global_step": 99}\n')  # another run's line
    log = MetricsLog(str(path), lr=0.5)
    log.start("task 1/2", 10)
    for step in (5, 10):
        log.record("epoch", {"global_step": step})
    log.record("task", {"global_step": 10})
    log.record("epoch", {"global_step": 15})
    read = lambda: [json.loads(line) for line in path.read_text().splitlines()]  # noqa: E731
    assert read() == [{"kind": "epoch", "global_step": 5, "lr": 0.5},
                      {"kind": "epoch", "global_step": 10, "lr": 0.5},
                      {"kind": "task", "global_step": 10},
                      {"kind": "epoch", "global_step": 15, "lr": 0.5}]
    resumed = MetricsLog(str(path), lr=0.5)
    resumed.resumed("ckpt", "task 2/2", 10)  # steps 11.. are trained again
    resumed.start("task 2/2", 10, 0)
    assert [line["global_step"] for line in read()] == [5, 10, 10]


def test_compare_figures_have_a_panel_per_measure_and_a_line_or_point_per_strategy(tmp_path):
    from lightcl_jax.figures import accuracy_curve_figure, cost_accuracy_figure
    runs = {"lightcl": [_run(TIL, CIL), _run(TIL, CIL)], "finetune": [_run(TIL, CIL)]}
    fig = accuracy_curve_figure(runs, "digits")
    assert [ax.get_title() for ax in fig.axes] == ["TIL (mean ± std over seeds)",
                                                   "CIL (mean ± std over seeds)"]
    til_ax = fig.axes[0]
    assert [line.get_label() for line in til_ax.get_lines()] == ["lightcl", "finetune"]
    # After task 2 the TIL average over seen tasks is mean(98, 96) = 97.
    np.testing.assert_allclose(til_ax.get_lines()[0].get_ydata(), [100.0, 97.0, 95.0 + 1 / 3])
    save_figure(fig, str(tmp_path / "curve.png"))
    rows = [{"strategy": "lightcl", "cil_mean": 50.0, "cil_std": 1.0, "til_mean": 93.0,
             "til_std": 0.5, "step_mb_later": 9.2, "train_flops": 6.4e10},
            {"strategy": "finetune", "cil_mean": 47.0, "cil_std": 2.0, "til_mean": 96.0,
             "til_std": 1.0, "step_mb_later": 10.9, "train_flops": 1.2e11}]
    fig = cost_accuracy_figure(rows, "digits")
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == ["final CIL against train step from task 1 on, XLA MB",
                      "final CIL against whole-run train FLOPs",
                      "final TIL against train step from task 1 on, XLA MB",
                      "final TIL against whole-run train FLOPs"]
    assert sorted(t.get_text() for t in fig.axes[0].texts) == ["finetune", "lightcl"]
    path = save_figure(fig, str(tmp_path / "cost.png"))
    assert open(path, "rb").read()[:4] == b"\x89PNG"

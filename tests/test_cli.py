"""End-to-end runs of the real CLI, ``python -m experiments.run``."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

from experiments import run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEYS = {"strategy", "dataset", "num_tasks", "seed", "config", "acc_til", "acc_cil", "avg_til",
        "avg_cil", "forgetting_til", "forgetting_cil", "bwt_til", "bwt_cil", "wall_time_s"}


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "experiments.run", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)


def _check_results(path, strategy, dataset, num_tasks):
    with open(path) as f:
        results = json.load(f)
    assert KEYS <= set(results)
    assert (results["strategy"], results["dataset"], results["num_tasks"]) == (
        strategy, dataset, num_tasks)
    for key in ("acc_til", "acc_cil"):
        matrix = results[key]
        assert [len(row) for row in matrix] == list(range(1, num_tasks + 1))
        assert all(0.0 <= v <= 100.0 for row in matrix for v in row)
    np.testing.assert_allclose(results["avg_til"], np.mean(results["acc_til"][-1]))
    np.testing.assert_allclose(results["avg_cil"], np.mean(results["acc_cil"][-1]))
    drops = [max(results["acc_cil"][i][j] for i in range(j, num_tasks - 1))
             - results["acc_cil"][-1][j] for j in range(num_tasks - 1)]
    np.testing.assert_allclose(results["forgetting_cil"], np.mean(drops))
    # TIL is at least as easy as CIL on every entry: it picks among fewer classes.
    assert all(t >= c for rt, rc in zip(results["acc_til"], results["acc_cil"])
               for t, c in zip(rt, rc))
    return results


def test_cli_on_mock_cifar10_through_tfds(tmp_path):
    args = ["--dataset", "cifar10", "--strategy", "finetune", "--epochs", "1", "--nf", "4",
            "--batch-size", "8", "--workdir", str(tmp_path), "--no-progress"]
    with tfds.testing.mock_data(num_examples=120, policy=tfds.testing.MockPolicy.USE_CODE):
        assert run.main(args) == 0
    results = _check_results(tmp_path / "results.json", "finetune", "cifar10", 5)
    assert results["config"]["augment"] is None and results["eval_split"] == "holdout"


@pytest.mark.parametrize("args,words", [
    (["--strategy-arg", "ratio=1.5"], "strategy lightcl: ratio must be a float in (0, 1]; got 1.5"),
    (["--strategy-arg", "beta=-1"], "strategy lightcl: beta must be a float >= 0; got -1.0"),
    (["--strategy-arg", "beta=nan"], "strategy lightcl: beta must be a float >= 0; got nan"),
    (["--strategy-arg", "buffer_size=1.5"], "buffer_size must be an int >= 1; got '1.5'"),
    (["--strategy-arg", "buffer_size=40"], "buffer_size must be at most batch_size=32"),
    (["--strategy-arg", "beta"], "write NAME=VALUE (e.g. lam=100)"),
    (["--strategy", "er", "--strategy-arg", "beta=5"],
     "strategy er has no hyperparameter 'beta'; it has buffer_size"),
    (["--strategy-arg", "ewc.lam=5"], "ewc is not a strategy of this run (lightcl)"),
    (["--strategy", "finetune", "--strategy-arg", "buffer_size=5"],
     "strategy finetune has no hyperparameter 'buffer_size'; it has none"),
    (["--strategy", "nope.py:Mine"], "cannot import nope.py for 'nope.py:Mine'"),
    (["--strategy", "os:getcwd"], "os:getcwd is not a strategy"),
    (["--metrics", "avg,nope"], "unknown metric 'nope'"),
    (["--metrics", "loss"], "metrics must include avg"),
    (["--metrics", "avg,os:getcwd"], "neither a lightcl_jax Summary nor an EvalMetric"),
    (["--lr", "0"], "lr must be > 0"),
    (["--epochs", "0"], "epochs must be an integer >= 1"),
    (["--nf", "0"], "nf must be an integer in [1, 4096]"),
    (["--strategy", "sgd"], "unknown strategy 'sgd'; known:"),
    (["--dataset", "mnist"], "invalid choice: 'mnist'"),
    (["--num-tasks", "3"], "positive divisor of the 10 classes"),
    (["--epochs", "two"], "invalid int value: 'two'"),
    (["--batch-size", "400"], "fewer than one batch of 400"),
    (["--freeze", "stage9"], "invalid choice: 'stage9'"),
    (["--layer-metrics", "nope"], "layer_metrics: unknown similarity 'nope'"),
    (["--ckpt-every", "-1"], "--ckpt-every must be >= 0"),
    (["--seeds", "0"], "--seeds must be >= 1"),
    (["--sparse-execution", "fast"], "invalid choice: 'fast'"),
    (["--xla-scheduler", "fast"], "invalid choice: 'fast'"),
    (["--last-batch", "pad"], "invalid choice: 'pad'"),
    (["--sparse", "--sparse-execution", "compact", "--seeds", "2", "--nf", "4", "--dataset", "digits"],
     "seed 1 prunes other channels than seed 0"),
    (["--dataset", "cifar10", "--data-dir", "/nonexistent"], "'/nonexistent' is missing or empty"),
])
def test_bad_flags_give_one_line_and_exit_code_2(tmp_path, args, words):
    proc = _cli(*args, "--workdir", str(tmp_path / "w"))
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and words in proc.stderr, proc.stderr
    assert not (tmp_path / "w").exists()


def test_freeze_auto_and_layer_metrics_flags_reach_the_config_and_the_table():
    """The flags' end of --freeze auto and --layer-metrics. The runs themselves are
    tests/test_generalizability.py's and tests/test_checkpoint.py's (resumed mid-task)."""
    _, args = run.parse_args(["--freeze", "auto", "--layer-metrics", "--freeze-threshold", "0.8",
                              "--similarity", "cosine"])
    config = run.config_from_args(args)
    assert (config.freeze, config.freeze_threshold, config.similarity, config.layer_metrics) == (
        "auto", 0.8, "cosine", "linear_cka_debiased")     # bare --layer-metrics: the default
    results = {"strategy": "lightcl", "dataset": "digits", "num_tasks": 2, "seed": 0,
               "metric_names": {"summaries": ["avg", "forgetting", "bwt"], "evaluation": []},
               "eval_split": "holdout", "acc_til": [[90.0], [80.0, 70.0]],
               "acc_cil": [[90.0], [40.0, 60.0]], "avg_til": 75.0, "avg_cil": 50.0,
               "forgetting_til": 10.0, "forgetting_cil": 50.0, "bwt_til": -10.0,
               "bwt_cil": -50.0, "wall_time_s": 1.5,
               "freeze_auto": {"chosen": "stage2", "task": 1, "similarity": "cosine",
                               "threshold": 0.8}}
    table = run.format_table(results)
    assert "--freeze auto chose stage2 at task 2 (cosine LP and MS >= 0.8)" in table
    assert "after 2    80.00   70.00   75.00" in table
    assert "CIL      50.00       50.00  -50.00" in table


def test_every_config_field_is_a_flag_with_the_configs_default():
    import dataclasses

    from lightcl_jax.config import Config
    _, args = run.parse_args([])
    # strategy_args come from the repeatable --strategy-arg.
    assert {f.name for f in dataclasses.fields(Config)} - {"strategy_args"} <= set(vars(args))
    assert args.strategy_arg == [] and run.config_from_args(args) == Config()


@pytest.mark.parametrize("flags", [["--workdir", "w"], ["--ckpt-every", "3"], ["--overwrite"],
                                   ["--seeds", "2"]])
def test_check_sensitivity_refuses_the_run_flags_it_cannot_honour(flags, capsys):
    from benchmarks import check_sensitivity
    with pytest.raises(SystemExit) as exit_info:
        check_sensitivity.main(flags)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1
    assert f"{flags[0]} is not supported here" in err


def test_check_identical_compares_all_but_the_wall_time_and_refuses_a_non_checkout(
        tmp_path, capsys):
    from benchmarks import check_identical
    assert check_identical.differences({"a": 1, "wall_time_s": 2.0}, {"a": 1, "wall_time_s": 3.0}) \
        == []
    # An old entry changed or gone differs; a new one is listed apart; ignored ones pass.
    assert check_identical.differences({"a": [1.0], "b": 0}, {"a": [1.5], "c": 0}) == ["a", "b"]
    assert check_identical.added({"a": [1.0], "b": 0}, {"a": [1.5], "c": 0}) == ["c"]
    assert check_identical.differences({"a": 1, "config": 1}, {"a": 1, "config": 2},
                                       ignore=("config",)) == []
    # The peak resident memory is measured too (an old run's results have none).
    resources = {"flops": 1.0, "peak_rss_mb": 900.0}
    assert check_identical.differences({"resources": resources},
                                       {"resources": {"flops": 1.0, "more": 3}}) == []
    assert check_identical.differences({"resources": resources},
                                       {"resources": {"flops": 2.0}}) == ["resources.flops"]
    for argv, words in ((["--old", str(tmp_path)], "is not a lightcl_jax checkout"),
                        (["--old", ".", "--runs", "nope"], "unknown runs ['nope']")):
        with pytest.raises(SystemExit) as exit_info:
            check_identical.main(argv)
        assert exit_info.value.code == 2 and words in capsys.readouterr().err


def test_the_library_names_the_allowed_last_batch_modes():
    from lightcl_jax.config import Config
    with pytest.raises(ValueError, match=r"last_batch must be one of drop, keep; got 'pad'"):
        Config(last_batch="pad").validate()

"""Extending the library from one file: strategies that own their hyperparameters, metrics
of three kinds as plugins, streams of your own, and the two examples in docs/examples/."""

import dataclasses
import functools
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import compare, run
from lightcl_jax.config import DEFAULT_METRICS, Config
from lightcl_jax.data.streams import split_into_tasks
from lightcl_jax.metrics.continual import (EvalMetric, Summary, average_incremental_accuracy,
                                           register_eval_metric, register_summary, split_metrics)
from lightcl_jax.registry import EVAL_METRICS, STRATEGIES, SUMMARIES, load_path
from lightcl_jax.strategies import (LightCL, OnlineEWC, Strategy, get_strategy, hyperparameter,
                                    register_strategy)
from lightcl_jax.strategies.hyperparameters import describe, parse_value
from lightcl_jax.training.checkpoint import RunCheckpoints
from lightcl_jax.training.run import upgrade_identity
from lightcl_jax.training.loop import train_and_evaluate
from lightcl_jax.training.progress import Progress
from test_checkpoint import _SnapshotAfter, _same
from test_training import TINY, _tiny_stream, with_strategy
from lightcl_jax.training.loop import Hooks, train
from lightcl_jax.training.run import setup_run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
L2_ANCHOR = "docs/examples/l2_anchor.py:L2Anchor"
LEARNING = "docs/examples/my_metrics.py:LEARNING_ACCURACY"
ECE = "docs/examples/my_metrics.py:CALIBRATION_ERROR"


def test_a_strategy_declares_checks_and_records_its_hyperparameters():
    assert OnlineEWC().hyperparameters() == {"lam": 10.0, "gamma": 1.0}
    assert LightCL().hyperparameters() == {"beta": 2e-4, "buffer_size": 15, "ratio": 0.15}
    ewc = get_strategy("ewc", lam=100)
    assert ewc == OnlineEWC(lam=100.0) and isinstance(ewc.lam, float)  # an int where a float goes
    for make, words in (
            (lambda: OnlineEWC(gamma=2.0), "strategy ewc: gamma must be a float in [0, 1]; got 2.0"),
            (lambda: OnlineEWC(lam=True), "lam must be a float >= 0; got True"),
            (lambda: OnlineEWC(lam=float("inf")), "lam must be a float >= 0; got inf"),
            (lambda: LightCL(buffer_size=2.0), "buffer_size must be an int >= 1; got 2.0"),
            (lambda: LightCL(ratio=0.0), "ratio must be a float in (0, 1]; got 0.0"),
            (lambda: get_strategy("ewc", lambda_=1), "strategy ewc has no hyperparameter "
                                                     "'lambda_'; it has lam, gamma"),
            (lambda: get_strategy("finetune", buffer_size=1), "it has none"),
            (lambda: get_strategy("sgd"), "unknown strategy 'sgd'; known: ")):
        with pytest.raises(ValueError) as error:
            make()
        assert words in str(error.value)
    with pytest.raises(dataclasses.FrozenInstanceError, match="cannot change OnlineEWC.lam"):
        ewc.lam = 1.0
    # From text, as --strategy-arg gives it.
    assert parse_value(OnlineEWC, "lam", "100") == 100.0
    assert parse_value(LightCL, "buffer_size", "8") == 8
    with pytest.raises(ValueError, match=r"buffer_size must be an int >= 1; got '8.5'"):
        parse_value(LightCL, "buffer_size", "8.5")
    assert describe(OnlineEWC) == ["lam=10.0 (a float >= 0): weight of the penalty",
                                   "gamma=1.0 (a float in [0, 1]): decay of the accumulated Fisher"]


def test_a_strategy_of_your_own_is_a_dataclass_with_or_without_the_decorator():
    class Plain(Strategy):
        name = "plain_test"
        weight: float = hyperparameter(0.5, "a weight", above=0)
        flag: bool = False

    @dataclasses.dataclass(frozen=True)
    class Decorated(Plain):
        name = "decorated_test"
        count: int = 3

    assert Plain(weight=2).hyperparameters() == {"weight": 2.0, "flag": False}
    assert Decorated(count=4).hyperparameters() == {"weight": 0.5, "flag": False, "count": 4}
    with pytest.raises(ValueError, match="weight must be a float > 0; got 0.0"):
        Decorated(weight=0.0)
    assert parse_value(Plain, "flag", "on") is True
    with pytest.raises(TypeError, match="write name = 'x' without an annotation"):
        class Annotated(Strategy):  # noqa: F841  (the class statement is what fails)
            name: str = "x"
    with pytest.raises(TypeError, match=r"register the class, not an instance"):
        register_strategy(Plain())
    register_strategy(Plain)
    try:
        config = Config(strategy="plain_test", strategy_args={"weight": 3.0})
        assert get_strategy(config.strategy, **config.strategy_args) == Plain(weight=3.0)
    finally:
        STRATEGIES.pop("plain_test", None)


def test_config_holds_no_strategy_field():
    fields = {f.name for f in dataclasses.fields(Config)}
    assert not {"beta", "buffer_size", "ratio"} & fields
    assert not [f for f in fields if f.startswith(("derpp_", "ewc_", "lwf_"))]


def test_the_identity_holds_every_hyperparameter_and_a_changed_one_differs():
    """(The CLI test below has a workdir refuse a changed hyperparameter.)"""
    from lightcl_jax.training.checkpoint import identity_differences
    from lightcl_jax.training.run import run_identity
    stream = _tiny_stream(num_tasks=1)
    ewc = with_strategy(TINY, "ewc")
    # Given at its default or not given: the same run.
    identity = run_identity(ewc, stream, False)
    assert identity == run_identity(dataclasses.replace(ewc, strategy_args={"lam": 10}), stream,
                                    False)
    assert identity["config"]["strategy_args"] == {"lam": 10.0, "gamma": 1.0}
    changed = run_identity(with_strategy(TINY, "ewc", lam=100.0), stream, False)
    assert identity_differences(identity, changed) == (
        "strategy_args {'lam': 10.0, 'gamma': 1.0} there, {'lam': 100.0, 'gamma': 1.0} here")


def test_an_older_identity_reads_as_this_versions():
    old = {"config": {"strategy": "derpp", "beta": 2e-4, "buffer_size": 8, "ratio": 0.15,
                      "derpp_alpha": 0.1, "derpp_beta": 0.5, "ewc_lambda": 10.0, "ewc_gamma": 1.0,
                      "lwf_alpha": 1.0, "lwf_temperature": 2.0, "lr": 0.01}, "devices": 1}
    assert upgrade_identity(old) == {
        "config": {"strategy": "derpp", "lr": 0.01, "metrics": ["avg", "forgetting", "bwt"],
                   "strategy_args": {"buffer_size": 8, "alpha": 0.1, "beta": 0.5}},
        "devices": 1}
    current = upgrade_identity(old)
    assert upgrade_identity(current) is current


def test_summaries_and_their_registry():
    matrix = [[90.0], [70.0, 80.0], [60.0, 50.0, 40.0]]
    assert average_incremental_accuracy(matrix) == pytest.approx(np.mean([90.0, 75.0, 50.0]))
    assert SUMMARIES["avg_incremental"](matrix) == pytest.approx(71.6666666667)
    summaries, evals = split_metrics(DEFAULT_METRICS)
    assert [s.name for s in summaries] == ["avg", "forgetting", "bwt", "avg_incremental"]
    assert [e.name for e in evals] == ["loss"]
    register_summary("worst_test", lambda m: float(np.min(m[-1])))
    try:
        assert split_metrics(("avg", "worst_test"))[0][1](matrix) == 40.0
        with pytest.raises(ValueError, match="already names a summary metric"):
            register_eval_metric("worst_test", lambda *a, **k: {}, lambda t: 0.0)
    finally:
        SUMMARIES.pop("worst_test", None)
    with pytest.raises(ValueError, match="are both called 'loss'"):
        split_metrics(("avg", "loss", "lightcl_jax.metrics.continual:EVAL_LOSS"))
    with pytest.raises(ValueError, match="a name that is a Python identifier"):
        register_summary("two words", lambda m: 0.0)


def test_a_stream_of_your_own_runs_with_a_config_that_names_it_or_none():
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(4), 20).astype(np.int32)
    x = rng.normal(size=(80, 8, 8, 1)).astype(np.float32)
    x[np.arange(80), y, :, 0] += 3.0
    stream = split_into_tasks("toy", x, y, x[::4], y[::4], 4, 2)
    with pytest.raises(ValueError, match="dataset 'toy' is not built in, so epochs and nf have "
                                         "no default: set epochs and nf"):
        Config(dataset="toy").resolved()
    with pytest.raises(ValueError, match="pass its stream"):
        train_and_evaluate(Config(dataset="toy", epochs=1, nf=2))
    from lightcl_jax.training.run import setup_run
    assert setup_run(Config(strategy="finetune", dataset="toy", epochs=1, nf=2, batch_size=8),
                     stream).config.nf == 2
    results = train_and_evaluate(Config(strategy="finetune", dataset=None, epochs=1, nf=2,
                                        batch_size=8), stream=stream)
    assert results["dataset"] == "toy" and results["config"]["dataset"] is None
    assert (results["config"]["epochs"], results["config"]["nf"]) == (1, 2)


class _Epochs(Progress):
    def __init__(self):
        self.epochs = []

    def record(self, kind, values):
        if kind == "epoch":
            self.epochs.append(values)


def _np_logits(state, x):
    from lightcl_jax.model.resnet import ResNet18
    logits, _ = ResNet18(num_classes=4, nf=4).apply(
        {"params": state.params, "batch_stats": state.batch_stats}, x, train=False)
    return np.asarray(logits, np.float64)


def test_the_examples_run_from_python_with_values_numpy_gives():
    """docs/examples: the L2 anchor's penalty and weight, the learning accuracy and the
    calibration error, each against NumPy; the built-in evaluation loss too."""
    l2 = sys.modules[load_path(os.path.join(ROOT, L2_ANCHOR)).__module__]
    rng = np.random.default_rng(0)
    params = {"a": rng.normal(size=(3, 2)).astype(np.float32), "b": rng.normal(size=4)
              .astype(np.float32)}
    anchor = jax.tree_util.tree_map(lambda p: p + rng.normal(size=p.shape).astype(np.float32),
                                    params)
    expected = sum(np.sum((params[k] - anchor[k]).astype(np.float64) ** 2) for k in params)
    loss, terms = l2.L2Anchor(weight=0.25).extra_loss(None, None, params, anchor)
    np.testing.assert_allclose(float(terms["l2_anchor"]), expected, rtol=1e-5)
    np.testing.assert_allclose(float(loss), 0.25 * expected, rtol=1e-5)

    register_strategy(l2.L2Anchor)
    epochs, final = _Epochs(), {}
    stream = _tiny_stream(num_tasks=2)
    try:
        metrics = [os.path.join(ROOT, path) for path in (LEARNING, ECE)]
        config = dataclasses.replace(TINY, strategy="l2_anchor", strategy_args={"weight": 0.05},
                                     epochs=2, metrics=(*DEFAULT_METRICS, *metrics))
        results = train(setup_run(config, stream), progress=epochs,
                        hooks=Hooks(on_task_end=lambda t, state: final.update(state=state)))
    finally:
        STRATEGIES.pop("l2_anchor", None)
    assert results["config"]["strategy_args"] == {"weight": 0.05}
    # Each epoch's mean loss is the mean cross-entropy plus weight x the mean penalty.
    for epoch in epochs.epochs:
        if epoch["task"] == 0:
            assert "l2_anchor" not in epoch
        else:
            assert epoch["l2_anchor"] > 0
            np.testing.assert_allclose(epoch["loss"], epoch["ce"] + 0.05 * epoch["l2_anchor"],
                                       rtol=1e-5)
    til = results["acc_til"]
    assert results["learning_til"] == pytest.approx(np.mean([til[t][t] for t in range(2)]))
    for j, task in enumerate(stream.tasks):
        logits = _np_logits(final["state"], task.x_eval)
        labels = task.y_eval
        # Expected calibration error over 15 equal-width bins of the top softmax probability.
        p = np.exp(logits - logits.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        confidence, right = p.max(1), p.argmax(1) == labels
        bins = np.minimum((confidence * 15).astype(int), 14)
        ece = sum(abs(right[bins == b].sum() - confidence[bins == b].sum())
                  for b in range(15)) / len(labels)
        np.testing.assert_allclose(results["eval_ece"][-1][j], ece, rtol=1e-4, atol=1e-6)
        # The evaluation loss: the task-masked cross-entropy.
        own = logits[:, task.class_offset:task.class_offset + 2]
        log_p = own - np.log(np.exp(own).sum(1, keepdims=True))
        loss = -np.mean(log_p[np.arange(len(labels)), labels - task.class_offset])
        np.testing.assert_allclose(results["eval_loss"][-1][j], loss, rtol=1e-5)
    assert results["avg_eval_ece"] == pytest.approx(np.mean(results["eval_ece"][-1]))
    assert [len(row) for row in results["eval_ece"]] == [1, 2]


def test_the_examples_run_from_the_command_line_by_their_paths(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    workdir = tmp_path / "w"
    argv = ["--strategy", L2_ANCHOR, "--strategy-arg", "weight=0.05", "--dataset", "digits",
            "--nf", "2", "--epochs", "1", "--num-tasks", "2", "--batch-size", "16",
            "--metrics", f"+{LEARNING},{ECE}", "--ckpt-every", "0", "--no-progress",
            "--workdir", str(workdir)]
    assert run.main(argv) == 0
    out = capsys.readouterr().out
    assert "learning" in out and "evaluation ece" in out
    results = json.loads((workdir / "results.json").read_text())
    assert results["strategy"] == L2_ANCHOR
    assert results["config"]["strategy_args"] == {"weight": 0.05}
    assert results["metric_names"] == {
        "summaries": ["avg", "forgetting", "bwt", "avg_incremental", "learning"],
        "evaluation": ["loss", "ece"]}
    lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    later = [line for line in lines if line["kind"] == "epoch" and line["task"] == 1]
    assert later and all(abs(e["loss"] - e["ce"] - 0.05 * e["l2_anchor"]) < 1e-5 for e in later)
    task = [line for line in lines if line["kind"] == "task"][-1]
    assert task["eval_ece_row"] == results["eval_ece"][-1]
    assert task["learning_til"] == results["learning_til"]
    # The same command again: this run's results, nothing trained. Another weight: refused.
    assert run.main(argv) == 0
    assert "already holds this run's results" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        run.main([*argv, "--strategy-arg", "weight=0.5"])
    assert exit_info.value.code == 2
    assert "strategy_args {'weight': 0.05} there, {'weight': 0.5} here" in capsys.readouterr().err
    # --help lists the strategy's hyperparameter and the metrics.
    with pytest.raises(SystemExit):
        run.main(["--strategy", L2_ANCHOR, "--help"])
    help_text = capsys.readouterr().out
    assert "weight=0.01 (a float >= 0): weight of the pull" in help_text
    assert "avg_incremental" in help_text and "strategy:" in help_text


def test_compare_runs_a_strategy_and_metrics_of_your_own(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    out = tmp_path / "cmp"
    assert compare.main(["--strategies", L2_ANCHOR, "--strategy-arg",
                         "l2_anchor.weight=0.05", "--metrics", f"+{ECE}", "--seeds", "2",
                         "--epochs", "1", "--nf", "2", "--dataset", "digits", "--num-tasks", "2",
                         "--workdir", str(out), "--no-progress"]) == 0
    seeds = [json.loads((out / f"l2_anchor-seed{s}.json").read_text()) for s in (0, 1)]
    assert seeds[0]["config"]["strategy_args"] == {"weight": 0.05}
    table = json.loads((out / "table.json").read_text())["rows"]
    assert [row["strategy"] for row in table] == [L2_ANCHOR]
    row = table[0]
    assert row["avg_eval_ece"] == pytest.approx(np.mean([s["avg_eval_ece"] for s in seeds]))
    assert row["avg_incremental_cil"] == pytest.approx(
        np.mean([s["avg_incremental_cil"] for s in seeds]))
    assert "avg_eval_ece" in (out / "table.csv").read_text().splitlines()[0]
    assert "avg_eval_ece |" in (out / "table.md").read_text()
    capsys.readouterr()
    for argv, words in (
            (["--strategy-arg", "lam=1"], "none of the strategies here (finetune, lightcl) has a "
                                          "hyperparameter 'lam'"),
            (["--strategy-arg", "ewc.lam=1"], "ewc is not a strategy of this run"),
            (["--metrics", "avg,nope"], "unknown metric 'nope'")):
        with pytest.raises(SystemExit) as exit_info:
            compare.main(["--strategies", "finetune,lightcl", *argv, "--workdir",
                          str(tmp_path / "never")])
        assert exit_info.value.code == 2 and words in capsys.readouterr().err
    assert not (tmp_path / "never").exists()


def test_seeds_resume_and_freeze_auto_work_with_a_strategy_and_metrics_of_your_own(tmp_path):
    """A LightCL of your own (one more hyperparameter), a metric of your own: two seeds in
    one program, --freeze auto, killed mid-task and resumed to the uninterrupted results."""
    class Scaled(LightCL):
        name = "scaled_test"
        scale: float = hyperparameter(2.0, "multiplies beta", minimum=0)

        def extra_loss(self, *args, **kwargs):
            loss, terms = super().extra_loss(*args, **kwargs)
            return self.scale * loss, terms

    register_strategy(Scaled)
    register_eval_metric("wrong_test", lambda logits, labels, valid, **_: {
        "wrong": jnp.sum((jnp.argmax(logits, 1) != labels) & valid, dtype=jnp.float32),
        "count": jnp.sum(valid, dtype=jnp.float32)}, lambda t: float(t["wrong"] / t["count"]))
    try:
        stream = _tiny_stream(num_tasks=2)
        # Threshold -1: every group passes, so both seeds choose to freeze all but the head.
        config = dataclasses.replace(TINY, strategy="scaled_test", epochs=2, freeze="auto",
                                     freeze_threshold=-1.0,
                                     strategy_args={"buffer_size": 8, "scale": 3.0},
                                     metrics=("avg", "wrong_test"))
        clean = train(setup_run(config, stream, seeds=2),
                      checkpoints=RunCheckpoints(tmp_path / "run", every=8),
                      progress=_SnapshotAfter(9, tmp_path / "run", tmp_path / "killed"))
        resumed = train(setup_run(config, stream, seeds=2),
                        checkpoints=RunCheckpoints(tmp_path / "killed", every=8))
    finally:
        STRATEGIES.pop("scaled_test", None)
        EVAL_METRICS.pop("wrong_test", None)
    assert resumed["resumed_at_steps"] == [8] and _same(resumed) == _same(clean)
    for seed in clean["seeds"]:
        assert (seed["freeze_auto"]["task"], seed["freeze_auto"]["chosen"]) == (1, "all-but-head")
        # CIL accuracy and the error rate add up to 100 % on every task.
        np.testing.assert_allclose(100 * np.array(seed["eval_wrong_test"][-1]),
                                   100 - np.array(seed["acc_cil"][-1]), atol=1e-9)
    assert clean["config"]["strategy_args"] == {"beta": 2e-4, "buffer_size": 8, "ratio": 0.15,
                                                "scale": 3.0}


def test_an_import_path_loads_once_and_names_what_is_wrong(tmp_path):
    path = tmp_path / "mine.py"
    path.write_text("import lightcl_jax as lcl\nclass Mine(lcl.Strategy):\n    name = 'mine'\n"
                    "BROKEN = 1\n")
    first = load_path(f"{path}:Mine")
    assert load_path(f"{path}:Mine") is first and first.name == "mine"
    (tmp_path / "bad.py").write_text("raise RuntimeError('no')\n")
    for where, words in ((f"{path}:Nope", "has no attribute 'Nope'"),
                         (f"{tmp_path / 'bad.py'}:X", "RuntimeError: no"),
                         (f"{tmp_path / 'none.py'}:X", "no file"),
                         ("mine", "is not an import path")):
        with pytest.raises(ValueError, match=words):
            load_path(where)
    with pytest.raises(ValueError, match="is not a strategy: it is 1"):
        STRATEGIES.lookup(f"{path}:BROKEN")
    assert isinstance(load_path("lightcl_jax.metrics.continual:EVAL_LOSS"), EvalMetric)
    assert isinstance(load_path(LEARNING.replace("docs/", f"{ROOT}/docs/")), Summary)


def test_an_evaluation_metric_is_a_pure_jittable_pair_testable_with_chex():
    """The example's calibration error, batch by batch, against NumPy on all of a task at
    once; padding rows (valid False) are left out."""
    import chex
    metric = load_path(os.path.join(ROOT, ECE))
    rng = np.random.default_rng(5)
    logits = rng.normal(size=(20, 6)).astype(np.float32) * 3
    labels = rng.integers(0, 6, size=20).astype(np.int32)
    valid = np.arange(20) < 17                                  # three padding rows
    update = jax.jit(functools.partial(metric.update, class_offset=jnp.asarray(2),
                                       classes_per_task=2))
    halves = [update(jnp.asarray(logits[s]), jnp.asarray(labels[s]), jnp.asarray(valid[s]))
              for s in (slice(0, 10), slice(10, 20))]
    total = jax.tree_util.tree_map(lambda a, b: np.asarray(a, np.float64) + np.asarray(b),
                                   *halves)
    p = np.exp(logits[:17] - logits[:17].max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    confidence, right = p.max(1), p.argmax(1) == labels[:17]
    bins = np.minimum((confidence * 15).astype(int), 14)
    chex.assert_trees_all_close(total, {
        "count": np.bincount(bins, minlength=15).astype(np.float64),
        "confidence": np.bincount(bins, confidence, minlength=15),
        "correct": np.bincount(bins, right.astype(np.float64), minlength=15)}, rtol=1e-5)
    expected = np.sum(np.abs(np.bincount(bins, right.astype(float), minlength=15)
                             - np.bincount(bins, confidence, minlength=15))) / 17
    assert metric.compute(total) == pytest.approx(expected, rel=1e-5)

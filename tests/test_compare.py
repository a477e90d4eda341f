import csv
import hashlib
import json
import os
import signal

import numpy as np
import pytest
import tensorflow_datasets as tfds

from experiments import compare, convert_torch


# Two strategies, two seeds (trained in one program), 2 tasks of 25 steps each.
_SMALL = ["--strategies", "finetune,lightcl", "--seeds", "2", "--epochs", "1", "--nf", "4",
          "--dataset", "digits", "--num-tasks", "2", "--no-progress"]


@pytest.fixture(scope="module")
def clean_comparison(tmp_path_factory):
    """The workdir of an uninterrupted comparison of `_SMALL`."""
    workdir = tmp_path_factory.mktemp("clean")
    assert compare.main([*_SMALL, "--workdir", str(workdir)]) == 0
    return workdir


def test_compare_writes_both_tables(clean_comparison, tmp_path):
    out = clean_comparison
    with open(out / "table.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["strategy"] for r in rows] == ["finetune", "lightcl"]
    markdown = (out / "table.md").read_text()
    assert "| finetune | - |" in markdown and "| lightcl | 15 |" in markdown
    runs = [json.load(open(out / f"lightcl-seed{s}.json")) for s in (0, 1)]
    til = [r["avg_til"] for r in runs]
    lightcl = rows[1]
    assert abs(float(lightcl["til_mean"]) - sum(til) / 2) < 1e-9
    assert abs(float(lightcl["til_std"]) - abs(til[0] - til[1]) / 2) < 1e-9
    # Without pre-training LightCL's task 0 step is finetune's; from task 1 on its
    # frozen step is smaller and cheaper (XLA's figures).
    assert float(lightcl["step_mb"]) == float(rows[0]["step_mb"])
    assert float(lightcl["step_mb_later"]) < float(rows[0]["step_mb_later"])
    assert float(lightcl["train_flops"]) < float(rows[0]["train_flops"])
    for figure in ("accuracy_curve.png", "cost_vs_accuracy.png"):
        assert (out / figure).read_bytes()[:4] == b"\x89PNG"
    # The two seeds trained in one program; one by one, the same costs (one seed's steps).
    # (Their accuracies agree only up to float order, which lr 0.01 amplifies at nf 4:
    # tests/test_seeds.py checks them at lr 1e-3.)
    assert runs[0]["trained_with_seeds"] == [0, 1]
    assert compare.main(["--strategies", "lightcl", "--seeds", "2", "--epochs", "1", "--nf", "4", "--dataset", "digits",
                         "--num-tasks", "2", "--workdir", str(tmp_path / "apart"),
                         "--one-by-one", "--no-progress"]) == 0
    for seed in (0, 1):
        apart = json.load(open(tmp_path / "apart" / f"lightcl-seed{seed}.json"))
        assert apart["seed"] == seed and "trained_with_seeds" not in apart
    with open(tmp_path / "apart" / "table.csv") as f:
        (alone,) = list(csv.DictReader(f))
    for column in ("train_flops", "step_mb", "step_mb_later"):
        assert float(alone[column]) == pytest.approx(float(lightcl[column]), rel=1e-6), column
    # ... which are what a single run's own compiled steps report.
    assert float(alone["train_flops"]) == pytest.approx(apart["resources"]["train_flops"])
    assert float(alone["step_mb"]) == pytest.approx(
        apart["resources"]["peak_train_step_bytes"] / 2 ** 20)
    assert "(one after another)" in (tmp_path / "apart" / "table.md").read_text()


def test_compare_refuses_unknown_strategies(tmp_path, capsys):
    import pytest
    with pytest.raises(SystemExit) as exit_info:
        compare.main(["--strategies", "finetune,gem", "--workdir", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "unknown strategies ['gem']" in capsys.readouterr().err


def test_compare_from_one_backbone_with_a_paper_config(tmp_path):
    """Table 1 the paper's way, shrunk: --config split_cifar10 (its settings for every
    strategy), every strategy from the same converted nf 2 backbone, on mock CIFAR-10."""
    from test_convert_torch import _reference_state_dict
    np.savez(tmp_path / "ref.npz", **_reference_state_dict(np.random.default_rng(0), nf=2,
                                                            classes=1000))
    assert convert_torch.main([str(tmp_path / "ref.npz"), str(tmp_path / "backbone")]) == 0
    out = tmp_path / "cmp"
    with tfds.testing.mock_data(num_examples=120, policy=tfds.testing.MockPolicy.USE_CODE):
        assert compare.main(["--config", "split_cifar10", "--init-from", str(tmp_path / "backbone"),
                             "--strategies", "finetune,lightcl", "--seeds", "2", "--epochs", "1",
                             "--num-tasks", "2", "--batch-size", "8", "--strategy-arg", "buffer_size=4",
                             "--workdir", str(out), "--no-progress"]) == 0
    for name in ("finetune", "lightcl"):
        for seed in (0, 1):
            results = json.load(open(out / f"{name}-seed{seed}.json"))
            assert results["dataset"] == "cifar10" and results["pretrained"] is True
            config = results["config"]
            # The config's settings, the backbone's width, the flags given here.
            assert (config["nf"], config["lr"], config["frozen_bn"], config["epochs"],
                    config["batch_size"]) == (2, 0.01, "update", 1, 8)
            # The config's hyperparameters, the flag's buffer; finetune has none.
            assert config["strategy_args"] == ({} if name == "finetune" else
                                               dict(beta=2e-4, buffer_size=4, ratio=0.15))
    lightcl = json.load(open(out / "lightcl-seed0.json"))
    assert lightcl["phases"][0]["frozen"] == ["stem", "stage1", "stage2", "stage3"]
    assert "from " + str(tmp_path / "backbone") in (out / "table.md").read_text()


@pytest.mark.parametrize("args,words", [
    (["--config", "split_mnist"], "unknown config 'split_mnist'"),
    (["--seeds", "0"], "--seeds must be an integer >= 1"),
    (["--epochs", "0"], "epochs must be an integer >= 1"),
    (["--init-from", "/nonexistent"], "/nonexistent"),
])
def test_compare_refuses_bad_settings(tmp_path, capsys, args, words):
    with pytest.raises(SystemExit) as exit_info:
        compare.main(args + ["--workdir", str(tmp_path / "w")])
    assert exit_info.value.code == 2
    assert words in capsys.readouterr().err
    assert not (tmp_path / "w").exists()


class _SignalAt:
    """Progress bars that send this process SIGTERM at the ``step``-th train step of the
    whole comparison (one counter over every run)."""

    def __init__(self, step):
        self.step, self.done = step, 0

    def __call__(self, enabled):
        from lightcl_jax.training.progress import Progress
        outer = self

        class Sink(Progress):
            def advance(self, steps, metrics=None):
                outer.done += steps
                if steps and outer.done == outer.step:
                    os.kill(os.getpid(), signal.SIGTERM)
        return Sink()


def _tree(directory):
    """Every file under ``directory`` with its SHA-256, but the lock files (which name the
    process holding them)."""
    return {str(path.relative_to(directory)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(directory.rglob("*"))
            if path.is_file() and not path.name.startswith(".lock")}


def _without_times(rows):
    return [{k: v for k, v in row.items() if k != "wall_time_s"} for row in rows]


def test_compare_stopped_then_rerun_gives_the_uninterrupted_table_and_refuses_another(
        clean_comparison, tmp_path, monkeypatch, capsys):
    # Each run trains 2 tasks of 25 steps; SIGTERM in step 60 of the comparison: step 10
    # of LightCL's first task, after finetune finished. It stops after checkpointing it.
    monkeypatch.setattr(compare, "Bars", _SignalAt(60))
    stopped = tmp_path / "stopped"
    assert compare.main([*_SMALL, "--workdir", str(stopped)]) == 143
    err = capsys.readouterr().err
    assert "python -m experiments.compare: lightcl: stopped by SIGTERM" in err
    assert "rerun the same command to resume" in err and "Traceback" not in err
    assert not (stopped / "table.md").exists()
    monkeypatch.undo()
    finished = _tree(stopped / "runs" / "finetune")
    assert compare.main([*_SMALL, "--workdir", str(stopped)]) == 0
    assert _tree(stopped / "runs" / "finetune") == finished  # read back, not trained again
    lightcl = json.load(open(stopped / "runs" / "lightcl" / "results.json"))
    assert lightcl["resumed_at_steps"] == [10]  # the run of both seeds
    tables = [json.load(open(path / "table.json")) for path in (clean_comparison, stopped)]
    assert _without_times(tables[1]["rows"]) == _without_times(tables[0]["rows"])
    # Another comparison in the same workdir is refused, nothing touched; --overwrite
    # discards it.
    capsys.readouterr()
    before = _tree(stopped)
    with pytest.raises(SystemExit) as exit_info:
        compare.main([*_SMALL[:1], "finetune", *_SMALL[2:], "--workdir", str(stopped)])
    assert exit_info.value.code == 2 and _tree(stopped) == before
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "comparison.json is of another comparison (strategies " \
        "['finetune', 'lightcl'] there, ['finetune'] here); pass --overwrite" in err
    with pytest.raises(SystemExit):  # a setting of a strategy: named
        compare.main([*_SMALL, "--workdir", str(stopped), "--strategy-arg", "lightcl.beta=2"])
    assert "(lightcl strategy_args {'beta': " in capsys.readouterr().err
    assert _tree(stopped) == before
    assert compare.main([*_SMALL[:1], "finetune", *_SMALL[2:], "--workdir", str(stopped),
                         "--overwrite"]) == 0
    assert sorted(os.listdir(stopped / "runs")) == ["finetune"]
    assert not (stopped / "lightcl-seed0.json").exists()
    assert not (stopped / "lightcl-seed1.json").exists()

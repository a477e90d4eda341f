"""Pre-training (experiments.pretrain) and starting a run from a backbone (--init-from).

A run from a backbone is trained in tests/test_configs.py (the paper's TinyImageNet
command on a converted checkpoint); here, the backbones it refuses.

Pre-training runs on TFDS's mock of its default dataset, imagenet_resized/32x32
(random images, 1000 classes), so the TFDS path is the real one.
"""

import json
import os
import shutil
import signal

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from experiments import pretrain as pretrain_cli
from experiments import run as run_cli
from lightcl_jax.model.backbone import load_backbone, save_backbone
from lightcl_jax.model.torch_import import convert_state_dict
from lightcl_jax.training import workdir as preemption
from lightcl_jax.training.checkpoint import RunCheckpoints
from lightcl_jax.training.progress import Progress
from lightcl_jax.training.pretrain import (PretrainConfig, epoch_order, load_tfds_data,
                                           pretrain)

# 48 mock records, batch 16: 3 steps an epoch, 6 in all; checkpoints at steps 2, 3 (end of
# epoch 1), 4 and 6 (end of epoch 2).
FLAGS = ["--nf", "4", "--epochs", "2", "--batch-size", "16", "--eval-samples", "16",
         "--ckpt-every", "2", "--no-progress"]
CONFIG = PretrainConfig(nf=4, epochs=2, batch_size=16, eval_samples=16)


def _mock():
    return tfds.testing.mock_data(num_examples=48, policy=tfds.testing.MockPolicy.USE_CODE)


class _SnapshotAt(Progress):
    """Progress that copies the run's directory once ``steps`` train steps were reported."""

    def __init__(self, steps, source, target):
        self.steps, self.source, self.target, self.done = steps, source, target, 0

    def advance(self, steps, metrics=None):
        self.done += steps
        if self.done >= self.steps and not os.path.exists(self.target):
            shutil.copytree(self.source, self.target)


def _without_times(history):
    return [{k: v for k, v in e.items() if k != "wall_time_s"} for e in history["epochs"]]


def test_pretrain_resumes_mid_epoch_to_the_uninterrupted_backbone(tmp_path, capsys):
    with _mock():
        data = load_tfds_data(CONFIG)
        assert data.num_classes == 1000 and data.image_shape == (32, 32, 3)
        assert len(data.y_eval) == 16
        # Every step is reported (its checkpoint comes after); at step 6 the newest
        # checkpoint is step 4's, batch 1 of epoch 2: what a kill during step 5 or 6 leaves.
        variables, history = pretrain(
            CONFIG, data, checkpoints=RunCheckpoints(tmp_path / "run" / "checkpoints", every=2),
            progress=_SnapshotAt(6, tmp_path / "run", tmp_path / "killed"))
        assert RunCheckpoints(tmp_path / "killed" / "checkpoints").latest() == ("steps", 4)
        assert pretrain_cli.main(["--workdir", str(tmp_path / "killed"), *FLAGS]) == 0
    out = capsys.readouterr().out
    assert "epoch   2: loss" in out and "peak resident memory" in out
    assert history["peak_rss_mb"] > 100  # JAX and a compiled ResNet-18 at least
    with open(tmp_path / "killed" / "pretrain.json") as f:
        resumed = json.load(f)
    assert resumed["resumed_at_steps"] == [4] and history["resumed_at_steps"] == []
    assert _without_times(resumed) == _without_times(history)
    assert [e["epoch"] for e in history["epochs"]] == [1, 2]
    assert all(np.isfinite(e["loss"]) and e["eval_accuracy"] is not None
               for e in history["epochs"])
    backbone, meta = load_backbone(str(tmp_path / "killed" / "backbone"))
    jax.tree_util.tree_map(np.testing.assert_array_equal, backbone, variables)
    assert meta["source"]["kind"] == "pretrain" and meta["num_classes"] == 1000
    assert meta["normalisation"] == {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}

    # Once finished, the same command says so and changes nothing; other flags are refused.
    before = (tmp_path / "killed" / "pretrain.json").read_text()
    with _mock():
        assert pretrain_cli.main(["--workdir", str(tmp_path / "killed"), *FLAGS]) == 0
        assert "already holds this run" in capsys.readouterr().out
        with pytest.raises(SystemExit) as exit_info:
            pretrain_cli.main(["--workdir", str(tmp_path / "killed"), *FLAGS, "--lr", "0.02"])
    assert exit_info.value.code == 2
    assert "holds another pre-training run (lr 0.01 there, 0.02 here)" in capsys.readouterr().err
    assert (tmp_path / "killed" / "pretrain.json").read_text() == before


def test_epoch_order_depends_on_seed_and_epoch_only():
    perm, flips = epoch_order(10, 3, 1)
    again, flips_again = epoch_order(10, 3, 1)
    np.testing.assert_array_equal(perm, again)
    np.testing.assert_array_equal(flips, flips_again)
    assert sorted(perm.tolist()) == list(range(10))
    assert not np.array_equal(perm, epoch_order(10, 3, 2)[0])


@pytest.mark.parametrize("flags, message", [
    (["--epochs", "0"], "epochs must be an integer >= 1; got 0"),
    (["--max-train-samples", "8", "--batch-size", "16"],
     "max_train_samples must be an integer >= batch_size=16; got 8"),
    (["--dataset", "no_such_dataset"], "dataset 'no_such_dataset' is not available"),
])
def test_bad_pretrain_flags_are_refused(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as exit_info:
        pretrain_cli.main(["--workdir", str(tmp_path / "w"), "--no-progress", *flags])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "w" / "backbone")


def _backbone(directory, in_channels):
    """A backbone of random weights (nf 4), converted from the reference's tensor names."""
    from test_convert_torch import _reference_state_dict
    variables, info = convert_state_dict(_reference_state_dict(np.random.default_rng(0),
                                                               cin=in_channels))
    save_backbone(str(directory), variables, {**info, "image_shape": [8, 8, in_channels]})


@pytest.mark.parametrize("make, extra, message", [
    ("grey", ["--nf", "8"], "--nf 8 differs from the backbone's nf=4"),
    ("colour", [], "takes 3-channel images; digits has 1"),
    (None, [], "does not exist; give a directory written by experiments.pretrain"),
])
def test_run_init_from_refuses_misfits(tmp_path, capsys, make, extra, message):
    if make is not None:
        _backbone(tmp_path / "backbone", in_channels=1 if make == "grey" else 3)
    with pytest.raises(SystemExit) as exit_info:
        run_cli.main(["--dataset", "digits", "--init-from", str(tmp_path / "backbone"), "--workdir",
                      str(tmp_path / "run"), "--no-progress", *extra])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "run")


def test_pretrain_refuses_a_backbone_directory_it_did_not_write(tmp_path, capsys):
    os.makedirs(tmp_path / "w" / "backbone")
    _backbone(tmp_path / "v" / "backbone", in_channels=3)
    for workdir, message in (("w", "backbone exists and is not a backbone directory"),
                             ("v", "holds a backbone that no run in this workdir wrote")):
        with _mock(), pytest.raises(SystemExit) as exit_info:
            pretrain_cli.main(["--workdir", str(tmp_path / workdir), *FLAGS])
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "v" / "checkpoints")
    load_backbone(str(tmp_path / "v" / "backbone"))          # untouched


class _SignalAfter(Progress):
    """Progress that sends this process SIGTERM once ``steps`` train steps were reported."""

    def __init__(self, steps):
        self.steps, self.done = steps, 0

    def advance(self, steps, metrics=None):
        self.done += steps
        if self.done >= self.steps and self.steps:
            self.steps = 0
            os.kill(os.getpid(), signal.SIGTERM)


def test_pretrain_stops_at_a_signal_after_a_checkpoint_and_resumes_to_the_same_backbone(
        tmp_path):
    with _mock():
        data = load_tfds_data(CONFIG)
        clean, _ = pretrain(CONFIG, data)
        checkpoints = RunCheckpoints(tmp_path / "checkpoints", every=0)
        # The signal comes while step 1 is reported: step 1 is checkpointed, and
        # pre-training stops there.
        with preemption.handle_signals(), pytest.raises(preemption.Preempted) as info:
            pretrain(CONFIG, data, checkpoints=checkpoints, progress=_SignalAfter(1))
        checkpoints.close()
        assert info.value.exit_code == 143 and info.value.position.global_step == 1
        assert RunCheckpoints(tmp_path / "checkpoints").latest() == ("steps", 1)
        resumed, history = pretrain(CONFIG, data,
                                    checkpoints=RunCheckpoints(tmp_path / "checkpoints"))
    assert history["resumed_at_steps"] == [1]
    jax.tree_util.tree_map(np.testing.assert_array_equal, resumed, clean)


def test_pretrain_command_says_where_it_stopped_and_exits_143(tmp_path, capsys, monkeypatch):
    # The signal comes at step 3, the end of epoch 1: pre-training stops after that epoch's
    # checkpoint, the one to resume from.
    monkeypatch.setattr(pretrain_cli, "Bars", lambda enabled: _SignalAfter(3))
    with _mock():
        code = pretrain_cli.main(["--workdir", str(tmp_path), *FLAGS, "--ckpt-every", "0"])
    assert code == 143
    err = capsys.readouterr().err
    assert (f"python -m experiments.pretrain: stopped by SIGTERM at step 3; checkpoint "
            f"{tmp_path / 'checkpoints' / 'steps' / '3'}; rerun the same command to resume"
            ) in err
    assert not (tmp_path / "pretrain.json").exists() and not (tmp_path / "backbone").exists()


def test_the_digits_written_as_a_tfds_dataset_read_back_as_pretraining_data(tmp_path):
    from sklearn.datasets import load_digits

    from benchmarks.digits_tfds import prepare
    name = prepare(str(tmp_path))
    data = load_tfds_data(PretrainConfig(dataset=name, data_dir=str(tmp_path), eval_samples=5))
    digits = load_digits()
    # Each of the 8x8 pixels (0..16) a 4x4 block of 3 equal channels, in 0..255.
    want = np.round(digits.images / 16 * 255).repeat(4, axis=1).repeat(4, axis=2)
    assert data.image_shape == (32, 32, 3) and data.num_classes == 10
    np.testing.assert_array_equal(data.y_train, digits.target[:1500])
    for i in (0, 777, 1499):
        pixels = np.asarray(data.x_train[np.array([i])][0]) * data.std + np.array(data.mean)
        np.testing.assert_allclose(pixels * 255, np.stack([want[i]] * 3, axis=-1), atol=1e-3)
    assert len(data.y_eval) == 5 and set(data.y_eval) <= set(digits.target[1500:])

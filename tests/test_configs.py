"""The paper configurations (experiments/configs) and ``experiments.run --config``."""

import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from experiments import convert_torch, run
from experiments.configs import CONFIGS, load_config
from lightcl_jax.config import Config
from lightcl_jax.model.backbone import load_backbone
from lightcl_jax.training.checkpoint import RunCheckpoints

# SPEC sections 2 and 3, written out here: the hyperparameters and Table 1's LightCL rows.
PAPER = {
    "split_cifar10": dict(dataset="cifar10", num_tasks=5, epochs=50, cil=55.53, til=96.28,
                          sparse_cil=38.31, sparse_til=86.88),
    "split_tinyimagenet": dict(dataset="tinyimagenet", num_tasks=10, epochs=100, cil=12.79,
                               til=37.39, sparse_cil=8.95, sparse_til=33.94),
}


@pytest.mark.parametrize("name", CONFIGS)
def test_paper_configs_hold_the_paper_hyperparameters_and_numbers(name):
    paper = PAPER[name]
    _, args = run.parse_args(["--config", name])
    expected = Config(strategy="lightcl", dataset=paper["dataset"], num_tasks=paper["num_tasks"],
                      eval_split="holdout", epochs=paper["epochs"], batch_size=32, lr=0.01,
                      strategy_args=dict(beta=2e-4, buffer_size=15, ratio=0.15), nf=64, seed=0,
                      freeze="stage3", frozen_bn="update", sparse=False)
    # nf is the dataset's default (64), or the backbone's with --init-from.
    assert args.nf is None and run.config_from_args(args).resolved() == expected
    assert args.seeds == 5                               # the paper averages 5 runs
    doc = " ".join(load_config(name).__doc__.split())
    assert f"python -m experiments.run --config {name} --init-from BACKBONE" in doc
    assert f"LightCL CIL {paper['cil']}, TIL {paper['til']}" in doc
    assert f"sparse 0.9: CIL {paper['sparse_cil']}, TIL {paper['sparse_til']}" in doc
    # Flags given on the command line win over the config's.
    _, args = run.parse_args(["--config", name, "--epochs", "3", "--seeds", "1", "--sparse"])
    assert (args.epochs, args.seeds, args.sparse, args.lr) == (3, 1, True, 0.01)
    # So do strategy arguments; another strategy takes the config's setting for it (Table 1:
    # buffer 15 for every method with a buffer), one without a buffer none.
    for strategy, flags, strategy_args in (
            ("lightcl", ["--strategy-arg", "beta=0.5"], dict(beta=0.5, buffer_size=15, ratio=0.15)),
            ("derpp", [], dict(buffer_size=15)), ("ewc", ["--strategy-arg", "lam=3"], dict(lam=3.0))):
        _, args = run.parse_args(["--config", name, "--strategy", strategy, *flags])
        assert run.config_from_args(args).strategy_args == strategy_args


def test_config_files_and_bad_configs(tmp_path, capsys):
    path = tmp_path / "mine.py"
    path.write_text('"""Mine."""\nFLAGS = dict(strategy="er", epochs=2, nf=8)\n')
    _, args = run.parse_args(["--config", str(path), "--nf", "4"])
    assert (args.strategy, args.epochs, args.nf, args.dataset) == ("er", 2, 4, "digits32")
    bad = tmp_path / "bad.py"
    bad.write_text("FLAGS = dict(learning_rate=0.1)\n")
    for config, message in ((str(bad), "sets unknown flags ['learning_rate']"),
                            ("split_mnist", "unknown config 'split_mnist'; known: split_cifar10"),
                            (str(tmp_path / "none.py"), "none.py does not exist")):
        with pytest.raises(SystemExit) as exit_info:
            run.parse_args(["--config", config])
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err


def test_split_tinyimagenet_config_runs_from_a_converted_backbone(tmp_path, capsys):
    """The paper's TinyImageNet command, shrunk: a fake folder, an nf 2 backbone (no --nf: the
    backbone's is used), one epoch, one seed, 2 tasks of 100 classes (tests/test_tiny_imagenet.py
    checks the 10 x 20 split)."""
    from test_convert_torch import _reference_state_dict
    from test_tiny_imagenet import _write_folder
    folder = tmp_path / "tiny-imagenet-200"
    _write_folder(folder)
    np.savez(tmp_path / "ref.npz", **_reference_state_dict(np.random.default_rng(0), nf=2,
                                                            classes=1000))
    assert convert_torch.main([str(tmp_path / "ref.npz"), str(tmp_path / "backbone")]) == 0
    workdir = tmp_path / "run"
    assert run.main(["--config", "split_tinyimagenet", "--init-from", str(tmp_path / "backbone"),
                     "--data-dir", str(folder), "--epochs", "1", "--seeds", "1", "--num-tasks", "2",
                     "--batch-size", "16", "--strategy-arg", "buffer_size=8", "--workdir", str(workdir),
                     "--no-progress"]) == 0
    assert "note:" not in capsys.readouterr().err
    with open(workdir / "results.json") as f:
        results = json.load(f)
    assert results["dataset"] == "tinyimagenet" and results["num_tasks"] == 2
    assert results["pretrained"] is True and results["config"]["nf"] == 2   # the backbone's
    assert [len(row) for row in results["acc_til"]] == [1, 2]
    assert results["phases"][0] == {"task": 0, "frozen": ["stem", "stage1", "stage2", "stage3"],
                                    "memory": False}
    backbone, meta = load_backbone(str(tmp_path / "backbone"))
    assert results["identity"]["init_from"] == meta["digest"]
    assert results["init_from"]["source"]["kind"] == "convert_torch"
    # Frozen layers keep the backbone's weights; stage 4 trains; the head is a fresh 200-way one.
    checkpoints = RunCheckpoints(workdir / "checkpoints")
    params = ocp.StandardCheckpointer().restore(
        os.path.join(checkpoints.path(*checkpoints.latest()), "state"))["state"]["params"]
    for group in ("stem_conv", "stage1_block1", "stage2_block1", "stage3_block2"):
        jax.tree_util.tree_map(np.testing.assert_array_equal, params[group],
                               backbone["params"][group])
    changed = jax.tree_util.tree_map(lambda a, b: not np.array_equal(a, b),
                                     params["stage4_block2"], backbone["params"]["stage4_block2"])
    assert all(jax.tree_util.tree_leaves(changed)), changed
    assert params["head"]["kernel"].shape == (16, 200)

    # The same workdir from another backbone is another run: refused, results kept.
    np.savez(tmp_path / "other.npz", **_reference_state_dict(np.random.default_rng(1), nf=2,
                                                              classes=1000))
    assert convert_torch.main([str(tmp_path / "other.npz"), str(tmp_path / "other")]) == 0
    before = (workdir / "results.json").read_text()
    with pytest.raises(SystemExit) as exit_info:
        run.main(["--config", "split_tinyimagenet", "--init-from", str(tmp_path / "other"),
                  "--data-dir", str(folder), "--epochs", "1", "--seeds", "1",
                  "--num-tasks", "2", "--batch-size", "16", "--strategy-arg", "buffer_size=8",
                  "--workdir", str(workdir), "--no-progress"])
    assert exit_info.value.code == 2
    assert "holds another run's results (init_from" in capsys.readouterr().err
    assert (workdir / "results.json").read_text() == before

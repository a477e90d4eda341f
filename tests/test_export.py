"""experiments.export and the runner it writes: the library's numbers without the library.

A run of two tasks (LightCL; compact sparse too with LIGHTCL_EXPORT_COMPACT=1)
trains in the library; its state after the first task is exported, and the runner trains the second task in a
subprocess whose
``sys.modules`` must hold none of lightcl_jax, flax, optax and orbax. Its
parameters, statistics and memory must equal the library's after the same task
within float tolerance (one compiled program where the library ran the
boundary hooks as several), and its accuracies exactly.
"""

import hashlib
import json
import os
import runpy
import shutil
import subprocess
import sys

import numpy as np
import pytest

from experiments import export as export_cli
from lightcl_jax.config import Config
from lightcl_jax.deploy import ExportError, export_run, task_arrays
from lightcl_jax.deploy.export import leaf_names, read_task_state
from lightcl_jax.training.checkpoint import RunCheckpoints
from lightcl_jax.training.loop import train
from lightcl_jax.training.run import setup_run

import jax

# Runs the runner as a script and reports which of the library's packages it imported.
PROBE = """
import json, runpy, sys
sys.argv = sys.argv[1:]
code = 0
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
except SystemExit as stop:
    code = stop.code
held = sorted({m.split(".")[0] for m in sys.modules} & {"lightcl_jax", "flax", "optax", "orbax"})
print("IMPORTED " + json.dumps(held))
sys.exit(code)
"""


def run_runner(artifact, *args):
    return subprocess.run([sys.executable, "-c", PROBE, os.path.join(artifact, "runner.py"),
                           *args], capture_output=True, text=True, cwd=artifact,
                          env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})


def settings(sparse: bool) -> Config:
    # digits' tasks of 5 classes hold 808 and 809 training samples: batches of 32 leave
    # a smaller last batch, which "keep" trains on (the exported step's symbolic batch).
    extra = {"sparse": True, "sparse_execution": "compact"} if sparse else {}
    return Config(strategy="lightcl", dataset="digits", nf=4, epochs=1, num_tasks=2,
                  last_batch="keep", **extra)


# The compact sparse network exports through the same path with narrower layers; its run
# costs 15 s more, so the suite runs it when LIGHTCL_EXPORT_COMPACT=1 (BUILD.md).
SPARSE = [False] + ([True] if os.environ.get("LIGHTCL_EXPORT_COMPACT") == "1" else [])


@pytest.fixture(scope="module", params=SPARSE, ids=lambda sparse: "compact" if sparse else "dense")
def exported(request, tmp_path_factory):
    """(run, workdir, library results, artifact, an untouched copy, the task file, the
    runner's output, its accuracies file)."""
    root = tmp_path_factory.mktemp("export")
    run = setup_run(settings(sparse=request.param))
    workdir = str(root / "run")
    checkpoints = RunCheckpoints(os.path.join(workdir, "checkpoints"))
    results = train(run, checkpoints=checkpoints)  # train_and_evaluate, less its files
    checkpoints.close()
    artifact = str(root / "artifact")
    manifest = export_run(run, workdir, artifact, after_task=0)
    assert manifest["run"]["exported_after_task"] == 0
    task = str(root / "task1.npz")
    np.savez(task, **task_arrays(run.stream, 1))
    pristine = str(root / "pristine")
    shutil.copytree(artifact, pristine)
    out = run_runner(artifact, "--task", task, "--json", str(root / "acc.json"))
    return run, workdir, results, artifact, pristine, task, out, str(root / "acc.json")


def test_the_runner_continues_the_run_as_the_library_does_without_the_library(exported):
    run, workdir, results, artifact, _, _, out, acc_json = exported
    assert out.returncode == 0, out.stderr[-2000:]
    assert "IMPORTED []" in out.stdout
    with open(acc_json) as f:
        acc = json.load(f)
    # The accuracies after the runner's task equal the library's after the same task.
    assert acc["til"] == results["acc_til"][1]
    assert acc["cil"] == results["acc_cil"][1]
    assert acc["acc_til"] == results["acc_til"] and acc["acc_cil"] == results["acc_cil"]

    _, state, memory, *_ = read_task_state(run, workdir, 1)
    with np.load(os.path.join(artifact, "state.npz")) as data:
        ours = {k: data[k] for k in data.files}
    expected = {}
    for prefix, tree in (("state", state), ("memory", memory)):
        expected.update(zip(leaf_names(tree, prefix), jax.tree_util.tree_leaves(tree)))
    compared = [k for k in expected if not k.startswith("state/opt_state")]
    assert any(k.startswith("memory/vital_masks") for k in compared)
    assert any(k.startswith("memory/buffer_x") for k in compared)
    for name in compared:
        want = np.asarray(expected[name])
        assert ours[name].shape == want.shape and ours[name].dtype == want.dtype, name
        if want.dtype == bool or np.issubdtype(want.dtype, np.integer):
            np.testing.assert_array_equal(ours[name], want, err_msg=name)
        else:
            np.testing.assert_allclose(ours[name], want, rtol=1e-4, atol=1e-5, err_msg=name)
    assert int(ours["state/step"]) == int(np.asarray(state.step)) > 0


def test_the_manifest_names_every_function_its_figures_and_the_state(exported):
    _, _, _, _, pristine, *_ = exported
    with open(os.path.join(pristine, "manifest.json")) as f:
        manifest = json.load(f)
    assert manifest["format"] == "lightcl_jax.artifact" and manifest["version"] == 1
    functions = manifest["functions"]
    assert {"init_optimizer", "begin_task", "train_step", "end_task", "eval_step"} <= set(functions)
    for name, entry in functions.items():
        with open(os.path.join(pristine, entry["file"]), "rb") as f:
            blob = f.read()
        assert len(blob) == entry["bytes"]
        assert hashlib.sha256(blob).hexdigest() == entry["sha256"]
        assert "cpu" in entry["platforms"]
    step = functions["train_step"]
    assert step["xla"]["flops"] > 0 and step["xla"]["step_bytes"] > 0
    # The batch axis of the train step is symbolic: one function for both batch sizes.
    assert step["inputs"]["x"][0]["shape"][0] == "b"
    with np.load(os.path.join(pristine, "state.npz")) as data:
        names = set(data.files)
    assert {leaf["name"] for leaf in manifest["state"]["leaves"]} | {"__progress__"} == names


def _mutate(case, folder, task, tmp_path):
    """Spoils a copy of the artifact or task as ``case`` says; returns the task path."""
    if case == "missing function":
        os.remove(os.path.join(folder, "functions", "train_step.jax"))
    elif case == "truncated function":
        path = os.path.join(folder, "functions", "end_task.jax")
        with open(path, "rb") as f:
            blob = f.read()
        with open(path, "wb") as f:
            f.write(blob[:len(blob) // 2])
    elif case == "truncated state":
        path = os.path.join(folder, "state.npz")
        with open(path, "rb") as f:
            blob = f.read()
        with open(path + ".orig", "wb") as f:
            f.write(blob)
        with open(path, "wb") as f:
            f.write(blob[:len(blob) // 3])
    elif case == "other version":
        path = os.path.join(folder, "manifest.json")
        with open(path) as f:
            manifest = json.load(f)
        with open(path, "w") as f:
            json.dump({**manifest, "version": 99}, f)
    else:
        with np.load(task) as data:
            arrays = {k: data[k] for k in data.files}
        if case == "wrong image shape":
            arrays["x_train"] = arrays["x_train"][:, :4]
        elif case == "wrong image dtype":
            arrays["x_eval"] = arrays["x_eval"].astype(np.float64)
        elif case == "labels outside the classes":
            arrays["y_train"] = arrays["y_train"] + 5
        elif case == "labels of two tasks":
            arrays["y_eval"] = arrays["y_eval"] - 5 * (np.arange(len(arrays["y_eval"])) % 2)
        task = str(tmp_path / "bad.npz")
        np.savez(task, **arrays)
    return task


def _contents(folder):
    found = {}
    for root, _, files in os.walk(folder):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                found[os.path.join(root, name)] = f.read()
    return found


@pytest.mark.parametrize("case, message", [
    ("missing function", "train_step.jax is missing"),
    ("truncated function", "truncated or changed"),
    ("truncated state", "is unreadable"),
    ("other version", "artifact version 99; this runner reads version 1"),
    ("wrong image shape", "4, 8, 1]; the run takes images of shape [N, 8, 8, 1]"),
    ("wrong image dtype", "x_eval is float64; the run takes float32"),
    ("labels outside the classes", "the run's classes are 0..9"),
    ("labels of two tasks", "labels span the class groups starting at [0, 5]"),
])
def test_bad_artifacts_and_tasks_are_refused_in_one_line_and_nothing_is_written(
        exported, tmp_path, capsys, case, message):
    folder = str(tmp_path / "artifact")
    shutil.copytree(exported[4], folder)
    task = _mutate(case, folder, exported[5], tmp_path)
    before = _contents(folder)
    # In this process (the subprocess test above shows what the runner imports).
    runner = runpy.run_path(os.path.join(folder, "runner.py"))
    code = runner["main"](["--artifact", folder, "--task", task,
                           "--json", str(tmp_path / "acc.json")])
    assert code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], lines
    assert _contents(folder) == before
    assert not os.path.exists(tmp_path / "acc.json")


def test_export_refuses_what_it_cannot_export(exported, tmp_path, capsys):
    run, workdir, *_ = exported
    with pytest.raises(ExportError, match="no checkpoint after task 3; it has them after tasks 1, 2"):
        export_run(run, workdir, str(tmp_path / "a"), after_task=2)
    joint = setup_run(Config(strategy="joint", dataset="digits", nf=4, epochs=1, num_tasks=2))
    with pytest.raises(ExportError, match="strategy joint is not exported: it trains on every"):
        export_run(joint, workdir, str(tmp_path / "a"))
    empty = tmp_path / "empty"
    empty.mkdir()
    for argv, message in [
            (["--workdir", str(empty), "--out", str(tmp_path / "b")],
             "holds no checkpoint at a task's end"),
            (["--workdir", str(tmp_path / "none"), "--out", str(tmp_path / "b")],
             "is not a directory"),
            (["--workdir", workdir, "--out", str(empty)], "exists; choose another"),
            (["--workdir", workdir, "--out", str(tmp_path / "b"), "--after-task", "0"],
             "counts tasks from 1")]:
        with pytest.raises(SystemExit) as stop:
            export_cli.main(argv)
        assert stop.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert message in err[-1], err
    assert not os.path.exists(tmp_path / "b")


@pytest.mark.parametrize("keep", [False, True])
def test_the_runner_draws_the_library_batches_with_augmentation(keep):
    """The runner holds its own copy of the library's batching (it imports no lightcl_jax):
    for one seed, both give the same batches, crops and flips."""
    from lightcl_jax.data.pipeline import epoch_batches
    runner = runpy.run_path(os.path.join(os.path.dirname(export_cli.__file__), os.pardir,
                                         "lightcl_jax", "deploy", "runner.py"))
    x = np.random.default_rng(1).normal(size=(70, 6, 6, 3)).astype(np.float32)
    y = np.arange(70, dtype=np.int32) % 4
    fill = (-1.0, 0.5, 2.0)
    ours = list(runner["epoch_batches"](x, y, 16, np.random.default_rng([3, 2]), augment=True,
                                        fill=fill, keep_remainder=keep))
    library = list(epoch_batches(x, y, 16, np.random.default_rng([3, 2]), augment=True,
                                 fill=fill, keep_remainder=keep))
    assert len(ours) == len(library) == (5 if keep else 4)
    for (xa, ya), (xb, yb) in zip(ours, library):
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)
    assert not np.array_equal(ours[0][0], x[:16])  # augmented: crops and flips moved pixels

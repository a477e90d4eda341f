"""Checkpoints, exact resume, determinism, divergence and the refusals of bad files.

Runs are tiny (nf=4, the 5 digits tasks, 1 epoch of 10 steps each) so each one
compiles and trains in seconds. "The same results" means the same
results.json but for ``wall_time_s`` and ``resumed_at_steps`` (which record
how the run went, not what it computed).
"""

import dataclasses
import errno
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import run
from lightcl_jax.config import Config
from lightcl_jax.training.checkpoint import (CheckpointError, Position, RunCheckpoints,
                                             identity_differences)
from lightcl_jax.training.epochs import DivergenceError
from lightcl_jax.training.progress import Progress
from lightcl_jax.training.run import without_measurements
from lightcl_jax.training.loop import Hooks, train
from lightcl_jax.training.run import setup_run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The digits tasks have 325, 325, 327, 324 and 317 training samples: at batch 32 and 1 epoch,
# tasks end at steps 10, 20, 30, 40 and 49. Same settings as tests/test_cli.py's CLI run.
STEPS_PER_TASK = 10
TINY = dict(dataset="digits", nf=4, epochs=1)


def _same(results):
    return {k: v for k, v in without_measurements(results).items() if k != "resumed_at_steps"}


class _SnapshotAfter(Progress):
    """Progress that copies the checkpoint directory after ``steps`` train steps.

    The copy is what a kill at that moment leaves on disk; the run itself goes
    on uninterrupted, so one run gives both the clean results and the wreck.
    """

    def __init__(self, steps, source, target):
        self.steps, self.source, self.target, self.done = steps, source, target, 0

    def advance(self, steps, metrics=None):
        self.done += steps
        if steps and self.done == self.steps:
            shutil.copytree(self.source, self.target)


@pytest.fixture(scope="module")
def stream(digits_stream):
    return digits_stream


# Plain LightCL is resumed mid-task in the divergence and SIGKILL tests below. These two
# run on test_training's random stream and config (3 tasks, 3 steps per epoch), whose
# compiled steps other tests share.
@pytest.mark.parametrize("strategy,config_changes", [
    ("derpp", {}),
    ("lightcl", dict(freeze="auto", layer_metrics="cosine", sparse=True)),
    # 48 samples a task in batches of 20 and a kept last one of 8: 3 steps an epoch too,
    # the killed run's step 9 a smaller batch.
    ("lightcl", dict(last_batch="keep", batch_size=20)),
])
def test_resume_mid_task_gives_the_uninterrupted_results(tmp_path, strategy, config_changes):
    from test_training import TINY as TRAINING_TINY, _tiny_stream, with_strategy
    stream = _tiny_stream(num_tasks=3)
    config = dataclasses.replace(with_strategy(TRAINING_TINY, strategy), epochs=2, **config_changes)
    # Tasks run steps 1-6, 7-12 and 13-18. The disk as a kill after step 9 leaves it: the
    # newest checkpoint is at step 8, the second step of task 1.
    clean = train(setup_run(config, stream), checkpoints=RunCheckpoints(tmp_path / "run", every=8),
                  progress=_SnapshotAfter(9, tmp_path / "run", tmp_path / "killed"))
    latest = RunCheckpoints(tmp_path / "killed").latest()
    assert latest == ("steps", 8)
    meta = RunCheckpoints(tmp_path / "killed").read_meta(*latest)
    assert (meta["position"]["task"], meta["position"]["step_in_task"]) == (1, 2)
    resumed = train(setup_run(config, stream),
                    checkpoints=RunCheckpoints(tmp_path / "killed", every=8))
    assert resumed["resumed_at_steps"] == [8] and clean["resumed_at_steps"] == []
    assert _same(resumed) == _same(clean)
    if strategy == "lightcl" and config.sparse:
        # The same wreck, written by the code before the training package was split.
        old = resume_old_fixture("old_lightcl_auto_sparse", tmp_path, config, stream, clean)
        assert old["resumed_at_steps"] == [8]


FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")


def resume_old_fixture(name, tmp_path, config, stream, clean, *, seeds=1, boundary=False):
    """Resumes a run from a checkpoint the code of commit 98a67a2 wrote
    (tests/fixtures/make_old_checkpoints.py): its mid-task checkpoint of step 8, or with
    ``boundary`` its task-0 checkpoint of step 6. The tasks that checkpoint had finished
    keep the accuracies that code measured (restored, not recomputed); the run goes on to
    the identity, phases and freeze choice of an uninterrupted run of this code
    (``clean``). Its later numbers are this code's: that code compiled convolutions with
    XLA's default kernels, this one with `lightcl_jax.compiler.COMPILER_OPTIONS`, which
    round differently (and these tiny runs magnify rounding; see tests/test_seeds.py).
    That code held the strategy's hyperparameters as config fields and computed the
    metrics of `LEGACY_METRICS`: the identity it wrote reads as this code's
    (`upgrade_identity`), and it resumes with those metrics."""
    from lightcl_jax.training.run import LEGACY_METRICS, upgrade_identity
    directory = tmp_path / f"old-{name}"
    shutil.copytree(os.path.join(FIXTURES, name, "checkpoints"), directory)
    if boundary:
        shutil.rmtree(directory / "steps")
    with pytest.raises(CheckpointError, match=r"metrics \['avg', 'forgetting', 'bwt'\] there"):
        train(setup_run(config, stream, seeds=seeds), checkpoints=RunCheckpoints(directory))
    resumed = train(setup_run(dataclasses.replace(config, metrics=LEGACY_METRICS), stream, seeds=seeds),
                    checkpoints=RunCheckpoints(directory, every=8))
    with open(os.path.join(FIXTURES, name, "results.json")) as f:
        old = json.load(f)
    assert upgrade_identity(old["identity"]) == resumed["identity"]
    clean_identity = {**clean["identity"], "config": {**clean["identity"]["config"],
                                                      "metrics": list(LEGACY_METRICS)}}
    assert clean_identity == resumed["identity"]
    for other in (old, clean):
        assert other["phases"] == resumed["phases"]
    for old_run, new_run, clean_run in zip(*(r.get("seeds", [r]) for r in (old, resumed, clean))):
        assert old_run["freeze_auto"] == new_run["freeze_auto"]  # chosen before step 6
        for key in ("acc_til", "acc_cil"):
            assert new_run[key][0] == old_run[key][0]  # task 0: restored from the checkpoint
            assert [len(row) for row in new_run[key]] == [len(row) for row in clean_run[key]]
    return resumed


@pytest.fixture(scope="module")
def lightcl_run(tmp_path_factory, stream):
    """A finished LightCL run that checkpointed every 14 steps: (directory, results)."""
    directory = tmp_path_factory.mktemp("lightcl")
    results = train(setup_run(Config(strategy="lightcl", **TINY), stream),
                    checkpoints=RunCheckpoints(directory, every=14))
    return directory, results


def test_same_seed_gives_identical_results(lightcl_run, finished_workdir):
    """The library run and the CLI run of one config agree exactly, in one process.

    tests/test_power_loss.py compares runs killed and restarted in other processes.
    """
    with open(finished_workdir / "results.json") as f:
        cli = json.load(f)
    assert lightcl_run[1]["resumed_at_steps"] == []
    assert _same(lightcl_run[1]) == _same(cli)


def test_checkpoint_layout_and_retention(lightcl_run):
    directory, _ = lightcl_run
    # One checkpoint per finished task is kept; mid-task ones go once their task ends.
    assert sorted(os.listdir(directory / "tasks"), key=int) == ["10", "20", "30", "40", "49"]
    assert os.listdir(directory / "steps") == []
    meta = RunCheckpoints(directory).read_meta("tasks", 10)
    assert Position(**meta["position"]) == Position(task=0, task_done=True, epoch=0,
                                                    batch=STEPS_PER_TASK,
                                                    step_in_task=STEPS_PER_TASK, global_step=10)
    assert len(meta["results"]["acc_til"]) == 1 and meta["identity"]["config"]["nf"] == 4


def test_resume_from_a_task_boundary_and_from_a_finished_run(tmp_path, stream, lightcl_run):
    config = Config(strategy="lightcl", **TINY)
    directory = tmp_path / "checkpoints"
    shutil.copytree(lightcl_run[0], directory)
    # A finished run's checkpoint gives its results back without training.
    calls = []
    again = train(setup_run(config, stream), checkpoints=RunCheckpoints(directory),
                  hooks=Hooks(step_wrapper=lambda f: calls.append(1) or f))
    assert calls == [] and again["resumed_at_steps"] == [49]
    assert _same(again) == _same(lightcl_run[1])
    # Without the last task's checkpoint, the run goes on from the end of task 3.
    shutil.rmtree(directory / "tasks" / "49")
    resumed = train(setup_run(config, stream), checkpoints=RunCheckpoints(directory))
    assert resumed["resumed_at_steps"] == [40]
    assert _same(resumed) == _same(lightcl_run[1])


def _nan_at_step(bad_step):
    """Wraps a train step so that the step numbered ``bad_step`` gives NaN params and loss.

    It poisons that step's images; the other steps' images pass through the select. The
    program is not the unwrapped step's (XLA compiles it otherwise, and the weights differ
    in their last bits, which the evaluation loss shows), but it is the same program
    whatever ``bad_step`` is: a run wrapped with a step it never reaches is the
    uninterrupted twin of a run poisoned at ``bad_step``.
    """
    def wrap(step_fn):
        def poisoned(state, memory, x, y, offset):
            x = jnp.where(state.step + 1 == bad_step, jnp.nan, x)
            return step_fn(state, memory, x, y, offset)
        return poisoned
    return wrap


def test_divergence_names_task_and_step_keeps_the_last_good_checkpoint_and_resumes(
        tmp_path, stream, lightcl_run):
    config = Config(strategy="lightcl", **TINY)
    bad_step = STEPS_PER_TASK + 6  # the 6th step of the second task (index 1)
    with pytest.raises(DivergenceError, match=r"non-finite at task 2, step 6 of the task"):
        train(setup_run(config, stream), checkpoints=RunCheckpoints(tmp_path, every=14),
              hooks=Hooks(step_wrapper=_nan_at_step(bad_step)))
    checkpoints = RunCheckpoints(tmp_path, every=14)
    # The checkpoints at steps 10 (end of task 0) and 14 were finite; the NaN (step 16) was
    # found at the end of the epoch, before task 1's checkpoint at step 20 was written.
    assert checkpoints.latest() == ("steps", 14)
    never = _nan_at_step(10 ** 6)
    resumed = train(setup_run(config, stream), checkpoints=checkpoints,
                    hooks=Hooks(step_wrapper=never))
    assert resumed["resumed_at_steps"] == [14]
    assert _same(resumed) == _same(train(setup_run(config, stream),
                                         hooks=Hooks(step_wrapper=never)))
    # Against the unwrapped run: the same accuracies (the weights differ in their last bits).
    for key in ("acc_til", "acc_cil"):
        assert resumed[key] == lightcl_run[1][key]


def _tree_digest(path):
    """A hash of every file under ``path`` but the workdir lock (each process that takes
    it writes its own name there)."""
    digest = hashlib.sha256()
    for root, dirs, files in sorted(os.walk(path)):
        dirs.sort()
        for name in sorted(set(files) - {".lock"}):
            full = os.path.join(root, name)
            digest.update(full.encode())
            with open(full, "rb") as f:
                digest.update(f.read())
    return digest.hexdigest()


CLI_TINY = ["--dataset", "digits", "--nf", "4", "--epochs", "1", "--no-progress"]


@pytest.fixture(scope="module")
def finished_workdir(tmp_path_factory):
    """A workdir of a finished CLI run (results.json and checkpoints)."""
    workdir = tmp_path_factory.mktemp("finished")
    assert run.main([*CLI_TINY, "--workdir", str(workdir)]) == 0
    return workdir


def _copy(workdir, tmp_path):
    copy = tmp_path / "w"
    shutil.copytree(workdir, copy)
    return copy


def _refused(args, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run.main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "python -m experiments.run: error:" in line]
    assert len(lines) == 1, err
    return lines[0]


def test_cli_results_file_of_a_run(finished_workdir):
    from test_cli import _check_results
    results = _check_results(finished_workdir / "results.json", "lightcl", "digits", 5)
    config = results["config"]
    assert (config["nf"], config["epochs"], config["lr"], config["freeze"]) == (
        4, 1, 0.01, "stage3")
    # Every hyperparameter of the strategy is recorded, the defaults filled in.
    assert config["strategy_args"] == {"beta": 2e-4, "buffer_size": 15, "ratio": 0.15}
    assert (finished_workdir / "accuracy.png").read_bytes()[:4] == b"\x89PNG"
    # metrics.jsonl: per epoch (1 a task here) and per task, in order.
    lines = _metrics(finished_workdir)
    epochs = [line for line in lines if line["kind"] == "epoch"]
    tasks = [line for line in lines if line["kind"] == "task"]
    assert [line["kind"] for line in lines] == ["epoch", "task"] * 5
    steps = [325 // 32, 325 // 32, 327 // 32, 324 // 32, 317 // 32]  # whole batches of 32
    assert [e["steps"] for e in epochs] == steps
    assert [e["global_step"] for e in epochs] == list(np.cumsum(steps))
    for t, (e, task) in enumerate(zip(epochs, tasks)):
        assert (e["task"], e["epoch"], e["lr"], task["task"]) == (t, 1, 0.01, t)
        assert set(e) >= {"seconds", "step_time_s", "examples_per_s", "loss", "ce"}
        assert ("regulation" in e) == (t >= 1)  # LightCL's buffer loss from task 1 on
        assert e["step_time_s"] == pytest.approx(e["seconds"] / e["steps"])
        assert e["examples_per_s"] == pytest.approx(32 * e["steps"] / e["seconds"])
        assert task["til_row"] == results["acc_til"][t] and task["cil_row"] == results["acc_cil"][t]
        assert task["global_step"] == e["global_step"]
        # Every metric of the run, as the matrices so far give it.
        assert task["eval_loss_row"] == results["eval_loss"][t]
        assert task["avg_incremental_til"] == pytest.approx(
            np.mean([np.mean(row) for row in results["acc_til"][:t + 1]]))


def _metrics(workdir):
    with open(workdir / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


def test_cli_rerun_of_a_finished_run_prints_it_and_trains_nothing(finished_workdir, capsys):
    before = _tree_digest(finished_workdir)
    capsys.readouterr()
    assert run.main([*CLI_TINY, "--workdir", str(finished_workdir)]) == 0
    out = capsys.readouterr().out
    assert "already holds this run's results; pass --overwrite to run it again" in out
    assert "TIL accuracy" in out and _tree_digest(finished_workdir) == before


def test_cli_refuses_a_workdir_with_another_runs_results_unless_overwrite(
        finished_workdir, tmp_path, capsys):
    workdir = _copy(finished_workdir, tmp_path)
    before = _tree_digest(workdir)
    line = _refused([*CLI_TINY, "--seed", "1", "--workdir", str(workdir)], capsys)
    assert "holds another run's results (seed 0 there, 1 here)" in line
    assert "--overwrite" in line and _tree_digest(workdir) == before
    # Without results.json the checkpoints are refused the same way.
    os.unlink(workdir / "results.json")
    line = _refused([*CLI_TINY, "--seed", "1", "--workdir", str(workdir)], capsys)
    assert "is of another run (seed 0 there, 1 here)" in line
    assert sorted(os.listdir(workdir / "checkpoints" / "tasks"), key=int) == [
        "10", "20", "30", "40", "49"]
    # --overwrite replaces both.
    assert run.main([*CLI_TINY, "--seed", "1", "--overwrite", "--workdir", str(workdir)]) == 0
    with open(workdir / "results.json") as f:
        assert json.load(f)["config"]["seed"] == 1


# Reading damaged arrays leaves orbax callbacks that fire after its event loop closed:
# noise from orbax's error path, not a failure of the refusal.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("damage,words", [
    ("meta", "is unreadable: {newest}/meta/metadata is not valid JSON (cut short or "
             "overwritten"),
    ("arrays", "is unreadable: the data of its array "),
    ("format", "has format 99; this version reads format 1"),
])
def test_cli_refuses_a_corrupt_checkpoint_and_changes_nothing(finished_workdir, tmp_path,
                                                              capsys, damage, words):
    workdir = _copy(finished_workdir, tmp_path)
    os.unlink(workdir / "results.json")
    newest = workdir / "checkpoints" / "tasks" / "49"
    if damage == "meta":
        (newest / "meta" / "metadata").write_text("{not json")
    elif damage == "format":
        meta = json.loads((newest / "meta" / "metadata").read_text())
        (newest / "meta" / "metadata").write_text(json.dumps({**meta, "format": 99}))
    else:  # truncate every stored array chunk
        for root, _, files in os.walk(newest / "state"):
            for name in files:
                if os.path.basename(root) == "d":
                    with open(os.path.join(root, name), "wb") as f:
                        f.write(b"\0")
    before = _tree_digest(workdir)
    line = _refused([*CLI_TINY, "--workdir", str(workdir)], capsys)
    assert f"checkpoint {newest}" in line and words.format(newest=newest) in line, line
    assert "<bound method" not in line
    if damage == "arrays":  # the first array read, and by how much it falls short
        assert re.search(r"the data of its array \S+ is cut short \(\d+ bytes expected, 1 on "
                         r"disk: a file was truncated\)", line), line
    assert _tree_digest(workdir) == before


def test_a_checkpoint_that_does_not_fit_is_refused_by_name(tmp_path, finished_workdir, stream):
    checkpoints = RunCheckpoints(finished_workdir / "checkpoints")
    template = {"state": {"params": {"stem": {"conv": {"kernel": jax.ShapeDtypeStruct(
        (3, 3, 1, 8), jnp.float32)}}}}}
    with pytest.raises(CheckpointError, match=r"does not fit this run: memory/\S+ is "
                                              r"float32\[[\d, ]+\] there, absent here"):
        checkpoints.restore("tasks", 49, template)


def test_crash_during_a_write_leaves_the_previous_checkpoint(finished_workdir, tmp_path):
    workdir = _copy(finished_workdir, tmp_path)
    # What orbax leaves when killed while writing step 60: a temporary directory.
    partial = workdir / "checkpoints" / "tasks" / "60.orbax-checkpoint-tmp-1234"
    os.makedirs(partial / "state")
    (partial / "state" / "junk").write_bytes(b"\0" * 10)
    checkpoints = RunCheckpoints(workdir / "checkpoints")
    assert checkpoints.latest() == ("tasks", 49)
    assert checkpoints.read_meta("tasks", 49)["position"]["global_step"] == 49


def test_identity_differences_name_each_changed_setting():
    a = {"config": {"lr": 0.01, "seed": 0}, "pretrained": False}
    b = {"config": {"lr": 0.02, "seed": 0}, "pretrained": True}
    assert identity_differences(a, a) == ""
    assert identity_differences(a, b) == "lr 0.01 there, 0.02 here; pretrained False there, True here"


def test_checkpoint_interval_must_be_a_non_negative_integer():
    with pytest.raises(ValueError, match="checkpoint interval must be an integer >= 0"):
        RunCheckpoints("unused", every=-1)


def test_cli_refuses_an_unreadable_results_file_and_a_workdir_that_is_a_file(
        tmp_path, capsys, finished_workdir):
    workdir = tmp_path / "bare"
    workdir.mkdir()
    (workdir / "results.json").write_text("{half a file")
    line = _refused([*CLI_TINY, "--workdir", str(workdir)], capsys)
    assert "results.json is not a readable results file of this version" in line
    assert "pass --overwrite to replace it, or choose another --workdir" in line
    assert (workdir / "results.json").read_text() == "{half a file"
    # Beside a finished run's checkpoints, deleting it rebuilds it from them, no step trained.
    finished = _copy(finished_workdir, tmp_path)
    (finished / "results.json").write_text("{half a file")
    line = _refused([*CLI_TINY, "--workdir", str(finished)], capsys)
    assert "delete it and rerun the same command to rebuild it from the run's checkpoints" in line
    os.unlink(finished / "results.json")
    assert run.main([*CLI_TINY, "--workdir", str(finished)]) == 0
    with open(finished / "results.json") as f:
        rebuilt = json.load(f)
    with open(finished_workdir / "results.json") as f:
        assert _same(rebuilt) == _same(json.load(f))
    line = _refused([*CLI_TINY, "--workdir", str(workdir / "results.json")], capsys)
    assert "results.json is a file; it must be a directory (or not exist)" in line


def test_sigterm_mid_run_checkpoints_exits_143_and_the_rerun_gives_the_clean_results(
        tmp_path, finished_workdir):
    """Preemption: SIGTERM (twice: the second arrives while the first is handled) once task 0
    has ended; the run finishes its step, checkpoints, says where, exits 143; rerunning the
    same command gives the uninterrupted run's numbers (``finished_workdir``)."""
    args = [sys.executable, "-m", "experiments.run", *CLI_TINY, "--ckpt-every", "0"]
    workdir = tmp_path / "preempted"
    proc = subprocess.Popen([*args, "--workdir", str(workdir)], cwd=ROOT, env=dict(os.environ),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if (workdir / "metrics.jsonl").exists() and '"kind": "task"' in (
                workdir / "metrics.jsonl").read_text():
            break
        time.sleep(0.005)
    assert proc.poll() is None, "the run ended before the signal"
    proc.send_signal(signal.SIGTERM)
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=600)[1]
    assert proc.returncode == 143, err
    (line,) = [x for x in err.splitlines() if "stopped by SIGTERM" in x]
    latest = RunCheckpoints(workdir / "checkpoints").latest()
    assert line.endswith(f"checkpoint {RunCheckpoints(workdir / 'checkpoints').path(*latest)}; "
                         "rerun the same command to resume")
    assert latest[1] > 0 and not (workdir / "results.json").exists()

    resumed = subprocess.run([*args, "--workdir", str(workdir)], cwd=ROOT, env=dict(os.environ),
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    with open(finished_workdir / "results.json") as f:
        want = json.load(f)
    with open(workdir / "results.json") as f:
        got = json.load(f)
    assert got["resumed_at_steps"] == [latest[1]]
    assert _same(got) == _same(want)


def test_signals_only_set_a_flag_inside_handle_signals():
    from lightcl_jax.training import workdir as preemption
    before = signal.getsignal(signal.SIGINT)
    with preemption.handle_signals():
        os.kill(os.getpid(), signal.SIGINT)   # no KeyboardInterrupt here
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)
        assert preemption.requested() == signal.SIGINT   # the first one counts
    assert preemption.requested() is None and signal.getsignal(signal.SIGINT) is before
    position = Position(task=2, task_done=False, epoch=0, batch=3, step_in_task=3,
                        global_step=23)
    stop = preemption.Preempted(signal.SIGINT, position)
    assert stop.exit_code == 130 and str(stop) == "stopped by SIGINT at task 3, step 23"
    assert preemption.Preempted(signal.SIGTERM, position).exit_code == 143


def _fail_on_call(n, error):
    """A stand-in that raises ``error`` on its ``n``-th call and passes the others through."""
    def wrap(real):
        calls = []

        def fake(*args, **kwargs):
            calls.append(1)
            if len(calls) == n:
                raise error
            return real(*args, **kwargs)
        return fake
    return wrap


def test_a_failing_checkpoint_write_stops_the_run_and_keeps_the_one_before(
        tmp_path, finished_workdir, monkeypatch, capsys):
    """Disk full while orbax finalises the third task checkpoint (its rename of the finished
    temporary directory): the run stops with one line, the checkpoints before stay restorable,
    and rerunning resumes from the second task's to the uninterrupted results."""
    from orbax.checkpoint._src.path import async_path
    full = OSError(errno.ENOSPC, "No space left on device")
    # orbax renames three temporary directories a checkpoint (state, meta, the step): the
    # ninth rename is the third checkpoint's last.
    monkeypatch.setattr(async_path, "rename", _fail_on_call(9, full)(async_path.rename))
    workdir = tmp_path / "w"
    assert run.main([*CLI_TINY, "--ckpt-every", "0", "--workdir", str(workdir)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "writing a checkpoint failed ([Errno 28] No space left" in err
    checkpoints = RunCheckpoints(workdir / "checkpoints")
    kind, step = checkpoints.latest()
    assert kind == "tasks" and checkpoints.read_meta(kind, step)["position"]["task"] == 1
    assert f"the last complete checkpoint is {checkpoints.path(kind, step)}" in err
    # Task 2's checkpoint never became one: orbax left its temporary directory, ignored.
    assert [name for name in os.listdir(workdir / "checkpoints" / "tasks")
            if "orbax-checkpoint-tmp" in name]
    assert not (workdir / "results.json").exists()
    monkeypatch.undo()
    assert run.main([*CLI_TINY, "--ckpt-every", "0", "--workdir", str(workdir)]) == 0
    with open(workdir / "results.json") as f:
        got = json.load(f)
    with open(finished_workdir / "results.json") as f:
        want = json.load(f)
    assert got["resumed_at_steps"] == [step] and _same(got) == _same(want)


def test_a_failing_results_write_leaves_no_partial_file(tmp_path, finished_workdir, monkeypatch,
                                                        capsys):
    from lightcl_jax.training import workdir as workdir_module

    def half_then_full(payload, f, **kwargs):
        f.write('{"strategy": "lightc')
        raise OSError(errno.ENOSPC, "No space left on device")
    workdir = _copy(finished_workdir, tmp_path)
    os.unlink(workdir / "results.json")   # the run finished; only its results are missing
    monkeypatch.setattr(workdir_module.json, "dump", half_then_full)
    assert run.main([*CLI_TINY, "--workdir", str(workdir)]) == 1
    err = capsys.readouterr().err
    assert f"writing {workdir / 'results.json'} failed ([Errno 28]" in err
    assert not (workdir / "results.json").exists()
    assert not any(name.startswith(".results-") for name in os.listdir(workdir))
    monkeypatch.undo()
    assert run.main([*CLI_TINY, "--workdir", str(workdir)]) == 0
    with open(workdir / "results.json") as f:
        got = json.load(f)
    with open(finished_workdir / "results.json") as f:
        assert _same(got) == _same(json.load(f))


def test_a_run_that_diverges_before_any_checkpoint_exits_3_and_leaves_no_workdir(
        tmp_path, capsys):
    workdir = tmp_path / "w"
    assert run.main([*CLI_TINY, "--lr", "1e30", "--ckpt-every", "0",
                     "--workdir", str(workdir)]) == 3
    (line,) = capsys.readouterr().err.strip().splitlines()[-1:]
    assert line.startswith("python -m experiments.run: error: training diverged: the loss "
                           "became non-finite at task 1, step ")
    assert line.endswith("; no checkpoint was written before it, so the run left nothing: "
                         "lower --lr")
    assert not workdir.exists()

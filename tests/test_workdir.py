"""`train_and_evaluate(config, workdir)`: a run from Python writes what the command writes,
resumes from its checkpoints, gives a finished run's results back, refuses another's."""

import dataclasses
import json
import os

import pytest

from lightcl_jax.training.loop import train_and_evaluate
from lightcl_jax.training.progress import Progress
from lightcl_jax.training.run import without_measurements
from test_training import TINY, _tiny_stream


class _CrashAfter(Progress):
    """Progress that raises once ``steps`` train steps were reported: a run that dies
    there, its checkpoints on disk as it left them."""

    def __init__(self, steps):
        self.steps, self.done = steps, 0

    def advance(self, steps, metrics=None):
        self.done += steps
        if self.done >= self.steps:
            raise KeyboardInterrupt("the process died here")


class _Steps(Progress):
    def __init__(self):
        self.done = 0

    def advance(self, steps, metrics=None):
        self.done += steps


def _same(results):
    return {k: v for k, v in without_measurements(results).items() if k != "resumed_at_steps"}


def test_a_workdir_gets_the_commands_files_and_a_rerun_resumes_or_returns(tmp_path):
    stream = _tiny_stream(num_tasks=2)
    clean = train_and_evaluate(TINY, stream=stream)  # in memory: nothing written
    assert not os.listdir(tmp_path)
    workdir = tmp_path / "run"
    # Tasks of 3 steps (48 training samples, batch 16); a checkpoint every 2 steps of the
    # run: a death in step 5 leaves the checkpoint of step 4, in task 1.
    with pytest.raises(KeyboardInterrupt):
        train_and_evaluate(TINY, str(workdir), stream=stream, progress=_CrashAfter(5),
                           checkpoint_every=2)
    assert not (workdir / "results.json").exists()
    resumed = train_and_evaluate(TINY, str(workdir), stream=stream, checkpoint_every=2)
    assert resumed["resumed_at_steps"] == [4] and _same(resumed) == _same(clean)
    assert sorted(os.listdir(workdir)) == [".lock", "accuracy.png", "checkpoints",
                                           "metrics.jsonl", "results.json"]
    with open(workdir / "results.json") as f:
        assert json.load(f) == json.loads(json.dumps(resumed))
    with open(workdir / "metrics.jsonl") as f:
        lines = [json.loads(line) for line in f]
    # No step logged twice: what came after step 4 was dropped and trained again.
    assert [(line["kind"], line["global_step"]) for line in lines] == [
        ("epoch", 3), ("task", 3), ("epoch", 6), ("task", 6)]
    assert [line["cil"] for line in lines if line["kind"] == "task"] == pytest.approx(
        [sum(row) / len(row) for row in clean["acc_cil"]])
    # Finished: the results come back without a step.
    steps = _Steps()
    again = train_and_evaluate(TINY, str(workdir), stream=stream, progress=steps)
    assert steps.done == 0 and again == json.loads(json.dumps(resumed))
    # Another run's workdir is refused, its files untouched.
    before = (workdir / "results.json").read_bytes()
    with pytest.raises(ValueError, match="holds another run's results .*lr 0.01 there, 0.02"):
        train_and_evaluate(dataclasses.replace(TINY, lr=0.02), str(workdir), stream=stream)
    assert (workdir / "results.json").read_bytes() == before


def test_the_second_argument_is_the_workdir():
    with pytest.raises(TypeError, match="second argument is the workdir, a path; got "
                                        r"TaskStream \(a stream goes in as stream=...\)"):
        train_and_evaluate(TINY, _tiny_stream(num_tasks=1))

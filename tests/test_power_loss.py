"""Power lost three times: `benchmarks.check_resume --kills 3` kills a tiny run with SIGKILL
inside a checkpoint write, during an evaluation and at a task boundary, restarts it after
each, and finds the results of a run that never stopped (BUILD.md has the 10-kill runs);
its log and its TensorBoard scalars hold each epoch and task once, and the restarted
processes read every program from the compilation cache the first one filled."""

import json
import re

import pytest

from benchmarks import check_resume


def _lines(workdir):
    with open(workdir / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


def test_three_kills_at_the_worst_moments_give_the_uninterrupted_results(tmp_path, capsys):
    code = check_resume.main(["--kills", "3", "--kill-seed", "0", "--out", str(tmp_path), "--",
                              "--dataset", "digits", "--nf", "4", "--epochs", "1",
                              "--num-tasks", "2", "--tensorboard",
                              "--compile-cache", str(tmp_path / "cache")])
    out = capsys.readouterr().out
    assert code == 0, out
    kills = re.findall(r"^kill +\d+ +(\w+) after step \d+: (\S+)", out, re.M)
    assert sorted(moment for moment, _ in kills) == ["boundary", "checkpoint", "evaluation"]
    assert all(state == "killed" for _, state in kills), out  # each came before the end
    assert re.search(r"after 3 kills: identical to the clean run's .*: True$", out, re.M), out
    assert "resuming from" in out
    # No process after the clean run compiled a program: none entered the cache later.
    finished = (tmp_path / "clean" / "results.json").stat().st_mtime
    late = [p.name for p in (tmp_path / "cache").iterdir() if p.stat().st_mtime > finished]
    assert len(list((tmp_path / "cache").iterdir())) > 10 and late == [], late
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    with open(killed / "results.json") as f:
        got = json.load(f)
    assert got["resumed_at_steps"], got["resumed_at_steps"]
    # The log holds each epoch and task once: what a killed process wrote after its
    # checkpoint was dropped and written again.
    lines, want = _lines(killed), _lines(clean)
    assert [(x["kind"], x["task"]) for x in lines] == [(x["kind"], x["task"]) for x in want]
    assert [x for x in lines if x["kind"] == "task"] == [x for x in want if x["kind"] == "task"]
    # TensorBoard's own reader sees each epoch and task once too (a resumed process's file
    # marks the checkpoint's step: what the killed one logged after it is dropped).
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(killed / "tensorboard"))
    events.Reload()
    epoch_steps = [x["global_step"] for x in want if x["kind"] == "epoch"]
    tasks = [x for x in want if x["kind"] == "task"]
    assert [e.step for e in events.Scalars("train/ce")] == epoch_steps
    assert [e.value for e in events.Scalars("train/lr")] == pytest.approx([0.01] * len(epoch_steps))
    cil = events.Scalars("accuracy/cil")
    assert [e.step for e in cil] == [x["global_step"] for x in tasks]
    assert [e.value for e in cil] == pytest.approx([x["cil"] for x in tasks])
    assert [e.step for e in events.Scalars("accuracy_til/task0")] == epoch_steps
    # Every metric of the run: the evaluation loss per task and on average, each summary.
    assert [e.value for e in events.Scalars("eval/loss")] == pytest.approx(
        [x["avg_eval_loss"] for x in tasks])
    assert [e.value for e in events.Scalars("eval_loss/task0")] == pytest.approx(
        [row[0] for row in got["eval_loss"]])
    assert events.Scalars("summary/avg_incremental_cil")[-1].value == pytest.approx(
        got["avg_incremental_cil"])

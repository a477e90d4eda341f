"""Power lost three times: `benchmarks.check_resume --kills 3` kills a tiny run with SIGKILL
inside a checkpoint write, during an evaluation and at a task boundary, restarts it after
each, and finds the results of a run that never stopped (BUILD.md has the 10-kill runs)."""

import re

from benchmarks import check_resume


def test_three_kills_at_the_worst_moments_give_the_uninterrupted_results(tmp_path, capsys):
    code = check_resume.main(["--kills", "3", "--kill-seed", "0", "--out", str(tmp_path), "--",
                              "--dataset", "digits", "--nf", "4", "--epochs", "1",
                              "--num-tasks", "2"])
    out = capsys.readouterr().out
    assert code == 0, out
    kills = re.findall(r"^kill +\d+ +(\S+): (\S+)", out, re.M)
    assert sorted(moment for moment, _ in kills) == ["boundary", "checkpoint", "evaluation"]
    assert all(state == "killed" for _, state in kills), out  # each came before the end
    assert re.search(r"after 3 kills: identical to the clean run's .*: True$", out, re.M), out
    assert "resuming from" in out

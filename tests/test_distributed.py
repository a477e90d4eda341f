"""The multi-process flags (`experiments.distributed`) and the per-process workdir locks."""

import pytest

from experiments import run
from lightcl_jax.training.workdir_lock import WorkdirInUse, lock_workdir


@pytest.mark.parametrize("flags, words", [
    (["--coordinator", "localhost:1234"], "go together"),
    (["--num-processes", "2", "--process-id", "0"], "go together"),
    (["--coordinator", "localhost", "--num-processes", "2", "--process-id", "0"],
     "--coordinator must be HOST:PORT; got 'localhost'"),
    (["--coordinator", "localhost:70000", "--num-processes", "2", "--process-id", "0"],
     "--coordinator must be HOST:PORT"),
    (["--coordinator", "h:1", "--num-processes", "0", "--process-id", "0"],
     "--num-processes must be >= 1; got 0"),
    (["--coordinator", "h:1", "--num-processes", "2", "--process-id", "2"],
     "--process-id must lie in [0, 1] (--num-processes 2); got 2"),
    (["--coordinator", "h:1", "--num-processes", "2", "--process-id", "1", "--distributed"],
     "give it or the three flags"),
])
def test_bad_process_flags_are_refused_in_one_line(tmp_path, capsys, flags, words):
    with pytest.raises(SystemExit) as exit_info:
        run.main(["--dataset", "digits", "--workdir", str(tmp_path / "w"), *flags])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and words in err, err
    assert not (tmp_path / "w").exists()


def test_distributed_after_jax_started_is_one_line(tmp_path, capsys):
    import jax
    jax.numpy.zeros(1).block_until_ready()  # JAX is running in this process
    with pytest.raises(SystemExit) as exit_info:
        run.main(["--dataset", "digits", "--workdir", str(tmp_path / "w"), "--distributed"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1
    assert "JAX's distributed runtime did not start" in err
    assert not (tmp_path / "w").exists()


def test_each_process_of_a_run_locks_its_own_file(tmp_path):
    first = lock_workdir(str(tmp_path), 0)
    second = lock_workdir(str(tmp_path), 1)  # the same run's process 1: not refused
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock", ".lock.1"]
    with pytest.raises(WorkdirInUse, match="is in use by a run that is still alive"):
        lock_workdir(str(tmp_path), 1)  # a second launch of process 1 is
    first.release()
    second.release(remove_empty_workdir=True)  # .lock is still there: the workdir stays
    assert tmp_path.exists()

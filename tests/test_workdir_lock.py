"""One run per workdir (`lightcl_jax.training.workdir`): a live run's workdir is refused
to a second process, naming it; a lock left by a killed process blocks nothing."""

import os
import signal
import subprocess
import sys

import pytest

from experiments import run
from lightcl_jax.training.workdir import WorkdirInUse, lock_workdir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOLDER = ("import sys, time; from lightcl_jax.training.workdir import lock_workdir; "
          "lock = lock_workdir(sys.argv[1]); print('held', flush=True); time.sleep(120)")


def test_a_second_process_is_refused_and_a_killed_holder_blocks_nothing(tmp_path, capsys):
    workdir = tmp_path / "w"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(workdir)], cwd=ROOT,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        before = sorted(os.listdir(workdir))
        with pytest.raises(SystemExit) as exit_info:
            run.main(["--dataset", "digits", "--nf", "4", "--epochs", "1", "--no-progress",
                      "--workdir", str(workdir)])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1, err
        assert (f"--workdir {workdir} is in use by a run that is still alive "
                f"(process {holder.pid}: -c {workdir})") in err
        assert sorted(os.listdir(workdir)) == before == [".lock"]  # nothing written
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # The file outlives the killed holder; its lock does not.
    assert (workdir / ".lock").exists()
    with lock_workdir(str(workdir)):
        pass


def test_the_lock_is_exclusive_within_a_process_too_until_released(tmp_path):
    first = lock_workdir(str(tmp_path))
    with pytest.raises(WorkdirInUse, match=f"process {os.getpid()}"):
        lock_workdir(str(tmp_path))
    first.release()
    lock_workdir(str(tmp_path)).release()

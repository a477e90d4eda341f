"""The multi-process flags (`experiments.cli.distributed`) and the per-process workdir locks."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from experiments import run
from lightcl_jax.data.streams import make_stream
from lightcl_jax.training.workdir import WorkdirInUse, lock_workdir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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


# A tiny digits run: 12 steps of 64 a task, a checkpoint every 8 steps (8: in task 0).
_FLAGS = ["--dataset", "digits", "--nf", "4", "--epochs", "1", "--num-tasks", "2",
          "--batch-size", "64", "--lr", "1e-3", "--ckpt-every", "8", "--no-progress"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _start(workdir, devices: int, processes: int = 1) -> list[subprocess.Popen]:
    """``processes`` processes of one run, ``devices`` host devices each."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = env.get("XLA_FLAGS", "") + \
        f" --xla_force_host_platform_device_count={devices}"
    port = _free_port()
    several = lambda i: (["--coordinator", f"localhost:{port}", "--num-processes",  # noqa: E731
                          str(processes), "--process-id", str(i)] if processes > 1 else [])
    return [subprocess.Popen([sys.executable, "-m", "experiments.run", *_FLAGS, "--workdir",
                              str(workdir), *several(i)], cwd=ROOT, env=env, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            for i in range(processes)]


def _finish(procs) -> list[tuple[int, str, str]]:
    """(exit code, stdout, stderr) of each process, once it has ended."""
    outputs = [p.communicate(timeout=600) for p in procs]
    return [(p.returncode, *output) for p, output in zip(procs, outputs)]


def _own_lines(text: str) -> list[str]:
    """The lines of a process's output that are not gloo's connection notices ("[Gloo]
    Rank 1 is connected to 3 peer ranks. Expected number of connected peer ranks is : 3"),
    nor the pieces and blank lines they leave when two of its threads print at once."""
    return [line for line in text.splitlines()
            if line.strip() and not line.startswith("[Gloo] Rank")
            and "connected peer ranks is" not in line]


def test_two_processes_give_the_one_process_numbers_and_resume_after_a_death(tmp_path):
    # The reference: one process on one device, here (test_parallel: 4 devices give its
    # numbers within one evaluation sample per entry).
    assert run.main([*_FLAGS, "--workdir", str(tmp_path / "one")]) == 0
    one = json.loads((tmp_path / "one" / "results.json").read_text())

    # Two processes of 2 devices each; process 1 is killed once the mid-task checkpoint
    # of step 8 is complete, and process 0 must then stop on its own, promptly.
    two = tmp_path / "two"
    procs = _start(two, devices=2, processes=2)
    steps = two / "checkpoints" / "steps"
    deadline = time.monotonic() + 300
    while not (steps / "8").is_dir():
        assert time.monotonic() < deadline and procs[1].poll() is None, _finish(procs)
        time.sleep(0.2)
    procs[1].kill()
    killed = time.monotonic()
    code, out, err = _finish(procs[:1])[0]
    assert time.monotonic() - killed < 60
    assert _own_lines(out) == [], out
    if code == 1:  # the dead process broke a collective of process 0's: our line
        # One line of ours and no traceback. JAX's runtime may log lines of its own
        # ("E1203 ..." from its C++ logging) when it notices the dead peer at the same
        # time: those are not ours to count (a slow machine once showed one in CI).
        ours = [line for line in _own_lines(err) if line.startswith("python -m experiments.run")]
        assert len(ours) == 1 and "Traceback" not in err, err[-4000:]
        (line,) = ours
        assert line.startswith("python -m experiments.run: error: process 0 of 2 stopped: a "
                               "collective with the other processes failed"), err
        assert "rerun every process with the same command to resume" in line
    else:  # process 0 was waiting at orbax's barrier instead: JAX's heartbeat check stops it
        assert code == -signal.SIGABRT, (code, err[-2000:])
        assert "the JAX distributed service detected fatal errors" in err, err[-2000:]
    assert not (two / "results.json").exists()

    # Both rerun: they resume from step 8 (task 0) to the 1-process numbers.
    (code0, out0, err0), (code1, out1, err1) = _finish(_start(two, devices=2, processes=2))
    assert code0 == 0 and code1 == 0, (err0, err1)
    assert "resuming from" in err0 and "steps/8:" in err0.split("resuming from")[1]
    assert _own_lines(out1) == [] and _own_lines(err1) == [], (out1, err1)  # process 1: silent
    resumed = json.loads((two / "results.json").read_text())
    sizes = [len(t.y_eval) for t in make_stream("digits", num_tasks=2).tasks]
    for key in ("acc_til", "acc_cil"):  # within one evaluation sample per entry, as 4 v 1 device
        for row2, row1 in zip(resumed[key], one[key]):
            assert all(abs(a - b) <= 100 / n + 1e-9 for a, b, n in zip(row2, row1, sizes)), key
    assert (resumed["identity"]["devices"], one["identity"]["devices"]) == (4, 1)
    # Process 0 alone wrote the run's files: the 1-process run's, and a lock per process.
    assert sorted(p.name for p in two.iterdir()) == sorted(
        [p.name for p in (tmp_path / "one").iterdir()] + [".lock.1"])
    tasks = [json.loads(line)["task"] for line in (two / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["kind"] == "task"]
    assert tasks == [0, 1]  # each entry once (the killed run wrote task 0's, the rerun task 1's)

"""A full disk, for real: a run on a size-limited tmpfs that fills while a checkpoint is
written stops with one line naming the space to free, keeps its previous checkpoint,
and, the space freed, resumes to the numbers of a run that never stopped.

Mounting needs root (as the machines these tests run on are); where ``mount`` is refused
the test is skipped with the reason (tests/test_checkpoint.py simulates the same fault with
a raising write inside orbax's save).
"""

import json
import os
import subprocess

import pytest

from experiments import run
from lightcl_jax.training.checkpoint import RunCheckpoints
from lightcl_jax.training.run import without_measurements

# A run of 5 tasks, one epoch each, nf 4 on the 8x8 digits: checkpoints of about 0.4-0.55
# MB each (ext4; a little less on tmpfs), 2.4 MB for the whole workdir. A 1.3 MB disk
# holds the first two checkpoints and fills during the third.
CLI_TINY = ["--dataset", "digits", "--nf", "4", "--epochs", "1", "--no-progress",
            "--ckpt-every", "0"]


def _mount(path, size: str) -> None:
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"mounting a tmpfs was refused ({proc.stderr.strip() or proc.returncode})")


def _same(results):
    return {k: v for k, v in without_measurements(results).items() if k != "resumed_at_steps"}


def test_a_full_disk_stops_the_run_in_one_line_and_the_freed_disk_resumes_it(tmp_path, capsys):
    clean = tmp_path / "clean"
    assert run.main([*CLI_TINY, "--workdir", str(clean)]) == 0
    disk = tmp_path / "disk"
    disk.mkdir()
    _mount(disk, "1300k")
    try:
        workdir = disk / "w"
        assert run.main([*CLI_TINY, "--workdir", str(workdir)]) == 1
        (line,) = capsys.readouterr().err.strip().splitlines()[-1:]
        assert "writing a checkpoint failed ([Errno 28] No space left on device" in line, line
        assert "free at least " in line and " MB on its disk (a checkpoint takes about that; " \
            in line and "rerun the same command to resume" in line, line
        checkpoints = RunCheckpoints(workdir / "checkpoints")
        kind, step = checkpoints.latest()
        assert f"the last complete checkpoint is {checkpoints.path(kind, step)}" in line
        checkpoints.read_meta(kind, step)  # the previous checkpoint is whole
        assert not (workdir / "results.json").exists()
        subprocess.run(["mount", "-o", "remount,size=8m", str(disk)], check=True)
        assert run.main([*CLI_TINY, "--workdir", str(workdir)]) == 0
        with open(workdir / "results.json") as f:
            resumed = json.load(f)
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)
    with open(clean / "results.json") as f:
        want = json.load(f)
    assert resumed["resumed_at_steps"] == [step] and _same(resumed) == _same(want)
    assert not os.path.ismount(disk)

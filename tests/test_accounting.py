import dataclasses
import os

import pytest

from lightcl_jax.accounting import compiled_train_step_cost
from lightcl_jax.config import Config

TINY = Config(dataset="digits", nf=8, batch_size=16, strategy_args={"buffer_size": 8})


def test_frozen_step_compiles_to_fewer_bytes_and_flops_than_the_unfrozen_step():
    shape = (8, 8, 1)
    finetune = compiled_train_step_cost(dataclasses.replace(TINY, strategy="finetune", strategy_args={}), shape,
                                        10, 2, task_index=1)
    lightcl = compiled_train_step_cost(dataclasses.replace(TINY, strategy="lightcl"), shape,
                                       10, 2, task_index=1)
    assert lightcl["phase"] == {"frozen": ["stem", "stage1", "stage2", "stage3"], "memory": True}
    assert finetune["phase"] == {"frozen": [], "memory": False}
    # No gradients or kept activations for the frozen prefix: fewer temporaries and FLOPs,
    # even though LightCL adds a forward pass over its buffer.
    assert lightcl["temp_bytes"] < finetune["temp_bytes"]
    assert lightcl["train_bytes"] < finetune["train_bytes"]
    assert lightcl["flops"] < finetune["flops"]
    # LightCL's task 0 without pre-training trains everything, as finetune does.
    task0 = compiled_train_step_cost(dataclasses.replace(TINY, strategy="lightcl"), shape, 10, 2,
                                     task_index=0)
    assert task0["phase"] == {"frozen": [], "memory": False}
    assert task0["flops"] == finetune["flops"]


def test_results_resources_are_per_step_figures_times_step_counts():
    import numpy as np

    from lightcl_jax.accounting import compiled_eval_step_cost
    from lightcl_jax.data.streams import split_into_tasks
    from lightcl_jax.training.loop import train_and_evaluate

    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(4), 20).astype(np.int32)
    x = rng.normal(size=(len(y), 8, 8, 1)).astype(np.float32)
    stream = split_into_tasks("tiny", x, y, x[::4], y[::4], 4, 2)
    config = dataclasses.replace(TINY, strategy="lightcl", nf=4, epochs=2, eval_batch_size=8)
    res = train_and_evaluate(config, stream=stream)["resources"]
    # Task 0 trains everything, task 1 freezes: two compiled phases, 40 // 16 = 2 steps
    # per epoch, 2 epochs each.
    assert [(s["tasks"], s["steps"]) for s in res["train_steps"]] == [([0], 4), ([1], 4)]
    full = {}
    for s, task in zip(res["train_steps"], (0, 1)):
        alone = compiled_train_step_cost(config, (8, 8, 1), 4, 2, task_index=task)
        assert s["flops"] == alone["flops"] and s["step_bytes"] == alone["train_bytes"]
        full[task] = alone["flops"]
    assert res["train_flops"] == sum(4 * s["flops"] for s in res["train_steps"])
    # Evaluation after task 0 (task 0: 10 samples -> 2 batches of 8) and after task 1 (2 + 2).
    assert res["eval_step"]["steps"] == 6
    assert res["eval_step"]["flops"] == compiled_eval_step_cost(config, (8, 8, 1), 4, 2)["flops"]
    assert res["eval_flops"] == 6 * res["eval_step"]["flops"]
    assert res["peak_train_step_bytes"] == max(s["step_bytes"] for s in res["train_steps"])
    # Keeping each epoch's last 8 samples as a smaller batch: 3 steps an epoch, and the
    # run's FLOPs count those steps at the smaller program's figure.
    keep = train_and_evaluate(dataclasses.replace(config, last_batch="keep"), stream=stream)
    res = keep["resources"]
    assert [(s["tasks"], s["steps"]) for s in res["train_steps"]] == [([0], 6), ([1], 6)]
    for s, task in zip(res["train_steps"], (0, 1)):
        small = compiled_train_step_cost(dataclasses.replace(config, batch_size=8), (8, 8, 1),
                                         4, 2, task_index=task)["flops"]
        assert s["flops"] == full[task] and s["run_flops"] == 4 * full[task] + 2 * small
    assert res["train_flops"] == sum(s["run_flops"] for s in res["train_steps"])


def test_sparse_step_compiles_with_its_masks_in_the_optimizer_state():
    dense = compiled_train_step_cost(dataclasses.replace(TINY, strategy="lightcl"), (8, 8, 1),
                                     10, 2, task_index=1)
    sparse = compiled_train_step_cost(dataclasses.replace(TINY, strategy="lightcl", sparse=True),
                                      (8, 8, 1), 10, 2, task_index=1)
    # Dense tensors either way; the sparse step also carries bool masks of its trainable
    # weights (stage 4 and head), one byte per entry.
    assert sparse["argument_bytes"] > dense["argument_bytes"]
    assert sparse["flops"] >= dense["flops"]


def test_memory_plan_lists_what_fits_deepest_first_and_each_fits_when_compiled_again():
    from lightcl_jax.accounting.compiled import memory_plan
    config = Config(strategy="lightcl", dataset="digits", nf=4, strategy_args={"buffer_size": 8})
    shape = (8, 8, 1)
    points = ("stage3", "none")  # 2 of the 6 freeze points keep the test short
    everything = memory_plan(config, shape, 10, 2, budget_mb=1e9, batch_sizes=(8, 16),
                             buffer_sizes=(8,), freeze_points=points)
    # 2 freeze points x 2 batch sizes, all fitting an endless budget, deepest trainable first.
    assert [(r["freeze"], r["batch_size"]) for r in everything] == [
        ("none", 16), ("none", 8), ("stage3", 16), ("stage3", 8)]
    assert all(r["fits"] for r in everything)
    budget = sorted(r["step_mb"] for r in everything)[1]  # the 2 smallest steps fit
    rows = memory_plan(config, shape, 10, 2, budget_mb=budget, batch_sizes=(8, 16),
                       buffer_sizes=(8,), freeze_points=points)
    fitting = [r for r in rows if r["fits"]]
    assert len(fitting) >= 2 and rows[:len(fitting)] == fitting
    assert all(r["step_mb"] > budget for r in rows[len(fitting):])
    for row in fitting:  # compiled again, with LLVM's optimisations (the plan's are off)
        trial = dataclasses.replace(config, freeze=row["freeze"], batch_size=row["batch_size"])
        again = compiled_train_step_cost(trial, shape, 10, 2, pretrained=True)
        assert again["step_bytes"] / 2 ** 20 == row["step_mb"] <= budget
        assert again["flops"] == row["flops"]


def test_plan_memory_refuses_bad_budgets_and_sizes(capsys):
    from experiments import plan_memory
    for argv, words in ((["--budget-mb", "0"], "--budget-mb must be > 0"),
                        (["--budget-mb", "64", "--batch-sizes", "8,x"], "comma-separated"),
                        (["--budget-mb", "64", "--dataset", "cifar100", "--num-tasks", "3"],
                         "--num-tasks must divide the 100 classes")):
        with pytest.raises(SystemExit) as exit_info:
            plan_memory.main(argv)
        assert exit_info.value.code == 2 and words in capsys.readouterr().err


def test_peak_rss_is_the_kernels_figure_and_malloc_arenas_cap_on_glibc():
    import platform
    import sys

    from lightcl_jax.process import limit_malloc_arenas, peak_rss_mb
    with open("/proc/self/status") as f:
        hwm = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    assert 0 < peak_rss_mb() and abs(peak_rss_mb() - hwm) < 64  # both in MiB, moments apart
    glibc = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
    assert limit_malloc_arenas(8) is glibc  # 8 arenas: harmless to the test process


def test_release_free_memory_hands_freed_heap_pages_back():
    import ctypes
    import platform
    import sys

    from lightcl_jax.process import release_free_memory
    if not (sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"):
        assert release_free_memory() is False
        return

    def resident_mb():
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024

    libc = ctypes.CDLL(None)
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    # 128 MiB in 64 KiB blocks (below glibc's mmap threshold: from the heap), touched, then
    # freed under a block kept last, so that free() itself cannot shrink the heap's top.
    blocks = [libc.malloc(64 << 10) for _ in range(2048)]
    keep = libc.malloc(64 << 10)
    for b in blocks:
        ctypes.memset(b, 1, 64 << 10)
    for b in blocks:
        libc.free(b)
    before = resident_mb()
    assert release_free_memory() is True
    after = resident_mb()
    libc.free(keep)
    assert before - after > 64, (before, after)


def test_bench_rss_refuses_a_bad_setting_before_running_anything(capsys):
    from benchmarks import bench_rss
    with pytest.raises(SystemExit) as exit_info:
        bench_rss.main(["--nf", "0"])
    assert exit_info.value.code == 2 and "nf must be an integer in [1, 4096]" in capsys.readouterr().err


def test_huge_pages_environment_asks_only_where_it_changes_something():
    from lightcl_jax.process import huge_pages_environment
    madvise, env = "always [madvise] never\n", {"PATH": "/bin"}
    assert huge_pages_environment(env, "glibc 2.36", madvise) == {
        "PATH": "/bin", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1",
        "LIGHTCL_HUGE_PAGES_RAN_AGAIN": "1"}  # the marker: never run again twice
    assert huge_pages_environment({"LIGHTCL_HUGE_PAGES": ""}, "glibc 2.36", madvise)  # default
    # the user's other tunables stay, in front
    assert huge_pages_environment({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"},
                                  "glibc 2.35", madvise)["GLIBC_TUNABLES"] == (
        "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1")
    for environ, libc, thp in [
            ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, "glibc 2.36", madvise),  # user's
            ({"LIGHTCL_HUGE_PAGES": "0"}, "glibc 2.36", madvise),  # switched off
            ({"LIGHTCL_HUGE_PAGES_RAN_AGAIN": "1"}, "glibc 2.36", madvise),  # ran again
            (env, "glibc 2.34", madvise),  # no such tunable before 2.35
            (env, "", madvise),  # not glibc (macOS, musl)
            (env, "glibc 2.36", "[always] madvise never"),  # huge pages anyway
            (env, "glibc 2.36", "always madvise [never]"),  # none at all
            (env, "glibc 2.36", "")]:  # no transparent huge pages in this kernel
        assert huge_pages_environment(environ, libc, thp) is None, (environ, libc, thp)
    with pytest.raises(ValueError, match="LIGHTCL_HUGE_PAGES='yes'.*1 .*or 0"):
        huge_pages_environment({"LIGHTCL_HUGE_PAGES": "yes"}, "glibc 2.36", madvise)


def test_run_with_huge_pages_runs_the_command_again_with_the_tunable(tmp_path):
    import subprocess
    import sys

    from lightcl_jax.process import huge_pages_environment
    code = ("import os, sys; from lightcl_jax.process import run_with_huge_pages; "
            "print('start', os.getpid(), flush=True); run_with_huge_pages(); "
            "print('tunables', os.environ.get('GLIBC_TUNABLES'), os.getpid(), sys.argv[1:])")
    env = {k: v for k, v in os.environ.items()
           if k not in ("GLIBC_TUNABLES", "LIGHTCL_HUGE_PAGES", "LIGHTCL_HUGE_PAGES_RAN_AGAIN")}
    out = subprocess.run([sys.executable, "-c", code, "an argument"], env=env, check=True,
                         capture_output=True, text=True).stdout.split("\n")
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            thp = f.read()
    except OSError:
        thp = ""
    libc = os.confstr("CS_GNU_LIBC_VERSION") if hasattr(os, "confstr") else ""
    starts = [line for line in out if line.startswith("start")]
    last = out[-2].split()
    if huge_pages_environment(env, libc or "", thp) is None:
        assert len(starts) == 1 and last[1] == "None"
    else:  # ran twice, the second time (same process) with the tunable and the same argv
        assert len(starts) == 2 and starts[0].split()[1] == starts[1].split()[1] == last[2]
        assert last[1] == "glibc.malloc.hugetlb=1" and " ".join(last[3:]) == "['an argument']"
    # Not run again where the command line did not run the script: one read from stdin.
    out = subprocess.run([sys.executable, "-", "x"], input=code.replace("; ", "\n"), env=env,
                         check=True, capture_output=True, text=True).stdout
    assert out.count("start") == 1 and "tunables None" in out
    env["LIGHTCL_HUGE_PAGES"] = "0"
    out = subprocess.run([sys.executable, "-c", code, "x"], env=env, check=True,
                         capture_output=True, text=True).stdout
    assert out.count("start") == 1 and "tunables None" in out


def test_started_command_is_the_module_python_m_is_locating():
    from lightcl_jax.process import started_command
    py = "/usr/bin/python3"
    # While `python -m` locates its module (importing the package), argv[0] is "-m".
    assert started_command("experiments", ["-m", "--seeds", "2"],
                           [py, "-X", "utf8", "-m", "experiments.run", "--seeds", "2"]) == "run"
    assert started_command("benchmarks", ["-m"],
                           [py, "-m", "benchmarks.side_by_side.run_ours"]) == "side_by_side.run_ours"
    for package, argv, orig in [
            ("experiments", ["/r/experiments/run.py"], [py, "-m", "experiments.run"]),  # running
            ("experiments", ["-m"], [py, "-m", "benchmarks.bench_step"]),  # another package's
            ("experiments", ["-m"], [py, "-m", "experimentsX.run"]),
            ("experiments", ["-m", "-m", "slow"], [py, "-m", "pytest", "-m", "slow"]),
            ("experiments", ["/v/bin/pytest", "tests"], [py, "/v/bin/pytest", "tests"]),
            ("experiments", ["-c", "x"], [py, "-c", "import experiments.run", "x"]),
            ("experiments", ["-m", "x"], [py, "-m", "experiments.run", "y"]),  # not this argv
            ("experiments", [], [])]:
        assert started_command(package, argv, orig) is None, (package, argv, orig)


@pytest.mark.parametrize("package, command, expected", [
    ("experiments", "run", ["again", "arenas"]), ("experiments", "pretrain", ["again", "arenas"]),
    ("experiments", "compare", ["again"]), ("experiments", "plan_memory", []),
    ("benchmarks", "bench_step", ["again"]), ("benchmarks", "bench_rss", ["again"]),
    ("benchmarks", "side_by_side.run_ours", ["again", "arenas"]),
    ("benchmarks", "bench_huge_pages", []),  # starts its own processes with and without
    ("benchmarks", None, []), ("experiments", None, [])])  # imported here, by the test
def test_the_packages_set_up_the_processes_of_their_commands(package, command, expected,
                                                             monkeypatch):
    import importlib
    import sys

    from lightcl_jax import process
    module = importlib.import_module(package)  # by the test: nothing to set up
    done = []
    monkeypatch.setattr(process, "huge_pages_here", lambda: {"GLIBC_TUNABLES": "x"})
    monkeypatch.setattr(process, "_run_again", lambda env: done.append("again"))
    monkeypatch.setattr(process, "limit_malloc_arenas", lambda: done.append("arenas"))
    if command is not None:  # as while `python -m package.command --flag` locates its module
        monkeypatch.setattr(sys, "argv", ["-m", "--flag"])
        monkeypatch.setattr(sys, "orig_argv", [sys.executable, "-m", f"{package}.{command}",
                                               "--flag"])
    importlib.reload(module)
    assert done == expected


def test_a_command_runs_again_with_huge_pages_as_its_package_is_imported(tmp_path):
    """A package set up as `experiments`, run by a real ``python -m``: its command runs
    again (same PID, same argv) before its module; an import or another module does not."""
    import pathlib
    import subprocess
    import sys

    from lightcl_jax.process import huge_pages_here
    root = pathlib.Path(__file__).resolve().parent.parent
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text(
        "import os\nprint('start', os.getpid(), flush=True)\n"
        "from lightcl_jax.process import prepare_command_process\n"
        "prepare_command_process(__name__, huge_pages=('cmd',), capped_arenas=('cmd',))\n")
    report = ("import os, sys\n"
              "print('tunables', os.environ.get('GLIBC_TUNABLES'), os.getpid(), sys.argv[1:])\n")
    (tmp_path / "pkg" / "cmd.py").write_text(report)
    (tmp_path / "pkg" / "other.py").write_text(report)
    env = {k: v for k, v in os.environ.items()
           if k not in ("GLIBC_TUNABLES", "LIGHTCL_HUGE_PAGES", "LIGHTCL_HUGE_PAGES_RAN_AGAIN")}
    env["PYTHONPATH"] = str(root)

    def run(*args):
        return subprocess.run([sys.executable, *args], cwd=tmp_path, env=env, check=True,
                              capture_output=True, text=True).stdout.splitlines()

    out = run("-m", "pkg.cmd", "an argument")
    starts, last = [line for line in out if line.startswith("start")], out[-1].split()
    if huge_pages_here(env) is None:
        assert len(starts) == 1 and last[1] == "None"
    else:  # ran twice, the second time (same process) with the tunable and the same argv
        assert len(starts) == 2 and starts[0].split()[1] == starts[1].split()[1] == last[2]
        assert last[1] == "glibc.malloc.hugetlb=1" and " ".join(last[3:]) == "['an argument']"
    for args in (["-m", "pkg.other", "x"], ["-c", "import pkg.cmd", "x"]):
        out = run(*args)
        assert sum(line.startswith("start") for line in out) == 1 and out[-1].split()[1] == "None"

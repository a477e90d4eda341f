"""Every flag of ``python -m experiments.run``, fuzzed with hypothesis.

Each example sets one to three flags to values drawn from the flag's own kind
(numbers from tiny to huge, negative, NaN and Inf spellings, empty strings,
unknown names, the valid choices) on top of a tiny run. The command must
either run or refuse with exit code 2 and one line on stderr; an exception
escaping ``main`` (a traceback) fails the test. A run that starts is stopped
after its first step by the preemption path (as SIGTERM would: checkpoint,
one line, exit 143), so a huge ``--epochs`` costs one step; a value that makes
the loss non-finite may end in the divergence line (exit 3).

The examples are the same every run (``derandomize``); ``FUZZ_EXAMPLES=500
FUZZ_RANDOM=1 pytest tests/test_fuzz_flags.py --hypothesis-seed=N`` searches
further (how the refusals of huge ``--nf``, ``--seeds`` and ``--seed`` were found).
"""

import argparse
import os
import signal

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from experiments import run

TINY = ["--dataset", "digits", "--nf", "2", "--epochs", "1", "--num-tasks", "2",
        "--batch-size", "16", "--strategy-arg", "buffer_size=8", "--ckpt-every", "0",
        "--no-progress"]
NUMBERS = ["0", "1", "2", "3", "-1", "-7", "0.5", "-0", "1e-300", "1e308", "-1e308", "nan", "NaN",
           "inf", "-inf", "Infinity", "", " ", "abc", "0x10", "99999999999999999999", "2147483648",
           "4294967296", "-9223372036854775809", "1_000"]
NAMES = ["", " ", "nope", "NONE", "../x", "a" * 300, "\u00e9t\u00e9"]
PATHS = ["", ".", "missing/dir", "a_file.txt", "a_file.txt/below", "sub/dir"]  # under a tmp cwd
# Import paths: a missing file, a file that is not Python, a module without the name, an
# object of another kind, a module that fails to import.
IMPORT_PATHS = ["a_file.txt:X", "missing.py:X", "os:nope", "os:getcwd", "json:JSONDecoder",
                "no_such_module:X", ":X", "a:b:c"]
STRATEGY_ARGS = ["beta=0.5", "beta=-1", "beta=nan", "beta=inf", "beta=", "beta=abc", "ratio=0",
                 "ratio=1", "ratio=2", "buffer_size=1", "buffer_size=0", "buffer_size=16",
                 "buffer_size=17", "buffer_size=1.5", "buffer_size=99999999999999999999",
                 "lam=100", "ewc.lam=1", "lightcl.beta=0.1", "er.buffer_size=4", "nope=1",
                 "=1", "beta", ".beta=1", "a.b.c=1"]
METRICS = ["avg", "avg,loss", "+loss", "+avg_incremental", "loss", "avg,avg", "+", ",", "avg,nope",
           "+os:getcwd", "avg,json:JSONDecoder"]


def _flag_values(action: argparse.Action) -> list:
    """The values to draw for one flag (None: the flag alone, without a value)."""
    if action.nargs == 0:
        return [None]
    if action.choices is not None:
        values = [str(c) for c in action.choices] + NAMES
        return [None] + values if action.nargs == "?" else values
    if action.dest == "strategy":
        return ["lightcl", "finetune", "er", "derpp", "ewc", "lwf", "agem", "joint"] + \
            IMPORT_PATHS + NAMES
    if action.dest == "strategy_arg":
        return STRATEGY_ARGS
    if action.dest == "metrics":
        return METRICS + NAMES + IMPORT_PATHS
    if action.dest in ("similarity", "layer_metrics"):
        return ["cosine", "linear_cka", "param_similarity"] + IMPORT_PATHS + NAMES + (
            [None] if action.nargs == "?" else [])
    if action.dest in ("workdir", "data_dir", "init_from", "config", "compile_cache"):
        return PATHS + (["split_cifar10", "split_tinyimagenet"] + NAMES
                        if action.dest == "config" else [])
    if action.dest == "augment":
        return ["on", "off", "yes", "0", "maybe"] + NAMES
    return NUMBERS


ACTIONS = {a.option_strings[0]: a for a in run.build_parser()._actions
           if a.option_strings and a.dest != "help"}
FLAG = st.sampled_from(sorted(ACTIONS)).flatmap(
    lambda flag: st.tuples(st.just(flag), st.sampled_from(_flag_values(ACTIONS[flag]))))


@pytest.fixture
def stop_after_the_first_step(monkeypatch):
    """The preemption flag reads as set, as after a SIGTERM: the run checkpoints after its
    first step and exits 143."""
    from lightcl_jax.training import epochs, loop
    monkeypatch.setattr(epochs, "requested", lambda: signal.SIGTERM)
    monkeypatch.setattr(loop, "requested", lambda: signal.SIGTERM)


@settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", "40")), deadline=None, derandomize="FUZZ_RANDOM" not in os.environ, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(flags=st.lists(FLAG, min_size=1, max_size=3, unique_by=lambda f: f[0]))
def test_every_flag_value_runs_or_is_refused_in_one_line(flags, tmp_path_factory, monkeypatch,
                                                          capsys, stop_after_the_first_step):
    where = tmp_path_factory.mktemp("fuzz")
    monkeypatch.chdir(where)
    (where / "a_file.txt").write_text("not a directory\n")
    argv = [*TINY, "--workdir", "w"]
    for flag, value in flags:
        argv += [flag] if value is None else [f"{flag}={value}"]
    capsys.readouterr()
    try:
        code = run.main(argv)
    except SystemExit as exit_:
        code = exit_.code
    err = capsys.readouterr().err
    event(f"exit {code}")  # pytest --hypothesis-show-statistics counts them
    lines = [line for line in err.splitlines() if line.strip()]
    assert code in (0, 2, 3, 143), (argv, code, err)
    if code == 2:
        assert len(lines) == 1 and "error: " in lines[0], (argv, err)
    elif code == 3:
        assert lines[-1].startswith("python -m experiments.run: error: training diverged"), (
            argv, err)
    elif code == 143:
        assert lines[-1].startswith("python -m experiments.run: stopped by SIGTERM"), (argv, err)

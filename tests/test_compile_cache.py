"""The compilation cache the commands turn on (`lightcl_jax.compiler.use_compilation_cache`).

That a restarted run compiles nothing its first process had not is checked in
tests/test_power_loss.py, whose runs share a cache of their own.
"""

import os

import pytest

from experiments import run
from lightcl_jax.compiler import CACHE_ENV, cache_folder, default_cache_dir


def test_the_folder_is_the_flag_then_the_variable_then_jaxs_then_the_default(monkeypatch):
    assert cache_folder("/a", {CACHE_ENV: "/b"}, "/c") == "/a"
    assert cache_folder(None, {CACHE_ENV: "/b"}, "/c") == "/b"
    assert cache_folder(None, {}, "/c") == "/c"
    assert cache_folder("off", {CACHE_ENV: "/b"}, "/c") is None
    assert cache_folder(None, {CACHE_ENV: ""}, "/c") is None
    monkeypatch.setenv("XDG_CACHE_HOME", "/x")
    assert cache_folder(None, {}, None) == default_cache_dir() == "/x/lightcl_jax/jax"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", "/home/u")
    assert default_cache_dir() == "/home/u/.cache/lightcl_jax/jax"


@pytest.mark.parametrize("given, env, named", [
    (["--compile-cache", "{file}/c"], {}, "--compile-cache: the folder cannot be used"),
    ([], {CACHE_ENV: "{file}/c"}, f"{CACHE_ENV}: the folder cannot be used"),
])
def test_a_folder_that_cannot_be_made_is_refused_in_one_line(tmp_path, capsys, monkeypatch,
                                                               given, env, named):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    for name, value in env.items():
        monkeypatch.setenv(name, value.format(file=blocker))
    with pytest.raises(SystemExit) as exit_info:
        run.main(["--dataset", "digits", "--workdir", str(tmp_path / "w"),
                  *[flag.format(file=blocker) for flag in given]])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1, err
    assert named in err and "--compile-cache off" in err, err
    assert not (tmp_path / "w").exists() and not os.path.exists(f"{blocker}/c")

"""benchmarks.bench_huge_pages: the ratios it reports, one measuring process's figures, its
refusals."""

import pytest

from benchmarks import bench_huge_pages


def _figures(**walls):
    return {kind.replace("_", " "): {"wall_ms": ms, "user_ms": 0.0, "sys_ms": 0.0,
                                     "minor_faults": 0.0} for kind, ms in walls.items()}


def test_summary_is_each_pairs_ratio_with_over_without_and_their_median():
    pairs = [{"off": _figures(jax_full=1000.0, jax_lightcl=500.0),
              "on": _figures(jax_full=900.0, jax_lightcl=550.0)},
             {"off": _figures(jax_full=800.0, jax_lightcl=400.0),
              "on": _figures(jax_full=600.0, jax_lightcl=300.0)},
             {"off": _figures(jax_full=1000.0, jax_lightcl=500.0),
              "on": _figures(jax_full=1000.0, jax_lightcl=450.0)}]
    summary = bench_huge_pages.summarize(pairs)
    assert set(summary) == {"jax full", "jax lightcl"}  # no PyTorch figures: no PyTorch rows
    assert summary["jax full"]["ratios"] == pytest.approx([0.9, 0.75, 1.0])
    assert summary["jax full"]["median"] == pytest.approx(0.9)
    assert summary["jax lightcl"]["ratios"] == pytest.approx([1.1, 0.75, 0.9])
    assert summary["jax lightcl"]["median"] == pytest.approx(0.9)


def test_a_measuring_process_times_both_jax_steps():
    figures = bench_huge_pages.child(steps=1, nf=2, torch=False)
    assert set(figures) == {"jax full", "jax lightcl"}
    for f in figures.values():
        assert f["wall_ms"] > 0 and f["user_ms"] >= 0 and f["sys_ms"] >= 0
        assert f["minor_faults"] >= 0


@pytest.mark.parametrize("argv", [["--pairs", "0"], ["--steps", "0"], ["--nf", "-1"]])
def test_the_cli_refuses_a_bad_setting(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench_huge_pages.main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "must be >= 1" in err


def test_the_measuring_processes_differ_in_the_tunable_only():
    environ = {"PATH": "/bin", "GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=0",
               "LIGHTCL_HUGE_PAGES": "0", "LIGHTCL_HUGE_PAGES_RAN_AGAIN": "1"}
    assert bench_huge_pages.child_environment(environ, False) == {
        "PATH": "/bin", "GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}
    assert bench_huge_pages.child_environment(environ, True) == {
        "PATH": "/bin", "GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"}
    assert bench_huge_pages.child_environment({"PATH": "/bin"}, False) == {"PATH": "/bin"}

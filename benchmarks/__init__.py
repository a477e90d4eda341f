"""Benchmarks, probes and checks of lightcl_jax: ``python -m benchmarks.NAME`` (README.md here).

Importing the package sets up the process of the command ``python -m`` starts,
before the command's module and JAX load
(`lightcl_jax.process.prepare_command_process`): the ones that time or
measure train steps as ``experiments.run`` takes them run again with glibc's
malloc asking for huge pages (`run_with_huge_pages`; ``LIGHTCL_HUGE_PAGES=0``
turns it off), and ``side_by_side.run_ours`` also caps malloc's arenas as
``experiments.run`` does. ``bench_huge_pages`` is left out: it starts its own
processes with and without the tunable. Any other import of the package (a test)
changes nothing.
"""

from lightcl_jax.process import prepare_command_process

prepare_command_process(__name__, huge_pages=("bench_rss", "bench_step", "bench_vs_torch",
                                              "profile_step", "side_by_side.run_ours"),
                        capped_arenas=("side_by_side.run_ours",))

"""The commands a user runs: ``python -m experiments.run`` and the others here (README.md).

Importing the package sets up the process of the command ``python -m`` starts,
before the command's module and JAX load
(`lightcl_jax.process.prepare_command_process`): ``run``, ``compare``
and ``pretrain`` run again with glibc's malloc asking for huge pages
(`run_with_huge_pages`; ``LIGHTCL_HUGE_PAGES=0`` turns it off), and ``run`` and
``pretrain`` cap malloc's arenas (`limit_malloc_arenas`). Any other import of the
package (a test, a benchmark) changes nothing.
"""

from lightcl_jax.process import prepare_command_process

prepare_command_process(__name__, huge_pages=("run", "compare", "pretrain"),
                        capped_arenas=("run", "pretrain"))

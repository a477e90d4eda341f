"""What the running process holds and how its C library allocates: its peak resident memory,
as the operating system counts it; glibc's malloc arenas, freed pages and huge pages."""

from __future__ import annotations

import ctypes
import os
import resource
import sys


def peak_rss_mb() -> float:
    """The peak resident set size of this process so far, in MiB (``getrusage``'s ``ru_maxrss``).

    Everything the process holds counts: arrays, compiled programs, the Python
    interpreter and its libraries, the data in memory, allocator caches.
    """
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports kibibytes, macOS bytes.
    return peak / 2 ** 20 if sys.platform == "darwin" else peak / 2 ** 10


# glibc's mallopt parameter for the number of malloc arenas.
_M_ARENA_MAX = -8


def limit_malloc_arenas(arenas: int = 2) -> bool:
    """Caps glibc's malloc arenas at ``arenas`` for the threads created from now on.

    glibc gives threads their own arenas (up to 8 per core), and memory freed in
    one stays with it; JAX's and XLA's threads then hold more resident memory
    than they use; capped, a run's peak resident memory is lower with the same
    results (docs/memory.md, from `benchmarks.bench_rss`). `prepare_command_process`
    calls it for the commands that train; a script of one's own calls it before
    importing JAX (after `run_with_huge_pages`). Returns whether it applied (False
    where the C library is not glibc: it changes nothing there).
    """
    mallopt = _glibc("mallopt")
    return mallopt is not None and mallopt(_M_ARENA_MAX, arenas) == 1


def release_free_memory() -> bool:
    """Hands the C heap's free pages back to the operating system (glibc's ``malloc_trim``).

    Compiling a program (LLVM) allocates and frees a few hundred MB; glibc
    keeps the freed pages, and a step's large buffers, which glibc maps
    afresh, then come on top of them. Released after the initialisation
    and after each step's compilation, a run peaks lower (docs/memory.md, from
    `benchmarks.bench_rss`). Costs a few milliseconds; changes no result.
    Returns whether it applied (False where the C library is not glibc).
    """
    trim = _glibc("malloc_trim")
    if trim is None:
        return False
    trim(0)
    return True


def _glibc(name: str):
    """The C library's function ``name`` where it is glibc's (on Linux), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return getattr(ctypes.CDLL(None), name)
    except (OSError, AttributeError):
        return None


# glibc >= 2.35: malloc asks the kernel for transparent huge pages for the memory it maps.
HUGE_PAGES_TUNABLE = "glibc.malloc.hugetlb=1"
HUGE_PAGES_SWITCH = "LIGHTCL_HUGE_PAGES"  # "0": never run again with the tunable
_RAN_AGAIN = "LIGHTCL_HUGE_PAGES_RAN_AGAIN"  # set in the command run again: never twice


def huge_pages_environment(environ, libc_version: str, thp_mode: str) -> dict | None:
    """The environment to run this command again with, or None where it would change nothing.

    Args:
      environ: the process's environment.
      libc_version: ``os.confstr("CS_GNU_LIBC_VERSION")`` (``"glibc 2.36"``), "" elsewhere.
      thp_mode: the contents of ``/sys/kernel/mm/transparent_hugepage/enabled``
        (``"always [madvise] never"``), "" where it does not exist.

    None where the switch says ``0``, the tunable is set already (whatever its
    value: the user's choice stands), this is the command run again already, the
    C library is not glibc 2.35 or newer (older ones ignore it), or the kernel
    gives huge pages only where nobody asks (``never``) or everywhere anyway
    (``always``). Raises ValueError on a switch other than ``0``, ``1`` or empty
    (the default, ``1``).
    """
    switch = environ.get(HUGE_PAGES_SWITCH) or "1"
    if switch not in ("0", "1"):
        raise ValueError(f"{HUGE_PAGES_SWITCH}={switch!r}: use 1 (the default: run with "
                         f"{HUGE_PAGES_TUNABLE} where it helps) or 0 (never)")
    tunables = environ.get("GLIBC_TUNABLES", "")
    if switch == "0" or "glibc.malloc.hugetlb" in tunables or environ.get(_RAN_AGAIN):
        return None
    name, _, version = libc_version.partition(" ")
    try:
        major, minor = (int(part) for part in version.split(".")[:2])
    except ValueError:
        return None
    if name != "glibc" or (major, minor) < (2, 35) or "[madvise]" not in thp_mode:
        return None
    return {**environ, "GLIBC_TUNABLES": ":".join(filter(None, [tunables, HUGE_PAGES_TUNABLE])),
            _RAN_AGAIN: "1"}


def huge_pages_here(environ=None) -> dict | None:
    """`huge_pages_environment` for this machine (its C library and kernel); ``environ``
    defaults to this process's."""
    try:
        libc = os.confstr("CS_GNU_LIBC_VERSION") or ""
    except (AttributeError, ValueError, OSError):
        libc = ""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            thp = f.read()
    except OSError:
        thp = ""
    return huge_pages_environment(os.environ if environ is None else environ, libc, thp)


def run_with_huge_pages() -> None:
    """Runs this command again, in this process, with glibc's malloc asking for huge pages.

    A train step's temporaries (and Eigen's packing blocks) are larger than glibc
    keeps for reuse, so it maps them afresh every step and the kernel faults them in
    4 KB at a time. With ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` (read only when a
    process starts) malloc asks for transparent huge pages for what it maps and for
    its heaps: far fewer faults and TLB misses, the same values (docs/performance.md
    has the figures). `prepare_command_process` does this for the
    commands of `experiments` and `benchmarks`; a script of one's own calls it
    first. It returns without doing anything where `huge_pages_here` says it would
    change nothing (``LIGHTCL_HUGE_PAGES=0`` turns it off), in an interactive
    session, and where the script is not what the command line ran (``%run`` in
    IPython, a script read from stdin). The command line is the original one
    (``sys.orig_argv``), so the command runs as typed, in the same process (same
    PID), once: the command run again carries a marker.
    """
    env = huge_pages_here()
    if env is None or sys.flags.interactive or not _command_runs_this_script():
        return
    _run_again(env)


def _run_again(env: dict) -> None:
    """Replaces this process with its own command line (``sys.orig_argv``) in ``env``."""
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


def started_command(package: str, argv=None, orig_argv=None) -> str | None:
    """The module of ``package`` that ``python -m`` is starting (``"run"`` for ``python -m
    experiments.run``), or None: for a package's ``__init__`` to ask.

    ``python -m package.name ARGS`` imports ``package`` while it locates the module,
    and meanwhile ``sys.argv`` is ``["-m", *ARGS]`` (the module's path replaces
    ``"-m"`` just before the module runs) and ``sys.orig_argv`` ends with ``["-m",
    "package.name", *ARGS]``. Any other import of the package (by a test, a module,
    a command of another package, ``python -c``) gives None. ``argv`` and
    ``orig_argv`` default to ``sys``'s.
    """
    argv = sys.argv if argv is None else argv
    orig = getattr(sys, "orig_argv", []) if orig_argv is None else orig_argv
    n = len(argv)
    if (not argv or argv[0] != "-m" or len(orig) < n + 2 or orig[len(orig) - n - 1] != "-m"
            or orig[len(orig) - n + 1:] != argv[1:]):
        return None
    module = orig[len(orig) - n]
    return module[len(package) + 1:] if module.startswith(package + ".") else None


def prepare_command_process(package: str, huge_pages=(), capped_arenas=()) -> None:
    """Sets up the process of the command of ``package`` that ``python -m`` is starting,
    before the command's module (and JAX) is imported; a package's ``__init__`` calls it.

    Where that command (`started_command`: ``"run"``, ``"side_by_side.run_ours"``) is
    in ``huge_pages``, it runs again with glibc's malloc asking for huge pages (as
    `run_with_huge_pages`, on the same conditions); where it is in ``capped_arenas``,
    malloc's arenas are capped (`limit_malloc_arenas`). Any other import of the
    package, and any other command, changes nothing.
    """
    command = started_command(package)
    if command is None:
        return
    if command in huge_pages:
        env = huge_pages_here()
        if env is not None and not sys.flags.interactive:
            _run_again(env)
    if command in capped_arenas:
        limit_malloc_arenas()


def _command_runs_this_script() -> bool:
    """Whether this process's command line ran the script now running (a file, ``-m``'s
    module or ``-c``'s code, with these arguments), not a host that runs it (IPython's
    ``%run``, `runpy` with ``alter_sys``) or a script read from stdin."""
    argv, orig = sys.argv, getattr(sys, "orig_argv", [])
    n = len(argv)
    if not argv or argv[0] in ("", "-") or len(orig) <= n or orig[len(orig) - n + 1:] != argv[1:]:
        return False
    ran, flag = orig[len(orig) - n], orig[len(orig) - n - 1]
    if argv[0] == "-c":
        return flag == "-c"
    if flag == "-m":
        spec = getattr(sys.modules.get("__main__"), "__spec__", None)
        return spec is not None and spec.name in (ran, ran + ".__main__")
    return ran == argv[0]

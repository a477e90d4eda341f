"""What a lightcl_jax process holds: peak resident memory of imports and of whole runs.

    python -m benchmarks.bench_rss [--dataset digits32] [--nf 64] [--epochs 2] [--json PATH]

Each figure comes from a fresh Python process (``getrusage``'s peak resident
set size, MiB), one after the other:

* the imports: the interpreter, then JAX with its CPU client started, Flax
  and optax, the library's training loop, and scikit-learn (which the
  library no longer imports: the digits are read from its bundled file);
* a LightCL run (`train_and_evaluate`, no checkpoints) three ways, with
  each run's accuracy and wall time: as the library ran before either cut
  (glibc's malloc arenas as they are, freed heap pages kept); with the
  arenas capped at 2 (`lightcl_jax.process.limit_malloc_arenas`,
  as the experiment scripts do before JAX starts); and, as every run now
  goes, capped and with the compiler's freed memory handed back after the
  initialisation and each compilation
  (`lightcl_jax.process.release_free_memory`).
"""

from __future__ import annotations

import json
import subprocess
import sys

from experiments.cli.common import Parser, write_json_atomic

IMPORTS = """
import json, resource
def peak(): return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
out = {"python": peak()}
import jax, jax.numpy as jnp; jnp.zeros(1).block_until_ready(); out["jax"] = peak()
import flax, optax; out["flax, optax"] = peak()
import lightcl_jax.training.loop; out["lightcl_jax.training.loop"] = peak()
import sklearn.datasets; out["scikit-learn"] = peak()
print(json.dumps(out))
"""

RUN = """
import json, sys
mode = sys.argv[1]
if mode != "neither":
    from lightcl_jax.process import limit_malloc_arenas
    assert limit_malloc_arenas(2)
if mode != "capped, released":  # the library releases; undo it for the comparison
    import lightcl_jax.compiler, lightcl_jax.training.state
    for module in (lightcl_jax.compiler, lightcl_jax.training.state):
        module.release_free_memory = lambda: False
from lightcl_jax.config import Config
from lightcl_jax.training.loop import train_and_evaluate
config = Config(**json.loads(sys.argv[2]))
r = train_and_evaluate(config)
print(json.dumps({"peak_rss_mb": r["resources"]["peak_rss_mb"], "avg_til": r["avg_til"],
                  "avg_cil": r["avg_cil"], "wall_time_s": r["wall_time_s"]}))
"""


MODES = {"neither": "arenas uncapped, nothing released",
         "capped": "arenas capped, nothing released",
         "capped, released": "arenas capped, freed memory released (as runs go)"}


def _child(code: str, *args: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"bench_rss: a child process failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = Parser(prog="python -m benchmarks.bench_rss", description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="digits32")
    p.add_argument("--nf", type=int, default=64)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--json", default=None, metavar="PATH")
    args = p.parse_args(argv)
    from lightcl_jax.config import Config
    settings = {"dataset": args.dataset, "nf": args.nf, "epochs": args.epochs}
    try:
        Config(**settings).resolved()
    except ValueError as err:
        p.error(str(err))
    imports = _child(IMPORTS)
    print("peak resident MB after importing (cumulative): " +
          ", ".join(f"{name} {mb:.0f}" for name, mb in imports.items()))
    runs = {}
    for name in MODES:
        runs[name] = _child(RUN, name, json.dumps(settings))
        print(f"LightCL on {args.dataset}, nf {args.nf}, {args.epochs} epochs a task, "
              f"{MODES[name]}: peak {runs[name]['peak_rss_mb']:.0f} MB, TIL "
              f"{runs[name]['avg_til']:.2f}, CIL {runs[name]['avg_cil']:.2f}, "
              f"{runs[name]['wall_time_s']:.1f} s")
    if args.json:
        write_json_atomic(args.json, {"settings": settings, "imports": imports, "runs": runs})
    return 0


if __name__ == "__main__":  # benchmarks/__init__.py has set up the process
    sys.exit(main())

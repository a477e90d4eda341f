"""Edge-memory benchmark: what one train step costs, per strategy, at the paper's CIFAR-10 setting.

    python -m benchmarks.bench_memory --json out.json
    python -m benchmarks.bench_memory --no-torch          # without the PyTorch comparison

ResNet-18 (nf 64), 32x32x3 inputs, 10 classes in tasks of 2, batch 32, buffer 15,
pre-trained backbone (LightCL freezes stem + stages 1-3), a step of task 1. Per
strategy it prints and writes:

* ``xla_train_bytes``: XLA's memory analysis of the compiled train step, arguments
  + temporaries + outputs not aliased to donated arguments (its parts too);
* ``train_step_flops``: XLA's cost analysis of the same step;
* ``step_time_s``: median wall time of ``--steps`` steps after ``--warmup`` ones;
* ``xla_run_flops``: a whole run's train FLOPs by XLA's count (task 0's step, compiled
  too, and the later tasks' step, times the run's steps; `run_flops`);
* ``theory_mem_mb`` / ``theory_train_flops``: `theoretical_cost`, the paper's way of
  counting a whole run, beside the paper's Table 1 figures;

then the lightcl / finetune ratios, LightCL's XLA bytes taken apart term by term
against the theoretical count, and (torch installed: ``pip install -e .[bench]``)
the same LightCL step written in PyTorch (`benchmarks.torch_reference`), timed in
the same run with the same number of threads. Time it on a quiet machine: with
every core busy, anything else running slows both steps several times over.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

SETTING = dict(nf=64, image_size=32, channels=3, num_classes=10, classes_per_task=2,
               batch_size=32, buffer_size=15)
# Rows: name -> (strategy, sparse execution or None). ``lightcl_sparse`` runs the
# reference's way (pruned weights held at zero in dense layers), ``lightcl_compact`` the
# same pruned network as narrower layers.
ROWS = {"finetune": ("finetune", None), "ewc": ("ewc", None), "er": ("er", None),
        "derpp": ("derpp", None), "agem": ("agem", None), "lightcl": ("lightcl", None),
        "lightcl_sparse": ("lightcl", "masked"), "lightcl_compact": ("lightcl", "compact")}
MIB = 2 ** 20


def lightcl_terms(config, theory: dict) -> dict:
    """LightCL's step bytes as XLA holds them at the step's peak, term by term (MiB).

    The step is compiled once more with XLA's dump on and its live set at the
    peak read value by value (`benchmarks.live`); each value goes
    to a term of the theoretical count or to what the theory does not count.
    Beside it, `theoretical_cost`'s terms. ``largest`` lists the live values of
    1 MiB or more, for a reader who wants to check the sorting.
    """
    from lightcl_jax.accounting.compiled import lowered_train_step
    from benchmarks.live import peak_live_set, train_step_terms, value_terms

    shape = (SETTING["image_size"], SETTING["image_size"], SETTING["channels"])
    lowered, _ = lowered_train_step(config, shape, SETTING["num_classes"],
                                    SETTING["classes_per_task"], task_index=1, pretrained=True)
    live = peak_live_set(lowered)
    largest = [{"value": v.name, "mb": v.bytes / MIB, "term": term, "op_name": v.op_name,
                "argument": v.parameter, "role": v.role}
               for v, term in sorted(value_terms(live), key=lambda vt: -vt[0].bytes)
               if v.bytes >= MIB]
    return {
        "xla_mb": {**{k: b / MIB for k, b in train_step_terms(live).items()},
                   "total": live.step_bytes / MIB},
        "theory_mb": {**theory["mem_breakdown_mb"], "total": theory["mem_mb"]},
        "largest": largest,
    }


def run_flops(task0_step_flops: float, later_step_flops: float) -> float:
    """A whole run's train FLOPs by XLA's count at the paper's CIFAR-10 setting: task 0's
    compiled step and the later tasks' one, times the steps a run takes (each task's
    45000 / 5 training samples in whole batches of 32, 50 epochs), as a run's
    ``resources.train_flops`` counts them."""
    from lightcl_jax.accounting import PAPER_SETTINGS
    paper = PAPER_SETTINGS["cifar10"]
    steps = paper["epochs"] * ((paper["train_samples"] // paper["num_tasks"])
                               // paper["batch_size"])
    return steps * (task0_step_flops + (paper["num_tasks"] - 1) * later_step_flops)


def measure(steps: int, warmup: int, rows: list[str], torch_threads: int | None) -> dict:
    import jax

    from benchmarks.bench_step import time_steps
    from lightcl_jax.accounting import PAPER_SETTINGS, PAPER_TABLE1, theoretical_cost
    from lightcl_jax.accounting.compiled import compiled_train_step_cost
    from lightcl_jax.config import Config

    shape = (SETTING["image_size"], SETTING["image_size"], SETTING["channels"])
    out = {"device": f"{jax.devices()[0].device_kind} ({jax.default_backend()})",
           "setting": SETTING, "strategies": {}}
    for name in rows:
        strategy, execution = ROWS[name]
        sparse = execution is not None
        buffer = ({"buffer_size": SETTING["buffer_size"]}
                  if strategy in ("er", "derpp", "agem", "lightcl") else {})
        config = Config(strategy=strategy, strategy_args=buffer, dataset="cifar10",
                        nf=SETTING["nf"], batch_size=SETTING["batch_size"], sparse=sparse,
                        sparse_execution=execution or "masked").resolved()
        print(f"  {name}: compiling and timing ...", file=sys.stderr, flush=True)
        cost = compiled_train_step_cost(config, shape, SETTING["num_classes"],
                                        SETTING["classes_per_task"], task_index=1,
                                        pretrained=True)
        times = time_steps(config, shape, SETTING["num_classes"], SETTING["classes_per_task"],
                           steps, task_index=1, warmup=warmup, pretrained=True)
        theory = theoretical_cost(strategy, sparse=sparse, **PAPER_SETTINGS["cifar10"])
        paper = PAPER_TABLE1["cifar10"].get("lightcl_sparse" if sparse else name,
                                            {"mem_mb": None, "train_flops": None})  # A-GEM
        first = compiled_train_step_cost(config, shape, SETTING["num_classes"],
                                         SETTING["classes_per_task"], task_index=0,
                                         pretrained=True, quick=True)
        row = {
            "xla_train_bytes": cost["train_bytes"],
            "argument_bytes": cost["argument_bytes"], "temp_bytes": cost["temp_bytes"],
            "output_bytes": cost["output_bytes"], "alias_bytes": cost["alias_bytes"],
            "train_step_flops": cost["flops"],
            "step_time_s": statistics.median(times), "step_times_s": times,
            "task0_step_flops": first["flops"],
            "xla_run_flops": run_flops(first["flops"], cost["flops"]),
            "theory_mem_mb": theory["mem_mb"], "theory_train_flops": theory["train_flops"],
            "paper_mem_mb": paper["mem_mb"], "paper_train_flops": paper["train_flops"],
            "phase": cost["phase"],
        }
        if name == "lightcl":
            row["terms"] = lightcl_terms(config, theory)
        out["strategies"][name] = row
    rows_ = out["strategies"]
    if "lightcl" in rows_ and "finetune" in rows_:
        a, b = rows_["lightcl"], rows_["finetune"]
        out["lightcl_over_finetune"] = {
            "xla_train_bytes": a["xla_train_bytes"] / b["xla_train_bytes"],
            "train_step_flops": a["train_step_flops"] / b["train_step_flops"],
            "step_time_s": a["step_time_s"] / b["step_time_s"],
        }
    if torch_threads is not None and "lightcl" in rows_:
        from benchmarks.torch_reference import time_lightcl_step
        print("  lightcl in PyTorch: timing ...", file=sys.stderr, flush=True)
        try:
            torch = time_lightcl_step(steps=steps, warmup=warmup, threads=torch_threads,
                                      nf=SETTING["nf"], image_size=SETTING["image_size"],
                                      num_classes=SETTING["num_classes"],
                                      batch_size=SETTING["batch_size"],
                                      buffer_size=SETTING["buffer_size"])
        except ImportError as err:
            print(f"  skipped the PyTorch comparison: {err}", file=sys.stderr)
            out["torch"] = None
        else:
            out["torch"] = {**torch, "jax_over_torch_step_time":
                            rows_["lightcl"]["step_time_s"] / torch["median_s"]}
    return out


def report(out: dict) -> str:
    lines = [f"device: {out['device']}; ResNet-18 nf {SETTING['nf']}, "
             f"{SETTING['image_size']}x{SETTING['image_size']}x{SETTING['channels']}, batch "
             f"{SETTING['batch_size']}, buffer {SETTING['buffer_size']}, a step of task 1", "",
             f"{'strategy':<15}{'XLA MB':>9}{'GFLOP':>9}{'step s':>9}{'theory MB':>11}"
             f"{'paper MB':>10}{'XLA run FLOPs':>15}{'theory FLOPs':>14}{'paper FLOPs':>13}"]
    for name, r in out["strategies"].items():
        paper_mb, paper_flops = (("-", "-") if r["paper_mem_mb"] is None else
                                 (f"{r['paper_mem_mb']:.1f}", f"{r['paper_train_flops']:.3g}"))
        lines.append(f"{name:<15}{r['xla_train_bytes'] / MIB:9.1f}"
                     f"{r['train_step_flops'] / 1e9:9.2f}{r['step_time_s']:9.3f}"
                     f"{r['theory_mem_mb']:11.1f}{paper_mb:>10}"
                     f"{r['xla_run_flops']:15.3g}{r['theory_train_flops']:14.3g}"
                     f"{paper_flops:>13}")
    if "lightcl_over_finetune" in out:
        ratio = out["lightcl_over_finetune"]
        lines += ["", f"lightcl / finetune: XLA bytes {ratio['xla_train_bytes']:.2f}x, "
                  f"FLOPs per step {ratio['train_step_flops']:.2f}x, "
                  f"step time {ratio['step_time_s']:.2f}x"]
    if "lightcl" in out["strategies"]:
        terms = out["strategies"]["lightcl"]["terms"]
        lines += ["", "lightcl step bytes, term by term (MB): live at XLA's peak | theory"]
        x, t = terms["xla_mb"], terms["theory_mb"]
        pairs = [("weights, each once", x["weights"], t["weights"]),
                 ("a weight's old value, read after its update", x["weights held twice"], 0.0),
                 ("gradients", x["gradients"], t["gradients"]),
                 ("optimizer state", x["optimizer state"], t["optimizer_state"]),
                 ("forward activations the backward reads", x["forward activations"],
                  t["activations"]),
                 ("memory state (buffer, features, taps, masks)", x["memory state"],
                  t["buffer"] + t["stored_features"] + t["strategy_state"]),
                 ("BatchNorm running statistics", x["BatchNorm running statistics"], 0.0),
                 ("training batch", x["training batch"], 0.0),
                 ("scratch (activation gradients, layout copies)", x["scratch"], 0.0),
                 ("other", x["other"], 0.0),
                 ("left unused by XLA's packing of buffers", x["packing"], 0.0),
                 ("total", x["total"], t["total"])]
        lines += [f"  {label:<50}{a:8.1f} | {b:6.1f}" for label, a, b in pairs]
    if out.get("torch"):
        torch = out["torch"]
        lines += ["", f"lightcl step, JAX {out['strategies']['lightcl']['step_time_s']:.3f} s vs "
                  f"PyTorch {torch['torch_version']} ({torch['threads']} threads) "
                  f"{torch['median_s']:.3f} s: {torch['jax_over_torch_step_time']:.2f}x"]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_memory",
                                description=__doc__.splitlines()[0])
    p.add_argument("--json", default=None, help="write the figures to this file")
    p.add_argument("--steps", type=int, default=5, help="timed steps (>= 5)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (>= 1)")
    p.add_argument("--strategies", default=",".join(ROWS),
                   help=f"comma-separated rows among {', '.join(ROWS)}")
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch comparison")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                   help="PyTorch threads (default: every core, as XLA uses)")
    args = p.parse_args(argv)
    rows = args.strategies.split(",")
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        p.error(f"unknown rows {unknown}; known: {', '.join(ROWS)}")
    if args.steps < 5:
        p.error(f"--steps must be >= 5 (a median over at least 5 steps); got {args.steps}")
    if args.warmup < 1:
        p.error(f"--warmup must be >= 1 (the first step compiles); got {args.warmup}")
    if args.threads < 1:
        p.error(f"--threads must be >= 1; got {args.threads}")
    out = measure(args.steps, args.warmup, rows, None if args.no_torch else args.threads)
    print(report(out))
    if args.json:
        from experiments.cli.common import write_json_atomic
        write_json_atomic(args.json, out)
        print(f"figures written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

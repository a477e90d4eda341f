"""JAX's train steps against the same steps in PyTorch, timed side by side in one process.

    python -m benchmarks.bench_vs_torch [--rounds 5] [--steps 4] [--json PATH]

At the reference's setting (ResNet-18 nf 64, 32x32x3, batch 32, buffer 15, 10
classes in tasks of 2), two steps each way:

  * ``full``: every layer trains (task 0 without pre-training, finetune, every
    baseline, pre-training): our LightCL task-0 step against
    `benchmarks.torch_reference.FullStep` (the authors' ``train``);
  * ``lightcl``: a step of task 1 without pre-training (stem + stages 1-3
    frozen, the regulation loss on the buffer): ours, whose buffer starts at
    stage 4 from its stored features, against the authors' way, the buffer
    through every layer (`benchmarks.torch_reference.LightCLStep`).

Each step is also compiled with XLA's default options (``{}`` for
`lightcl_jax.compiler.COMPILER_OPTIONS`: YNNPACK convolutions), the evidence
for the library's choice. Rounds alternate all of them (``--steps`` timed
steps of each, after a pause that lets the previous one's worker threads go
idle), so a change in the machine's speed touches every figure. Prints per step the median wall time of each, the ratio
JAX / PyTorch, the FLOPs (XLA's count of our step; the theoretical count of
the PyTorch step, `lightcl_jax.accounting.theory`'s conventions with the
buffer's frozen-layer forward added) and the GFLOP/s each sustains, beside
the machine's practical peak: a 2048^3 float32 matmul in JAX and in PyTorch.
PyTorch uses as many threads as there are cores (``--threads``), as XLA does.
Where JAX's default backend is a GPU, PyTorch's steps run on CUDA too
(``--torch-device``; `benchmarks/accelerator_check.sh` runs it so).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

from experiments.cli.common import write_json_atomic

SETTING = dict(nf=64, image_size=32, channels=3, num_classes=10, classes_per_task=2,
               batch_size=32, buffer_size=15)
PAUSE_S = 0.5  # lets spinning worker threads of the framework just timed go idle


def _jax_steps(compiler_options: dict) -> dict:
    """{"full": [step, state, memory, x, y, offset], "lightcl": ...}: compiled with
    ``compiler_options`` in place of the library's, warmed up."""
    import jax.numpy as jnp

    from benchmarks.bench_step import prepared_step
    from lightcl_jax import compiler
    from lightcl_jax.config import Config

    config = Config(strategy="lightcl", strategy_args={"buffer_size": SETTING["buffer_size"]},
                    dataset="cifar10", nf=SETTING["nf"], batch_size=SETTING["batch_size"])
    shape = (SETTING["image_size"], SETTING["image_size"], SETTING["channels"])
    library_options, compiler.COMPILER_OPTIONS = compiler.COMPILER_OPTIONS, compiler_options
    try:
        out = {}
        for name, task in (("full", 0), ("lightcl", 1)):
            step, state, memory, x, y = prepared_step(config, shape, SETTING["num_classes"],
                                                      SETTING["classes_per_task"], task)
            offset = jnp.asarray(task * SETTING["classes_per_task"], jnp.int32)
            out[name] = [step, state, memory, x, y, offset]
        return out
    finally:
        compiler.COMPILER_OPTIONS = library_options


def _time_jax(entry, steps: int) -> list[float]:
    import jax
    step, state, memory, x, y, offset = entry
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        state, memory, metrics = step(state, memory, x, y, offset)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    entry[1], entry[2] = state, memory
    return times


def _time_torch(entry, steps: int) -> list[float]:
    step, x, y = entry
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step(x, y)  # .item() waits for the result
        times.append(time.perf_counter() - start)
    return times


def matmul_peak(size: int = 2048, repeats: int = 10, torch_device: str = "cpu") -> dict:
    """GFLOP/s of a size^3 float32 matmul in JAX and in PyTorch (on ``torch_device``;
    best of ``repeats``)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    a = np.random.default_rng(0).random((size, size), np.float32)
    ja = jnp.asarray(a)
    matmul = jax.jit(lambda a: a @ a)
    matmul(ja).block_until_ready()
    ta = torch.from_numpy(a).to(torch_device)

    def torch_matmul():
        out = ta @ ta
        if out.is_cuda:  # CUDA runs asynchronously: wait for the product
            torch.cuda.synchronize()
        return out

    out = {}
    for name, run in (("jax", lambda: matmul(ja).block_until_ready()), ("torch", torch_matmul)):
        run()
        best = min(_elapsed(run) for _ in range(repeats))
        out[name] = 2 * size ** 3 / best / 1e9
        time.sleep(PAUSE_S)
    return out


def _elapsed(run) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def torch_step_flops() -> dict:
    """Theoretical FLOPs of the PyTorch steps (`theoretical_cost`'s conventions)."""
    from lightcl_jax.accounting.theory import layer_table
    rows = layer_table(SETTING["nf"], SETTING["image_size"], SETTING["num_classes"],
                       SETTING["channels"])
    forward = sum(r["macs"] for r in rows)
    stage4 = sum(r["macs"] for r in rows if r["group"] in ("stage4", "head"))
    batch, buffer = SETTING["batch_size"], SETTING["buffer_size"]
    # Full step: forward + backward (twice the forward) of every layer.
    full = 2 * 3 * forward * batch
    # LightCL, the authors' way: batch and buffer through every layer, backward of stage 4.
    lightcl = 2 * (forward + 2 * stage4) * (batch + buffer)
    return {"full": float(full), "lightcl": float(lightcl)}


def measure(rounds: int, steps: int, threads: int, torch_device: str = "cpu") -> dict:
    import jax
    import torch

    from benchmarks.torch_reference import build_full_step, build_lightcl_step
    torch.set_num_threads(threads)
    settings = {k: SETTING[k] for k in ("nf", "image_size", "channels", "num_classes",
                                        "classes_per_task", "batch_size")}
    settings["device"] = torch_device
    torch_steps = {"full": build_full_step(**settings),
                   "lightcl": build_lightcl_step(**settings, buffer_size=SETTING["buffer_size"])}
    from lightcl_jax.compiler import COMPILER_OPTIONS
    # The library's options against XLA's defaults: they are XLA:CPU's, so elsewhere the
    # two compile to the same program and only the first is timed.
    variants = {"jax": COMPILER_OPTIONS}
    if jax.default_backend() == "cpu":
        variants["jax_xla_defaults"] = {}
    jax_steps = {side: _jax_steps(options) for side, options in variants.items()}
    for name in torch_steps:  # warm-up (PyTorch's first steps allocate)
        _time_torch(torch_steps[name], 2)
    times = {name: {**{side: [] for side in variants}, "torch": []} for name in torch_steps}
    for _ in range(rounds):
        for name in torch_steps:
            for side in variants:
                times[name][side] += _time_jax(jax_steps[side][name], steps)
                time.sleep(PAUSE_S)
            times[name]["torch"] += _time_torch(torch_steps[name], steps)
            time.sleep(PAUSE_S)
    flops = {"jax": {name: jax_steps["jax"][name][0].cost["flops"] for name in torch_steps},
             "torch": torch_step_flops()}
    flops["jax_xla_defaults"] = flops["jax"]
    out = {"device": f"{jax.devices()[0].device_kind} ({jax.default_backend()})",
           "torch_version": torch.__version__, "torch_device": torch_device,
           "threads": threads, "setting": SETTING,
           "steps": {}}
    for name, by in times.items():
        row = {side: {"median_s": statistics.median(t), "times_s": t} for side, t in by.items()}
        for side in row:
            row[side]["flops"] = flops[side][name]
            row[side]["gflop_per_s"] = flops[side][name] / row[side]["median_s"] / 1e9
        row["jax_over_torch"] = row["jax"]["median_s"] / row["torch"]["median_s"]
        if "jax_xla_defaults" in row:
            row["xla_defaults_over_torch"] = (row["jax_xla_defaults"]["median_s"]
                                              / row["torch"]["median_s"])
        out["steps"][name] = row
    out["matmul_gflop_per_s"] = matmul_peak(torch_device=torch_device)
    return out


def report(out: dict) -> str:
    lines = [f"JAX on {out['device']}, PyTorch {out['torch_version']} on "
             f"{out['torch_device']} with {out['threads']} threads; "
             "ResNet-18 nf 64, 32x32x3, batch 32, buffer 15"]
    if out.get("glibc_tunables"):  # both frameworks share this process's environment
        lines.append(f"both ran with GLIBC_TUNABLES={out['glibc_tunables']}")
    lines += ["",
              f"{'step':<10}{'JAX ms':>9}{'PyTorch ms':>12}{'JAX/PyTorch':>13}"
              f"{'JAX GFLOP':>11}{'GFLOP/s':>9}{'PyTorch GFLOP':>15}{'GFLOP/s':>9}"]
    for name, row in out["steps"].items():
        j, t = row["jax"], row["torch"]
        lines.append(f"{name:<10}{j['median_s'] * 1e3:9.1f}{t['median_s'] * 1e3:12.1f}"
                     f"{row['jax_over_torch']:13.2f}{j['flops'] / 1e9:11.1f}"
                     f"{j['gflop_per_s']:9.0f}{t['flops'] / 1e9:15.1f}{t['gflop_per_s']:9.0f}")
    if all("xla_defaults_over_torch" in row for row in out["steps"].values()):
        lines += ["", "with XLA's default kernels (YNNPACK convolutions, lightcl_jax.compiler): "
                  + ", ".join(f"{name} {row['jax_xla_defaults']['median_s'] * 1e3:.1f} ms "
                              f"({row['xla_defaults_over_torch']:.2f}x PyTorch)"
                              for name, row in out["steps"].items())]
    peak = out["matmul_gflop_per_s"]
    lines += ["", f"practical peak, a 2048^3 float32 matmul: JAX {peak['jax']:.0f} GFLOP/s, "
                  f"PyTorch {peak['torch']:.0f} GFLOP/s"]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_vs_torch",
                                description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5, help="alternations of the frameworks")
    p.add_argument("--steps", type=int, default=4, help="timed steps of each per round")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                   help="PyTorch threads (default: every core, as XLA uses)")
    p.add_argument("--torch-device", default="auto",
                   help="where PyTorch's steps run: cpu, cuda, or auto (default: cuda where "
                        "JAX's default backend is a GPU, else cpu)")
    p.add_argument("--json", default=None, help="also write the figures here")
    args = p.parse_args(argv)
    for name in ("rounds", "steps", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1; got {getattr(args, name)}")
    import importlib.util
    if importlib.util.find_spec("torch") is None:
        from benchmarks.torch_reference import TORCH_MISSING
        p.error(TORCH_MISSING)
    from benchmarks.torch_reference import torch_device
    if args.torch_device == "auto":
        import jax
        args.torch_device = "cuda" if jax.default_backend() in ("gpu", "cuda") else "cpu"
    try:
        torch_device(args.torch_device)
    except ValueError as err:
        p.error(f"--torch-device: {err}")
    out = measure(args.rounds, args.steps, args.threads, args.torch_device)
    out["glibc_tunables"] = os.environ.get("GLIBC_TUNABLES")  # huge pages or not
    print(report(out))
    if args.json:
        write_json_atomic(args.json, out)
    return 0


if __name__ == "__main__":  # benchmarks/__init__.py has set up the process
    sys.exit(main())

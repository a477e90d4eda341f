"""Why the model has its own BatchNorm: per-channel sums and BatchNorm timed three ways.

    python -m benchmarks.bench_batchnorm [--rounds 40] [--batch-size 32] [--json PATH]

At ResNet-18's four map shapes (nf 64, 32x32 input: 32x32x64 down to 4x4x512),
times, as compiled programs (median of ``--rounds`` calls, the ways alternating):

  * a per-channel sum of the map: ``x.sum((0, 1, 2))`` (what Flax's
    `nn.BatchNorm` and autodiff of its broadcasts take) against
    `lightcl_jax.model.batchnorm.channel_sums` (the same sum as two column
    sums of wider views);
  * BatchNorm + ReLU forward and backward (gradients of x, scale and bias of
    ``sum(relu(bn(x)) * g)``): Flax's `nn.BatchNorm` against the model's
    `BatchNorm`, and PyTorch's `BatchNorm2d` on channels-last maps when PyTorch
    is installed (``--threads``, default every core, as XLA).

Also prints the largest difference between the two JAX BatchNorms' gradients.
"""

from __future__ import annotations

import argparse
import os

from experiments.cli.common import median_ms, write_json_atomic


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_batchnorm",
                                description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--json", default=None, help="write the figures here")
    return p


def _jax_ways(shape):
    import flax.linen as nn
    import jax
    import numpy as np

    from lightcl_jax.compiler import jit
    from lightcl_jax.model.batchnorm import BatchNorm, channel_sums

    rng = np.random.default_rng(0)
    x, g = (jax.numpy.asarray(rng.normal(size=shape).astype(np.float32)) for _ in range(2))
    grads = {}
    for name, module in (("flax", nn.BatchNorm(momentum=0.9, epsilon=1e-5)),
                         ("ours", BatchNorm(momentum=0.9, epsilon=1e-5))):
        variables = module.init(jax.random.PRNGKey(0), x, use_running_average=False)

        def loss(params, x, module=module, stats=variables["batch_stats"]):
            y, _ = module.apply({"params": params, "batch_stats": stats}, x,
                                use_running_average=False, mutable=["batch_stats"])
            return (jax.nn.relu(y) * g).sum()
        grads[name] = (jit(jax.grad(loss, argnums=(0, 1))), variables["params"])
    sums = {"x.sum((0, 1, 2))": jit(lambda x: x.sum((0, 1, 2))), "channel_sums": jit(channel_sums)}
    ways = {f"sum: {name}": (lambda f=f: jax.block_until_ready(f(x))) for name, f in sums.items()}
    ways.update({f"bn fwd+bwd: {name}": (lambda f=f, p=p: jax.block_until_ready(f(p, x)))
                 for name, (f, p) in grads.items()})
    (flax_grad, flax_params), (our_grad, our_params) = grads["flax"], grads["ours"]
    diff = max(float(abs(a - b).max()) for a, b in zip(
        jax.tree_util.tree_leaves(flax_grad(flax_params, x)),
        jax.tree_util.tree_leaves(our_grad(our_params, x))))
    return ways, diff


def _torch_way(shape, threads):
    try:
        import torch
    except ImportError:
        return {}
    torch.set_num_threads(threads)
    n, h, w, c = shape
    x = torch.randn(n, c, h, w).contiguous(memory_format=torch.channels_last).requires_grad_()
    g = torch.randn(n, c, h, w).contiguous(memory_format=torch.channels_last)
    bn = torch.nn.BatchNorm2d(c)

    def step():
        torch.autograd.grad((torch.relu(bn(x)) * g).sum(), [x, bn.weight, bn.bias])
    return {"bn fwd+bwd: torch": step}


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.rounds < 1 or args.batch_size < 1 or args.threads < 1:
        raise SystemExit("bench_batchnorm: --rounds, --batch-size and --threads must be >= 1")
    results = []
    for size, channels in ((32, 64), (16, 128), (8, 256), (4, 512)):
        shape = (args.batch_size, size, size, channels)
        ways, diff = _jax_ways(shape)
        ways.update(_torch_way(shape, args.threads))
        ms = median_ms(ways, args.rounds)
        print(f"{shape}: " + ", ".join(f"{name} {value} ms" for name, value in ms.items())
              + f"; largest gradient difference ours - flax {diff:.2e}", flush=True)
        results.append({"shape": list(shape), "ms": ms, "max_grad_diff": diff})
    if args.json:
        write_json_atomic(args.json, {"rounds": args.rounds, "results": results})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

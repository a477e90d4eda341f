"""ResNet-18's 3x3 convolutions one by one: XLA's, as the library compiles them, and PyTorch's.

    python -m benchmarks.bench_conv [--rounds 10] [--batch-size 32] [--nf 64] [--json PATH]

At each 3x3 convolution shape of ResNet-18 on 32x32 inputs (nf 64: the
32x32x3 stem, then 32x32x64 to 4x4x512, the three stride-2 ones included),
times as compiled programs (median of ``--rounds`` calls, the ways alternating):

  * the forward convolution, its input gradient and its weight gradient, each
    a program of its own (the transpose of the convolution with respect to one
    operand, which is what autodiff emits), compiled with
    `lightcl_jax.compiler.jit`; and the same three in PyTorch (``F.conv2d``,
    ``torch.nn.grad.conv2d_input`` and ``conv2d_weight`` on NCHW tensors, as
    the authors' script runs them) when PyTorch is installed (``--threads``,
    default every core, as XLA);
  * at the stride-1 shapes, a lead that did not pay: the weight gradient as
    nine matmuls over contiguous row ranges of the flattened, padded map
    (`flat_weight_gradient`). It needs no transpose of the activations,
    which XLA's weight-gradient convolution makes of both its operands.

Prints milliseconds and GFLOP/s (2 x multiply-adds) of each way, JAX /
PyTorch per pass, and the largest relative difference of the flat weight
gradient from XLA's.
"""

from __future__ import annotations

import argparse
import os

from experiments.cli.common import median_ms, write_json_atomic

PAUSE_S = 0.2   # lets spinning worker threads of the framework just timed go idle


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_conv",
                                description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--nf", type=int, default=64)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--json", default=None, help="write the figures here")
    return p


def shapes(nf: int) -> list[tuple[int, int, int, int]]:
    """(input size, input channels, output channels, stride) of each distinct 3x3
    convolution of a CIFAR ResNet-18 on 32x32 RGB inputs, the stem first."""
    out = [(32, 3, nf, 1), (32, nf, nf, 1)]
    size, width = 32, nf
    for _ in range(3):
        out.append((size, width, 2 * width, 2))
        size, width = size // 2, 2 * width
        out.append((size, width, width, 1))
    return out


def _conv(x, w, stride: int):
    import jax
    return jax.lax.conv_general_dilated(x, w, (stride, stride), ((1, 1), (1, 1)),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


def flat_weight_gradient(x, g):
    """The weight gradient of a 3x3 stride-1 convolution padded by 1 (NHWC, HWIO).

    On the map padded to (H+2, W+2) and flattened over (n, h, w), the input
    seen by kernel tap (i, j) at output (n, h, w) sits ``i*(W+2) + j`` rows
    after row (n, h, w). So with ``g`` placed at the top-left H x W of the
    same padded grid (zeros elsewhere), tap (i, j)'s gradient is one matmul
    over contiguous rows: ``x_flat[off:off+m].T @ g_flat[:m]``.
    """
    import jax
    import jax.numpy as jnp

    n, h, w, c = x.shape
    hp, wp = h + 2, w + 2
    x_flat = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0))).reshape(n * hp * wp, c)
    g_flat = jnp.pad(g, ((0, 0), (0, 2), (0, 2), (0, 0))).reshape(n * hp * wp, g.shape[-1])
    rows = n * hp * wp - (2 * wp + 2)
    taps = [jax.lax.slice_in_dim(x_flat, i * wp + j, i * wp + j + rows).T @ g_flat[:rows]
            for i in range(3) for j in range(3)]
    return jnp.stack(taps).reshape(3, 3, c, g.shape[-1])


def _jax_ways(batch: int, size: int, cin: int, cout: int, stride: int) -> tuple[dict, float]:
    import jax
    import numpy as np

    from lightcl_jax.compiler import jit

    rng = np.random.default_rng(0)
    out_size = size // stride
    x = jax.numpy.asarray(rng.normal(size=(batch, size, size, cin)).astype(np.float32))
    w = jax.numpy.asarray(rng.normal(size=(3, 3, cin, cout)).astype(np.float32))
    g = jax.numpy.asarray(rng.normal(size=(batch, out_size, out_size, cout)).astype(np.float32))
    forward = jit(lambda x, w: _conv(x, w, stride))
    input_grad = jit(lambda w, g: jax.linear_transpose(lambda x: _conv(x, w, stride), x)(g)[0])
    weight_grad = jit(lambda x, g: jax.linear_transpose(lambda w: _conv(x, w, stride), w)(g)[0])
    ways = {"jax forward": lambda: jax.block_until_ready(forward(x, w)),
            "jax input grad": lambda: jax.block_until_ready(input_grad(w, g)),
            "jax weight grad": lambda: jax.block_until_ready(weight_grad(x, g))}
    difference = float("nan")
    if stride == 1:
        flat = jit(flat_weight_gradient)
        ways["jax weight grad, 9 flat matmuls"] = lambda: jax.block_until_ready(flat(x, g))
        reference = weight_grad(x, g)
        difference = float(abs(flat(x, g) - reference).max() / abs(reference).max())
    return ways, difference


def _torch_ways(batch: int, size: int, cin: int, cout: int, stride: int, threads: int) -> dict:
    try:
        import torch
    except ImportError:
        return {}
    torch.set_num_threads(threads)
    out_size = size // stride
    x, w = torch.randn(batch, cin, size, size), torch.randn(cout, cin, 3, 3)
    g = torch.randn(batch, cout, out_size, out_size)
    grad = torch.nn.grad

    def run(fn):
        def call():
            with torch.no_grad():
                fn()
        return call
    return {"torch forward": run(lambda: torch.nn.functional.conv2d(x, w, None, stride, 1)),
            "torch input grad": run(lambda: grad.conv2d_input(x.shape, w, g, stride, 1)),
            "torch weight grad": run(lambda: grad.conv2d_weight(x, w.shape, g, stride, 1))}


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if min(args.rounds, args.batch_size, args.nf, args.threads) < 1:
        raise SystemExit("bench_conv: --rounds, --batch-size, --nf and --threads must be >= 1")
    results = []
    for size, cin, cout, stride in shapes(args.nf):
        ways, difference = _jax_ways(args.batch_size, size, cin, cout, stride)
        ways.update(_torch_ways(args.batch_size, size, cin, cout, stride, args.threads))
        ms = median_ms(ways, args.rounds, PAUSE_S)
        gflop = 2 * args.batch_size * (size // stride) ** 2 * 9 * cin * cout / 1e9
        name = f"{size}x{size}x{cin} -> {cout}, stride {stride}"
        print(f"{name} ({gflop:.3g} GFLOP a pass):", flush=True)
        for way, value in ms.items():
            line = f"  {way:34s} {value:8.2f} ms  {gflop / value * 1e3:6.1f} GFLOP/s"
            torch_way = "torch " + way.split(" ", 1)[1]
            if way.startswith("jax") and torch_way in ms:
                line += f"  {value / ms[torch_way]:.2f}x PyTorch"
            print(line, flush=True)
        if stride == 1:
            print(f"  flat weight grad vs XLA's: largest relative difference {difference:.1e}")
        results.append({"size": size, "in_channels": cin, "out_channels": cout,
                        "stride": stride, "gflop": gflop, "ms": ms,
                        "flat_weight_grad_rel_diff": difference if stride == 1 else None})
    if args.json:
        write_json_atomic(args.json, {"rounds": args.rounds, "batch_size": args.batch_size,
                                      "threads": args.threads, "results": results})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

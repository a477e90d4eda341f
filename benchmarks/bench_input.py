"""Is the input pipeline the bottleneck? Train steps/s with real input against a fixed batch.

    python -m benchmarks.bench_input [--dataset cifar10] [--data-dir DIR] [--steps 40]
                                     [--nf 16] [--batch-size 32] [--strategy finetune]

Builds the stream as a run does (TFDS ``data_source``: images are read,
decoded and normalised batch by batch, not held in memory), then times the
same compiled train step of task 0 fed three ways:

  * real input: shuffled batches read from the source, augmented (random
    crop + flip) and sent to the device by `prefetch`'s background thread;
  * real input without prefetch: the same work on the main thread, between steps;
  * a fixed batch already on the device (no input work at all);

and the input alone (batches read, augmented and transferred, no training).
Real input at the fixed batch's steps/s means the input is not the bottleneck.

Without ``--data-dir`` the dataset is TFDS's mock (``tfds.testing.mock_data``,
``--examples`` random records, no download): its records come already
decoded, so the PNG decode of a prepared dataset is not in those figures;
the benchmark times it apart (a batch of the images as PNG, decoded with PIL)
and prints the input rate it would leave.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time

_DATASETS = ("cifar10", "cifar100")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_input",
                                description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="cifar10", choices=_DATASETS)
    p.add_argument("--data-dir", default=None,
                   help="a prepared TFDS data_dir (default: TFDS's mock data, no download)")
    p.add_argument("--examples", type=int, default=2000, help="mock records (without --data-dir)")
    p.add_argument("--steps", type=int, default=40, help="timed steps per measurement")
    p.add_argument("--nf", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--strategy", default="finetune",
                   help="whose task-0 step to time (finetune trains every layer)")
    return p


def main(argv=None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    for flag in ("examples", "steps", "nf", "batch_size"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1; got {getattr(args, flag)}")

    import jax
    import tensorflow_datasets as tfds

    from lightcl_jax.config import Config
    from lightcl_jax.data.streams import make_stream

    config = Config(strategy=args.strategy, dataset=args.dataset, data_dir=args.data_dir,
                    nf=args.nf, batch_size=args.batch_size)
    try:
        config = config.resolved()
    except ValueError as err:
        p.error(str(err))
    mock = (tfds.testing.mock_data(num_examples=args.examples,
                                   policy=tfds.testing.MockPolicy.USE_CODE)
            if args.data_dir is None else contextlib.nullcontext())
    with mock:  # the mock serves records only inside this block
        try:
            stream = make_stream(args.dataset, data_dir=args.data_dir)
        except ValueError as err:
            p.error(str(err))
        rates = measure(stream, config, args.steps, p)
        if args.data_dir is None:
            rates["decode_ms"] = png_decode_ms(stream.tasks[0].x_train, config.batch_size,
                                               args.steps)

    source = ("TFDS mock data (records come decoded)" if args.data_dir is None
              else f"{args.data_dir} (records decoded as read)")
    print(f"{args.dataset} from {source}: task 0 has {len(stream.tasks[0].y_train)} training "
          f"images {stream.image_shape}, read batch by batch; ResNet-18 nf={config.nf}, batch "
          f"{config.batch_size}, {config.strategy}'s task-0 step, {jax.default_backend()} "
          f"({jax.devices()[0].device_kind}), {args.steps} steps per figure")
    fixed = rates["fixed"]
    print(f"  fixed batch on the device:         {fixed:8.2f} steps/s")
    print(f"  real input, prefetched:            {rates['prefetched']:8.2f} steps/s "
          f"({100 * rates['prefetched'] / fixed:.0f}% of the fixed batch)")
    print(f"  real input, read between steps:    {rates['synchronous']:8.2f} steps/s "
          f"({100 * rates['synchronous'] / fixed:.0f}%)")
    print(f"  input alone (read, augment, send): {rates['input']:8.2f} batches/s")
    if "decode_ms" in rates:
        with_decode = 1.0 / (1.0 / rates["input"] + rates["decode_ms"] / 1e3)
        print(f"  + PNG decode a prepared dataset adds (PIL, as TFDS without OpenCV): "
              f"{rates['decode_ms']:.2f} ms per batch -> input alone about {with_decode:.1f} "
              "batches/s")
    return 0


def measure(stream, config, steps: int, parser) -> dict[str, float]:
    """Steps/s of task 0's compiled step on a fixed batch, on real input with and without
    prefetch, and batches/s of the input alone."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from lightcl_jax import compiler
    from lightcl_jax.data.pipeline import epoch_batches, prefetch
    from lightcl_jax.model.resnet import ResNet18
    from lightcl_jax.strategies import strategy_of
    from lightcl_jax.training.epochs import PREFETCH
    from lightcl_jax.training.placement import data_parallel
    from lightcl_jax.training.state import create_train_state
    from lightcl_jax.training.step import phase_step

    task = stream.tasks[0]
    parallel = data_parallel(None, {"--batch-size": config.batch_size})
    model = ResNet18(num_classes=stream.num_classes, nf=config.nf)
    state = create_train_state(model, stream.image_shape, jax.random.PRNGKey(0))
    phase, tx, step = phase_step(model, strategy_of(config), config, state.params,
                                 0, False, stream.classes_per_task)
    if phase.uses_memory:
        parser.error(f"--strategy {config.strategy} needs its memory in task 0; pick one that "
                     "does not (finetune, lightcl, ewc, lwf)")
    state = parallel.replicate(state.replace(opt_state=tx.init(state.params)))
    train_step = compiler.jit(step, donate_argnums=(0,))
    offset = jnp.asarray(task.class_offset, jnp.int32)
    rng = np.random.default_rng(0)

    def to_device(batch):
        return parallel.batch(*batch)

    def real_batches(with_prefetch: bool):
        """Endless epochs of the task, as the training loop draws them."""
        while True:
            epoch = epoch_batches(task.x_train, task.y_train, config.batch_size, rng,
                                  augment=True, fill=stream.pad_value)
            yield from (prefetch(epoch, PREFETCH, to_device) if with_prefetch
                        else map(to_device, epoch))

    def timed(batches) -> float:
        nonlocal state
        x, y = next(batches)  # compiles on the first measurement
        state, _, metrics = train_step(state, None, x, y, offset)
        jax.block_until_ready(metrics)
        start = time.perf_counter()
        for _ in range(steps):
            x, y = next(batches)
            state, _, metrics = train_step(state, None, x, y, offset)
        jax.block_until_ready((state, metrics))
        rate = steps / (time.perf_counter() - start)
        if hasattr(batches, "close"):
            batches.close()  # stops its prefetch thread before the next figure
        return rate

    fixed = to_device(next(epoch_batches(task.x_train, task.y_train, config.batch_size,
                                         np.random.default_rng(1), augment=True,
                                         fill=stream.pad_value)))
    rates = {"fixed": timed(iter(lambda: fixed, None)), "prefetched": timed(real_batches(True)),
             "synchronous": timed(real_batches(False))}
    batches = real_batches(True)
    jax.block_until_ready(next(batches))
    start = time.perf_counter()
    for _ in range(steps):
        last = next(batches)
    jax.block_until_ready(last)
    rates["input"] = steps / (time.perf_counter() - start)
    batches.close()
    return rates


def png_decode_ms(images, batch_size: int, repeats: int) -> float:
    """Milliseconds to decode a batch of these images stored as PNG, as a prepared TFDS
    dataset stores them (the mock's records skip it)."""
    import io

    import numpy as np
    from PIL import Image

    encoded = []
    for record in images.indices[:batch_size]:
        buffer = io.BytesIO()
        Image.fromarray(np.asarray(images.source[int(record)]["image"])).save(buffer, "PNG")
        encoded.append(buffer.getvalue())
    start = time.perf_counter()
    for _ in range(repeats):
        for data in encoded:
            with Image.open(io.BytesIO(data)) as image:
                np.asarray(image)
    return 1e3 * (time.perf_counter() - start) / repeats


if __name__ == "__main__":
    sys.exit(main())

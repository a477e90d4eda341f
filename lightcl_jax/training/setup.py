"""Everything a run is before it trains: config, stream, strategy, model, placement, identity.

`setup_run` validates the settings and the data, places the seeds and
devices, and computes the run's identity (what a checkpoint or results file
must match to belong to it) once; `experiments.run` reads the identity to
find earlier results and hands the same `Run` to `train_and_evaluate`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp

from lightcl_jax.config import MAX_SEED, Config
from lightcl_jax.data.streams import DATASETS, TaskStream, make_stream, validate_stream
from lightcl_jax.metrics.continual import EvalMetric, Summary, split_metrics
from lightcl_jax.metrics.similarity import get_similarity
from lightcl_jax.model.backbone import variables_digest
from lightcl_jax.model.resnet import ResNet, ResNet18
from lightcl_jax.strategies import Strategy, strategy_of
from lightcl_jax.training.forward import jitted_eval_forward
from lightcl_jax.training.placement import Placement
from lightcl_jax.training.resume import run_identity
from lightcl_jax.training.state import run_model


@dataclasses.dataclass(frozen=True)
class Run:
    """A validated run, ready to train."""

    config: Config              # resolved: dataset defaults and every strategy argument filled in
    stream: TaskStream
    strategy: Strategy          # made from the config's strategy and strategy_args
    model: ResNet
    placement: Placement        # seeds (lanes) and devices
    pretrained: bool            # starts from a pre-trained backbone
    augment: bool               # random crop + flip on training batches
    identity: dict              # `run_identity`: what a checkpoint of this run must match
    init_variables: Any         # the backbone's {"params", "batch_stats"}, or None
    eval_forward: Callable      # the model's jitted evaluation-mode forward, for the hooks
    eval_batch_size: int        # `eval_batch_size` of the config and the stream
    summaries: tuple[Summary, ...] = ()       # the config's run summaries
    eval_metrics: tuple[EvalMetric, ...] = ()  # the config's evaluation metrics

    @property
    def lane_configs(self) -> list[Config]:
        """Each seed's config."""
        return self.placement.lane_configs(self.config)


def setup_run(config: Config, stream: TaskStream | None = None, *,
              init_variables: dict | None = None, devices: int | None = None,
              seeds: int = 1) -> Run:
    """Validates a run's settings and data, and places it on the devices.

    Args:
      config: the run's settings (validated and resolved here; its strategy is made
        from ``strategy_args``, and the run's config records every hyperparameter).
      stream: the task stream; built from ``config.dataset`` when None. A stream of
        your own may go with a config whose dataset is None or its name.
      init_variables: ``{"params", "batch_stats"}`` of a pre-trained backbone;
        the run then counts as pre-trained (LightCL freezes from task 0).
      devices: how many of the visible devices to split each batch over
        (data parallel, `lightcl_jax.training.parallel`); None: all of them.
      seeds: train seeds ``config.seed, ..., config.seed + seeds - 1`` as
        independent runs in one compiled program (`lightcl_jax.training.lanes`).

    Raises:
      ValueError: bad configuration, strategy arguments, metrics, data, seed count or
        device count.
    """
    config = config.resolved()
    strategy = strategy_of(config)
    config = dataclasses.replace(config, strategy_args=strategy.hyperparameters())
    summaries, eval_metrics = split_metrics(config.metrics)
    for similarity in {config.similarity, config.layer_metrics} - {None}:
        get_similarity(similarity)  # a bad name or import path fails here, not mid-run
    if stream is None:
        if config.dataset not in DATASETS:
            raise ValueError(f"dataset {config.dataset!r} is not built in ({', '.join(DATASETS)}):"
                             " pass its stream (lightcl_jax.split_into_tasks) with the config")
        stream = make_stream(config.dataset, data_dir=config.data_dir,
                             num_tasks=config.num_tasks, eval_split=config.eval_split)
    validate_stream(stream, config.batch_size)
    if config.seed + seeds - 1 > MAX_SEED:
        raise ValueError(f"seeds {config.seed}..{config.seed + seeds - 1} go past {MAX_SEED}, "
                         "the largest seed (JAX's PRNG keys take 32 bits); start lower")
    check_weights_fit(config.nf, stream.num_classes, stream.image_shape, seeds)
    placement = Placement.of(config.seed, seeds, devices,
                             {"batch_size": config.batch_size,
                              "eval_batch_size": config.eval_batch_size})
    if config.last_batch == "keep" and placement.parallel.num_devices > 1:
        raise ValueError(f"last_batch keep runs on one device (an epoch's smaller last batch "
                         f"need not split over {placement.parallel.num_devices}); pass "
                         "--devices 1, or last_batch drop")
    pretrained = init_variables is not None
    model = run_model(config, stream.num_classes, stream.image_shape, config.seed,
                      init_variables=init_variables)
    identity = run_identity(config, stream, pretrained, placement.parallel.num_devices,
                            placement.lanes.size,
                            init_digest=variables_digest(init_variables) if pretrained else None)
    return Run(config=config, stream=stream, strategy=strategy, model=model,
               placement=placement, pretrained=pretrained,
               augment=stream.augment if config.augment is None else config.augment,
               identity=identity, init_variables=init_variables,
               eval_forward=jitted_eval_forward(model),
               eval_batch_size=eval_batch_size(config.eval_batch_size, stream,
                                               placement.parallel.num_devices),
               summaries=summaries, eval_metrics=eval_metrics)


def check_weights_fit(nf: int, num_classes: int, image_shape, seeds: int) -> None:
    """Raises ValueError when ``seeds`` ResNet-18s of width ``nf`` could not be trained in
    the first device's memory (its ``bytes_limit``; the machine's RAM where the device
    reports none, as the CPU does): a step holds the weights about three times (weights,
    gradients, updated weights), before any activation. Counted abstractly, nothing is
    allocated."""
    weights = 4 * seeds * _weight_count(nf, num_classes, image_shape[-1])
    device = jax.local_devices()[0]
    limit = (device.memory_stats() or {}).get("bytes_limit") or (
        os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    if 3 * weights > limit:
        raise ValueError(f"{seeds} seed{'s of' if seeds > 1 else ' of'} a ResNet-18 of nf {nf} "
                         f"{'hold' if seeds > 1 else 'holds'} {weights / 2**30:.1f} GiB of weights; a train step holds them "
                         f"about 3 times, more than the {limit / 2**30:.1f} GiB of memory the "
                         f"{device.platform} device has: lower nf or train fewer seeds together")


@functools.lru_cache(maxsize=None)
def _weight_count(nf: int, num_classes: int, channels: int) -> int:
    """Parameters and BatchNorm statistics of a ResNet-18 (traced, not allocated)."""
    shapes = jax.eval_shape(lambda: ResNet18(num_classes=num_classes, nf=nf).init(
        jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, channels)), train=False))
    return sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(shapes))


def eval_batch_size(largest: int, stream: TaskStream, num_devices: int) -> int:
    """The evaluation batch: ``largest``, or fewer when no task's evaluation split needs
    that many (rounded up to split over the devices), so that a small split is not
    padded to a large batch. One compiled shape either way."""
    needed = max(len(task.y_eval) for task in stream.tasks)
    return min(largest, -(-needed // num_devices) * num_devices)

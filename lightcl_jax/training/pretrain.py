"""Pre-training the backbone on a TFDS image dataset, as the reference does before CL.

SPEC section 2: ImageNet downsampled to 32x32 (TFDS ``imagenet_resized/32x32``,
1000 classes), 50 epochs of plain SGD at lr 0.01, batch 256, random horizontal
flips, cross-entropy over all classes, BatchNorm in training mode. Any TFDS
image dataset with ``image`` and ``label`` features works the same way (a
small one, such as ``cifar10``, to try it).

Images are read batch by batch from the TFDS ``data_source``
(`lightcl_jax.data.sources.RecordImages`) with a background prefetch, so the
dataset never sits whole in memory. Every epoch's order and flips come from
``(seed, epoch)`` alone, so a run resumed from a checkpoint mid-epoch
continues exactly where the interrupted one was. `pretrain` returns the
trained variables; `experiments.pretrain` saves them as a backbone
(`lightcl_jax.model.backbone`) that ``experiments.run --init-from`` starts
from.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lightcl_jax import compiler
from lightcl_jax.data.pipeline import part_of, prefetch
from lightcl_jax.data.sources import RecordImages, update_digest
from lightcl_jax.data.streams import CIFAR10_MEAN, CIFAR10_STD, CIFAR100_MEAN, CIFAR100_STD
from lightcl_jax.model.resnet import ResNet18
from lightcl_jax.process import peak_rss_mb
from lightcl_jax.training.checkpoint import Clock, Position, Saver, find_resume_point
from lightcl_jax.training.epochs import EpochMeans, Steps, counts_on
from lightcl_jax.training.placement import data_parallel
from lightcl_jax.training.progress import Progress
from lightcl_jax.training.state import TrainState, random_variables, train_state
from lightcl_jax.training.step import make_eval_step
from lightcl_jax.training.workdir import Preempted, requested

# Per-channel statistics of images scaled to [0, 1]; other datasets get theirs
# estimated from their first `STATISTICS_SAMPLES` training records.
KNOWN_NORMALISATION = {
    "imagenet_resized": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "cifar10": (CIFAR10_MEAN, CIFAR10_STD),
    "cifar100": (CIFAR100_MEAN, CIFAR100_STD),
}
STATISTICS_SAMPLES = 2048
PREFETCH = 2


@dataclasses.dataclass(frozen=True)
class PretrainConfig:
    """Settings of a pre-training run (defaults: the reference's, SPEC section 2).

    Attributes:
      dataset: TFDS name, with config if any (``imagenet_resized/32x32``).
      data_dir: TFDS data directory holding it prepared (None: TFDS's default).
      epochs, batch_size, lr: plain SGD, no momentum, no weight decay.
      nf: width of the ResNet-18's first stage.
      seed: initialisation, data order and flips.
      flip: random horizontal flips of training images.
      eval_samples: accuracy after every epoch on at most this many samples of
        the dataset's ``validation`` (else ``test``) split; 0: none.
      max_train_samples: train on only the first this many records (None: all),
        for trying the script on a big dataset.
    """

    dataset: str = "imagenet_resized/32x32"
    data_dir: str | None = None
    epochs: int = 50
    batch_size: int = 256
    lr: float = 0.01
    nf: int = 64
    seed: int = 0
    flip: bool = True
    eval_samples: int = 10000
    max_train_samples: int | None = None

    def validate(self) -> None:
        """Raises ValueError naming the first bad setting and what is allowed."""
        def need(ok, message):
            if not ok:
                raise ValueError(message)

        def is_int(v):
            return isinstance(v, int) and not isinstance(v, bool)

        need(isinstance(self.dataset, str) and self.dataset.strip(),
             f"dataset must be a TFDS name such as imagenet_resized/32x32; got {self.dataset!r}")
        for field in ("epochs", "batch_size", "nf"):
            need(is_int(getattr(self, field)) and getattr(self, field) >= 1,
                 f"{field} must be an integer >= 1; got {getattr(self, field)!r}")
        need(self.lr > 0, f"lr must be > 0; got {self.lr!r}")
        need(is_int(self.seed) and self.seed >= 0, f"seed must be an integer >= 0; got {self.seed!r}")
        need(is_int(self.eval_samples) and self.eval_samples >= 0,
             f"eval_samples must be an integer >= 0; got {self.eval_samples!r}")
        need(self.max_train_samples is None or (is_int(self.max_train_samples)
                                                and self.max_train_samples >= self.batch_size),
             f"max_train_samples must be an integer >= batch_size={self.batch_size}; got "
             f"{self.max_train_samples!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class PretrainData:
    """A labelled image dataset: training and (optional) evaluation images and labels."""

    name: str
    num_classes: int
    image_shape: tuple[int, int, int]
    x_train: Any            # (N, H, W, C) normalised float32: array or RecordImages
    y_train: np.ndarray
    x_eval: Any | None
    y_eval: np.ndarray | None
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def fingerprint(self) -> str:
        """Identifies the data without reading the images (RecordImages) or from them (arrays)."""
        import hashlib
        digest = hashlib.blake2b(digest_size=16)
        for part in (self.x_train, self.y_train, self.x_eval, self.y_eval):
            if part is None:
                digest.update(b"none")
            else:
                update_digest(digest, part)
        return digest.hexdigest()

    def check_batch_size(self, batch_size: int) -> None:
        """Raises ValueError when the training split holds less than one batch."""
        if len(self.y_train) < batch_size:
            raise ValueError(f"{self.name} has {len(self.y_train)} training samples, fewer than "
                             f"one batch of {batch_size}; lower --batch-size")


def load_tfds_data(config: PretrainConfig) -> PretrainData:
    """The training (and evaluation) split of ``config.dataset`` from its TFDS data_source.

    Raises:
      ValueError: the dataset is not prepared in ``data_dir``, lacks ``image``
        or ``label`` features, or has images of several shapes.
    """
    import tensorflow_datasets as tfds

    from lightcl_jax.data.sources import read_labels, skip_image_decoding

    try:
        builder = tfds.builder(config.dataset, data_dir=config.data_dir)
        train_source = builder.as_data_source(split="train")
    except Exception as err:  # TFDS raises several types for "unknown" and "not prepared"
        where = config.data_dir or "TFDS's default data_dir"
        raise ValueError(f"dataset {config.dataset!r} is not available in {where}: "
                         f"{str(err).splitlines()[0] if str(err) else type(err).__name__}. "
                         f"Prepare it with `tfds build {config.dataset} "
                         "--file_format=array_record` and pass --data-dir") from err
    features = builder.info.features
    if "image" not in features or "label" not in features:
        raise ValueError(f"dataset {config.dataset!r} has features {sorted(features)}; "
                         "pre-training needs 'image' and 'label'")
    num_classes = features["label"].num_classes
    image_shape = tuple(features["image"].shape)
    if None in image_shape:
        image_shape = tuple(np.shape(train_source[0]["image"]))
    # Labels from a source that leaves images encoded; only the records trained on.
    y_train = read_labels(train_source, config.max_train_samples, undecoded=builder.as_data_source(
        split="train", decoders=skip_image_decoding()))
    indices = np.arange(len(y_train))
    mean, std = _normalisation(config.dataset, train_source, image_shape)
    x_train = RecordImages(train_source, indices, mean, std, image_shape,
                           f"{config.dataset}:{builder.info.version}/train")
    x_eval = y_eval = None
    eval_split = eval_source = None
    for split in ("validation", "test") if config.eval_samples else ():
        try:
            eval_source, eval_split = builder.as_data_source(split=split), split
            break
        except Exception:  # no such split: try the next
            continue
    if eval_source is not None:
        count = min(config.eval_samples, len(eval_source))
        # A fixed random subset: evaluation splits are often sorted by class.
        chosen = np.sort(np.random.default_rng(0).permutation(len(eval_source))[:count])
        labels = builder.as_data_source(split=eval_split, decoders=skip_image_decoding())
        try:
            labels[0]
        except ImportError:  # TFDS's mock data without TensorFlow: see read_labels
            labels = eval_source
        y_eval = np.asarray([int(labels[int(i)]["label"]) for i in chosen], np.int32)
        x_eval = RecordImages(eval_source, chosen, mean, std, image_shape,
                              f"{config.dataset}:{builder.info.version}/{eval_split}")
    return PretrainData(config.dataset, int(num_classes), image_shape, x_train, y_train,
                        x_eval, y_eval, tuple(round(float(m), 6) for m in mean),
                        tuple(round(float(s), 6) for s in std))


def _normalisation(dataset: str, source, image_shape) -> tuple[np.ndarray, np.ndarray]:
    """Known per-channel mean/std, or those of the first `STATISTICS_SAMPLES` records."""
    known = KNOWN_NORMALISATION.get(dataset.split("/")[0])
    if known is not None and len(known[0]) == image_shape[-1]:
        return np.array(known[0], np.float32), np.array(known[1], np.float32)
    count = min(STATISTICS_SAMPLES, len(source))
    images = np.stack([np.asarray(source[i]["image"]) for i in range(count)]).astype(np.float64)
    images /= 255.0
    mean = images.mean(axis=(0, 1, 2))
    std = np.maximum(images.std(axis=(0, 1, 2)), 1e-3)
    return mean.astype(np.float32), std.astype(np.float32)


def epoch_order(num_samples: int, seed: int, epoch: int) -> tuple[np.ndarray, np.ndarray]:
    """(permutation, flips) of one epoch: a function of (seed, epoch) only, so resumable."""
    rng = np.random.default_rng([seed, epoch])
    return rng.permutation(num_samples), rng.random(num_samples) < 0.5


def make_pretrain_step(model, tx: optax.GradientTransformation):
    """``step(state, x, y) -> (state, {"loss", "correct"})``: softmax cross-entropy over
    all classes, BatchNorm in training mode, one optax update."""
    def step(state: TrainState, x, y):
        def loss_fn(params):
            (logits, _), updates = model.apply(
                {"params": params, "batch_stats": state.batch_stats}, x, train=True,
                mutable=["batch_stats"])
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
            return loss, (updates["batch_stats"], jnp.sum(jnp.argmax(logits, -1) == y))

        (loss, (batch_stats, correct)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        return TrainState(params=optax.apply_updates(state.params, updates),
                          batch_stats=batch_stats, opt_state=opt_state,
                          step=state.step + 1), {"loss": loss, "correct": correct}
    return step


def pretrain_identity(config: PretrainConfig, data: PretrainData, num_devices: int) -> dict:
    """What makes two pre-training runs the same run (a checkpoint resumes only its own)."""
    return {"config": config.to_dict(), "data": {"name": data.name,
                                                 "num_classes": data.num_classes,
                                                 "image_shape": list(data.image_shape),
                                                 "fingerprint": data.fingerprint()},
            "devices": num_devices}


def pretrain(config: PretrainConfig, data: PretrainData | None = None, *,
             checkpoints=None, progress: Progress | None = None,
             devices: int | None = None) -> tuple[dict, dict]:
    """Pre-trains a ResNet-18 on ``data`` (default: ``config.dataset`` from TFDS).

    Args:
      config: the settings.
      data: the dataset; None loads ``config.dataset`` (`load_tfds_data`).
      checkpoints: a `lightcl_jax.training.checkpoint.RunCheckpoints`: saves
        every ``checkpoints.every`` steps and after every epoch, and resumes
        from the newest checkpoint of this run when there is one
        (`lightcl_jax.training.checkpoint`, as a continual-learning run does).
      progress: receives epochs and steps (`lightcl_jax.training.progress`).
      devices: devices to split each batch over (None: all visible).

    Returns:
      ``(variables, history)``: the trained ``{params, batch_stats}`` (NumPy)
      and ``{"epochs": [{"epoch", "loss", "train_accuracy", "eval_accuracy",
      "wall_time_s"}...], "steps", "resumed_at_steps", "wall_time_s",
      "identity", "normalisation", "eval_samples"}``.

    Raises:
      ValueError: bad config or data, or a checkpoint of another run (CheckpointError).
      DivergenceError: the loss became NaN or Inf. Preempted: a signal (after a checkpoint).
    """
    start_time = time.perf_counter()
    config.validate()
    data = load_tfds_data(config) if data is None else data
    data.check_batch_size(config.batch_size)
    progress = progress or Progress()
    parallel = data_parallel(devices, {"batch_size": config.batch_size})
    saver = Saver(checkpoints, pretrain_identity(config, data, parallel.num_devices))
    model = ResNet18(num_classes=data.num_classes, nf=config.nf)
    tx = optax.sgd(config.lr)
    variables = random_variables(model, tuple(data.image_shape), jax.random.PRNGKey(config.seed))
    state = train_state(variables["params"], variables["batch_stats"],
                        tx.init(variables["params"]))
    steps_per_epoch = len(data.y_train) // config.batch_size
    history, clock = {"epochs": [], "resumed_at_steps": []}, Clock(start_time)
    position, means = _position(0, 0, steps_per_epoch), EpochMeans()
    point = find_resume_point(checkpoints, saver.identity)
    if point is not None:
        state = checkpoints.restore(point.kind, point.step, state)
        position, means = point.position, _epoch_means(point.meta)
        progress.resumed(point.path, f"epoch {position.epoch + 1}/{config.epochs}, "
                                     f"{position.batch} steps of it done")
        history = point.meta["history"]
        history["resumed_at_steps"] = history["resumed_at_steps"] + [point.step]
        clock = Clock(start_time, point.meta["wall_time_s"])
    rep, split = parallel.replicated, parallel.split
    state = parallel.replicate(state)
    step_fn = compiler.jit(make_pretrain_step(model, tx), donate_argnums=0,
                           in_shardings=(rep, split, split), out_shardings=rep)
    eval_step = jax.jit(make_eval_step(model, data.num_classes))
    for epoch in range(position.epoch, config.epochs):
        epoch_start = time.perf_counter()
        progress.start(f"epoch {epoch + 1}/{config.epochs}", steps_per_epoch, position.batch)

        def save(at: Position, state, means=means) -> None:
            saver.save(at, state, {"history": history, "epoch_means": means.to_meta(),
                                   "wall_time_s": clock.elapsed()})
        steps = Steps(step_fn, progress, "pre-training", saver.every, save)
        state, _ = steps.run(state, _batches(data, config, position, parallel), position,
                             end=(epoch + 1) * steps_per_epoch, means=means)
        summary = {"epoch": epoch + 1, "loss": means.sums["loss"] / means.counts["loss"],
                   "train_accuracy": 100.0 * means.sums["correct"]
                   / (means.counts["correct"] * config.batch_size),
                   "eval_accuracy": _accuracy(eval_step, state, data, config),
                   "wall_time_s": time.perf_counter() - epoch_start}
        history["epochs"].append(summary)
        progress.end({k: v for k, v in summary.items() if k in _SHOWN and v is not None})
        position, means = _position(epoch + 1, 0, steps_per_epoch), EpochMeans()
        save(position, state, means)
        if requested() is not None and epoch + 1 < config.epochs:
            raise Preempted(requested(), position)
    history.update({
        "steps": config.epochs * steps_per_epoch,
        "wall_time_s": clock.elapsed(),
        "identity": saver.identity,
        "normalisation": {"mean": list(data.mean), "std": list(data.std)},
        "eval_samples": 0 if data.y_eval is None else int(len(data.y_eval)),
        "peak_rss_mb": peak_rss_mb(),
    })
    variables = jax.tree_util.tree_map(np.asarray, {"params": state.params,
                                                    "batch_stats": state.batch_stats})
    return variables, history


def _position(epoch: int, batch: int, steps_per_epoch: int) -> Position:
    """Where pre-training stands ``batch`` steps into ``epoch`` (its steps all count as the
    steps of one task)."""
    step = epoch * steps_per_epoch + batch
    return Position(task=0, task_done=False, epoch=epoch, batch=batch, step_in_task=step,
                    global_step=step)


def _epoch_means(meta: dict) -> EpochMeans:
    """The loss terms of the epoch so far a checkpoint holds."""
    if "epoch_sums" in meta:  # written before pre-training stepped with `Steps`
        sums = meta["epoch_sums"]
        return EpochMeans({"loss": sums["loss"], "correct": sums["correct"]},
                          {"loss": sums["steps"], "correct": sums["steps"]})
    return EpochMeans(**meta["epoch_means"])


# What an epoch's end shows a progress bar.
_SHOWN = ("loss", "train_accuracy", "eval_accuracy")


def _batches(data: PretrainData, config: PretrainConfig, position: Position, parallel):
    """The rest of ``position.epoch``'s batches from ``position.batch`` on (this process's
    part of each, sent to the devices ahead of the steps)."""
    steps_per_epoch = len(data.y_train) // config.batch_size
    perm, flips = epoch_order(len(data.y_train), config.seed, position.epoch)
    mine = part_of(config.batch_size, parallel.part)  # this process's part of every batch

    def batches():
        for b in range(position.batch, steps_per_epoch):
            idx = perm[b * config.batch_size:(b + 1) * config.batch_size][mine]
            x = data.x_train[idx]
            if config.flip:
                x = np.where(flips[idx][:, None, None, None], x[:, :, ::-1], x)
            yield x, data.y_train[idx]
    return prefetch(batches(), PREFETCH, transform=lambda xy: parallel.batch(*xy))


def _accuracy(eval_step, state: TrainState, data: PretrainData, config: PretrainConfig):
    """Top-1 accuracy (%) on the evaluation samples, or None when there are none."""
    if data.y_eval is None or not len(data.y_eval):
        return None
    _, right, _ = counts_on(eval_step, state, (data.x_eval, data.y_eval), 0, config.batch_size)
    return 100.0 * int(right) / len(data.y_eval)

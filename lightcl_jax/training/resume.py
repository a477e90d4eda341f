"""Resuming: a run's identity, its newest checkpoint, and saving where it stands.

A checkpoint resumes only the run it belongs to: `run_identity` (settings,
data, backbone, devices, seeds) must match. `find_resume_point` reads the
newest checkpoint's JSON part and checks that; `Saver` writes checkpoints and
does nothing when a run has none. What a run's checkpoint holds is
`payload`'s arrays and the meta the loop gives `Saver.save`
(`lightcl_jax.training.checkpoint` has the layout). Pre-training
(`lightcl_jax.training.pretrain`) resumes through the same functions.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from lightcl_jax.config import Config
from lightcl_jax.data.sources import update_digest
from lightcl_jax.data.streams import TaskStream
from lightcl_jax.strategies import Strategy, strategy_of
from lightcl_jax.training.checkpoint import Position, RunCheckpoints
from lightcl_jax.training.record import RunRecord
from lightcl_jax.training.state import TrainState
from lightcl_jax.training.steps import abstract_memory, phase_for_task, phase_optimizer


def stream_fingerprint(stream: TaskStream) -> str:
    """A hash of every task's classes, images and labels (BLAKE2b, hex).

    Images a TFDS source holds (`RecordImages`) count by their source's name
    and version, record indices and normalisation, without being read.
    """
    digest = hashlib.blake2b(digest_size=16)
    for task in stream.tasks:
        digest.update(repr((task.index, tuple(task.classes))).encode())
        for array in (task.x_train, task.y_train, task.x_eval, task.y_eval):
            update_digest(digest, array)
    return digest.hexdigest()


def run_identity(config: Config, stream: TaskStream, pretrained: bool,
                 num_devices: int = 1, seeds: int = 1, init_digest: str | None = None) -> dict:
    """What makes two runs the same run: a checkpoint resumes only its own run.

    The resolved config (its strategy's every hyperparameter), the stream (name, shapes, and a fingerprint of its
    data), whether it started from a pre-trained backbone and, when it did,
    the digest of that backbone's arrays (``init_digest``,
    `lightcl_jax.model.backbone.variables_digest`), the number of devices the
    batch is split over (which changes the order of float sums), and, for
    more than one, the number of seeds trained together, as JSON values. The
    config's `EXECUTION_FIELDS` are left out: they never change a result; so are
    `IDENTITY_DEFAULTS` at their values, as runs made before those fields existed.
    """
    config = config.resolved()
    config = dataclasses.replace(config, strategy_args=strategy_of(config).hyperparameters())
    identity = {
        "config": config.identity_dict(),
        "stream": {"name": stream.name, "num_tasks": stream.num_tasks,
                   "num_classes": stream.num_classes, "image_shape": list(stream.image_shape),
                   "eval_split": stream.eval_split, "fingerprint": stream_fingerprint(stream)},
        "pretrained": pretrained,
        **({"init_from": init_digest} if init_digest is not None else {}),
        "devices": num_devices,
        **({"seeds": seeds} if seeds > 1 else {}),
    }
    return json.loads(json.dumps(identity))


@dataclasses.dataclass(frozen=True)
class ResumePoint:
    """The newest checkpoint of a run."""

    kind: str           # "tasks" (a task's end) or "steps" (mid-task)
    step: int           # the run's train steps at the checkpoint
    meta: dict          # its JSON part
    path: str           # its directory

    @property
    def position(self) -> Position:
        return Position(**self.meta["position"])

    @property
    def first_task(self) -> int:
        """The first task the resumed run trains (or finishes)."""
        position = self.position
        return position.task + 1 if position.task_done else position.task

    def within(self, task_index: int) -> bool:
        """Whether the checkpoint was taken inside ``task_index`` (it resumes mid-task)."""
        return not self.position.task_done and self.position.task == task_index


def find_resume_point(checkpoints: RunCheckpoints | None, identity: dict) -> ResumePoint | None:
    """The newest checkpoint of this run, or None when there is none (or no ``checkpoints``).

    Raises:
      CheckpointError: the newest checkpoint is unreadable, or of another run.
    """
    latest = None if checkpoints is None else checkpoints.latest()
    if latest is None:
        return None
    meta = checkpoints.read_meta(*latest)
    checkpoints.check_identity(meta, identity, *latest)
    return ResumePoint(*latest, meta, checkpoints.path(*latest))


def payload(state: TrainState, memory, before_task) -> dict:
    """The arrays a run's checkpoint holds: train state, strategy memory, the model
    before the current task (layer metrics compare with it; None otherwise)."""
    return {"state": state, "memory": memory, "before_task": before_task}


def _abstract(tree):
    return jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(np.shape(a), a.dtype), tree)


def payload_template(model, strategy: Strategy, config: Config, stream: TaskStream, state,
                     position: Position, pretrained: bool, masks) -> dict:
    """The structure of what a checkpoint at ``position`` holds (see `payload`), for one lane.

    ``state`` is any train state of the run's model (its shapes are what count).
    """
    t = position.task
    phase = phase_for_task(strategy, config, t, pretrained)
    tx = phase_optimizer(config, state.params, phase.frozen, masks)
    params, batch_stats = _abstract(state.params), _abstract(state.batch_stats)
    memory = abstract_memory(model, strategy, config, phase, t, params, batch_stats,
                             stream.image_shape, stream.classes_per_task,
                             task_ended=position.task_done)
    before = None
    if config.layer_metrics is not None and t >= 1 and not position.task_done:
        before = {"params": params, "batch_stats": batch_stats}
    return payload(TrainState(params=params, batch_stats=batch_stats,
                              opt_state=jax.eval_shape(tx.init, params),
                              step=jax.ShapeDtypeStruct((), jnp.int32)), memory, before)


@dataclasses.dataclass(frozen=True)
class Clock:
    """Wall time of a run over every process that ran it."""

    start: float                 # time.perf_counter() when this process began
    before_s: float = 0.0        # seconds the interrupted processes spent
    resumed_at: tuple = ()       # the global steps the run was resumed from

    def elapsed(self) -> float:
        return self.before_s + time.perf_counter() - self.start


class Saver:
    """Saves a run's checkpoints: ``checkpoints`` may be None, and then nothing is saved.

    Args:
      checkpoints: where to save (and how often within a task: ``every``).
      identity: the run's identity, stored in every checkpoint.
    """

    def __init__(self, checkpoints: RunCheckpoints | None, identity: dict):
        self.checkpoints, self.identity = checkpoints, identity

    @property
    def every(self) -> int:
        """Train steps between mid-task checkpoints (0: none)."""
        return 0 if self.checkpoints is None else self.checkpoints.every

    def save(self, position: Position, arrays, meta: dict) -> None:
        """Saves ``arrays`` with ``meta``, the identity and the position (nothing
        without checkpoints)."""
        if self.checkpoints is None:
            return
        self.checkpoints.save(arrays, {"identity": self.identity,
                                       "position": dataclasses.asdict(position), **meta},
                              task_done=position.task_done)


def restore_run(run, point: ResumePoint, checkpoints: RunCheckpoints, lane_state, masks: list,
                programs) -> tuple[dict, RunRecord]:
    """A run's arrays and record as its checkpoint at ``point`` holds them.

    Args:
      run: the `lightcl_jax.training.setup.Run`.
      point: the checkpoint (`find_resume_point`).
      checkpoints: where it is.
      lane_state: a train state of one lane (its shapes are what count).
      masks: each lane's sparse masks (None each without ``--sparse``).
      programs: the run's `lightcl_jax.training.programs.Programs`; takes the
        checkpoint's step counts and figures.

    Returns:
      (`payload`'s arrays, lane-stacked; the `RunRecord` so far).

    Raises:
      CheckpointError: the arrays do not fit this run, or cannot be read.
    """
    record = RunRecord.from_meta(point.meta["results"], run.placement.lanes)
    programs.restore(point.meta)
    config = record.configs(run.lane_configs)[0]
    template = payload_template(run.model, run.strategy, config, run.stream, lane_state,
                                point.position, run.pretrained, masks[0])
    return checkpoints.restore(point.kind, point.step, run.placement.abstract(template)), record

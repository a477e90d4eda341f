"""Checkpoints of a whole run with orbax, and resuming from them.

A run's checkpoint is two orbax items:

  * ``state``: the arrays -- the train state (params, batch stats, optimizer
    state, step), the strategy's memory (buffer, reference features, vital
    masks, Fisher, ...) and, when layer metrics are recorded, the model as it
    was before the current task. Saved as nested dicts of arrays keyed by the
    pytree's field names; restored onto the structure the run expects at that
    point (`restore` takes a template), so NamedTuples and dataclasses come
    back as themselves.
  * ``meta``: JSON -- the run's identity (resolved config, stream, whether it
    started pre-trained, device count), the position (task, epoch, batch, global step), the
    data-order generator's state at the start of the epoch, the accuracy
    matrices and other results so far, compiled-step counts and figures, and
    the time spent.

Two orbax managers share a run's checkpoint directory: ``tasks/`` keeps one
checkpoint per finished task, ``steps/`` the latest mid-task one (every
``every`` train steps). orbax writes each into a temporary directory and
renames it when complete, so a crash during a write leaves the earlier
checkpoints as they were. Saves are synchronous: the next train step donates
the arrays being saved.

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
import errno
import json
import os
import re
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lightcl_jax.training.run import RunRecord, identity_differences
from lightcl_jax.training.state import TrainState
from lightcl_jax.training.step import TaskPhase, abstract_memory

# Version of the layout above; a checkpoint of another version is refused.
FORMAT = 1


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: unreadable, or of another run."""


@dataclasses.dataclass(frozen=True)
class Position:
    """Where in a run a checkpoint was taken."""

    task: int            # task index
    task_done: bool      # the task was trained, ended and evaluated
    epoch: int           # epoch of the task (mid-task checkpoints)
    batch: int           # batches done in that epoch (mid-task checkpoints)
    step_in_task: int    # train steps done in the task
    global_step: int     # train steps done in the run: the checkpoint's number

    def describe(self, num_tasks: int, epochs: int) -> str:
        """E.g. "task 2/5, epoch 3/10, 25 steps of the task done (step 105 of the run)"."""
        if self.task_done:
            return (f"the end of task {self.task + 1}/{num_tasks} "
                    f"(step {self.global_step} of the run)")
        return (f"task {self.task + 1}/{num_tasks}, epoch {self.epoch + 1}/{epochs}, "
                f"{self.step_in_task} steps of the task done (step {self.global_step} of the run)")


def _key_name(key) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    raise TypeError(f"unsupported pytree key {key!r}")


def _paths(tree) -> list[tuple[tuple[str, ...], Any]]:
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return [(tuple(_key_name(k) for k in path), leaf) for path, leaf in leaves]


def to_nested(tree) -> dict:
    """The pytree's leaves as nested dicts keyed by field names, keys and indices."""
    nested: dict = {}
    for keys, leaf in _paths(tree):
        node = nested
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = leaf
    return nested


def _nested_paths(nested, prefix=()) -> dict[tuple[str, ...], Any]:
    if not isinstance(nested, dict):
        return {prefix: nested}
    out = {}
    for key, value in nested.items():
        out.update(_nested_paths(value, prefix + (str(key),)))
    return out


def _shape_dtype(leaf) -> tuple[tuple[int, ...], str]:
    return tuple(int(d) for d in leaf.shape), np.dtype(leaf.dtype).name


class RunCheckpoints:
    """The checkpoints of one run under ``directory``.

    Args:
      directory: where the checkpoints live (created on the first save).
      every: also save every this many train steps within a task; 0: only at
        task boundaries.
    """

    def __init__(self, directory: str, *, every: int = 0):
        if not (isinstance(every, int) and not isinstance(every, bool) and every >= 0):
            raise ValueError(f"checkpoint interval must be an integer >= 0 (0: only at task "
                             f"boundaries); got {every!r}")
        self.directory = os.path.abspath(directory)
        self.every = every
        self._managers: dict[str, Any] = {}

    def _manager(self, kind: str, *, create: bool = False):
        """The orbax manager of ``kind`` ("tasks" or "steps"); None when absent and not ``create``."""
        path = os.path.join(self.directory, kind)
        if kind not in self._managers:
            if not os.path.isdir(path):
                if not create:
                    return None
                os.makedirs(path, exist_ok=True)  # several processes may make it at once
            import orbax.checkpoint as ocp  # late: importing orbax takes about a second
            options = ocp.CheckpointManagerOptions(
                max_to_keep=None if kind == "tasks" else 1, create=False,
                enable_async_checkpointing=False)
            self._managers[kind] = ocp.CheckpointManager(
                path, options=options, item_handlers={"state": ocp.StandardCheckpointHandler(),
                                                      "meta": ocp.JsonCheckpointHandler()})
        return self._managers[kind]

    def latest(self) -> tuple[str, int] | None:
        """(kind, step) of the newest checkpoint, or None when there is none."""
        found = []
        for kind in ("tasks", "steps"):
            manager = self._manager(kind)
            step = None if manager is None else manager.latest_step()
            if step is not None:
                found.append((step, kind == "tasks", kind))
        if not found:
            return None
        step, _, kind = max(found)
        return kind, step

    def path(self, kind: str, step: int) -> str:
        return os.path.join(self.directory, kind, str(step))

    def read_meta(self, kind: str, step: int) -> dict:
        """The JSON part of a checkpoint; CheckpointError when it is unreadable."""
        import orbax.checkpoint as ocp
        try:
            meta = self._manager(kind).restore(
                step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        except Exception as err:  # orbax and the file system raise many types
            raise self._unreadable(kind, step, err) from err
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
            raise CheckpointError(f"checkpoint {self.path(kind, step)} has format {found!r}; "
                                  f"this version reads format {FORMAT}. Use another --workdir "
                                  "or pass --overwrite to start again")
        return meta

    def _unreadable(self, kind: str, step: int, err: Exception) -> CheckpointError:
        return CheckpointError(
            f"checkpoint {self.path(kind, step)} is unreadable: "
            f"{unreadable_reason(self.path(kind, step), err)}; delete that directory to resume "
            "from the checkpoint before it, or pass --overwrite to start again")

    def check_identity(self, meta: dict, identity: dict, kind: str, step: int) -> None:
        """Raises CheckpointError when ``meta`` belongs to another run than ``identity``."""
        differences = identity_differences(meta.get("identity", {}), identity)
        if differences:
            raise CheckpointError(
                f"checkpoint {self.path(kind, step)} is of another run ({differences}); use "
                "another --workdir, or pass --overwrite to discard it")

    def save(self, payload, meta: dict, *, task_done: bool) -> None:
        """Saves ``payload`` (a pytree of arrays) and ``meta`` at ``meta['position']``'s step.

        A task-boundary checkpoint also deletes the mid-task ones before it.
        """
        import orbax.checkpoint as ocp
        step = meta["position"]["global_step"]
        kind = "tasks" if task_done else "steps"
        manager = self._manager(kind, create=True)
        try:
            saved = manager.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave(to_nested(payload)),
                meta=ocp.args.JsonSave({"format": FORMAT, **meta})), force=True)
            manager.wait_until_finished()
        except OSError:
            raise
        except Exception as err:  # TensorStore reports a full disk as a ValueError
            if _disk_full(err):
                raise OSError(errno.ENOSPC, f"No space left on device (writing "
                                            f"{self.path(kind, step)})") from err
            raise
        if not saved:
            raise RuntimeError(f"orbax did not save checkpoint {self.path(kind, step)}")
        if task_done:
            # Made whether or not "steps" exists: in a run of several processes the
            # manager is built together (orbax syncs them), so no process may skip it
            # because of what it saw on disk a moment earlier.
            steps = self._manager("steps", create=True)
            for old in steps.all_steps():
                if old <= step:
                    steps.delete(old)

    def restore(self, kind: str, step: int, template):
        """The arrays of a checkpoint, in ``template``'s structure.

        ``template`` is the pytree the run expects at that point (arrays or
        ``jax.ShapeDtypeStruct``s). Raises CheckpointError naming the first
        array whose path, shape or dtype differs, or when orbax cannot read it.
        """
        import orbax.checkpoint as ocp
        manager = self._manager(kind)
        expected = {keys: _shape_dtype(leaf) for keys, leaf in _paths(template)}
        try:
            stored_meta = manager.item_metadata(step)["state"]
            stored_tree = getattr(stored_meta, "tree", stored_meta)
            stored = {keys: _shape_dtype(leaf)
                      for keys, leaf in _nested_paths(stored_tree).items() if leaf is not None}
        except Exception as err:
            raise self._unreadable(kind, step, err) from err
        for keys in sorted(set(expected) | set(stored)):
            if expected.get(keys) != stored.get(keys):
                name = "/".join(keys)
                raise CheckpointError(
                    f"checkpoint {self.path(kind, step)} does not fit this run: {name} is "
                    f"{_describe(stored.get(keys))} there, {_describe(expected.get(keys))} "
                    "here; use another --workdir, or pass --overwrite to start again")
        abstract = to_nested(jax.tree_util.tree_map(
            lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype), template))
        try:
            restored = manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract)))["state"]
        except Exception as err:
            raise self._unreadable(kind, step, err) from err
        flat = _nested_paths(restored)
        _, treedef = jax.tree_util.tree_flatten(template)
        return jax.tree_util.tree_unflatten(treedef, [flat[keys] for keys, _ in _paths(template)])

    def close(self) -> None:
        for manager in self._managers.values():
            manager.close()
        self._managers = {}


# The JSON files of an orbax checkpoint directory, in the order they are read.
_JSON_FILES = ("_CHECKPOINT_METADATA", "meta/metadata", "state/_METADATA", "state/_sharding")


def unreadable_reason(path: str, err: Exception) -> str:
    """What is wrong with the checkpoint at ``path``, in words, from the error orbax (or
    TensorStore below it) raised reading it: a JSON file cut short or overwritten, an
    array whose data is shorter than it should be, a file that is missing; else the
    deepest message of the error's chain that says something."""
    for name in _JSON_FILES:
        file = os.path.join(path, name)
        if os.path.exists(file):
            try:
                with open(file) as f:
                    json.load(f)
            except (OSError, ValueError) as bad:
                return f"{file} is not valid JSON (cut short or overwritten: {bad})"
    chain, link = [], err
    while link is not None and len(chain) < 8:
        chain.append(link)
        link = link.__cause__ or link.__context__
    text = "\n".join(str(e) for e in chain)
    short = re.search(r'Error reading "([^"/]+)[^"]*".*?Requested byte range \[\d+, (\d+)\) '
                      r'is not valid for value of size (\d+)', text)
    if short:
        return (f"the data of its array {short[1].replace('.', '/')} is cut short ({short[2]} "
                f"bytes expected, {short[3]} on disk: a file was truncated)")
    missing = re.search(r"(?:No such file or directory|NOT_FOUND)[^\n]*?['\"]?(/[^'\"\s]+)", text)
    if missing:
        return f"{missing[1]} is missing"
    said = [line for e in chain for line in str(e).strip().splitlines()[:1]
            if line and "<bound method" not in line]
    reason = said[-1] if said else type(err).__name__
    return f"{type(chain[-1]).__name__}: {reason[:200]}"


def _disk_full(err: Exception) -> bool:
    """Whether ``err`` (or an error it came from) is a write that found the disk full."""
    link, depth = err, 0
    while link is not None and depth < 8:
        text = str(link)
        if getattr(link, "errno", None) == errno.ENOSPC or "No space left on device" in text \
                or "os_error_code='28'" in text:
            return True
        link, depth = link.__cause__ or link.__context__, depth + 1
    return False


def _describe(shape_dtype) -> str:
    if shape_dtype is None:
        return "absent"
    shape, dtype = shape_dtype
    return f"{dtype}{list(shape)}"


# Resuming, and saving where a run stands.


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


def payload_template(run, task_phase: TaskPhase, state, position: Position) -> dict:
    """The structure of what a checkpoint of ``run`` at ``position`` holds (see `payload`),
    for one lane, in ``task_phase`` (that of ``position.task``).

    ``state`` is any train state of the run's model (its shapes are what count).
    """
    config, t = task_phase.configs[0], position.task
    params, batch_stats = _abstract(state.params), _abstract(state.batch_stats)
    memory = abstract_memory(run.model, run.strategy, config, task_phase.phase, t, params,
                             batch_stats, run.stream.image_shape, run.stream.classes_per_task,
                             task_ended=position.task_done)
    before = None
    if config.layer_metrics is not None and t >= 1 and not position.task_done:
        before = {"params": params, "batch_stats": batch_stats}
    opt_state = jax.eval_shape(task_phase.optimizers[0].init, params)
    return payload(TrainState(params=params, batch_stats=batch_stats, opt_state=opt_state,
                              step=jax.ShapeDtypeStruct((), jnp.int32)), memory, before)


@dataclasses.dataclass(frozen=True)
class Clock:
    """Wall time of a run over every process that ran it."""

    start: float                 # time.perf_counter() when this process began
    before_s: float = 0.0        # seconds the interrupted processes spent
    resumed_at: tuple = ()       # the global steps the run was resumed from

    @classmethod
    def of(cls, start: float, point: "ResumePoint | None") -> "Clock":
        """The clock of a run that began at ``start`` here, resumed from ``point`` (None:
        a fresh run)."""
        if point is None:
            return cls(start)
        return cls(start, point.meta["elapsed_s"],
                   (*point.meta["resumed_at_steps"], point.step))

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
      run: the `lightcl_jax.training.run.Run`.
      point: the checkpoint (`find_resume_point`).
      checkpoints: where it is.
      lane_state: a train state of one lane (its shapes are what count).
      masks: each lane's sparse masks (None each without ``--sparse``).
      programs: the run's `lightcl_jax.training.step.Programs`; takes the
        checkpoint's step counts and figures.

    Returns:
      (`payload`'s arrays, lane-stacked; the `RunRecord` so far).

    Raises:
      CheckpointError: the arrays do not fit this run, or cannot be read.
    """
    record = RunRecord.from_meta(point.meta["results"], run.placement.lanes)
    programs.restore(point.meta)
    task_phase = run.task_phase(point.position.task, record.configs(run.lane_configs),
                                lane_state.params, masks)
    template = payload_template(run, task_phase, lane_state, point.position)
    return checkpoints.restore(point.kind, point.step, run.placement.abstract(template)), record

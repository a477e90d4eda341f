#!/usr/bin/env python3
"""Goes on training an exported lightcl_jax run on a new task, with JAX and NumPy alone.

    python runner.py --artifact DIR --task TASK.npz [--json OUT.json]

``DIR`` is what ``python -m experiments.export`` wrote (this file is copied
into it); ``TASK.npz`` holds the new task: ``x_train`` and ``x_eval``, (N, H,
W, C) float32 images normalised as the run's dataset, and ``y_train`` and
``y_eval``, integer labels of one of the run's class groups. The runner
trains the task as the library would (the run's seed, epochs, batch size,
shuffling and augmentation; the strategy's task-start and task-end work),
evaluates every task it has seen, and replaces ``DIR/state.npz`` with the
new state (written to a temporary file, then renamed: a run stopped midway
leaves the previous state). It prints the accuracies and writes them, with
the whole accuracy matrices, to ``--json``.

A bad artifact or task (a missing or truncated file, a manifest of another
version, images of the wrong shape or dtype, labels outside the run's
classes) is refused: one line on stderr, exit status 2, nothing written.
A loss that becomes NaN or Inf stops the task: exit status 3, nothing written.

This file imports only the standard library, NumPy and JAX (and, through
``jax.export``, flatbuffers). It does not import lightcl_jax.
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import json
import os
import sys
import tempfile
import zipfile

import numpy as np

FORMAT = "lightcl_jax.artifact"
VERSION = 1
MANIFEST = "manifest.json"
PROGRESS = "__progress__"
# Where each function group's leaves live in the state file.
GROUP_PREFIX = {"state": "state", "params": "state/params", "batch_stats": "state/batch_stats",
                "opt_state": "state/opt_state", "memory": "memory"}
# Train steps between NaN/Inf checks of the loss (and at the end of the task).
CHECK_EVERY = 50


# glibc's mallopt parameter for its arena count.
M_ARENA_MAX = -8


def _glibc(name: str):
    """A glibc function, or None where the C library has none of that name."""
    try:
        return getattr(ctypes.CDLL(None), name)
    except (OSError, AttributeError):
        return None


def limit_malloc_arenas(arenas: int = 2) -> None:
    """Caps glibc's malloc arenas before JAX's threads start: memory one thread frees then
    serves the others, and the process holds less (elsewhere: nothing)."""
    mallopt = _glibc("mallopt")
    if mallopt is not None:
        mallopt(M_ARENA_MAX, arenas)


def release_free_memory() -> None:
    """Hands the C heap's free pages back to the system: what compiling a function left."""
    trim = _glibc("malloc_trim")
    if trim is not None:
        trim(0)


class Refused(Exception):
    """A bad artifact, state or task: one line for the user, exit status 2."""


class Diverged(Exception):
    """The loss became NaN or Inf: exit status 3."""


# Loading and checking.

def load_manifest(folder: str) -> dict:
    path = os.path.join(folder, MANIFEST)
    if not os.path.isdir(folder):
        raise Refused(f"artifact {folder} is not a folder (experiments.export writes one)")
    try:
        with open(path) as f:
            manifest = json.load(f)
    except FileNotFoundError:
        raise Refused(f"artifact {folder} has no {MANIFEST}: not an exported run") from None
    except (OSError, ValueError) as err:
        raise Refused(f"{path} is unreadable: {err}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise Refused(f"{path} is not a lightcl_jax artifact manifest (format "
                      f"{manifest.get('format') if isinstance(manifest, dict) else None!r})")
    if manifest.get("version") != VERSION:
        raise Refused(f"{path} has artifact version {manifest.get('version')!r}; this runner "
                      f"reads version {VERSION}: export the run again with this version")
    return manifest


def read_function_bytes(folder: str, name: str, entry: dict) -> bytes:
    path = os.path.join(folder, entry["file"])
    try:
        with open(path, "rb") as f:
            blob = f.read()
    except OSError as err:
        raise Refused(f"function {name}: {path} is missing or unreadable ({err.strerror})") \
            from None
    if len(blob) != entry["bytes"] or hashlib.sha256(blob).hexdigest() != entry["sha256"]:
        raise Refused(f"function {name}: {path} holds {len(blob)} bytes that do not match the "
                      f"manifest ({entry['bytes']} bytes and their SHA-256): truncated or "
                      "changed; export the run again")
    return blob


def load_npz(path: str, what: str) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except FileNotFoundError:
        raise Refused(f"{what} {path} does not exist") from None
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
        raise Refused(f"{what} {path} is unreadable ({type(err).__name__}: {err}): "
                      "truncated or not an .npz") from None


def load_state(folder: str, manifest: dict) -> tuple[dict[str, np.ndarray], dict]:
    """(name -> array of every state and memory leaf, the progress record)."""
    path = os.path.join(folder, manifest["state"]["file"])
    store = load_npz(path, "state file")
    if PROGRESS not in store:
        raise Refused(f"state file {path} has no {PROGRESS} record: not an artifact's state")
    try:
        progress = json.loads(str(store.pop(PROGRESS)))
    except ValueError as err:
        raise Refused(f"state file {path}: its {PROGRESS} record is not JSON ({err})") from None
    return store, progress


def load_task(path: str, run: dict) -> dict[str, np.ndarray]:
    """The new task's arrays, checked against the run's image shape and classes."""
    data = load_npz(path, "task file")
    missing = [k for k in ("x_train", "y_train", "x_eval", "y_eval") if k not in data]
    if missing:
        raise Refused(f"task file {path} lacks {', '.join(missing)}; it needs x_train, y_train, "
                      "x_eval, y_eval")
    shape, classes = tuple(run["image_shape"]), run["num_classes"]
    cpt = run["classes_per_task"]
    for split in ("train", "eval"):
        x, y = data[f"x_{split}"], data[f"y_{split}"]
        if x.ndim != 4 or tuple(x.shape[1:]) != shape:
            raise Refused(f"task file {path}: x_{split} has shape {list(x.shape)}; the run takes "
                          f"images of shape [N, {', '.join(map(str, shape))}]")
        if x.dtype != np.float32:
            raise Refused(f"task file {path}: x_{split} is {x.dtype}; the run takes float32 "
                          "images normalised as its dataset")
        if not np.all(np.isfinite(x)):
            raise Refused(f"task file {path}: x_{split} holds NaN or Inf pixels")
        if y.ndim != 1 or len(y) != len(x):
            raise Refused(f"task file {path}: y_{split} has shape {list(y.shape)}; it needs one "
                          f"label per image ({len(x)})")
        if not np.issubdtype(y.dtype, np.integer):
            raise Refused(f"task file {path}: y_{split} is {y.dtype}; labels are integers")
        if len(y) == 0:
            raise Refused(f"task file {path}: {split} split is empty")
        if y.min() < 0 or y.max() >= classes:
            raise Refused(f"task file {path}: y_{split} holds labels {int(y.min())}..{int(y.max())}"
                          f"; the run's classes are 0..{classes - 1}")
        data[f"y_{split}"] = y.astype(np.int32)
    groups = {int(v) - int(v) % cpt for v in np.concatenate([data["y_train"], data["y_eval"]])}
    if len(groups) != 1:
        raise Refused(f"task file {path}: labels span the class groups starting at "
                      f"{sorted(groups)}; a task is one group of {cpt} classes "
                      f"({', '.join(f'{g}..{g + cpt - 1}' for g in range(0, classes, cpt))})")
    if len(data["y_train"]) < run["batch_size"]:
        raise Refused(f"task file {path}: {len(data['y_train'])} training samples, fewer than "
                      f"one batch of {run['batch_size']}")
    return data


# Batches, as the library draws them (lightcl_jax.data.pipeline).

def draw_augmentation(n, rng, padding=4):
    dy = rng.integers(0, 2 * padding + 1, size=n)
    dx = rng.integers(0, 2 * padding + 1, size=n)
    return dy, dx, rng.random(n) < 0.5


def apply_augmentation(x, draws, fill, padding=4):
    n, h, w, _ = x.shape
    dy, dx, flip = draws
    padded = np.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    if fill is not None:
        border = np.ones((h + 2 * padding, w + 2 * padding), bool)
        border[padding:padding + h, padding:padding + w] = False
        padded[:, border] = np.asarray(fill, x.dtype)
    rows = dy[:, None] + np.arange(h)[None, :]
    cols = dx[:, None] + np.arange(w)[None, :]
    cols = np.where(flip[:, None], cols[:, ::-1], cols)
    return padded[np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]


def epoch_batches(x, y, batch_size, rng, *, augment, fill, keep_remainder):
    perm = rng.permutation(len(x))
    steps = -(-len(x) // batch_size) if keep_remainder else len(x) // batch_size
    for start in range(0, steps * batch_size, batch_size):
        idx = perm[start:start + batch_size]
        draws = draw_augmentation(len(idx), rng) if augment else None
        xb = x[idx]
        if augment:
            xb = apply_augmentation(xb, draws, fill)
        yield xb, y[idx]


def eval_batches(x, y, batch_size):
    for start in range(0, len(x), batch_size):
        xb, yb = x[start:start + batch_size], y[start:start + batch_size]
        valid = np.zeros(batch_size, bool)
        valid[:len(xb)] = True
        if len(xb) < batch_size:
            pad = batch_size - len(xb)
            xb = np.concatenate([xb, np.zeros((pad, *x.shape[1:]), x.dtype)])
            yb = np.concatenate([yb, np.zeros((pad,), yb.dtype)])
        yield xb, yb, valid


# The exported functions.

class Functions:
    """The artifact's functions, deserialized and jitted, called on named groups."""

    def __init__(self, folder: str, manifest: dict):
        import jax
        from jax import export
        self.jax, self.entries, self.calls = jax, manifest["functions"], {}
        self.compiled: set[str] = set()
        for name, entry in self.entries.items():
            blob = read_function_bytes(folder, name, entry)
            try:
                exported = export.deserialize(bytearray(blob))
            except Exception as err:  # a serialization version this JAX cannot read
                raise Refused(f"function {name}: JAX {jax.__version__} cannot load it "
                              f"({type(err).__name__}: {str(err).splitlines()[0]}); it was "
                              f"written by JAX {manifest['written_by']['jax']}") from None
            if jax.default_backend() not in exported.platforms:
                raise Refused(f"function {name} was exported for {', '.join(exported.platforms)}"
                              f"; this JAX runs on {jax.default_backend()}")
            donate = tuple(i for i, g in enumerate(entry["inputs"]) if g in ("state", "memory"))
            # The XLA options the library compiles it with (xla_cpu_* ones are ignored
            # by other backends).
            self.calls[name] = jax.jit(exported.call, donate_argnums=donate,
                                       compiler_options=entry.get("compiler_options") or None)

    def matching(self, base: str, store: dict) -> str:
        """The variant of ``base`` whose memory input is the memory ``store`` holds."""
        held = sorted((k, list(v.shape), v.dtype.name) for k, v in store.items()
                      if k == "memory" or k.startswith("memory/"))
        for name, entry in self.entries.items():
            if name == base or name.startswith(base + "_"):
                wanted = sorted((leaf["name"], leaf["shape"], leaf["dtype"])
                                for leaf in entry["inputs"].get("memory", []))
                if wanted == held:
                    return name
        raise Refused(f"the state's memory ({len(held)} arrays) fits no exported {base}: the "
                      "state file belongs to another artifact")

    def __call__(self, name: str, store: dict, **given) -> dict:
        """Calls ``name`` on the groups ``given`` or read from ``store``; writes its
        state, parameter and memory outputs back into ``store``; returns the others."""
        entry = self.entries[name]
        args = []
        for group, leaves in entry["inputs"].items():
            if group in given:
                args.append([given[group]])
                continue
            prefix = GROUP_PREFIX[group]
            try:
                args.append([store[prefix + leaf["name"][len(group):]] for leaf in leaves])
            except KeyError as err:
                raise Refused(f"the state file lacks {err.args[0]}, an input of {name}: it "
                              "belongs to another artifact") from None
        out = self.calls[name](*args)
        if name not in self.compiled:  # compiled at its first call
            self.compiled.add(name)
            release_free_memory()
        rest = {}
        for group, values in out.items():
            if group not in GROUP_PREFIX:
                names = [leaf["name"] for leaf in entry["outputs"][group]]
                rest[group] = values[0] if names == [group] else dict(zip(names, values))
                continue
            prefix = GROUP_PREFIX[group]
            for key in [k for k in store if k == prefix or k.startswith(prefix + "/")]:
                del store[key]
            for leaf, value in zip(entry["outputs"][group], values):
                store[prefix + leaf["name"][len(group):]] = value
        return rest


def check_shapes(store: dict, manifest: dict, path: str) -> None:
    """The state file's parameters, statistics and step are the artifact's (its optimizer
    state and memory change structure between tasks: `Functions.matching` checks those)."""
    for leaf in manifest["state"]["leaves"]:
        if leaf["name"].startswith(("state/opt_state", "memory")):
            continue
        value = store.get(leaf["name"])
        if value is None:
            raise Refused(f"state file {path} lacks {leaf['name']}: it belongs to another "
                          "artifact")
        if list(value.shape) != leaf["shape"] or value.dtype.name != leaf["dtype"]:
            raise Refused(f"state file {path}: {leaf['name']} is {value.dtype.name}"
                          f"{list(value.shape)}; the artifact's is {leaf['dtype']}"
                          f"{leaf['shape']}")


def train_task(functions: Functions, store: dict, progress: dict, task: dict,
               manifest: dict, folder: str) -> dict:
    """Trains, ends and evaluates the new task; returns its accuracy record."""
    jnp = functions.jax.numpy
    run = manifest["run"]
    t = len(progress["tasks"])
    cpt, bs = run["classes_per_task"], run["batch_size"]
    offset = int(task["y_train"][0]) - int(task["y_train"][0]) % cpt
    rng = np.random.default_rng([run["seed"], t])
    fill = run["pad_value"] or None

    def epoch():
        return epoch_batches(task["x_train"], task["y_train"], bs, rng, augment=run["augment"],
                             fill=fill, keep_remainder=run["last_batch"] == "keep")

    def one():
        return next(epoch())

    x, y = one()
    functions(functions.matching("begin_task", store), store, x=x, y=y)
    class_offset = jnp.asarray(offset, jnp.int32)
    pending, steps = [], 0
    for e in range(run["epochs"]):
        for x, y in epoch():
            if len(x) < 2:
                raise Refused(f"an epoch's last batch holds {len(x)} sample; the exported step "
                              "takes 2 or more: give the task a training size that leaves no "
                              f"single sample after batches of {bs}")
            metrics = functions("train_step", store, x=x, y=y, class_offset=class_offset)
            pending.append(metrics["metrics"])
            steps += 1
            if len(pending) >= CHECK_EVERY:
                check_finite(pending, steps - len(pending), t)
                pending = []
        check_finite(pending, steps - len(pending), t)
        pending = []
    x, y = one()
    functions("end_task", store, x=x, y=y)

    seen = progress["tasks"] + [{"task": t, "class_offset": offset,
                                 "eval": os.path.join("eval", f"task{t}.npz"),
                                 "size": int(len(task["y_eval"]))}]
    til, cil = [], []
    for entry in seen:
        if entry["task"] == t:
            xe, ye = task["x_eval"], task["y_eval"]
        else:
            arrays = load_npz(os.path.join(folder, entry["eval"]), "evaluation file")
            xe, ye = arrays["x"], arrays["y"]
        right = np.zeros(2, np.int64)
        for xb, yb, valid in eval_batches(xe, ye, run["eval_batch_size"]):
            out = functions("eval_step", store, x=xb, y=yb, valid=valid,
                            class_offset=jnp.asarray(entry["class_offset"], jnp.int32))
            right += [int(out["til"]), int(out["cil"])]
        til.append(100.0 * right[0] / len(ye))
        cil.append(100.0 * right[1] / len(ye))
    return {"task": t, "class_offset": offset, "steps": steps, "seen": seen,
            "til": til, "cil": cil}


def check_finite(metrics: list, first: int, task: int) -> None:
    for i, m in enumerate(metrics):
        values = {k: float(v) for k, v in m.items()}
        if not all(np.isfinite(v) for v in values.values()):
            terms = ", ".join(f"{k}={v:.4g}" for k, v in values.items())
            raise Diverged(f"training diverged: the loss became non-finite at task {task + 1}, "
                           f"step {first + i + 1} of the task ({terms}); the state is unchanged")


def save(folder: str, manifest: dict, store: dict, progress: dict, task: dict,
         record: dict) -> None:
    """Writes the new task's evaluation split, then the new state file atomically."""
    eval_path = os.path.join(folder, record["seen"][-1]["eval"])
    _atomic(eval_path, lambda f: np.savez(f, x=task["x_eval"], y=task["y_eval"]))
    progress = {**progress, "tasks": record["seen"],
                "acc_til": progress["acc_til"] + [record["til"]],
                "acc_cil": progress["acc_cil"] + [record["cil"]]}
    arrays = {k: np.asarray(v) for k, v in store.items()}
    arrays[PROGRESS] = np.array(json.dumps(progress))
    _atomic(os.path.join(folder, manifest["state"]["file"]), lambda f: np.savez(f, **arrays))
    return progress


def _atomic(path: str, write) -> None:
    handle, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-",
                                   suffix=os.path.basename(path))
    try:
        with os.fdopen(handle, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="runner.py", description="Train an exported lightcl_jax run on a new task "
        "(JAX and NumPy only).")
    parser.add_argument("--artifact", default=os.path.dirname(os.path.abspath(__file__)),
                        help="the exported folder (default: this file's)")
    parser.add_argument("--task", required=True,
                        help=".npz with x_train, y_train, x_eval, y_eval of the new task")
    parser.add_argument("--json", help="also write the accuracies here")
    args = parser.parse_args(argv)
    limit_malloc_arenas()  # before JAX starts its threads
    try:
        manifest = load_manifest(args.artifact)
        store, progress = load_state(args.artifact, manifest)
        check_shapes(store, manifest, os.path.join(args.artifact, manifest["state"]["file"]))
        task = load_task(args.task, manifest["run"])
        functions = Functions(args.artifact, manifest)
        store = {k: functions.jax.numpy.asarray(v) for k, v in store.items()}
        record = train_task(functions, store, progress, task, manifest, args.artifact)
    except Refused as err:
        print(f"runner.py: error: {err}", file=sys.stderr)
        return 2
    except Diverged as err:
        print(f"runner.py: {err}", file=sys.stderr)
        return 3
    progress = save(args.artifact, manifest, store, progress, task, record)
    t = record["task"]
    summary = {"task": t, "classes": [record["class_offset"],
                                      record["class_offset"] + manifest["run"]["classes_per_task"] - 1],
               "steps": record["steps"], "til": record["til"], "cil": record["cil"],
               "avg_til": float(np.mean(record["til"])), "avg_cil": float(np.mean(record["cil"])),
               "acc_til": progress["acc_til"], "acc_cil": progress["acc_cil"]}
    print(f"task {t + 1} (classes {summary['classes'][0]}..{summary['classes'][1]}): "
          f"{record['steps']} steps; accuracy on the {t + 1} tasks seen: TIL "
          f"{summary['avg_til']:.2f}, CIL {summary['avg_cil']:.2f}")
    if args.json:
        _atomic(args.json, lambda f: f.write(json.dumps(summary, indent=1).encode()))
    return 0


if __name__ == "__main__":
    sys.exit(main())

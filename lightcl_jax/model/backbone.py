"""A saved backbone: what pre-training or the torch converter writes, and runs start from.

A backbone directory holds two things:

  * ``variables/``: the ResNet-18's ``{params, batch_stats}`` (head included),
    an orbax checkpoint;
  * ``backbone.json``: what the variables are -- format, ``nf``, classes,
    input channels, the image shape it was trained at, where it came from
    (pre-training's dataset and epochs, or the converted file), the
    per-channel normalisation it saw, and a digest of the arrays.

`save_backbone` writes both into a temporary directory beside the target and
renames it into place, so an interrupted save leaves no half backbone and an
existing one is only replaced when asked. `load_backbone` checks the format,
the tree against a ResNet-18 of the recorded width and the digest, and names
what is wrong. A run started from a backbone (``experiments.run
--init-from``) keeps its stem and stages, with a fresh head (SPEC section 2).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from typing import Any

import jax
import numpy as np

FORMAT = 1
META_FILE = "backbone.json"
VARIABLES_DIR = "variables"


class BackboneError(ValueError):
    """A backbone directory that cannot be used: missing, unreadable or inconsistent."""


def variables_digest(variables) -> str:
    """A hex digest of the arrays (paths, shapes, dtypes and values)."""
    digest = hashlib.blake2b(digest_size=16)
    for path, leaf in sorted(jax.tree_util.tree_leaves_with_path(variables),
                             key=lambda item: jax.tree_util.keystr(item[0])):
        array = np.ascontiguousarray(np.asarray(leaf))
        digest.update(repr((jax.tree_util.keystr(path), array.dtype.str, array.shape)).encode())
        digest.update(memoryview(array).cast("B"))
    return digest.hexdigest()


def _shapes(tree) -> dict[str, tuple[int, ...]]:
    return {jax.tree_util.keystr(p): tuple(np.shape(v))
            for p, v in jax.tree_util.tree_leaves_with_path(tree)}


def abstract_variables(nf: int, num_classes: int, in_channels: int) -> dict:
    """A ResNet-18's ``{params, batch_stats}`` as ShapeDtypeStructs (`jax.eval_shape`)."""
    import jax.numpy as jnp

    from lightcl_jax.model.resnet import ResNet18
    model = ResNet18(num_classes=num_classes, nf=nf)
    abstract = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0),
                                                 jnp.zeros((1, 8, 8, in_channels)), train=False))
    return {"params": abstract["params"], "batch_stats": abstract["batch_stats"]}


def check_variables(variables, nf: int, num_classes: int, in_channels: int, what: str) -> None:
    """Raises BackboneError naming the first array whose path or shape differs from a ResNet-18's."""
    want = _shapes(abstract_variables(nf, num_classes, in_channels))
    got = _shapes(variables)
    for path in sorted(set(want) | set(got)):
        if want.get(path) != got.get(path):
            raise BackboneError(f"{what}: {path} is {got.get(path, 'missing')}, a ResNet-18 with "
                                f"nf={nf}, {num_classes} classes and {in_channels} input "
                                f"channels has {want.get(path, 'no such array')}")


def save_backbone(directory: str, variables, meta: dict[str, Any], *,
                  overwrite: bool = False) -> dict:
    """Writes a backbone directory; returns the metadata written.

    Args:
      directory: the backbone directory to create.
      variables: ``{params, batch_stats}`` of a ResNet-18 (head included).
      meta: ``nf``, ``num_classes``, ``in_channels`` and ``image_shape``, and
        anything else worth keeping (``source``, ``normalisation``).
      overwrite: replace an existing backbone at ``directory``.

    Raises:
      BackboneError: ``directory`` exists (without ``overwrite``) or is not a
        backbone directory, or ``variables`` do not fit ``meta``.
    """
    import orbax.checkpoint as ocp

    directory = os.path.abspath(directory)
    for field in ("nf", "num_classes", "in_channels", "image_shape"):
        if field not in meta:
            raise BackboneError(f"backbone metadata needs {field!r}")
    # float32, as a ResNet-18's variables are (and as load_backbone restores them).
    variables = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float32),
                                       {"params": variables["params"],
                                        "batch_stats": variables["batch_stats"]})
    check_variables(variables, meta["nf"], meta["num_classes"], meta["in_channels"],
                    f"backbone for {directory}")
    if os.path.exists(directory):
        if not overwrite:
            raise BackboneError(f"{directory} exists; pass --overwrite to replace it, or choose "
                                "another output directory")
        if not os.path.isfile(os.path.join(directory, META_FILE)):
            raise BackboneError(f"{directory} exists and is not a backbone directory (no "
                                f"{META_FILE}); it is not replaced")
    parent = os.path.dirname(directory)
    os.makedirs(parent, exist_ok=True)
    meta = json.loads(json.dumps({"format": FORMAT, **meta,
                                  "digest": variables_digest(variables)}))
    staging = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(directory)}-")
    try:
        # Written by this process alone (in a run of several, process 0 writes the
        # backbone): orbax would otherwise wait for every process at its barriers.
        alone = ocp.options.MultiprocessingOptions(primary_host=jax.process_index(),
                                                   active_processes={jax.process_index()})
        checkpointer = ocp.StandardCheckpointer(multiprocessing_options=alone)
        checkpointer.save(os.path.join(staging, VARIABLES_DIR), variables)
        checkpointer.wait_until_finished()
        checkpointer.close()
        with open(os.path.join(staging, META_FILE), "w") as f:
            json.dump(meta, f, indent=2)
            f.write("\n")
        if os.path.exists(directory):
            old = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(directory)}-old-")
            os.replace(directory, os.path.join(old, "backbone"))
            os.replace(staging, directory)
            shutil.rmtree(old)
        else:
            os.replace(staging, directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return meta


def read_meta(directory: str) -> dict:
    """The ``backbone.json`` of a backbone directory, checked for format and fields."""
    path = os.path.join(directory, META_FILE)
    if not os.path.isdir(directory):
        raise BackboneError(f"backbone {directory} does not exist; give a directory written by "
                            "experiments.pretrain or experiments.convert_torch")
    try:
        with open(path) as f:
            meta = json.load(f)
    except (OSError, ValueError) as err:
        raise BackboneError(f"backbone {directory} has no readable {META_FILE} "
                            f"({type(err).__name__}: {err}); give a directory written by "
                            "experiments.pretrain or experiments.convert_torch") from err
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise BackboneError(f"backbone {directory} has format {found!r}; this version reads "
                            f"format {FORMAT}")
    for field in ("nf", "num_classes", "in_channels", "image_shape", "digest"):
        if field not in meta:
            raise BackboneError(f"backbone {directory}: {META_FILE} lacks {field!r}")
    for field in ("nf", "num_classes", "in_channels"):
        if not (isinstance(meta[field], int) and meta[field] >= 1):
            raise BackboneError(f"backbone {directory}: {META_FILE} has {field}="
                                f"{meta[field]!r}; it must be an integer >= 1")
    return meta


def load_backbone(directory: str) -> tuple[dict, dict]:
    """``(variables, meta)`` of a backbone directory, NumPy arrays.

    Raises:
      BackboneError: missing or unreadable directory, another format, arrays
        that are not a ResNet-18 of the recorded width, or arrays whose digest
        differs from the recorded one (a corrupt or edited backbone).
    """
    import orbax.checkpoint as ocp

    directory = os.path.abspath(directory)
    meta = read_meta(directory)
    target = abstract_variables(meta["nf"], meta["num_classes"], meta["in_channels"])
    try:
        checkpointer = ocp.StandardCheckpointer()
        variables = checkpointer.restore(os.path.join(directory, VARIABLES_DIR), target)
        checkpointer.close()
    except Exception as err:  # orbax and the file system raise many types
        reason = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise BackboneError(f"backbone {directory}: the arrays in {VARIABLES_DIR}/ are unreadable "
                            f"or do not fit a ResNet-18 with nf={meta['nf']} "
                            f"({type(err).__name__}: {reason[:200]})") from err
    variables = jax.tree_util.tree_map(np.asarray, variables)
    check_variables(variables, meta["nf"], meta["num_classes"], meta["in_channels"],
                    f"backbone {directory}")
    if variables_digest(variables) != meta["digest"]:
        raise BackboneError(f"backbone {directory}: the arrays' digest differs from the one in "
                            f"{META_FILE}; the backbone is corrupt or was edited")
    return variables, meta

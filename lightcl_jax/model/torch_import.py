"""The reference PyTorch ResNet-18's state_dict as lightcl_jax variables.

The authors' model (Mammoth's CIFAR ResNet-18 with its last stage split in two)
names its tensors::

    conv1.weight, bn1.{weight,bias,running_mean,running_var,num_batches_tracked}
    layer{1,2,3}.{0,1}.{conv1,bn1,conv2,bn2}.*      layer{2,3}.0.shortcut.{0,1}.*
    layer4_1.0.*  (stage 4, block 1, with shortcut)  layer4_2.0.*  (stage 4, block 2)
    linear.{weight,bias}

and repeats every one of them under aliases: ``_features.K.*`` (an
``nn.Sequential`` of conv1, bn1, a ReLU, layer1, layer2, layer3, layer4_1,
layer4_2) and ``classifier.*`` (the linear head): 244 keys for ResNet-18.
`convert_state_dict` maps the primary names to `lightcl_jax.model.resnet`'s
parameter paths and checks that every alias holds the same tensor.

Layouts: a PyTorch conv weight is (out, in, kh, kw), a Flax kernel (kh, kw,
in, out); a Linear weight is (out, in), a Dense kernel (in, out). BatchNorm's
weight and bias are Flax's scale and bias, its running mean and variance the
``batch_stats``; ``num_batches_tracked`` is dropped (PyTorch uses it only for
momentum=None).

Everything here is NumPy: torch is needed only to read a ``.pth`` file
(`read_state_dict`), and ``.npz`` files of the same names need nothing.
"""

from __future__ import annotations

import os
import re
from typing import Mapping

import numpy as np

_BN_PARAMS = {"weight": ("params", "scale"), "bias": ("params", "bias"),
              "running_mean": ("batch_stats", "mean"), "running_var": ("batch_stats", "var")}
_BN_FIELDS = (*_BN_PARAMS, "num_batches_tracked")

# The reference's top-level modules for stages, in network order, and the blocks
# of lightcl_jax each of their children is.
_STAGE_MODULES = ("layer1", "layer2", "layer3", "layer4_1", "layer4_2")


def _block_name(module: str, child: int) -> str | None:
    """lightcl_jax's block for ``<module>.<child>``, e.g. layer4_2.0 -> stage4_block2."""
    if module.startswith("layer4_"):
        return f"stage4_block{module[-1]}" if child == 0 else None
    return f"stage{module[-1]}_block{child + 1}" if child in (0, 1) else None


class ConversionError(ValueError):
    """A state_dict that is not the reference ResNet-18's."""


def _target(key: str):
    """(collection, path) of a primary key's tensor, "skip", or None when unknown."""
    parts = key.split(".")
    if key == "conv1.weight":
        return "params", ("stem_conv", "kernel")
    if parts[0] == "bn1" and len(parts) == 2 and parts[1] in _BN_FIELDS:
        return _bn("stem_bn", parts[1])
    if parts[0] == "linear" and len(parts) == 2 and parts[1] in ("weight", "bias"):
        return "params", ("head", "kernel" if parts[1] == "weight" else "bias")
    if parts[0] in _STAGE_MODULES and len(parts) >= 4 and parts[1].isdigit():
        block = _block_name(parts[0], int(parts[1]))
        if block is None:
            return None
        rest = parts[2:]
        if rest in (["conv1", "weight"], ["conv2", "weight"]):
            return "params", (block, rest[0], "kernel")
        if rest[0] in ("bn1", "bn2") and len(rest) == 2 and rest[1] in _BN_FIELDS:
            return _bn((block, rest[0]), rest[1])
        if rest == ["shortcut", "0", "weight"]:
            return "params", (block, "shortcut_conv", "kernel")
        if rest[:2] == ["shortcut", "1"] and len(rest) == 3 and rest[2] in _BN_FIELDS:
            return _bn((block, "shortcut_bn"), rest[2])
    return None


def _bn(module, field: str):
    if field == "num_batches_tracked":
        return "skip"
    collection, name = _BN_PARAMS[field]
    module = (module,) if isinstance(module, str) else module
    return collection, (*module, name)


def _alias_map(keys) -> dict[str, str]:
    """{alias key: primary key} for the ``_features.*`` and ``classifier.*`` keys.

    ``_features``' children that hold tensors are, in order: conv1, bn1, then
    the stage modules (a parameterless ReLU may sit between; its index is
    simply absent).

    Raises:
      ConversionError: more ``_features`` children than the reference has.
    """
    feature_keys = [k for k in keys if k.startswith("_features.")]
    indices = sorted({int(k.split(".")[1]) for k in feature_keys
                      if k.split(".")[1].isdigit()})
    modules = ("conv1", "bn1", *_STAGE_MODULES)
    if len(indices) > len(modules):
        raise ConversionError(f"_features has {len(indices)} children with tensors "
                              f"(indices {indices}); the reference has {len(modules)}: "
                              f"{', '.join(modules)}")
    module_of = dict(zip(indices, modules))
    aliases = {}
    for key in keys:
        parts = key.split(".")
        if parts[0] == "classifier":
            aliases[key] = ".".join(["linear", *parts[1:]])
        elif parts[0] == "_features" and len(parts) > 2 and parts[1].isdigit():
            aliases[key] = ".".join([module_of[int(parts[1])], *parts[2:]])
    return aliases


def convert_state_dict(state_dict: Mapping[str, np.ndarray]) -> tuple[dict, dict]:
    """The reference ResNet-18's tensors as lightcl_jax ``{params, batch_stats}``.

    Args:
      state_dict: {name: array} with the reference's names (aliases optional).

    Returns:
      ``(variables, info)``: nested NumPy float32 variables that
      ``ResNet18(num_classes, nf)`` takes, and ``{"nf", "num_classes",
      "in_channels", "keys", "aliases"}`` read from the tensors.

    Raises:
      ConversionError: an unknown key (names it and the expected forms), a
        missing tensor, a wrong shape, or an alias whose tensor differs from
        the one it repeats.
    """
    arrays = {str(k): np.asarray(v) for k, v in state_dict.items()}
    aliases = _alias_map(arrays)
    primary = {k: v for k, v in arrays.items() if k not in aliases}
    targets = _targets(arrays, aliases, primary)
    if "conv1.weight" not in primary or "linear.weight" not in primary:
        raise ConversionError("the state_dict lacks conv1.weight or linear.weight; it is not "
                              "a ResNet-18 of the reference")
    stem, head = primary["conv1.weight"], primary["linear.weight"]
    if stem.ndim != 4 or head.ndim != 2:
        raise ConversionError(f"conv1.weight must be (out, in, 3, 3) and linear.weight "
                              f"(classes, features); got {stem.shape} and {head.shape}")
    nf, in_channels = stem.shape[:2]
    num_classes = primary["linear.weight"].shape[0]
    expected = _expected_shapes(nf, in_channels, num_classes)
    missing = sorted(set(expected) - set(targets))
    if missing:
        raise ConversionError(f"{len(missing)} tensors of a ResNet-18 with nf={nf} are missing, "
                              f"e.g. {', '.join(missing[:5])}")
    extra = sorted(set(targets) - set(expected))
    if extra:
        raise ConversionError(f"{len(extra)} tensors are not in the reference ResNet-18 with "
                              f"nf={nf}, e.g. {', '.join(extra[:5])} (a shortcut only exists in "
                              "the first block of stages 2-4)")
    variables: dict = {"params": {}, "batch_stats": {}}
    for key, (collection, path) in targets.items():
        value = primary[key]
        if tuple(value.shape) != expected[key]:
            raise ConversionError(f"{key} is {tuple(value.shape)}; a ResNet-18 with nf={nf}, "
                                  f"{in_channels} input channels and {num_classes} classes "
                                  f"has {expected[key]}")
        node = variables[collection]
        for name in path[:-1]:
            node = node.setdefault(name, {})
        node[path[-1]] = _to_flax(value, path)
    info = {"nf": int(nf), "num_classes": int(num_classes), "in_channels": int(in_channels),
            "keys": len(arrays), "aliases": len(aliases)}
    return variables, info


def _targets(arrays: dict, aliases: dict[str, str], primary: dict) -> dict:
    """{primary key: (collection, path)} of the tensors to convert.

    Raises:
      ConversionError: unknown keys, aliases without the keys they repeat, or
        an alias whose tensor differs from its key's.
    """
    targets, unknown = {}, []
    for key in primary:
        target = _target(key)
        if target is None:
            unknown.append(key)
        elif target != "skip":
            targets[key] = target
    for alias, key in aliases.items():
        if key not in primary or _target(key) is None:
            unknown.append(alias)
    orphans = sorted(alias for alias, key in aliases.items() if key not in primary)
    if orphans and len(orphans) == len(aliases) and not targets:
        raise ConversionError(f"the state_dict holds only the _features.*/classifier.* aliases "
                              f"({len(orphans)} keys) without the names they repeat (conv1.weight, "
                              "layer1.0.*, linear.*, ...); save the model's full state_dict")
    if unknown:
        raise ConversionError(
            f"{len(unknown)} keys are not the reference ResNet-18's, e.g. "
            f"{', '.join(sorted(unknown)[:5])}; expected conv1.weight, bn1.*, "
            "layer{1,2,3}.{0,1}.*, layer4_1.0.*, layer4_2.0.*, *.shortcut.{0,1}.*, linear.*, "
            "and optionally their _features.* and classifier.* aliases")
    for alias, key in sorted(aliases.items()):
        if arrays[alias].shape != primary[key].shape or not np.array_equal(arrays[alias],
                                                                            primary[key]):
            raise ConversionError(f"alias {alias} does not hold the same tensor as {key} "
                                  f"(shapes {arrays[alias].shape} and {primary[key].shape}); "
                                  "the checkpoint is inconsistent")
    return targets


def _to_flax(value: np.ndarray, path: tuple[str, ...]) -> np.ndarray:
    """A PyTorch tensor in Flax's layout, as contiguous float32."""
    if value.ndim == 4:
        value = value.transpose(2, 3, 1, 0)     # (out, in, kh, kw) -> (kh, kw, in, out)
    elif path[-1] == "kernel":
        value = value.T                         # Linear (out, in) -> Dense (in, out)
    return np.ascontiguousarray(value, np.float32)


def _from_flax(value, path: tuple[str, ...]) -> np.ndarray:
    """A Flax array in PyTorch's layout (the inverse of `_to_flax`), as a new float32 array."""
    value = np.asarray(value, np.float32)
    if value.ndim == 4:
        value = value.transpose(3, 2, 0, 1)     # (kh, kw, in, out) -> (out, in, kh, kw)
    elif path[-1] == "kernel":
        value = value.T
    return np.array(value)


def export_state_dict(variables: Mapping, keys) -> dict[str, np.ndarray]:
    """lightcl_jax ``{params, batch_stats}`` under the reference's names (the inverse of
    `convert_state_dict`), for those of ``keys`` that have a counterpart in ours.

    Args:
      variables: ``{"params", "batch_stats"}`` of a `ResNet18`.
      keys: the reference model's state_dict keys, e.g. ``model.state_dict().keys()``;
        keys ours has no tensor for (``num_batches_tracked``, ``_features.*``
        aliases) are left out of the result, so the caller keeps its own values.

    Returns:
      {key: float32 array in PyTorch's layout}.
    """
    out = {}
    for key in keys:
        target = _target(key)
        if target in (None, "skip"):
            continue
        collection, path = target
        node = variables[collection]
        for name in path:
            node = node[name]
        out[key] = _from_flax(node, path)
    return out


def _expected_shapes(nf: int, cin: int, num_classes: int) -> dict[str, tuple[int, ...]]:
    """{primary key: PyTorch shape} of every tensor the conversion needs."""
    shapes = {"conv1.weight": (nf, cin, 3, 3), "linear.weight": (num_classes, 8 * nf),
              "linear.bias": (num_classes,)}

    def bn(prefix, width):
        shapes.update({f"{prefix}.{f}": (width,) for f in _BN_PARAMS})

    bn("bn1", nf)
    width_in = nf
    for stage in range(1, 5):
        width = nf * 2 ** (stage - 1)
        blocks = [(f"layer{stage}", 0), (f"layer{stage}", 1)] if stage < 4 else [
            ("layer4_1", 0), ("layer4_2", 0)]
        for number, (module, child) in enumerate(blocks):
            prefix = f"{module}.{child}"
            shapes[f"{prefix}.conv1.weight"] = (width, width_in, 3, 3)
            shapes[f"{prefix}.conv2.weight"] = (width, width, 3, 3)
            bn(f"{prefix}.bn1", width)
            bn(f"{prefix}.bn2", width)
            if number == 0 and width != width_in:
                shapes[f"{prefix}.shortcut.0.weight"] = (width, width_in, 1, 1)
                bn(f"{prefix}.shortcut.1", width)
            width_in = width
    return shapes


def read_state_dict(path: str) -> dict[str, np.ndarray]:
    """The tensors of a ``.pth``/``.pt`` (torch) or ``.npz`` file, as NumPy arrays.

    A ``.pth`` may hold the state_dict itself or a dict with it under
    ``state_dict``, ``model`` or ``net``; a ``module.`` prefix (DataParallel)
    is removed. torch is imported only here, and only for ``.pth``/``.pt``.

    Raises:
      ValueError: missing file, unknown suffix, or a file that holds no
        state_dict.
      ImportError: a ``.pth`` file without torch installed (says how to get it).
    """
    if not os.path.isfile(path):
        raise ValueError(f"{path} does not exist or is not a file")
    suffix = os.path.splitext(path)[1].lower()
    if suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as data:
                return {re.sub(r"^module\.", "", k): data[k] for k in data.files}
        except Exception as err:
            raise ValueError(f"{path} is not a readable .npz file ({type(err).__name__}: "
                             f"{err})") from err
    if suffix not in (".pth", ".pt", ".ckpt"):
        raise ValueError(f"{path}: unknown checkpoint type {suffix!r}; give a PyTorch "
                         ".pth/.pt/.ckpt file or an .npz of the same tensor names")
    try:
        import torch
    except ImportError as err:
        raise ImportError("reading a .pth checkpoint needs PyTorch, an optional extra: "
                          "pip install torch (CPU build is enough), or save the state_dict "
                          "as .npz with NumPy") from err
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"{path} is not a readable PyTorch checkpoint ({type(err).__name__}: "
                         f"{str(err).splitlines()[0] if str(err) else ''}). It is read with "
                         "weights_only=True, which refuses pickled objects other than tensors: "
                         "re-save the model's state_dict alone (torch.save(model.state_dict(), "
                         "...)), or as .npz with NumPy") from err
    if isinstance(loaded, Mapping):
        for wrapper in ("state_dict", "model", "net"):
            if isinstance(loaded.get(wrapper), Mapping):
                loaded = loaded[wrapper]
                break
    if not isinstance(loaded, Mapping) or not all(hasattr(v, "detach") for v in loaded.values()):
        raise ValueError(f"{path} does not hold a state_dict of tensors (got "
                         f"{type(loaded).__name__})")
    # float(): NumPy has no bfloat16; integer counters (num_batches_tracked) stay integers.
    return {re.sub(r"^module\.", "", k): (v.detach().cpu().float() if v.is_floating_point()
                                          else v.detach().cpu()).numpy()
            for k, v in loaded.items()}

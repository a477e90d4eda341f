"""The reference PyTorch checkpoint's import: names, layouts, aliases, and the CLI.

The state dicts are made here with the reference's exact names and shapes; the
converted model's logits are checked against a plain NumPy forward pass of the
PyTorch-layout tensors (NCHW, eval-mode BatchNorm), written in this file.
"""

import json
import os

import jax
import numpy as np
import pytest

from experiments import convert_torch
from lightcl_jax.model.backbone import BackboneError, load_backbone, save_backbone
from lightcl_jax.model.resnet import ResNet18
from lightcl_jax.model.torch_import import (ConversionError, convert_state_dict,
                                            export_state_dict)

NF, CIN, CLASSES = 4, 3, 7


def _reference_state_dict(rng, nf=NF, cin=CIN, classes=CLASSES, aliases=True):
    """The reference's state_dict names and shapes, random values (torch layouts)."""
    sd = {}

    def conv(name, cout, cin_, k):
        sd[name] = rng.normal(0, 0.3, (cout, cin_, k, k)).astype(np.float32)

    def bn(name, c):
        sd[f"{name}.weight"] = rng.uniform(0.5, 1.5, c).astype(np.float32)
        sd[f"{name}.bias"] = rng.normal(0, 0.1, c).astype(np.float32)
        sd[f"{name}.running_mean"] = rng.normal(0, 0.1, c).astype(np.float32)
        sd[f"{name}.running_var"] = rng.uniform(0.5, 2.0, c).astype(np.float32)
        sd[f"{name}.num_batches_tracked"] = np.array(100, np.int64)

    def block(prefix, cin_, cout, shortcut):
        conv(f"{prefix}.conv1.weight", cout, cin_, 3)
        bn(f"{prefix}.bn1", cout)
        conv(f"{prefix}.conv2.weight", cout, cout, 3)
        bn(f"{prefix}.bn2", cout)
        if shortcut:
            conv(f"{prefix}.shortcut.0.weight", cout, cin_, 1)
            bn(f"{prefix}.shortcut.1", cout)

    conv("conv1.weight", nf, cin, 3)
    bn("bn1", nf)
    block("layer1.0", nf, nf, False)
    block("layer1.1", nf, nf, False)
    block("layer2.0", nf, 2 * nf, True)
    block("layer2.1", 2 * nf, 2 * nf, False)
    block("layer3.0", 2 * nf, 4 * nf, True)
    block("layer3.1", 4 * nf, 4 * nf, False)
    block("layer4_1.0", 4 * nf, 8 * nf, True)
    block("layer4_2.0", 8 * nf, 8 * nf, False)
    sd["linear.weight"] = rng.normal(0, 0.3, (classes, 8 * nf)).astype(np.float32)
    sd["linear.bias"] = rng.normal(0, 0.1, classes).astype(np.float32)
    if aliases:
        # nn.Sequential(conv1, bn1, ReLU, layer1, layer2, layer3, layer4_1, layer4_2)
        index = {"conv1": 0, "bn1": 1, "layer1": 3, "layer2": 4, "layer3": 5, "layer4_1": 6,
                 "layer4_2": 7}
        for key in list(sd):
            top, rest = key.split(".", 1)
            if top == "linear":
                sd[f"classifier.{rest}"] = sd[key]
            else:
                sd[f"_features.{index[top]}.{rest}"] = sd[key]
    return sd


def _conv(x, w, stride=1, pad=1):
    n, c, h, wd = x.shape
    k = w.shape[2]
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    ho, wo = (h + 2 * pad - k) // stride + 1, (wd + 2 * pad - k) // stride + 1
    out = np.zeros((n, w.shape[0], ho, wo))
    for i in range(k):
        for j in range(k):
            patch = xp[:, :, i:i + stride * ho:stride, j:j + stride * wo:stride]
            out += np.einsum("nchw,oc->nohw", patch, w[:, :, i, j])
    return out


def _bn(x, sd, name):
    scale = sd[f"{name}.weight"] / np.sqrt(sd[f"{name}.running_var"] + 1e-5)
    shift = sd[f"{name}.bias"] - sd[f"{name}.running_mean"] * scale
    return x * scale[None, :, None, None] + shift[None, :, None, None]


def _numpy_forward(sd, x_nchw):
    relu = lambda v: np.maximum(v, 0)  # noqa: E731
    h = relu(_bn(_conv(x_nchw, sd["conv1.weight"]), sd, "bn1"))
    blocks = [("layer1.0", 1), ("layer1.1", 1), ("layer2.0", 2), ("layer2.1", 1),
              ("layer3.0", 2), ("layer3.1", 1), ("layer4_1.0", 2), ("layer4_2.0", 1)]
    for prefix, stride in blocks:
        out = relu(_bn(_conv(h, sd[f"{prefix}.conv1.weight"], stride), sd, f"{prefix}.bn1"))
        out = _bn(_conv(out, sd[f"{prefix}.conv2.weight"]), sd, f"{prefix}.bn2")
        if f"{prefix}.shortcut.0.weight" in sd:
            short = _bn(_conv(h, sd[f"{prefix}.shortcut.0.weight"], stride, 0), sd,
                        f"{prefix}.shortcut.1")
        else:
            short = h
        h = relu(out + short)
    pooled = h.mean(axis=(2, 3))
    return pooled @ sd["linear.weight"].T + sd["linear.bias"]


def test_reference_state_dict_converts_to_the_same_logits(tmp_path, capsys):
    rng = np.random.default_rng(0)
    sd = _reference_state_dict(rng)
    assert len(sd) == 244                     # the reference's count, aliases included
    path = tmp_path / "ref.npz"
    np.savez(path, **sd)
    out = tmp_path / "backbone"
    assert convert_torch.main([str(path), str(out)]) == 0
    assert "converted 244 keys (122 aliases checked)" in capsys.readouterr().out

    variables, meta = load_backbone(str(out))
    assert (meta["nf"], meta["num_classes"], meta["in_channels"]) == (NF, CLASSES, CIN)
    assert meta["source"]["kind"] == "convert_torch"
    x = rng.normal(0, 1, (3, 16, 16, CIN)).astype(np.float32)
    logits, _ = ResNet18(num_classes=CLASSES, nf=NF).apply(variables, x, train=False)
    expected = _numpy_forward({k: v.astype(np.float64) for k, v in sd.items()},
                              x.transpose(0, 3, 1, 2).astype(np.float64))
    np.testing.assert_allclose(np.asarray(logits), expected, rtol=1e-4, atol=1e-4)


def test_layouts_of_single_tensors():
    sd = _reference_state_dict(np.random.default_rng(1), aliases=False)
    variables, info = convert_state_dict(sd)
    assert info == {"nf": NF, "num_classes": CLASSES, "in_channels": CIN, "keys": 122,
                    "aliases": 0}
    w = sd["layer2.0.conv1.weight"]          # (out, in, kh, kw) -> (kh, kw, in, out)
    got = variables["params"]["stage2_block1"]["conv1"]["kernel"]
    assert got.shape == (3, 3, NF, 2 * NF)
    assert got[2, 0, 1, 5] == w[5, 1, 2, 0]
    assert np.array_equal(variables["params"]["head"]["kernel"], sd["linear.weight"].T)
    assert np.array_equal(variables["batch_stats"]["stage4_block2"]["bn2"]["var"],
                          sd["layer4_2.0.bn2.running_var"])
    assert np.array_equal(variables["params"]["stage3_block1"]["shortcut_bn"]["scale"],
                          sd["layer3.0.shortcut.1.weight"])


def test_export_is_the_inverse_of_the_conversion():
    sd = _reference_state_dict(np.random.default_rng(3))
    variables, _ = convert_state_dict(sd)
    back = export_state_dict(variables, sd.keys())
    # every tensor but the counters and the _features / classifier aliases comes back
    skipped = {k for k in sd if k.endswith("num_batches_tracked") or
               k.startswith(("_features.", "classifier."))}
    assert set(back) == set(sd) - skipped
    for key, value in back.items():
        assert value.dtype == np.float32 and np.array_equal(value, sd[key]), key
    # a single element placed by hand: Flax (kh, kw, in, out) -> PyTorch (out, in, kh, kw)
    variables["params"]["stage2_block1"]["conv1"]["kernel"][2, 0, 1, 5] = 42.0
    assert export_state_dict(variables, ["layer2.0.conv1.weight"])[
        "layer2.0.conv1.weight"][5, 1, 2, 0] == 42.0


def test_aliases_without_the_relu_index_are_accepted():
    sd = _reference_state_dict(np.random.default_rng(2), aliases=False)
    index = {"conv1": 0, "bn1": 1, "layer1": 2, "layer2": 3, "layer3": 4, "layer4_1": 5,
             "layer4_2": 6}
    for key in list(sd):
        top, rest = key.split(".", 1)
        if top != "linear":
            sd[f"_features.{index[top]}.{rest}"] = sd[key]
    _, info = convert_state_dict(sd)
    assert info["aliases"] == 120


@pytest.mark.parametrize("edit, message", [
    (lambda sd: sd.__setitem__("_features.6.0.conv2.weight",
                               sd["_features.6.0.conv2.weight"] + 1),
     "alias _features.6.0.conv2.weight does not hold the same tensor as layer4_1.0.conv2.weight"),
    (lambda sd: (sd.pop("layer3.1.bn2.running_var"), sd.pop("_features.5.1.bn2.running_var")),
     "1 tensors of a ResNet-18 with nf=4 are missing, e.g. layer3.1.bn2.running_var"),
    (lambda sd: sd.__setitem__("layer5.0.conv1.weight", np.zeros(1)),
     "1 keys are not the reference ResNet-18's, e.g. layer5.0.conv1.weight"),
    (lambda sd: sd.update({"layer2.1.shortcut.0.weight": np.zeros((8, 8, 1, 1), np.float32)}),
     "1 tensors are not in the reference ResNet-18 with nf=4, e.g. layer2.1.shortcut.0.weight"),
    (lambda sd: [sd.pop(k) for k in list(sd) if not k.startswith(("_features", "classifier"))],
     "holds only the _features.*/classifier.* aliases (122 keys)"),
    (lambda sd: sd.update({k: np.zeros((8, 8, 1, 1), np.float32)
                           for k in ("layer2.1.conv2.weight", "_features.4.1.conv2.weight")}),
     "layer2.1.conv2.weight is (8, 8, 1, 1); a ResNet-18 with nf=4"),
])
def test_bad_state_dicts_are_refused_and_nothing_is_written(tmp_path, capsys, edit, message):
    sd = _reference_state_dict(np.random.default_rng(3))
    edit(sd)
    path = tmp_path / "bad.npz"
    np.savez(path, **sd)
    with pytest.raises(SystemExit) as exit_info:
        convert_torch.main([str(path), str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "out")
    with pytest.raises(ConversionError, match="ResNet-18|alias"):
        convert_state_dict(sd)


def test_existing_output_and_corrupt_backbones(tmp_path, capsys):
    sd = _reference_state_dict(np.random.default_rng(4))
    path = tmp_path / "ref.npz"
    np.savez(path, **sd)
    out = tmp_path / "backbone"
    assert convert_torch.main([str(path), str(out)]) == 0
    before = (out / "backbone.json").read_text()
    other = tmp_path / "other.npz"
    np.savez(other, **_reference_state_dict(np.random.default_rng(5)))
    with pytest.raises(SystemExit):
        convert_torch.main([str(other), str(out)])
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert (out / "backbone.json").read_text() == before
    assert convert_torch.main([str(other), str(out), "--overwrite"]) == 0
    assert (out / "backbone.json").read_text() != before

    # Variables in another float type are stored as float32 and load back.
    variables, info = convert_state_dict(_reference_state_dict(np.random.default_rng(6)))
    wide = jax.tree_util.tree_map(lambda a: a.astype(np.float64), variables)
    save_backbone(str(tmp_path / "wide"), wide, {**info, "image_shape": [32, 32, 3]})
    loaded, _ = load_backbone(str(tmp_path / "wide"))
    jax.tree_util.tree_map(np.testing.assert_array_equal, loaded, variables)

    meta = json.loads((out / "backbone.json").read_text())
    meta["digest"] = "0" * 32
    (out / "backbone.json").write_text(json.dumps(meta))
    with pytest.raises(BackboneError, match="digest differs"):
        load_backbone(str(out))
    with pytest.raises(BackboneError, match="does not exist"):
        load_backbone(str(tmp_path / "nowhere"))
    with pytest.raises(SystemExit):
        convert_torch.main([str(tmp_path / "missing.pth"), str(tmp_path / "o2")])
    assert "missing.pth does not exist" in capsys.readouterr().err


def test_pth_files_read_with_torch(tmp_path):
    torch = pytest.importorskip("torch")
    sd = _reference_state_dict(np.random.default_rng(6))
    torch.save({k: torch.from_numpy(np.array(v)) for k, v in sd.items()}, tmp_path / "ref.pth")
    np.savez(tmp_path / "ref.npz", **sd)
    assert convert_torch.main([str(tmp_path / "ref.pth"), str(tmp_path / "a")]) == 0
    assert convert_torch.main([str(tmp_path / "ref.npz"), str(tmp_path / "b")]) == 0
    a, _ = load_backbone(str(tmp_path / "a"))
    b, _ = load_backbone(str(tmp_path / "b"))
    jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)

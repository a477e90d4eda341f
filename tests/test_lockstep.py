"""`benchmarks.side_by_side.lockstep` on a tiny stream, against a stub of the authors'
`models.py` written here (their names, their forward's outputs; the real checkout is not
needed). Needs PyTorch, an optional extra: skipped without it."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from benchmarks.side_by_side import lockstep  # noqa: E402
from lightcl_jax.config import Config  # noqa: E402
from lightcl_jax.data.streams import split_into_tasks  # noqa: E402

# The authors' ResNet-18 as their models.py lays it out: stem conv1/bn1, layer1-3 of two
# BasicBlocks, layer4_1 and layer4_2 of one each, linear; forward -> (logits, {taps, linear}).
STUB = '''
import torch
from torch import nn
from torch.nn.functional import relu, avg_pool2d
MOMENTUM = {momentum}

def conv3x3(cin, cout, stride=1):
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)

class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride, out_feature=False):
        super().__init__()
        self.conv1, self.bn1 = conv3x3(cin, cout, stride), nn.BatchNorm2d(cout, momentum=MOMENTUM)
        self.conv2, self.bn2 = conv3x3(cout, cout), nn.BatchNorm2d(cout, momentum=MOMENTUM)
        self.out_feature, self.shortcut = out_feature, nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(cout, momentum=MOMENTUM))

    def forward(self, x):
        hidden = relu(self.bn1(self.conv1(x)))
        out = relu(self.bn2(self.conv2(hidden)) + self.shortcut(x))
        return (out, [hidden, out]) if self.out_feature else out

class Stage(nn.Sequential):
    def forward(self, x):
        (block,) = self
        return block(x)

class ResNet(nn.Module):
    def __init__(self, nf, num_classes):
        super().__init__()
        self.conv1, self.bn1 = conv3x3(3, nf), nn.BatchNorm2d(nf, momentum=MOMENTUM)
        self.layer1 = nn.Sequential(BasicBlock(nf, nf, 1), BasicBlock(nf, nf, 1))
        self.layer2 = nn.Sequential(BasicBlock(nf, 2 * nf, 2), BasicBlock(2 * nf, 2 * nf, 1))
        self.layer3 = nn.Sequential(BasicBlock(2 * nf, 4 * nf, 2), BasicBlock(4 * nf, 4 * nf, 1))
        self.layer4_1 = Stage(BasicBlock(4 * nf, 8 * nf, 2, True))
        self.layer4_2 = Stage(BasicBlock(8 * nf, 8 * nf, 1, True))
        self.linear = nn.Linear(8 * nf, num_classes)

    def forward(self, x):
        out = relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        features = {{}}
        out, taps = self.layer4_1(out)
        features["layer4.0.conv1"], features["layer4.0.conv2"] = taps
        out, taps = self.layer4_2(out)
        features["layer4.1.conv1"], features["layer4.1.conv2"] = taps
        out = self.linear(avg_pool2d(out, out.shape[2]).flatten(1))
        features["linear"] = out
        return out, features

def resnet18(dataset, nf=64):
    return ResNet(nf, 4)
'''

CONFIG = Config(strategy="lightcl", dataset="digits", epochs=1, nf=4, batch_size=16,
                strategy_args={"buffer_size": 6}, last_batch="keep", lr=0.05).resolved()


def _stream():
    """Two tasks of two classes, 8x8x3 images; 40 training samples a task (a last batch
    of 8 behind two of 16)."""
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(4), 26).astype(np.int32)
    x = rng.normal(size=(len(y), 8, 8, 3)).astype(np.float32)
    x[np.arange(len(y)), y % 8, :, :] += 2.0
    train = np.concatenate([np.flatnonzero(y == c)[:20] for c in range(4)])
    held = np.setdiff1d(np.arange(len(y)), train)
    return split_into_tasks("stub", x[train], y[train], x[held], y[held], 4, 2)


def _checkout(tmp_path, momentum):
    (tmp_path / "models.py").write_text(STUB.format(momentum=momentum))
    return str(tmp_path)


def test_every_step_from_the_same_state_agrees_with_the_authors_protocol(tmp_path):
    report = []
    out = lockstep.lockstep(_checkout(tmp_path, 0.1), CONFIG, _stream(), report=report.append)
    assert [t["steps"] for t in out["tasks"]] == [3, 3]
    assert "buffer taps and logits/layer4.1.conv2" in out["tasks"][1]["worst"]
    for task in out["tasks"]:
        worst = {k: v for k, v in task["worst"].items() if "loss" not in k}
        assert max(worst.values()) < 1e-4, worst
        assert task["worst"]["loss |ours - theirs|"] < 1e-5
        assert task["vital_channels_differing"] == 0
        assert task["ours"] == task["theirs"] and task["eval logits"] < 1e-5
    assert "task 1: 3 steps" in report[1] and "vital channels differing 0" in report[1]


def test_a_behaviour_that_differs_shows_in_the_distances(tmp_path):
    """The stub's BatchNorm with momentum 0.2 (ours: PyTorch's 0.1): the parameters
    still agree after each step (train mode uses batch statistics), the running
    statistics do not."""
    out = lockstep.lockstep(_checkout(tmp_path, 0.2), CONFIG, _stream(), report=lambda s: None)
    worst = out["tasks"][0]["worst"]
    assert max(v for k, v in worst.items() if k.startswith("step/params")) < 1e-4
    assert max(v for k, v in worst.items() if k.startswith("step/batch_stats")) > 1e-2


def test_state_dict_round_trips_through_the_converter(tmp_path):
    model = lockstep.authors_model(_checkout(tmp_path, 0.1), 4)
    with torch.no_grad():
        for value in model.state_dict().values():
            if value.dtype == torch.float32:
                value.copy_(torch.randn(value.shape))
    ours = lockstep.convert_state_dict({k: v.numpy() for k, v in model.state_dict().items()})[0]
    back = lockstep.to_state_dict(ours, model)
    for key, value in model.state_dict().items():
        np.testing.assert_array_equal(back[key].numpy(), value.numpy())
    assert lockstep.distances(ours, ours)["params/stage4"] == 0.0


def test_distances_are_relative_l2_per_stage():
    a = {"params": {"stage4_block1": {"k": np.array([3.0, 4.0])}, "head": {"k": np.ones(2)}},
         "batch_stats": {"stage4_block1": {"m": np.array([1.0, 0.0])}}}
    b = {"params": {"stage4_block1": {"k": np.array([3.0, 0.0])}, "head": {"k": np.ones(2)}},
         "batch_stats": {"stage4_block1": {"m": np.array([1.0, 1.0])}}}
    d = lockstep.distances(a, b)
    assert d == {"params/stage4": pytest.approx(4.0 / 3.0), "params/head": 0.0,
                 "batch_stats/stage4": pytest.approx(1.0 / np.sqrt(2.0))}


def test_the_cli_refuses_a_folder_without_the_authors_model(tmp_path):
    with pytest.raises(SystemExit, match="has no models.py"):
        lockstep.main(["--ref", str(tmp_path), "--nf", "4", "--epochs", "1"])

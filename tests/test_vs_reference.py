"""benchmarks.vs_reference: the stream exporter and the side-by-side harness.

The authors' script is not needed: a stub checkout written here stands in for
it, with what the harness relies on (a ``LightCL.py`` that imports
``datasets.seq_cifar10``, hard-codes ``epochs = 50`` and leaves
``now_forget_TIL``/``now_forget_CIL``), and computes accuracies from the
batches it is served, which the test computes again from the stream.
"""

import json
import os

import numpy as np
import pytest

from benchmarks import vs_reference
from lightcl_jax.config import Config
from lightcl_jax.data.streams import make_stream, split_into_tasks

STUB = '''
import os, sys
import numpy as np
from datasets.seq_cifar10 import *
from datasets.seq_tinyimagenet import *
from models import CHECKOUT_MODELS  # the checkout's own module

assert sys.argv[1:] == ["--pretrain", "--Seed", "3"], sys.argv
assert os.path.isfile("models.py"), os.getcwd()  # it runs in the checkout
print("GLIBC_TUNABLES", os.environ.get("GLIBC_TUNABLES"))
num_task = 5
epochs = 50
data = SequentialCIFAR10(None)
loaders = [data.get_data_loaders() for _ in range(num_task)]
til, trained = [], 0
for task, (train, test) in enumerate(loaders):
    for _ in range(epochs):
        for x, y in train:
            assert tuple(np.asarray(x).shape[1:]) == (3, 8, 8) and len(y) <= 32
            trained += len(y)
    labels = np.concatenate([np.asarray(y) for _, y in test])
    til.append(np.mean(labels == 2 * task))
now_forget_TIL = float(np.mean(til))
now_forget_CIL = trained / 1e5
'''


def _stream():
    """5 tasks x 2 classes of 3-channel 8x8 images, 40 training samples a task."""
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(10), 20).astype(np.int32)
    x = rng.normal(size=(len(y), 8, 8, 3)).astype(np.float32)
    x[np.arange(len(y)), y % 8, :, :] += 3.0
    return split_into_tasks("tiny3", x, y, x[::3], y[::3], 10, 5)


def test_exported_stream_round_trips_and_the_harness_runs_both_sides(tmp_path):
    stream = _stream()
    path = tmp_path / "stream.npz"
    vs_reference.export_stream(stream, str(path))
    loaded = vs_reference.load_stream(str(path))
    assert (loaded.name, loaded.num_classes, loaded.image_shape) == ("tiny3", 10, (8, 8, 3))
    for a, b in zip(stream.tasks, loaded.tasks):
        assert a.classes == b.classes
        for key in ("x_train", "y_train", "x_eval", "y_eval"):
            np.testing.assert_array_equal(getattr(a, key), getattr(b, key))

    checkout = tmp_path / "checkout"
    checkout.mkdir()
    (checkout / "LightCL.py").write_text(STUB)
    (checkout / "models.py").write_text("CHECKOUT_MODELS = True\n")
    config = Config(dataset="digits", epochs=1, nf=4, batch_size=16,
                    strategy_args={"buffer_size": 8}, augment=False, last_batch="keep").resolved()
    lines = []
    summary = vs_reference.compare(str(checkout), stream, config, [3], 2, str(tmp_path / "w"),
                                   report=lines.append)
    assert (checkout / "LightCL.py").read_text() == STUB  # the override ran on a copy
    (run,) = summary["seeds"]
    # The stub's figures, from the stream: 2 epochs of every training sample (the last
    # smaller batch kept).
    til = np.mean([np.mean(t.y_eval == t.classes[0]) for t in stream.tasks])
    assert run["reference"]["til"] == pytest.approx(100 * til)
    assert run["reference"]["cil"] == pytest.approx(100 * 2 * 200 / 1e5)
    with open(tmp_path / "w" / "ours-seed3.json") as f:
        ours = json.load(f)
    assert ours["config"]["seed"] == 3 and ours["config"]["epochs"] == 2
    assert (run["ours"]["til"], run["ours"]["cil"]) == (ours["avg_til"], ours["avg_cil"])
    assert [len(row) for row in ours["acc_til"]] == [1, 2, 3, 4, 5]
    # Where the time went: 2 epochs of 40 samples in batches of 16, 16 and 8, the second
    # epochs counted.
    breakdown = run["ours"]["breakdown"]
    assert {name: phase["steps"] for name, phase in breakdown["phases"].items()} == \
        {"full": 3, "frozen": 12}
    assert 0 < breakdown["startup_s"] < breakdown["total_s"] <= run["ours"]["wall_time_s"]
    walls = {side: run[side]["wall_time_s"] for side in ("reference", "ours")}
    assert summary["wall_time_ratio"] == pytest.approx(walls["ours"] / walls["reference"])
    assert all(summary["peak_rss_mb"][side] > 50 for side in ("reference", "ours"))
    assert summary["epochs_overridden"] and len(lines) == 2
    # Both sides in one environment: the reference gets the huge-pages tunable our
    # scripts run themselves with, where they do.
    from lightcl_jax.process import huge_pages_here
    tunables = (huge_pages_here() or os.environ).get("GLIBC_TUNABLES")
    assert summary["glibc_tunables"] == tunables
    log = (tmp_path / "w" / "reference-seed3.log").read_text()
    assert f"GLIBC_TUNABLES {tunables}" in log.splitlines()
    text = vs_reference.format_summary(summary)
    assert "set in a temporary copy of the authors' LightCL.py" in text
    assert f"{summary['wall_time_ratio']:.3f}" in text

    # A finished seed is reused only with the same settings: nothing runs the second time.
    (checkout / "LightCL.py").write_text("raise SystemExit(3)\n")
    lines.clear()
    again = vs_reference.compare(str(checkout), stream, config, [3], 2, str(tmp_path / "w"),
                                 report=lines.append, reuse=True)
    assert again["seeds"] == summary["seeds"] and lines == [
        f"seed 3: figures reused from {tmp_path / 'w' / 'seed3.json'}"]
    with pytest.raises(RuntimeError, match="failed with exit code"):  # other epochs: runs
        vs_reference.compare(str(checkout), stream, config, [3], 1, str(tmp_path / "w"),
                             report=lines.append, reuse=True)


def test_the_cli_refuses_a_folder_that_is_not_the_authors_checkout(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        vs_reference.main(["--ref", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "is not a checkout of the authors' LightCL repository (no LightCL.py)" in \
        capsys.readouterr().err


def test_a_stream_the_authors_script_cannot_train_on_is_refused():
    vs_reference.check_fits_reference(make_stream("digits32"))
    with pytest.raises(ValueError, match="digits has 5 tasks, 10 classes and 1 channels"):
        vs_reference.check_fits_reference(make_stream("digits"))


def test_the_served_loaders_keep_or_drop_the_last_batch(tmp_path, monkeypatch):
    """What the authors' script is served: DataLoader batches of 32, the last smaller one
    kept as PyTorch does by default, or dropped under $LIGHTCL_DROP_LAST=1."""
    import importlib.util
    import os
    path = os.path.join(vs_reference.ROOT, "benchmarks", "side_by_side", "datasets",
                        "seq_cifar10.py")
    spec = importlib.util.spec_from_file_location("served_seq_cifar10", path)
    served = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(served)
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(10), 20).astype(np.int32)   # 40 training samples a task
    x = rng.normal(size=(len(y), 4, 4, 3)).astype(np.float32)
    stream = split_into_tasks("tiny", x, y, x[::5], y[::5], 10, 5)
    vs_reference.export_stream(stream, str(tmp_path / "s.npz"))
    monkeypatch.setenv("LIGHTCL_STREAM", str(tmp_path / "s.npz"))
    sizes = {}
    for drop in ("0", "1"):
        monkeypatch.setenv("LIGHTCL_DROP_LAST", drop)
        train, _ = served.SequentialCIFAR10(None).get_data_loaders()
        sizes[drop] = [len(batch_y) for _, batch_y in train]
    n = len(stream.tasks[0].y_train)
    assert sizes["0"] == [32] * (n // 32) + ([n % 32] if n % 32 else [])
    assert sizes["1"] == [32] * (n // 32) and n % 32 and sizes["0"] != sizes["1"]

import json

import numpy as np
import pytest
import tensorflow_datasets as tfds

from lightcl_jax.data.pipeline import (augment_batch, epoch_batches, eval_batches, prefetch,
                                       steps_per_epoch)
from lightcl_jax.data.sources import RecordImages, concatenate
from lightcl_jax.data.streams import CIFAR10_MEAN, CIFAR10_STD, make_stream, split_into_tasks


def test_digits_stream(digits_stream):
    stream = digits_stream
    assert stream.num_tasks == 5 and stream.num_classes == 10
    assert stream.image_shape == (8, 8, 1) and stream.eval_split == "holdout"
    assert [t.classes for t in stream] == [(0, 1), (2, 3), (4, 5), (6, 7), (8, 9)]
    assert sum(len(t.y_eval) for t in stream) == 179  # int(0.1 x 1797)
    assert sum(len(t.y_train) for t in stream) == 1797 - 179
    for task in stream:
        assert set(np.unique(task.y_train)) == set(task.classes)
        assert set(np.unique(task.y_eval)) == set(task.classes)
        assert task.x_train.dtype == np.float32
    # The held-out part is the first int(10%) of a fixed permutation (seed 0) of all 1,797.
    from sklearn.datasets import load_digits
    digits = load_digits()
    held = np.random.default_rng(0).permutation(1797)[:179]
    held = held[np.argsort(digits.target[held] // 2, kind="stable")]  # grouped by task
    x_eval = np.concatenate([t.x_eval for t in stream])
    y_eval = np.concatenate([t.y_eval for t in stream])
    np.testing.assert_array_equal(y_eval, digits.target[held])
    x_train = np.concatenate([t.x_train for t in stream])
    raw_train = digits.images[np.random.default_rng(0).permutation(1797)[179:]] / 16.0
    raw_eval = digits.images[held].astype(np.float32)[..., None] / 16.0
    np.testing.assert_allclose(x_eval, (raw_eval - raw_train.mean()) / raw_train.std(),
                               rtol=1e-4, atol=1e-5)
    # Normalised with the training part's statistics: zero mean, unit variance there.
    np.testing.assert_allclose(x_train.mean(), 0.0, atol=1e-5)
    np.testing.assert_allclose(x_train.std(), 1.0, atol=1e-4)
    # Crop padding fills with the normalised black pixel.
    np.testing.assert_allclose(stream.pad_value, [-raw_train.mean() / raw_train.std()], rtol=1e-5)
    again = make_stream("digits")
    np.testing.assert_array_equal(again.tasks[2].x_eval, stream.tasks[2].x_eval)


def test_bad_stream_arguments_are_refused():
    with pytest.raises(ValueError, match="unknown dataset 'mnist'; known: digits, digits32, cifar10"):
        make_stream("mnist")
    with pytest.raises(ValueError, match="positive divisor of the 10 classes"):
        make_stream("digits", num_tasks=3)
    with pytest.raises(ValueError, match="no test split"):
        make_stream("digits", eval_split="test")
    x = np.zeros((4, 8, 8, 1), np.float32)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\)"):
        split_into_tasks("t", x, np.array([0, 1, 2, 0]), x, np.array([0, 1, 0, 1]), 2, 1)
    with pytest.raises(ValueError, match="NaN or Inf"):
        bad = x.copy()
        bad[0, 0, 0, 0] = np.nan
        split_into_tasks("t", bad, np.array([0, 1, 1, 0]), x, np.array([0, 1, 0, 1]), 2, 1)
    with pytest.raises(ValueError, match="task 1 .* has 0 training"):
        split_into_tasks("t", x, np.array([0, 1, 1, 0]), x, np.array([0, 1, 2, 3]), 4, 2)


def _reference_augment(x, dy, dx, flip, padding, fill):
    """Plain loops: pad with ``fill``, crop at (dy, dx), then flip left-right."""
    n, h, w, c = x.shape
    out = np.zeros_like(x)
    for i in range(n):
        padded = np.empty((h + 2 * padding, w + 2 * padding, c), x.dtype)
        padded[:, :] = fill
        padded[padding:padding + h, padding:padding + w] = x[i]
        crop = padded[dy[i]:dy[i] + h, dx[i]:dx[i] + w]
        out[i] = crop[:, ::-1] if flip[i] else crop
    return out


def test_augment_matches_a_plain_loop_and_is_seeded():
    x = np.random.default_rng(0).normal(size=(6, 8, 8, 3)).astype(np.float32)
    fill = (-1.5, 0.25, 2.0)
    got = augment_batch(x, np.random.default_rng(7), padding=4, fill=fill)
    rng = np.random.default_rng(7)  # the same draws, in augment_batch's order
    dy, dx = rng.integers(0, 9, size=6), rng.integers(0, 9, size=6)
    flip = rng.random(6) < 0.5
    np.testing.assert_array_equal(got, _reference_augment(x, dy, dx, flip, 4, fill))
    np.testing.assert_array_equal(got, augment_batch(x, np.random.default_rng(7), fill=fill))
    zero_fill = augment_batch(x, np.random.default_rng(7))
    np.testing.assert_array_equal(zero_fill, _reference_augment(x, dy, dx, flip, 4, 0.0))


def test_batches_are_full_deterministic_and_padded_for_eval():
    x = np.arange(10, dtype=np.float32).reshape(10, 1, 1, 1)
    y = np.arange(10, dtype=np.int32)
    first = list(epoch_batches(x, y, 4, np.random.default_rng(3), augment=False))
    second = list(epoch_batches(x, y, 4, np.random.default_rng(3), augment=False))
    assert len(first) == 2 and all(len(b[1]) == 4 for b in first)
    for (xa, ya), (xb, yb) in zip(first, second):
        np.testing.assert_array_equal(ya, yb)
        np.testing.assert_array_equal(xa[:, 0, 0, 0], ya)
    evals = list(eval_batches(x, y, 4))
    assert [v.sum() for _, _, v in evals] == [4, 4, 2]
    np.testing.assert_array_equal(evals[-1][1][:2], [8, 9])
    # Kept, the remainder is a smaller last batch of the same permutation, as a
    # DataLoader without drop_last gives: every sample once.
    kept = list(epoch_batches(x, y, 4, np.random.default_rng(3), augment=False,
                              keep_remainder=True))
    assert [len(b[1]) for b in kept] == [4, 4, 2]
    assert steps_per_epoch(10, 4, keep_remainder=True) == 3 and steps_per_epoch(10, 4) == 2
    for (xa, ya), (xb, yb) in zip(first, kept):
        np.testing.assert_array_equal(ya, yb)
    assert sorted(np.concatenate([b[1] for b in kept]).tolist()) == list(range(10))


def test_each_process_reads_its_part_of_the_same_batches():
    # Two processes' parts of every batch, side by side, are the whole batch: the same
    # order and augmentation, each generator left where the whole batches leave it.
    x = np.arange(22 * 5 * 5, dtype=np.float32).reshape(22, 5, 5, 1)
    y = np.arange(22)
    rngs = [np.random.default_rng(4) for _ in range(3)]
    whole = list(epoch_batches(x, y, 8, rngs[0], augment=True, fill=[-1.0]))
    parts = [list(epoch_batches(x, y, 8, rngs[1 + i], augment=True, fill=[-1.0],
                                part=(i, 2))) for i in range(2)]
    assert len(whole) == len(parts[0]) == len(parts[1]) == 2
    for (xw, yw), (x0, y0), (x1, y1) in zip(whole, *parts):
        assert len(y0) == len(y1) == 4
        np.testing.assert_array_equal(np.concatenate([y0, y1]), yw)
        np.testing.assert_array_equal(np.concatenate([x0, x1]), xw)
    assert rngs[0].random() == rngs[1].random() == rngs[2].random()
    evals = [list(eval_batches(x, y, 8, part=(i, 2))) for i in range(2)]
    # The last batch holds samples 16..21: part 0 has 16..19, part 1 20, 21 and padding.
    assert evals[0][-1][2].tolist() == [True] * 4
    assert evals[1][-1][2].tolist() == [True, True, False, False]
    for (xw, yw, vw), (x0, y0, v0), (x1, y1, v1) in zip(eval_batches(x, y, 8), *evals):
        np.testing.assert_array_equal(np.concatenate([x0, x1]), xw)
        np.testing.assert_array_equal(np.concatenate([y0, y1]), yw)
        np.testing.assert_array_equal(np.concatenate([v0, v1]), vw)
    with pytest.raises(ValueError, match="a batch of 8 does not split over 3 processes"):
        next(epoch_batches(x, y, 8, rngs[0], augment=False, part=(0, 3)))


@pytest.mark.parametrize("name,num_tasks,classes_per_task", [("cifar10", None, 2),
                                                             ("cifar100", 5, 20)])
def test_tfds_streams_through_data_source(name, num_tasks, classes_per_task):
    with tfds.testing.mock_data(num_examples=1000, policy=tfds.testing.MockPolicy.USE_CODE):
        stream = make_stream(name, num_tasks=num_tasks)
        test_stream = make_stream(name, num_tasks=num_tasks, eval_split="test")
    assert stream.image_shape == (32, 32, 3) and stream.augment
    np.testing.assert_allclose(stream.pad_value[:1], [-0.4914 / 0.2470] if name == "cifar10"
                               else [-0.5071 / 0.2673], rtol=1e-6)
    assert stream.classes_per_task == classes_per_task
    assert sum(len(t.y_train) + len(t.y_eval) for t in stream) == 1000
    assert sum(len(t.y_eval) for t in stream) == 100  # int(0.1 x 1000)
    assert sum(len(t.y_train) for t in test_stream) == 1000
    for task in stream:
        assert task.y_train.min() >= task.classes[0] and task.y_train.max() <= task.classes[-1]


def test_tfds_images_are_read_batch_by_batch_from_the_source():
    mean, std = np.array(CIFAR10_MEAN, np.float32), np.array(CIFAR10_STD, np.float32)
    # Images are read when indexed: inside the mock, whose source serves the records.
    with tfds.testing.mock_data(num_examples=200, policy=tfds.testing.MockPolicy.USE_CODE):
        stream = make_stream("cifar10")
        source = tfds.data_source("cifar10", split="train")
        task = stream.tasks[1]
        assert isinstance(task.x_train, RecordImages)
        assert task.x_train.shape == (len(task.y_train), 32, 32, 3) and len(task.x_train) > 3
        records = task.x_train.indices

        def by_hand(record):
            return (np.asarray(source[int(record)]["image"], np.float32) / 255.0 - mean) / std

        np.testing.assert_allclose(task.x_train[2], by_hand(records[2]), atol=1e-6)
        picked = np.array([3, 0, 1])
        np.testing.assert_allclose(task.x_train[picked], [by_hand(r) for r in records[picked]],
                                   atol=1e-6)
        np.testing.assert_allclose(task.x_train[1:3], [by_hand(r) for r in records[1:3]],
                                   atol=1e-6)
        for i, record in enumerate(records):
            assert int(source[int(record)]["label"]) == task.y_train[i]
        # Batching indexes the source; joint training concatenates without reading.
        x, y = next(epoch_batches(task.x_train, task.y_train, 4, np.random.default_rng(0),
                                  augment=False))
        assert x.shape == (4, 32, 32, 3) and x.dtype == np.float32
        both = concatenate([stream.tasks[0].x_train, task.x_train])
        assert isinstance(both, RecordImages) and len(both) == len(stream.tasks[0].x_train) + len(
            task.x_train)
        np.testing.assert_array_equal(both[len(stream.tasks[0].x_train)], task.x_train[0])
    assert task.x_train.fingerprint() != task.x_train.subset(np.arange(2)).fingerprint()


def test_prefetch_keeps_order_and_draws_and_stops():
    import threading
    x = np.arange(40 * 6 * 6, dtype=np.float32).reshape(40, 6, 6, 1)
    y = np.arange(40)
    direct_rng, fetched_rng = np.random.default_rng(7), np.random.default_rng(7)
    direct = list(epoch_batches(x, y, 8, direct_rng, augment=True))
    fetched = list(prefetch(epoch_batches(x, y, 8, fetched_rng, augment=True), 2,
                            lambda b: (b[0] * 2, b[1])))
    assert len(fetched) == len(direct) == 5
    for (xa, ya), (xb, yb) in zip(direct, fetched):
        np.testing.assert_array_equal(xa * 2, xb)
        np.testing.assert_array_equal(ya, yb)
    # The generator has drawn exactly what iterating it directly draws.
    assert direct_rng.random() == fetched_rng.random()

    def failing():
        yield 1
        raise RuntimeError("bad record 17")
    it = prefetch(failing())
    assert next(it) == 1
    with pytest.raises(RuntimeError, match="bad record 17"):
        next(it)
    before = threading.active_count()
    it = prefetch(iter(range(1000)), 1)
    assert next(it) == 0
    it.close()  # stops the thread, which was blocked a batch ahead
    assert threading.active_count() == before
    with pytest.raises(ValueError, match="prefetch size must be an integer >= 1"):
        next(prefetch([], 0))


def test_missing_data_dir_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="missing or empty"):
        make_stream("cifar10", data_dir=str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="missing or empty"):
        make_stream("cifar10", data_dir=str(tmp_path / "empty"))
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "file.txt").write_text("x")
    with pytest.raises(ValueError, match="not available in"):
        make_stream("cifar10", data_dir=str(tmp_path / "junk"))


def test_a_data_dir_of_another_version_or_dataset_is_named(tmp_path):
    """TFDS itself says of these that the data is 'already prepared ... in the TFRECORD
    format'; the folder tells what is wrong."""
    import tensorflow_datasets as tfds

    def prepared(data_dir, name, version):
        folder = data_dir / name / version
        folder.mkdir(parents=True)
        (folder / "dataset_info.json").write_text(json.dumps({"name": name, "version": version}))
        return str(data_dir)

    want = str(tfds.builder_cls("cifar10").VERSION)
    old = prepared(tmp_path / "old", "cifar10", "1.0.0")
    with pytest.raises(ValueError, match=rf"holds cifar10 version 1.0.0, not {want}, the version "
                                         rf"tensorflow-datasets {tfds.__version__} reads"):
        make_stream("cifar10", data_dir=old)
    other = prepared(tmp_path / "other", "mnist", "3.0.1")
    prepared(tmp_path / "other", "cifar100", "3.0.2")
    with pytest.raises(ValueError, match=r"holds no prepared 'cifar10' \(it holds cifar100, mnist\)"):
        make_stream("cifar10", data_dir=other)
    with pytest.raises(ValueError, match=rf"one prepared version's folder .* holding cifar10/{want}/"):
        make_stream("cifar10", data_dir=str(tmp_path / "old" / "cifar10" / "1.0.0"))


def test_validate_stream_refuses_hand_built_streams_with_bad_data():
    import dataclasses

    import pytest

    from lightcl_jax.data.streams import split_into_tasks, validate_stream

    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(4), 20).astype(np.int32)
    x = rng.normal(size=(len(y), 8, 8, 1)).astype(np.float32)
    good = split_into_tasks("tiny", x, y, x[::4], y[::4], 4, 2)
    validate_stream(good, 8)
    t0, t1 = good.tasks

    def with_task1(**changes):
        return dataclasses.replace(good, tasks=(t0, dataclasses.replace(t1, **changes)))

    nan = t1.x_train.copy()
    nan[0, 0, 0, 0] = np.nan
    wrong_label = t1.y_train.copy()
    wrong_label[3] = 0
    cases = [
        (with_task1(x_train=nan), r"task 1 \(classes 2..3\): training images contain NaN or Inf"),
        (with_task1(y_train=wrong_label),
         r"training label 0 is not one of the task's classes \[2, 3\]"),
        (with_task1(classes=(1, 2)),
         r"class 1 also belongs to task 0; class groups must not overlap"),
        (with_task1(classes=(2, 4)), r"class 4 lies outside the head's 4 classes"),
        (with_task1(x_eval=t1.x_eval[:, :4]), r"evaluation images are \(10, 4, 8, 1\) with 10 "
                                              r"labels; expected \(N, 8, 8, 1\)"),
        (with_task1(x_train=t1.x_train[:0], y_train=t1.y_train[:0]),
         r"task 1 \(classes 2..3\) has no training samples"),
        (with_task1(classes=()), r"task 1 has no classes"),
    ]
    for stream, message in cases:
        with pytest.raises(ValueError, match=message):
            validate_stream(stream, 8)
    with pytest.raises(ValueError, match="fewer than one batch of 64"):
        validate_stream(good, 64)


def test_bench_input_prints_every_figure(capsys):
    from benchmarks import bench_input
    assert bench_input.main(["--steps", "2", "--nf", "2", "--batch-size", "8",
                             "--examples", "200"]) == 0
    out = capsys.readouterr().out
    for words in ("fixed batch on the device:", "real input, prefetched:",
                  "real input, read between steps:", "input alone (read, augment, send):",
                  "PNG decode"):
        assert words in out, out
    with pytest.raises(SystemExit) as exit_info:
        bench_input.main(["--steps", "0"])
    assert exit_info.value.code == 2


def test_digits_are_scikit_learns_without_importing_it():
    import subprocess
    import sys

    from sklearn.datasets import load_digits

    from lightcl_jax.data.streams import _load_digits
    x, y, num_classes = _load_digits()
    digits = load_digits()
    np.testing.assert_array_equal(x[..., 0], (digits.images / 16.0).astype(np.float32))
    np.testing.assert_array_equal(y, digits.target)
    assert num_classes == 10 and x.dtype == np.float32 and y.dtype == np.int32
    # scikit-learn (and SciPy with it) stays out of a run's process.
    code = ("import sys; from lightcl_jax.data.streams import make_stream; make_stream('digits32'); "
            "print(sorted(m for m in ('sklearn', 'scipy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"

"""Split TinyImageNet from a local folder in the standard layout, through TFDS.

The test writes a tiny fake ``tiny-imagenet-200`` folder: 200 classes, two
training images each (some greyscale, as a few real ones are), one validation
image each labelled in ``val/val_annotations.txt``, and compares what the
stream holds with the files decoded and normalised by hand.
"""

import os

import numpy as np
import pytest
from PIL import Image

from lightcl_jax.data.streams import TINYIMAGENET_MEAN, TINYIMAGENET_STD, make_stream
from lightcl_jax.data.tiny_imagenet import TinyImagenetError, read_folder

NUM_CLASSES = 200


def _write_folder(root, classes=NUM_CLASSES, size=64):
    rng = np.random.default_rng(0)
    # Shuffled in wnids.txt: classes are numbered in sorted order.
    wnids = [f"n{100 + 7 * i:08d}" for i in range(classes)]
    os.makedirs(root / "val" / "images")
    (root / "wnids.txt").write_text("\n".join(rng.permutation(wnids)) + "\n")
    files = {"train": {}, "val": {}}
    lines = []
    for c, wnid in enumerate(wnids):
        images = root / "train" / wnid / "images"
        os.makedirs(images)
        files["train"][c] = []
        for k in range(2):
            grey = c % 50 == 0 and k == 1
            shape = (size, size) if grey else (size, size, 3)
            path = images / f"{wnid}_{k}.JPEG"
            Image.fromarray(rng.integers(0, 256, shape, np.uint8)).save(path, format="JPEG")
            files["train"][c].append(path)
        path = root / "val" / "images" / f"val_{c}.JPEG"
        Image.fromarray(rng.integers(0, 256, (size, size, 3), np.uint8)).save(path, format="JPEG")
        files["val"][c] = path
        lines.append(f"val_{c}.JPEG\t{wnid}\t0\t0\t63\t63")
    (root / "val" / "val_annotations.txt").write_text("\n".join(lines[::-1]) + "\n")
    return wnids, files


def _by_hand(path):
    with Image.open(path) as image:
        pixels = np.asarray(image.convert("RGB"), np.float32) / 255.0
    return (pixels - np.array(TINYIMAGENET_MEAN, np.float32)) / np.array(TINYIMAGENET_STD,
                                                                          np.float32)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny") / "tiny-imagenet-200"
    return root, _write_folder(root)


def test_split_tinyimagenet_matches_the_files(folder, capsys):
    root, (wnids, files) = folder
    stream = make_stream("tinyimagenet", data_dir=str(root), eval_split="test")
    assert "preparing Tiny ImageNet" in capsys.readouterr().err
    assert (stream.num_classes, stream.num_tasks, stream.classes_per_task) == (200, 10, 20)
    assert stream.image_shape == (64, 64, 3) and stream.augment
    for task in (stream.tasks[0], stream.tasks[7]):
        assert task.classes == tuple(range(20 * task.index, 20 * task.index + 20))
        assert sorted(task.y_eval.tolist()) == list(task.classes)
        assert sorted(task.y_train.tolist()) == sorted(list(task.classes) * 2)
        x_eval, x_train = np.asarray(task.x_eval), np.asarray(task.x_train)
        for i, label in enumerate(task.y_eval):
            np.testing.assert_allclose(x_eval[i], _by_hand(files["val"][label]), atol=1e-5)
        for label in task.classes:
            got = x_train[task.y_train == label]
            for path in files["train"][label]:     # each file is one of the class's images
                want = _by_hand(path)
                assert min(np.max(np.abs(g - want)) for g in got) < 1e-5, path
    # Greyscale files come back as three equal channels.
    grey = np.asarray(stream.tasks[0].x_train)[stream.tasks[0].y_train == 0]
    pixels = grey * np.array(TINYIMAGENET_STD) + np.array(TINYIMAGENET_MEAN)
    assert any(np.allclose(p[..., 0], p[..., 1], atol=1e-5) for p in pixels)

    # Prepared once: the holdout protocol reads the same TFDS files.
    holdout = make_stream("tinyimagenet", data_dir=str(root))
    assert "preparing" not in capsys.readouterr().err
    assert sum(len(t.y_eval) for t in holdout.tasks) == 40           # 10% of 400
    assert sum(len(t.y_train) for t in holdout.tasks) == 360


def test_folder_problems_are_named(tmp_path):
    with pytest.raises(ValueError, match="'tinyimagenet' needs --data-dir"):
        make_stream("tinyimagenet")
    with pytest.raises(TinyImagenetError, match="does not exist"):
        make_stream("tinyimagenet", data_dir=str(tmp_path / "nowhere"))
    os.makedirs(tmp_path / "empty")
    with pytest.raises(TinyImagenetError, match="has no wnids.txt"):
        read_folder(str(tmp_path / "empty"))

    root = tmp_path / "small"
    wnids, _ = _write_folder(root, classes=4)
    annotations = root / "val" / "val_annotations.txt"
    annotations.write_text(annotations.read_text() + "val_0.JPEG\tn99999999\t0\t0\t1\t1\n")
    with pytest.raises(TinyImagenetError, match="line 5: class n99999999 is not in wnids.txt"):
        read_folder(str(root))

    root = tmp_path / "odd"
    wnids, files = _write_folder(root, classes=4)
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(files["train"][2][0], format="JPEG")
    with pytest.raises(TinyImagenetError, match=r"_0.JPEG is 32x32; Tiny ImageNet images are 64x64"):
        make_stream("tinyimagenet", data_dir=str(root), num_tasks=2)


def test_validation_rearranged_by_class_is_read(tmp_path):
    """val/<wnid>/images/, as rearrangement scripts leave it (annotations file kept)."""
    root = tmp_path / "tiny-imagenet-200"
    wnids, files = _write_folder(root, classes=4)
    for c, wnid in enumerate(wnids):
        os.makedirs(root / "val" / wnid / "images")
        os.replace(files["val"][c], root / "val" / wnid / "images" / f"val_{c}.JPEG")
    os.rmdir(root / "val" / "images")
    _, _, val = read_folder(str(root))
    assert [(os.path.basename(path), wnid) for path, wnid in val] == [
        (f"val_{c}.JPEG", wnid) for c, wnid in enumerate(wnids)]


def test_a_truncated_image_is_refused_by_name_and_nothing_half_prepared_is_left(tmp_path):
    from lightcl_jax.data.tiny_imagenet import tiny_imagenet_builder
    root = tmp_path / "truncated"
    _, files = _write_folder(root, classes=4)
    path = files["train"][3][0]
    whole = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(whole[:len(whole) // 3])
    with pytest.raises(TinyImagenetError, match=rf"{path} is not a readable image \(OSError: "
                                                "image file is truncated"):
        make_stream("tinyimagenet", data_dir=str(root), num_tasks=2)
    # TFDS wrote into a temporary folder: no prepared version is left to be read later.
    prepared = root / "tfds" / "tiny_imagenet_folder"
    assert not [name for name in os.listdir(prepared) if not name.startswith("incomplete")]
    with open(path, "wb") as f:
        f.write(whole)
    assert tiny_imagenet_builder(str(root)).is_prepared()

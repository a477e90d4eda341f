"""scikit-learn's digits written as a TFDS dataset on disk: ``python -m benchmarks.digits_tfds DIR``.

``experiments.pretrain`` reads a prepared TFDS dataset by name from ``--data-dir``; this
writes one that needs no download, so pre-training can be tried and checked offline:
``python -m experiments.pretrain --dataset digits32 --data-dir DIR``. Its images are the
digits at 32x32x3 (each pixel a 4x4 block, the grey level on three channels, in 0..255);
``train`` holds the first 1,500 of the 1,797 and ``test`` the rest. Prints where it went.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import sys

import numpy as np

NAME = "digits32"
NUM_TRAIN = 1500


def digits32_uint8() -> tuple[np.ndarray, np.ndarray]:
    """The 1,797 digits as (N, 32, 32, 3) uint8 images and their int labels."""
    from lightcl_jax.data.streams import _load_digits, _upscale
    x, y, _ = _load_digits()  # (N, 8, 8, 1) in [0, 1]
    return np.round(_upscale(x) * 255.0).astype(np.uint8), y


def prepare(data_dir: str) -> str:
    """Writes the dataset under ``data_dir`` (once; a prepared one is left as it is) and
    returns its TFDS name."""
    import tensorflow_datasets as tfds
    from PIL import Image

    images, labels = digits32_uint8()

    def png(image) -> bytes:  # encoded here: TFDS encodes arrays with TensorFlow
        out = io.BytesIO()
        Image.fromarray(image).save(out, format="PNG")
        return out.getvalue()

    class Digits32(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        """scikit-learn's digits at 32x32x3."""

        VERSION = tfds.core.Version("1.0.0")
        RELEASE_NOTES = {"1.0.0": "train: the first 1,500 digits; test: the rest"}

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self, description=__doc__.splitlines()[0],
                features=tfds.features.FeaturesDict({
                    "image": tfds.features.Image(shape=(32, 32, 3), encoding_format="png"),
                    "label": tfds.features.ClassLabel(num_classes=10)}),
                supervised_keys=("image", "label"), disable_shuffling=True)  # in order

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(0, NUM_TRAIN),
                    "test": self._generate_examples(NUM_TRAIN, len(labels))}

        def _generate_examples(self, start, stop):
            for i in range(start, stop):
                yield i, {"image": png(images[i]), "label": int(labels[i])}

    builder = Digits32(data_dir=data_dir, file_format="array_record")
    if not builder.is_prepared():
        os.makedirs(data_dir, exist_ok=True)
        tfds.disable_progress_bar()
        absl = logging.getLogger("absl")
        level = absl.level
        absl.setLevel(logging.ERROR)  # TFDS's warning that the folder is new
        try:
            with contextlib.redirect_stdout(sys.stderr):  # TFDS's "prepared" notes
                builder.download_and_prepare()  # nothing to download: the examples are above
        finally:
            absl.setLevel(level)
    return NAME


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.digits_tfds",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("data_dir", help="the TFDS data_dir to write the dataset into")
    args = parser.parse_args(argv)
    try:
        name = prepare(args.data_dir)
    except OSError as err:
        parser.error(f"cannot write the dataset to {args.data_dir}: {err}")
    print(f"dataset {name} is in {args.data_dir}: python -m experiments.pretrain "
          f"--dataset {name} --data-dir {args.data_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

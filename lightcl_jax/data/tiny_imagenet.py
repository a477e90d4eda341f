"""Tiny ImageNet from a local copy of its standard folder, through a small TFDS builder.

The folder (``tiny-imagenet-200``, as distributed) holds::

    wnids.txt                          the 200 class ids (WordNet ids), one a line
    train/<wnid>/images/*.JPEG         500 64x64 images per class
    val/images/*.JPEG                  10,000 64x64 images ...
    val/val_annotations.txt            ... labelled here: file <TAB> wnid <TAB> box
    test/images/*.JPEG                 unlabelled (not used)

A validation folder already sorted into ``val/<wnid>/images/`` (a common
rearrangement; used when there is no ``val/images/``) is read too. Classes are numbered in sorted wnid order (as
torchvision's ImageFolder numbers them). `TinyImagenetFolder` turns the
folder into a TFDS dataset once (array_record files, by default in
``<folder>/tfds``); its ``train`` split is the training images and its
``test`` split the labelled validation images, which ``eval_split="test"``
evaluates on. Images are stored as their original JPEG bytes; the few
greyscale ones are converted to RGB and stored as PNG (lossless), so every
image decodes to (64, 64, 3) uint8. Reading needs no TensorFlow.
"""

from __future__ import annotations

import functools
import io
import os
import sys

IMAGE_SHAPE = (64, 64, 3)


class TinyImagenetError(ValueError):
    """A folder that is not a usable copy of Tiny ImageNet."""


def read_wnids(folder: str) -> list[str]:
    """The class ids of ``wnids.txt``, sorted: label i is the i-th.

    Raises:
      TinyImagenetError: no ``wnids.txt``, or one that lists no class.
    """
    wnids_path = os.path.join(folder, "wnids.txt")
    if not os.path.isfile(wnids_path):
        raise TinyImagenetError(f"{folder} is not a Tiny ImageNet folder: it has no wnids.txt "
                                "(expected tiny-imagenet-200/ with wnids.txt, train/ and val/)")
    with open(wnids_path) as f:
        wnids = sorted({line.strip() for line in f if line.strip()})
    if not wnids:
        raise TinyImagenetError(f"{wnids_path} lists no classes")
    return wnids


def read_folder(folder: str) -> tuple[list[str], list[tuple[str, str]], list[tuple[str, str]]]:
    """(sorted wnids, [(train image path, wnid)], [(validation image path, wnid)]).

    Raises:
      TinyImagenetError: a missing ``wnids.txt``, ``train/<wnid>/images`` or
        validation labels, or a validation label naming an unknown class.
    """
    folder = os.path.abspath(folder)
    wnids = read_wnids(folder)
    known = set(wnids)
    train = []
    for wnid in wnids:
        images = os.path.join(folder, "train", wnid, "images")
        if not os.path.isdir(images):
            raise TinyImagenetError(f"{folder}: class {wnid} of wnids.txt has no {images}")
        files = sorted(f for f in os.listdir(images) if _is_image(f))
        if not files:
            raise TinyImagenetError(f"{images} holds no images")
        train += [(os.path.join(images, f), wnid) for f in files]
    val = []
    annotations = os.path.join(folder, "val", "val_annotations.txt")
    if os.path.isdir(os.path.join(folder, "val", "images")) and os.path.isfile(annotations):
        with open(annotations) as f:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                fields = line.rstrip("\n").split("\t")
                if len(fields) < 2:
                    raise TinyImagenetError(f"{annotations} line {number}: expected 'file<TAB>"
                                            f"wnid<TAB>box', got {line.strip()!r}")
                name, wnid = fields[0], fields[1]
                if wnid not in known:
                    raise TinyImagenetError(f"{annotations} line {number}: class {wnid} is not "
                                            "in wnids.txt")
                path = os.path.join(folder, "val", "images", name)
                if not os.path.isfile(path):
                    raise TinyImagenetError(f"{annotations} line {number}: {path} is missing")
                val.append((path, wnid))
    else:
        # Rearranged by class (the annotations file may still be there, unused).
        for wnid in wnids:
            images = os.path.join(folder, "val", wnid, "images")
            if os.path.isdir(images):
                val += [(os.path.join(images, f), wnid)
                        for f in sorted(os.listdir(images)) if _is_image(f)]
        if not val:
            raise TinyImagenetError(f"{folder}: no validation images: expected val/images/ "
                                    "labelled by val/val_annotations.txt, or val/<wnid>/images/")
    return wnids, train, val


def _is_image(name: str) -> bool:
    return name.lower().endswith((".jpeg", ".jpg", ".png"))


def _encoded(path: str) -> bytes:
    """The file's bytes when it is a 64x64 RGB image, else a lossless RGB PNG of it."""
    from PIL import Image

    with open(path, "rb") as f:
        raw = f.read()
    try:
        with Image.open(io.BytesIO(raw)) as image:
            image.load()
            if image.size != IMAGE_SHAPE[:2]:
                raise TinyImagenetError(f"{path} is {image.size[0]}x{image.size[1]}; Tiny "
                                        "ImageNet images are 64x64")
            if image.mode == "RGB":
                return raw
            out = io.BytesIO()
            image.convert("RGB").save(out, format="PNG")
            return out.getvalue()
    except TinyImagenetError:
        raise
    except Exception as err:
        raise TinyImagenetError(f"{path} is not a readable image ({type(err).__name__}: "
                                f"{err})") from err


@functools.lru_cache(maxsize=None)
def _builder_class():
    """Defines the TFDS builder on first use (importing TFDS takes a while)."""
    import tensorflow_datasets as tfds

    class TinyImagenetFolder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        """Tiny ImageNet (200 classes, 64x64) from a local copy of its standard folder."""

        VERSION = tfds.core.Version("1.0.0")
        RELEASE_NOTES = {"1.0.0": "train and labelled validation (as test) from the folder"}

        def __init__(self, *, folder: str, **kwargs):
            self._folder = os.path.abspath(folder)
            self._wnids = read_wnids(self._folder)  # the image files are listed only to prepare
            super().__init__(**kwargs)

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self,
                description=f"Tiny ImageNet from {self._folder}",
                features=tfds.features.FeaturesDict({
                    "image": tfds.features.Image(shape=IMAGE_SHAPE, encoding_format="jpeg"),
                    "label": tfds.features.ClassLabel(names=self._wnids),
                }),
                supervised_keys=("image", "label"))

        def _split_generators(self, dl_manager):
            _, train, val = read_folder(self._folder)
            return {"train": self._generate_examples(train), "test": self._generate_examples(val)}

        def _generate_examples(self, files):
            for path, wnid in files:
                key = os.path.relpath(path, self._folder)
                yield key, {"image": _encoded(path), "label": wnid}

    return TinyImagenetFolder


def tiny_imagenet_builder(folder: str, prepared_dir: str | None = None):
    """The folder's TFDS builder, prepared (on first use) and ready for ``as_data_source``.

    Its splits are ``train`` and ``test`` (the labelled validation images).

    Args:
      folder: the Tiny ImageNet folder.
      prepared_dir: where TFDS writes the prepared dataset (default
        ``<folder>/tfds``); preparing reads every image once.

    Raises:
      TinyImagenetError: the folder is not Tiny ImageNet, or the dataset
        cannot be written to ``prepared_dir``.
    """
    if not os.path.isdir(folder):
        raise TinyImagenetError(f"Tiny ImageNet folder {folder} does not exist; give the "
                                "unpacked tiny-imagenet-200 folder")
    prepared_dir = prepared_dir or os.path.join(os.path.abspath(folder), "tfds")
    builder = _builder_class()(folder=folder, data_dir=prepared_dir, file_format="array_record")
    if not builder.is_prepared():
        print(f"preparing Tiny ImageNet from {folder} into {prepared_dir} (once)", file=sys.stderr)
        try:
            os.makedirs(prepared_dir, exist_ok=True)
            builder.download_and_prepare()
        except OSError as err:
            raise TinyImagenetError(f"cannot write the prepared dataset to {prepared_dir}: "
                                    f"{err}") from err
    return builder

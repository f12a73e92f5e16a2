"""Tiny Oxford-IIIT Pet and Cityscapes built offline by the real tfds builders.

Each image encodes its raw label (pets trimap value, Cityscapes labelId) in its colour, so a
test recovers the label from the pixels and checks the mask against it pixel for pixel.
Regions are 16x16-aligned blocks, which JPEG (8x8 DCT, 2x2 chroma subsampling) keeps flat.
"""

import dataclasses
import io
import os
import zipfile
from collections.abc import Callable
from unittest import mock

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image


@dataclasses.dataclass(frozen=True)
class FakeDataset:
  """A prepared tfds data dir and how to read the raw label back from an image.

  Attributes:
    data_dir: the tfds data_dir holding the prepared data set.
    raw_label_of_image: uint8 (H, W, 3) image -> int (H, W) raw labels it was drawn from.
    num_examples: examples per split.
  """

  data_dir: str
  raw_label_of_image: Callable[[np.ndarray], np.ndarray]
  num_examples: dict[str, int]


def block_labels(rng, height, width, block, values):
  """(height, width) labels constant on block x block squares, every value used once at least."""
  rows, cols = height // block, width // block
  cells = np.concatenate([values, rng.choice(values, rows * cols - len(values))])
  rng.shuffle(cells)
  return np.kron(cells.reshape(rows, cols), np.ones((block, block), int))


# Pets: trimap value (1 pet, 2 background, 3 border) -> image colour, far apart.
PET_TRIMAP_COLORS = {1: (220, 40, 40), 2: (40, 40, 220), 3: (40, 220, 40)}
# name, class label (1-37), species (1 cat, 2 dog), (height, width); as in annotations/*.txt.
PET_SPLITS = {
  "train": [
    ("Abyssinian_1", 1, 1, (48, 64)),
    ("beagle_2", 5, 2, (64, 32)),
    ("Bengal_3", 6, 1, (32, 80)),
  ],
  "test": [
    ("boxer_4", 9, 2, (48, 48)),
    ("Sphynx_5", 34, 1, (32, 64)),
  ],
}


def pet_trimap_of_image(image):
  colors = np.array(list(PET_TRIMAP_COLORS.values()), np.int32)
  distances = np.abs(image[:, :, None, :].astype(np.int32) - colors).sum(-1)
  return np.array(list(PET_TRIMAP_COLORS))[distances.argmin(-1)]


def _write_pets_sources(root, rng):
  images_dir = os.path.join(root, "images", "images")
  annotations_dir = os.path.join(root, "annotations", "annotations")
  for sub in ("trimaps", "xmls"):
    os.makedirs(os.path.join(annotations_dir, sub))
  os.makedirs(images_dir)
  lists = {"train": "trainval.txt", "test": "test.txt"}
  for split, examples in PET_SPLITS.items():
    lines = []
    for name, label, species, (height, width) in examples:
      trimap = block_labels(rng, height, width, 16, [1, 2, 3])
      image = np.zeros((height, width, 3), np.uint8)
      for value, color in PET_TRIMAP_COLORS.items():
        image[trimap == value] = color
      Image.fromarray(image).save(os.path.join(images_dir, name + ".jpg"), quality=95)
      Image.fromarray(trimap.astype(np.uint8), mode="L").save(
        os.path.join(annotations_dir, "trimaps", name + ".png")
      )
      if split == "train":  # the real test split has no head boxes either
        with open(os.path.join(annotations_dir, "xmls", name + ".xml"), "w") as f:
          f.write(
            f"<annotation><size><width>{width}</width><height>{height}</height></size>"
            "<object><bndbox><xmin>1</xmin><ymin>2</ymin><xmax>10</xmax><ymax>12</ymax>"
            "</bndbox></object></annotation>"
          )
      lines.append(f"{name} {label} {species} 1\n")
    with open(os.path.join(annotations_dir, lists[split]), "w") as f:
      f.writelines(lines)
  return {"images": os.path.dirname(images_dir), "annotations": os.path.dirname(annotations_dir)}


@pytest.fixture(scope="session")
def fake_pets(tmp_path_factory):
  """Oxford-IIIT Pet, 3 train and 2 test images, prepared by the real tfds builder."""
  root = tmp_path_factory.mktemp("pets")
  paths = _write_pets_sources(str(root / "sources"), np.random.default_rng(0))
  data_dir = str(root / "tfds")
  with mock.patch.object(
    tfds.download.DownloadManager, "download_and_extract", lambda self, urls: paths
  ):
    tfds.builder("oxford_iiit_pet", data_dir=data_dir).download_and_prepare()
  return FakeDataset(data_dir, pet_trimap_of_image, {s: len(e) for s, e in PET_SPLITS.items()})


# Cityscapes: labelId -> colour (7 * id, 255 - 7 * id, 128), exact in PNG.
CITYSCAPES_SPLITS = {
  "train": ["aachen_000000_000019", "bochum_000000_000313"],
  "val": ["frankfurt_000000_000294"],
  "test": ["berlin_000000_000019"],
}


def cityscapes_label_id_of_image(image):
  assert np.all(image[..., 0] % 7 == 0) and np.all(image[..., 2] == 128)
  return image[..., 0].astype(np.int32) // 7


def _png(array):
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, format="png", compress_level=1)
  return buffer.getvalue()


def write_cityscapes_zips(manual_dir, rng):
  """Writes tiny leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip; 1024x2048 images."""
  os.makedirs(manual_dir, exist_ok=True)
  with (
    zipfile.ZipFile(os.path.join(manual_dir, "leftImg8bit_trainvaltest.zip"), "w") as images,
    zipfile.ZipFile(os.path.join(manual_dir, "gtFine_trainvaltest.zip"), "w") as labels,
  ):
    for split, image_ids in CITYSCAPES_SPLITS.items():
      for image_id in image_ids:
        city = image_id.split("_")[0]
        label_ids = block_labels(rng, 1024, 2048, 128, np.arange(34))
        image = np.stack(
          [7 * label_ids, 255 - 7 * label_ids, np.full_like(label_ids, 128)], -1
        ).astype(np.uint8)
        images.writestr(f"leftImg8bit/{split}/{city}/{image_id}_leftImg8bit.png", _png(image))
        labels.writestr(
          f"gtFine/{split}/{city}/{image_id}_gtFine_labelIds.png",
          _png(label_ids.astype(np.uint8)),
        )


@pytest.fixture(scope="session")
def fake_cityscapes(tmp_path_factory):
  """Cityscapes, 2 train, 1 validation and 1 test image, zips in <data_dir>/downloads/manual."""
  data_dir = str(tmp_path_factory.mktemp("cityscapes"))
  write_cityscapes_zips(os.path.join(data_dir, "downloads", "manual"), np.random.default_rng(1))
  # Default download config: the builder must find the zips in the documented manual dir.
  tfds.builder("cityscapes/semantic_segmentation", data_dir=data_dir).download_and_prepare()
  return FakeDataset(
    data_dir,
    cityscapes_label_id_of_image,
    {"train": 2, "validation": 1, "test": 1},
  )

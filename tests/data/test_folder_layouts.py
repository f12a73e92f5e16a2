"""The folder source's layouts (`dataset.images_dir`, `masks_dir`, `mask_pattern`), tfds-style
slices of one listing, mask values checked against the class count, and iterator checkpoints
that hold file names, not decoded images."""

import os

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from configs import unet_folder
from segjax.data import pipeline
from segjax.data.folder import image_folder, list_pairs
from segjax.data.splits import parse_split
from segjax.errors import ConfigError


def write(data_dir, images_dir, masks_dir, stem, mask_name, value, size=(16, 24)):
  """An image whose colour is `value` * 60 and its mask of `value`, in the given layout."""
  for sub in (images_dir, masks_dir):
    os.makedirs(os.path.join(data_dir, sub), exist_ok=True)
  mask = np.full(size, value, np.uint8)
  Image.fromarray(np.repeat(mask[..., None].astype(int) * 60 % 256, 3, -1).astype(np.uint8)).save(
    os.path.join(data_dir, images_dir, stem + ".png")
  )
  Image.fromarray(mask).save(os.path.join(data_dir, masks_dir, mask_name))


def read_all(ds):
  return list(ds.as_numpy_iterator())


def test_segnet_layout_reads_split_and_annotation_directories(tmp_path):
  for split in ("train", "val"):
    for i in range(3):
      write(tmp_path, split, f"{split}annot", f"{split}{i}", f"{split}{i}.png", i)
  ds = image_folder("val", data_dir=str(tmp_path), images_dir="{split}", masks_dir="{split}annot")
  examples = read_all(ds)
  assert [int(e["mask"][0, 0]) for e in examples] == [0, 1, 2]
  for e in examples:
    np.testing.assert_array_equal(e["image"][..., 0], e["mask"].astype(int) * 60)


def test_mask_pattern_names_masks_from_the_image_stem(tmp_path):
  for i, stem in enumerate(["FudanPed00001", "FudanPed00002", "PennPed00001"]):
    write(tmp_path, "PNGImages", "PedMasks", stem, f"{stem}_mask.png", i)
  images, masks = list_pairs(
    "all",
    str(tmp_path),
    images_dir="PNGImages",
    masks_dir="PedMasks",
    mask_pattern="{stem}_mask.png",
  )
  assert [os.path.basename(p) for p in masks] == [
    "FudanPed00001_mask.png",
    "FudanPed00002_mask.png",
    "PennPed00001_mask.png",
  ]
  assert [os.path.basename(p) for p in images] == [
    "FudanPed00001.png",
    "FudanPed00002.png",
    "PennPed00001.png",
  ]
  with pytest.raises(ConfigError, match=r"mask_pattern='mask\.png' must contain \{stem\}"):
    list_pairs(
      "all", str(tmp_path), images_dir="PNGImages", masks_dir="PedMasks", mask_pattern="mask.png"
    )
  with pytest.raises(ConfigError, match=r"images_dir='PNGImages' has no \{split\}.*'train'"):
    list_pairs(
      "train",
      str(tmp_path),
      images_dir="PNGImages",
      masks_dir="PedMasks",
      mask_pattern="{stem}_mask.png",
    )
  os.remove(tmp_path / "PedMasks" / "PennPed00001_mask.png")
  with pytest.raises(
    FileNotFoundError,
    match=r"PennPed00001\.png has no mask: expected "
    r".*PedMasks/PennPed00001_mask\.png",
  ):
    list_pairs(
      "all",
      str(tmp_path),
      images_dir="PNGImages",
      masks_dir="PedMasks",
      mask_pattern="{stem}_mask.png",
    )


@pytest.mark.parametrize("n", [1, 7, 10, 170])
@pytest.mark.parametrize("cuts", [("80%",), ("33%", "66%"), ("120",), ("-5",), ("10%", "-10%")])
def test_slices_of_one_listing_are_disjoint_and_cover_it(n, cuts):
  bounds = [None, *cuts, None]
  parts = [
    list(parse_split(f"all[{a or ''}:{b or ''}]").indices(n)) for a, b in zip(bounds, bounds[1:])
  ]
  covered = sorted(sum(parts, []))
  assert covered == list(range(n)), parts  # Disjoint (no repeats) and covering.
  assert sum(parts, []) == covered  # In listing order.


def test_percent_boundaries_round_as_tfds():
  # tfds rounds p * n / 100 to the closest integer: 10% of 7 is 1, 80% of 7 is 6 (5.6).
  assert list(parse_split("all[:80%]").indices(7)) == list(range(6))
  assert list(parse_split("all[80%:]").indices(7)) == [6]
  assert list(parse_split("all[10%:20%]").indices(170)) == list(range(17, 34))
  assert list(parse_split("train").indices(3)) == [0, 1, 2]
  for bad in ("all[", "all[a:b]", "all[1:2:3]", "all[5%%:]", "[1:2]"):
    with pytest.raises(ValueError, match="is not NAME or NAME"):
      parse_split(bad)


def test_mask_values_beyond_the_classes_name_the_file_and_value(tmp_path):
  write(tmp_path, "train/images", "train/masks", "a", "a.png", 1)
  write(tmp_path, "train/images", "train/masks", "b", "b.png", 255)  # ignore: fine
  write(tmp_path, "train/images", "train/masks", "c", "c.png", 3)
  ok = image_folder("train", data_dir=str(tmp_path), num_classes=4)
  assert len(read_all(ok)) == 3
  ds = image_folder("train", data_dir=str(tmp_path), num_classes=3)
  with pytest.raises(
    tf.errors.OpError,
    match=r"masks/c\.png has class id 3 .*num_classes=3 "
    r"nor ignore_label=255",
  ):
    read_all(ds)
  config = unet_folder.get_config("3")
  config.dataset.data_dir = str(tmp_path)
  config.dataset.eval_split = "train"
  config.image_size = (16, 16)
  eval_ds, _ = pipeline.eval_dataset(config, local_batch_size=2, canvas=((16, 24), (16, 24)))
  with pytest.raises(tf.errors.OpError, match=r"masks/c\.png has class id 3"):
    read_all(eval_ds)


def test_training_checkpoints_hold_file_names_and_resume_exactly(tmp_path):
  """1000 images of 64x96 would be 18 MB decoded in a 1000-example shuffle buffer; the folder
  shuffles names before decoding, so the iterator checkpoint stays small."""
  for i in range(1000):
    write(
      tmp_path / "data",
      "train/images",
      "train/masks",
      f"{i:04d}",
      f"{i:04d}.png",
      i % 3,
      size=(64, 96),
    )
  config = unet_folder.get_config("3")
  config.dataset.data_dir = str(tmp_path / "data")
  config.dataset.shuffle_buffer = 1000
  config.image_size = (32, 32)
  make = lambda: iter(pipeline.train_dataset(config, local_batch_size=4))  # noqa: E731
  iterator = make()
  for _ in range(3):
    next(iterator)
  path = tf.train.Checkpoint(it=iterator).write(str(tmp_path / "ckpt" / "it"))
  size = sum(
    os.path.getsize(os.path.join(tmp_path / "ckpt", f)) for f in os.listdir(tmp_path / "ckpt")
  )
  assert size < 1_000_000, size
  expected = [next(iterator) for _ in range(2)]
  restored = make()
  tf.train.Checkpoint(it=restored).read(path).assert_consumed()
  for want in expected:
    got = next(restored)
    for key in want:
      np.testing.assert_array_equal(got[key], want[key])

"""Tests for whole/slide evaluation batches of segjax/data/pipeline.py: native-size masks in
one canvas per split, padded with the ignore label."""

import os

import numpy as np
import pytest
from PIL import Image

from configs import unet_folder
from segjax.data import pipeline
from segjax.errors import ConfigError

IGNORE = 255
MEAN = 255 * np.array([0.485, 0.456, 0.406])
STD = 255 * np.array([0.229, 0.224, 0.225])
SIZES = [(97, 131), (60, 80), (33, 17)]  # Not multiples of the stride (4).


def write_folder(data_dir, split, sizes, num_classes=3, seed=0):
  """Random images and masks (some pixels ignore); returns [(image, mask)] as written."""
  rng = np.random.default_rng(seed)
  for sub in ("images", "masks"):
    os.makedirs(os.path.join(data_dir, split, sub), exist_ok=True)
  written = []
  for n, (h, w) in enumerate(sizes):
    image = rng.integers(0, 256, (h, w, 3), np.uint8)
    mask = rng.integers(0, num_classes, (h, w)).astype(np.uint8)
    mask[rng.random((h, w)) < 0.1] = IGNORE
    Image.fromarray(image).save(os.path.join(data_dir, split, "images", f"{n:02d}.png"))
    Image.fromarray(mask).save(os.path.join(data_dir, split, "masks", f"{n:02d}.png"))
    written.append((image, mask))
  return written


def folder_config(data_dir, **evaluation):
  config = unet_folder.get_config("3")
  config.image_size = (32, 32)
  config.model.depth, config.model.base_width = 2, 8
  config.dataset.data_dir = str(data_dir)
  config.evaluation.update(evaluation)
  return config


def test_whole_batches_hold_native_masks_in_one_padded_canvas(tmp_path):
  written = write_folder(tmp_path, "validation", SIZES)
  config = folder_config(tmp_path)
  canvas = pipeline.eval_canvas(config, multiple=4)
  # The largest of each side, rounded up to the stride; masks padded as far as images.
  assert canvas == ((100, 132), (100, 132))
  ds, num_batches = pipeline.eval_dataset(config, local_batch_size=2, canvas=canvas)
  canvas = canvas[0]
  batches = list(ds.as_numpy_iterator())
  assert num_batches == len(batches) == 2
  rows = [{k: v[i] for k, v in b.items()} for b in batches for i in range(2)]
  for row, (image, mask) in zip(rows, written):
    h, w = mask.shape
    assert row["image"].shape == (*canvas, 3) and row["mask"].shape == canvas
    np.testing.assert_array_equal(row["mask_size"], (h, w))
    np.testing.assert_array_equal(row["image_size"], (h, w))
    np.testing.assert_array_equal(row["mask"][:h, :w], mask)
    assert np.all(row["mask"][h:] == IGNORE) and np.all(row["mask"][:, w:] == IGNORE)
    np.testing.assert_allclose(row["image"][:h, :w], (image - MEAN) / STD, atol=1e-4)
    assert np.all(row["image"][h:] == 0) and np.all(row["image"][:, w:] == 0)
  padding = rows[3]
  assert not padding["example_mask"] and np.all(padding["mask"] == IGNORE)
  np.testing.assert_array_equal(padding["mask_size"], (1, 1))


def test_shorter_side_resizes_images_not_masks(tmp_path):
  write_folder(tmp_path, "validation", SIZES[:2])
  config = folder_config(tmp_path, shorter_side=30)
  canvas = pipeline.eval_canvas(config, multiple=4)
  assert canvas == ((32, 44), (97, 131))  # Images resized, masks native.
  (batch,) = pipeline.eval_dataset(config, local_batch_size=2, canvas=canvas)[0]
  assert batch["image"].shape == (2, 32, 44, 3) and batch["mask"].shape == (2, 97, 131)
  np.testing.assert_array_equal(batch["image_size"], [(30, 41), (30, 40)])  # 131 * 30 / 97
  np.testing.assert_array_equal(batch["mask_size"], SIZES[:2])
  np.testing.assert_array_equal(batch["mask"][1, 60:], IGNORE)
  config.evaluation.max_size = (97, 131)  # The largest mask; images as it resizes.
  assert pipeline.eval_canvas(config, multiple=4) == ((32, 44), (97, 131))


def test_slide_canvas_holds_the_window_and_max_size_is_checked(tmp_path):
  write_folder(tmp_path, "validation", SIZES[2:])
  config = folder_config(tmp_path, mode="slide", crop_size=(64, 64), stride=(32, 32))
  assert pipeline.eval_canvas(config, multiple=4) == ((64, 64), (64, 64))
  config.evaluation.max_size = (16, 16)
  assert pipeline.eval_canvas(config, multiple=4) == ((64, 64), (64, 64))
  config.evaluation.mode = "whole"
  canvas = pipeline.eval_canvas(config, multiple=4)
  with pytest.raises(Exception, match="larger than the canvas"):
    list(pipeline.eval_dataset(config, local_batch_size=1, canvas=canvas)[0])


@pytest.mark.parametrize(
  "key, value, message",
  [
    ("mode", "tiles", "evaluation.mode"),
    ("crop_size", None, "evaluation.crop_size"),
    ("scales", (), "evaluation.scales"),
  ],
)
def test_bad_evaluation_settings_name_the_key(tmp_path, key, value, message):
  config = folder_config(tmp_path, mode="slide", crop_size=(32, 32), stride=(16, 16))
  config.evaluation[key] = value
  with pytest.raises(ConfigError, match=message):
    pipeline.evaluation_settings(config)

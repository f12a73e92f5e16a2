"""Tests for segjax/data/folder.py on small image folders written into tmp_path."""

import os

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from segjax.data.folder import image_folder
from segjax.errors import DataError

# Class id -> image colour, far apart so JPEG cannot confuse them; 255 = ignore.
COLORS = {0: (0, 0, 0), 1: (255, 0, 0), 2: (0, 255, 0), 3: (0, 0, 255), 255: (255, 255, 255)}


def class_of_image(image):
  colors = np.array(list(COLORS.values()), np.int32)
  distances = np.abs(image[:, :, None, :3].astype(np.int32) - colors).sum(-1)
  return np.array(list(COLORS))[distances.argmin(-1)]


def write_pair(data_dir, split, stem, ext, size, seed, image_mode="RGB", mask_mode="L"):
  """Writes images/<stem><ext> and masks/<stem>.png; 16x16 blocks keep JPEG exact enough."""
  rng = np.random.default_rng(seed)
  height, width = size
  mask = np.kron(rng.choice(list(COLORS), (height // 16, width // 16)), np.ones((16, 16), int))
  image = np.zeros((height, width, 3), np.uint8)
  for value, color in COLORS.items():
    image[mask == value] = color
  for sub in ("images", "masks"):
    os.makedirs(os.path.join(data_dir, split, sub), exist_ok=True)
  Image.fromarray(image).convert(image_mode).save(
    os.path.join(data_dir, split, "images", stem + ext), quality=95
  )
  mask_image = Image.fromarray(mask.astype(np.uint8), mode="L")
  if mask_mode == "P":
    mask_image = mask_image.convert("P")
    # A palette whose colours differ from the indices: the source must read indices.
    mask_image.putpalette(list(np.random.default_rng(0).integers(0, 256, 768, dtype=np.uint8)))
  elif mask_mode != "L":
    mask_image = mask_image.convert(mask_mode)
  mask_image.save(os.path.join(data_dir, split, "masks", stem + ".png"))
  return mask


def test_pairs_are_aligned_at_native_size_in_sorted_order(tmp_path):
  masks = {
    "b": write_pair(tmp_path, "train", "b", ".png", (32, 48), seed=1),
    "a": write_pair(tmp_path, "train", "a", ".jpg", (48, 64), seed=2),
    "c": write_pair(tmp_path, "train", "c", ".JPEG", (64, 32), seed=3, image_mode="L"),
    "d": write_pair(
      tmp_path, "train", "d", ".png", (16, 32), seed=4, image_mode="RGBA", mask_mode="P"
    ),
  }
  (tmp_path / "train" / "images" / "notes.txt").write_text("not an image")
  ds = image_folder("train", data_dir=str(tmp_path))
  assert ds.cardinality().numpy() == 4
  assert ds.element_spec["image"] == tf.TensorSpec([None, None, 3], tf.uint8)
  assert ds.element_spec["mask"] == tf.TensorSpec([None, None], tf.uint8)
  examples = list(ds.as_numpy_iterator())
  for stem, example in zip("abcd", examples):
    np.testing.assert_array_equal(example["mask"], masks[stem])
    if stem != "c":  # grey image: colours collapse, only its shape and channels are checked
      np.testing.assert_array_equal(class_of_image(example["image"]), masks[stem])
    assert example["image"].shape == masks[stem].shape + (3,)


@pytest.mark.parametrize("process_count", [2, 3, 7])
def test_host_parts_are_contiguous_disjoint_and_cover_the_split(tmp_path, process_count):
  for i in range(5):
    write_pair(tmp_path, "val", f"{i:02d}", ".png", (16, 16 * (i + 1)), seed=i)
  widths = []
  for index in range(process_count):
    ds = image_folder(
      "val", data_dir=str(tmp_path), process_index=index, process_count=process_count
    )
    part = [ex["mask"].shape[1] // 16 - 1 for ex in ds.as_numpy_iterator()]
    assert ds.cardinality().numpy() == len(part)
    widths.append(part)
  sizes = [len(p) for p in widths]
  assert sizes == [5 // process_count + (i < 5 % process_count) for i in range(process_count)]
  assert sum(widths, []) == list(range(5))


def test_missing_split_directory(tmp_path):
  write_pair(tmp_path, "train", "a", ".png", (16, 16), seed=0)
  with pytest.raises(FileNotFoundError, match=f"{tmp_path}/validation"):
    image_folder("validation", data_dir=str(tmp_path))


def test_empty_folder(tmp_path):
  os.makedirs(tmp_path / "train" / "images")
  os.makedirs(tmp_path / "train" / "masks")
  with pytest.raises(FileNotFoundError, match=f"No .*images in {tmp_path}/train/images"):
    image_folder("train", data_dir=str(tmp_path))


def test_image_without_mask(tmp_path):
  write_pair(tmp_path, "train", "a", ".png", (16, 16), seed=0)
  write_pair(tmp_path, "train", "b", ".jpg", (16, 16), seed=0)
  os.remove(tmp_path / "train" / "masks" / "b.png")
  with pytest.raises(FileNotFoundError, match=r"images/b\.jpg has no mask: expected .*/b\.png"):
    image_folder("train", data_dir=str(tmp_path))


def test_two_images_with_one_stem(tmp_path):
  write_pair(tmp_path, "train", "a", ".png", (16, 16), seed=0)
  write_pair(tmp_path, "train", "a", ".jpg", (16, 16), seed=0)
  with pytest.raises(ValueError, match=r"a\.jpg and a\.png"):
    image_folder("train", data_dir=str(tmp_path))


def test_mask_size_differs_from_image_size(tmp_path):
  write_pair(tmp_path, "train", "a", ".png", (16, 32), seed=0)
  write_pair(tmp_path, "train", "b", ".png", (16, 32), seed=0)
  ds = image_folder("train", data_dir=str(tmp_path))
  # Changed after the source checked the headers: decoding checks again.
  Image.new("L", (16, 16)).save(tmp_path / "train" / "masks" / "b.png")
  with pytest.raises(tf.errors.OpError, match=r"masks/b\.png is 16x16 but image .*b\.png is 16x32"):
    list(ds.as_numpy_iterator())


def test_colour_mask_is_an_error(tmp_path):
  write_pair(tmp_path, "train", "a", ".png", (16, 16), seed=0)
  ds = image_folder("train", data_dir=str(tmp_path))
  write_pair(tmp_path, "train", "a", ".png", (16, 16), seed=0, mask_mode="RGB")
  with pytest.raises(tf.errors.OpError, match=r"masks/a\.png is a RGB image"):
    list(ds.as_numpy_iterator())


def test_bad_arguments(tmp_path):
  with pytest.raises(ValueError, match="needs data_dir"):
    image_folder("train", data_dir=None)
  with pytest.raises(ValueError, match="process_index 3"):
    image_folder("train", data_dir=str(tmp_path), process_index=3, process_count=3)


def test_unusable_files_are_all_named_when_the_source_is_built(tmp_path):
  for i in range(5):
    write_pair(tmp_path, "train", f"s{i}", ".png", (32, 48), seed=i)
  images, masks = tmp_path / "train" / "images", tmp_path / "train" / "masks"
  data = (images / "s1.png").read_bytes()
  (images / "s1.png").write_bytes(data[: len(data) // 2])  # Truncated.
  (images / "s2.png").write_text("not an image")
  Image.fromarray(np.zeros((16, 48), np.uint8)).save(masks / "s3.png")  # Wrong size.
  Image.fromarray(np.zeros((32, 48, 3), np.uint8)).save(masks / "s4.png")  # RGB mask.
  with pytest.raises(DataError) as error:
    image_folder("train", data_dir=str(tmp_path))
  message = str(error.value)
  assert message.startswith("4 of 5 image/mask pairs are unusable")
  assert f"{images / 's1.png'}: truncated PNG" in message
  assert f"{images / 's2.png'}: not a readable image" in message
  assert f"{masks / 's3.png'}: 16x48 but image {images / 's3.png'} is 32x48" in message
  assert f"{masks / 's4.png'}: a RGB image" in message
  assert "s0.png" not in message

"""Your own data set: a folder of images with same-named PNG masks (layout below; no paper).

Layout, one directory per split:

  <data_dir>/<split>/images/<stem>.jpg | .jpeg | .png
  <data_dir>/<split>/masks/<stem>.png

A mask holds one class id per pixel, 255 = ignore: a single-channel PNG (8-bit grey, or a
palette PNG, whose indices are the ids as in PASCAL VOC; 1-bit and 16-bit grey with ids
< 256 also work). Images are read as RGB (grey expanded, alpha dropped).

`image_folder` follows the segjax source contract: unbatched `{"image": uint8 (H, W, 3),
"mask": uint8 (H, W)}` at native size, in sorted stem order, with known cardinality; process
`process_index` of `process_count` reads a contiguous part of the sorted list, the first
parts taking the remainder (as `tfds.even_splits` does).

Errors. Checked when the source is built, naming the path: a missing split or `images/`
directory, a split without images, an image without a mask, two images with one stem; then,
from the files' headers (`check_files`, all of them at once): a file that is not an image, a
truncated PNG, a mask that is not single-channel or whose size differs from its image's.
Checked again when an example is decoded (a truncated JPEG is found only then); the error
names the files.
"""

import concurrent.futures
import os

import numpy as np
import tensorflow as tf
from PIL import Image

from segjax.data.images import read_image
from segjax.errors import DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")


def image_folder(
    split: str, *, data_dir: str | None, process_index: int = 0, process_count: int = 1
) -> tf.data.Dataset:
  """Image/mask pairs of `<data_dir>/<split>` (see the module docstring)."""
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} is not in [0, {process_count}).")
  image_paths, mask_paths = _list_pairs(split, data_dir)
  begin, end = _part_bounds(len(image_paths), process_index, process_count)
  check_files(image_paths[begin:end], mask_paths[begin:end])
  ds = tf.data.Dataset.from_tensor_slices((
      tf.constant(image_paths[begin:end], tf.string),
      tf.constant(mask_paths[begin:end], tf.string),
  ))
  return ds.map(_decode, num_parallel_calls=tf.data.AUTOTUNE)


def _list_pairs(split: str, data_dir: str | None) -> tuple[list[str], list[str]]:
  """Sorted image paths of a split and their mask paths; raises naming what is wrong."""
  if data_dir is None:
    raise ValueError("image_folder needs data_dir: the folder holding one directory per split.")
  split_dir = os.path.join(data_dir, split)
  images_dir = os.path.join(split_dir, "images")
  masks_dir = os.path.join(split_dir, "masks")
  if not os.path.isdir(split_dir):
    raise FileNotFoundError(f"Split directory {split_dir} does not exist.")
  if not os.path.isdir(images_dir):
    raise FileNotFoundError(f"Image directory {images_dir} does not exist.")

  images_by_stem = {}
  for name in sorted(os.listdir(images_dir)):
    stem, ext = os.path.splitext(name)
    if ext.lower() not in IMAGE_EXTENSIONS:
      continue
    if stem in images_by_stem:
      raise ValueError(
          f"Images {images_by_stem[stem]} and {name} in {images_dir} share the mask "
          f"{stem}.png; keep one."
      )
    images_by_stem[stem] = name
  if not images_by_stem:
    raise FileNotFoundError(f"No {'/'.join(IMAGE_EXTENSIONS)} images in {images_dir}.")

  image_paths, mask_paths = [], []
  for stem in sorted(images_by_stem):
    image_path = os.path.join(images_dir, images_by_stem[stem])
    mask_path = os.path.join(masks_dir, stem + ".png")
    if not os.path.isfile(mask_path):
      raise FileNotFoundError(f"Image {image_path} has no mask: expected {mask_path}.")
    image_paths.append(image_path)
    mask_paths.append(mask_path)
  return image_paths, mask_paths


MASK_MODES = ("1", "L", "P", "I", "I;16")
MAX_LISTED = 20


def check_files(image_paths: list[str], mask_paths: list[str]) -> None:
  """Reads the headers of every pair (and a PNG's last bytes) on a thread pool, raising one
  `DataError` that names each file that is not an image, a truncated PNG, a mask that is not
  single-channel or whose size differs from its image's: seconds, before any compile."""
  with concurrent.futures.ThreadPoolExecutor(16) as pool:
    problems = [p for p in pool.map(_check_pair, image_paths, mask_paths) if p]
  if problems:  # The first on the first line: the one line entry points print.
    listed = "".join(f"\n  {p}" for p in problems[1:MAX_LISTED])
    more = f"\n  ... and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
    raise DataError(f"{len(problems)} of {len(image_paths)} image/mask pairs are unusable: "
                    f"{problems[0]}{listed}{more}")


def _header(path: str) -> tuple[tuple[int, int] | None, str | None, str | None]:
  """((height, width), mode, None), or (None, None, what is wrong)."""
  try:
    with Image.open(path) as image:
      size, mode, format_ = (image.height, image.width), image.mode, image.format
  except (OSError, ValueError, SyntaxError) as e:
    return None, None, f"{path}: not a readable image ({e})"
  if format_ == "PNG":
    with open(path, "rb") as f:
      f.seek(max(os.path.getsize(path) - 64, 0))
      if b"IEND" not in f.read():
        return None, None, f"{path}: truncated PNG (no IEND chunk at the end)"
  return size, mode, None


def _check_pair(image_path: str, mask_path: str) -> str | None:
  image_size, _, problem = _header(image_path)
  if problem:
    return problem
  mask_size, mode, problem = _header(mask_path)
  if problem:
    return problem
  if mode not in MASK_MODES:
    return f"{mask_path}: a {mode} image; masks must be single-channel class ids"
  if mask_size != image_size:
    return (f"{mask_path}: {mask_size[0]}x{mask_size[1]} but image {image_path} is "
            f"{image_size[0]}x{image_size[1]} (HxW)")
  return None


def _part_bounds(n: int, index: int, count: int) -> tuple[int, int]:
  """[begin, end) of part `index` of `count` over n items, the first n % count one longer."""
  size, remainder = divmod(n, count)
  begin = index * size + min(index, remainder)
  return begin, begin + size + (index < remainder)


def _decode(image_path: tf.Tensor, mask_path: tf.Tensor) -> dict[str, tf.Tensor]:
  # Pillow for both: TF expands palette PNGs to RGB, losing the class indices, and its decode
  # errors do not name the file.
  image, mask = tf.numpy_function(_read_pair, [image_path, mask_path], [tf.uint8, tf.uint8],
                                  stateful=False)
  image.set_shape([None, None, 3])
  mask.set_shape([None, None])
  return {"image": image, "mask": mask}


def _read_pair(image_path: bytes, mask_path: bytes) -> tuple[np.ndarray, np.ndarray]:
  image_path, mask_path = image_path.decode(), mask_path.decode()
  image = read_image(image_path)
  try:
    with Image.open(mask_path) as mask_file:
      mode = mask_file.mode
      mask = np.asarray(mask_file)
  except (OSError, ValueError, SyntaxError) as e:
    raise ValueError(f"Cannot read mask {mask_path}: {e}") from None
  if mask.ndim != 2 or mode not in MASK_MODES:
    raise ValueError(
        f"Mask {mask_path} is a {mode} image; masks must be single-channel class ids "
        "(8-bit grey or palette PNG)."
    )
  if mask.shape != image.shape[:2]:
    raise ValueError(
        f"Mask {mask_path} is {mask.shape[0]}x{mask.shape[1]} but image {image_path} is "
        f"{image.shape[0]}x{image.shape[1]} (HxW)."
    )
  if mask.max(initial=0) > 255:
    raise ValueError(f"Mask {mask_path} has class id {mask.max()} > 255.")
  return image, mask.astype(np.uint8)

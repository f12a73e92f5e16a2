"""Your own data set: a folder of images with PNG masks (layout below; no paper).

Layout: `images_dir` and `masks_dir` are directories under `data_dir`, templates that may
contain `{split}`; a mask's file name is `mask_pattern` with the image's stem. The defaults,

  <data_dir>/<split>/images/<stem>.jpg | .jpeg | .png      images_dir="{split}/images"
  <data_dir>/<split>/masks/<stem>.png                      masks_dir="{split}/masks"

read one directory per split; SegNet's CamVid is `images_dir="{split}"`,
`masks_dir="{split}annot"`; PennFudanPed-like names are `mask_pattern="{stem}_mask.png"`.
Without `{split}` in `images_dir`, the sorted listing is one split named `all`. Any split takes
tfds's slicing syntax over the sorted listing (`segjax.data.splits`): `all[:120]`,
`all[120:]`, `train[:80%]`: deterministic, disjoint, together covering the listing.

A mask holds one class id per pixel, 255 = ignore: a single-channel PNG (8-bit grey, or a
palette PNG, whose indices are the ids as in PASCAL VOC; 1-bit and 16-bit grey with ids
< 256 also work). Images are read as RGB (grey expanded, alpha dropped).

`image_folder` follows the segjax source contract: unbatched `{"image": uint8 (H, W, 3),
"mask": uint8 (H, W)}` at native size, in sorted stem order, with known cardinality; process
`process_index` of `process_count` reads a contiguous part of the sorted list, the first
parts taking the remainder (as `tfds.even_splits` does).

With `shuffle_seed`, the file names are shuffled (anew each pass when repeated) before
decoding, so that a checkpoint of the training iterator holds names, not decoded images.

Errors. Checked when the source is built, naming the path: a missing image directory, a split
without images, an image without a mask, two images with one stem; then,
from the files' headers (`check_files`, all of them at once): a file that is not an image, a
truncated PNG, a mask that is not single-channel or whose size differs from its image's.
Checked again when an example is decoded (a truncated JPEG is found only then), with a mask
value that is neither a class id below `num_classes` nor `ignore_label`; the error names the
files and the value.
"""

import concurrent.futures
import functools
import os

import numpy as np
import tensorflow as tf
from PIL import Image

from segjax.data.images import read_image
from segjax.data.splits import parse_split
from segjax.errors import ConfigError, DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")


def image_folder(
  split: str,
  *,
  data_dir: str | None,
  process_index: int = 0,
  process_count: int = 1,
  images_dir: str = "{split}/images",
  masks_dir: str = "{split}/masks",
  mask_pattern: str = "{stem}.png",
  num_classes: int | None = None,
  ignore_label: int = 255,
  shuffle_seed: int | None = None,
  shuffle_buffer: int | None = None,
) -> tf.data.Dataset:
  """Image/mask pairs of `split` (see the module docstring); `num_classes` None skips the
  mask value check; with `shuffle_seed`, names are shuffled in a buffer of `shuffle_buffer`
  (default: all of them; 1 keeps the sorted order)."""
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} is not in [0, {process_count}).")
  image_paths, mask_paths = list_pairs(
    split, data_dir, images_dir=images_dir, masks_dir=masks_dir, mask_pattern=mask_pattern
  )
  begin, end = _part_bounds(len(image_paths), process_index, process_count)
  check_files(image_paths[begin:end], mask_paths[begin:end])
  ds = tf.data.Dataset.from_tensor_slices(
    (
      tf.constant(image_paths[begin:end], tf.string),
      tf.constant(mask_paths[begin:end], tf.string),
    )
  )
  if shuffle_seed is not None:
    buffer = end - begin if shuffle_buffer is None else min(shuffle_buffer, end - begin)
    ds = ds.shuffle(buffer, seed=shuffle_seed, reshuffle_each_iteration=True)
  read = functools.partial(_read_pair, num_classes=num_classes, ignore_label=ignore_label)
  return ds.map(functools.partial(_decode, read=read), num_parallel_calls=tf.data.AUTOTUNE)


def list_pairs(
  split: str,
  data_dir: str | None,
  *,
  images_dir: str = "{split}/images",
  masks_dir: str = "{split}/masks",
  mask_pattern: str = "{stem}.png",
) -> tuple[list[str], list[str]]:
  """Image paths of a split (sorted by stem, sliced) and their mask paths; raises naming what
  is wrong."""
  if data_dir is None:
    raise ValueError(
      "image_folder needs data_dir: the folder holding the images and masks "
      "(dataset.images_dir, dataset.masks_dir)."
    )
  if "{stem}" not in mask_pattern:
    raise ConfigError(
      f"dataset.mask_pattern={mask_pattern!r} must contain {{stem}}, the "
      "image's file name without extension."
    )
  selected = parse_split(split)
  if "{split}" not in images_dir and selected.name != "all":
    raise ConfigError(
      f"dataset.images_dir={images_dir!r} has no {{split}}: its listing is the "
      f"split 'all' (sliced as 'all[:80%]', 'all[80%:]'), not {split!r}."
    )
  images_dir = os.path.join(data_dir, images_dir.format(split=selected.name))
  masks_dir = os.path.join(data_dir, masks_dir.format(split=selected.name))
  if not os.path.isdir(images_dir):
    raise FileNotFoundError(f"Image directory {images_dir} does not exist (split {split!r}).")

  images_by_stem = {}
  for name in sorted(os.listdir(images_dir)):
    stem, ext = os.path.splitext(name)
    if ext.lower() not in IMAGE_EXTENSIONS:
      continue
    if stem in images_by_stem:
      raise ValueError(
        f"Images {images_by_stem[stem]} and {name} in {images_dir} share the mask "
        f"{mask_pattern.format(stem=stem)}; keep one."
      )
    images_by_stem[stem] = name
  if not images_by_stem:
    raise FileNotFoundError(f"No {'/'.join(IMAGE_EXTENSIONS)} images in {images_dir}.")

  stems = sorted(images_by_stem)
  stems = [stems[i] for i in selected.indices(len(stems))]
  if not stems:
    raise ValueError(
      f"Split {split!r} selects none of the {len(images_by_stem)} images in {images_dir}."
    )
  image_paths, mask_paths = [], []
  for stem in stems:
    image_path = os.path.join(images_dir, images_by_stem[stem])
    mask_path = os.path.join(masks_dir, mask_pattern.format(stem=stem))
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
    raise DataError(
      f"{len(problems)} of {len(image_paths)} image/mask pairs are unusable: "
      f"{problems[0]}{listed}{more}"
    )


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
    return (
      f"{mask_path}: {mask_size[0]}x{mask_size[1]} but image {image_path} is "
      f"{image_size[0]}x{image_size[1]} (HxW)"
    )
  return None


def _part_bounds(n: int, index: int, count: int) -> tuple[int, int]:
  """[begin, end) of part `index` of `count` over n items, the first n % count one longer."""
  size, remainder = divmod(n, count)
  begin = index * size + min(index, remainder)
  return begin, begin + size + (index < remainder)


def _decode(image_path: tf.Tensor, mask_path: tf.Tensor, *, read) -> dict[str, tf.Tensor]:
  # Pillow for both: TF expands palette PNGs to RGB, losing the class indices, and its decode
  # errors do not name the file.
  image, mask = tf.numpy_function(
    read, [image_path, mask_path], [tf.uint8, tf.uint8], stateful=False
  )
  image.set_shape([None, None, 3])
  mask.set_shape([None, None])
  return {"image": image, "mask": mask}


def _read_pair(
  image_path: bytes, mask_path: bytes, *, num_classes: int | None = None, ignore_label: int = 255
) -> tuple[np.ndarray, np.ndarray]:
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
  if num_classes is not None:
    values = np.flatnonzero(np.bincount(mask.ravel(), minlength=256))
    bad = values[(values >= num_classes) & (values != ignore_label)]
    if bad.size:
      raise ValueError(
        f"Mask {mask_path} has class id {bad[0]} (of {bad.tolist()[:8]}): "
        f"not below num_classes={num_classes} nor ignore_label={ignore_label}."
      )
  return image, mask.astype(np.uint8)

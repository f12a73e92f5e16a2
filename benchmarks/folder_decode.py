"""Folder source decoding: Pillow for image and mask (segjax.data.folder, errors name the
file) against the previous tf.io.decode_image for the image, and the cost of checking every
mask value against the class count (`num_classes`), interleaved A/B/C.

  python benchmarks/folder_decode.py [--images 96 --size 360,480 --rounds 5]

Writes a temporary CamVid-sized folder (PNG and JPEG images), reads the whole split through
tf.data with the source's parallel map, and prints median images/s of each, their ratio and
the machine's load.
"""

import argparse
import os
import statistics
import tempfile
import time

import numpy as np
import tensorflow as tf
from PIL import Image

from segjax.data import folder


def write_folder(root, count, size, ext):
  rng = np.random.default_rng(0)
  for sub in ("images", "masks"):
    os.makedirs(os.path.join(root, "train", sub), exist_ok=True)
  base = rng.integers(0, 256, (*size, 3), np.uint8)
  for i in range(count):
    Image.fromarray(np.roll(base, i, 0)).save(os.path.join(root, "train", "images", f"{i}{ext}"))
    Image.fromarray((np.roll(base[..., 0], i, 1) % 12).astype(np.uint8)).save(
      os.path.join(root, "train", "masks", f"{i}.png")
    )


def previous_source(data_dir):
  """The source before: TensorFlow decodes the image, Pillow (in Python) the mask."""
  images, masks = folder.list_pairs("train", data_dir)

  def decode(image_path, mask_path):
    image = tf.io.decode_image(tf.io.read_file(image_path), channels=3, expand_animations=False)
    mask = tf.numpy_function(
      lambda p: np.asarray(Image.open(p.decode())), [mask_path], tf.uint8, stateful=False
    )
    return {"image": image, "mask": mask}

  return tf.data.Dataset.from_tensor_slices((images, masks)).map(
    decode, num_parallel_calls=tf.data.AUTOTUNE
  )


def images_per_second(ds, count):
  start = time.perf_counter()
  for _ in ds.as_numpy_iterator():
    pass
  return count / (time.perf_counter() - start)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--images", type=int, default=96)
  parser.add_argument("--size", default="360,480")
  parser.add_argument("--rounds", type=int, default=5)
  args = parser.parse_args()
  size = tuple(int(s) for s in args.size.split(","))
  for ext in (".png", ".jpg"):
    with tempfile.TemporaryDirectory() as root:
      write_folder(root, args.images, size, ext)
      sources = {
        "pillow (now)": lambda: folder.image_folder("train", data_dir=root),
        "tf decode (before)": lambda: previous_source(root),
        "pillow + class check": lambda: folder.image_folder("train", data_dir=root, num_classes=12),
      }
      rates = {name: [] for name in sources}
      for _ in range(args.rounds):  # Interleaved: A B A B.
        for name, make in sources.items():
          rates[name].append(images_per_second(make(), args.images))
      medians = {name: statistics.median(r) for name, r in rates.items()}
      print(
        f"{ext} {size[0]}x{size[1]}, {args.images} images, load {os.getloadavg()[0]:.2f}: "
        + ", ".join(f"{n} {m:.0f} images/s" for n, m in medians.items())
        + f"; ratio now/before {medians['pillow (now)'] / medians['tf decode (before)']:.2f}"
        + f"; class check/none {medians['pillow + class check'] / medians['pillow (now)']:.2f}"
      )


if __name__ == "__main__":
  main()

"""Data ops on feature dicts: decode-free geometry and photometry for tf.data pipelines.

Every op has the contract `op(features: dict, ...) -> dict` over these keys:
  image: (H, W, 3) uint8 or float32.  mask: (H, W) uint8 class ids, `ignore_label` = no label.
Image and mask always move together. Random ops take a stateless `seed` (shape (2,) int),
so that the output depends only on the seed, never on thread timing (as in big_vision's
`pp/ops_image.py`).
"""

from __future__ import annotations

import tensorflow as tf

IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)


def resize(features: dict, size) -> dict:
  """Resizes to `size` (h, w): bilinear for the image, nearest neighbour for the mask."""
  image = tf.image.resize(features["image"], size, method="bilinear")
  mask = tf.image.resize(features["mask"][..., None], size, method="nearest")[..., 0]
  return {**features, "image": image, "mask": tf.cast(mask, features["mask"].dtype)}


def random_scale(features: dict, seed, min_scale: float, max_scale: float) -> dict:
  """Scales both sides by one factor drawn uniformly from [min_scale, max_scale]."""
  scale = tf.random.stateless_uniform([], seed, min_scale, max_scale)
  hw = tf.cast(tf.shape(features["image"])[:2], tf.float32)
  size = tf.cast(tf.math.round(hw * scale), tf.int32)
  return resize(features, tf.maximum(size, 1))


def pad_to_size(features: dict, size: tuple[int, int], ignore_label: int = 255) -> dict:
  """Pads bottom and right to at least `size`: image with zeros, mask with `ignore_label`."""
  hw = tf.shape(features["image"])[:2]
  pad_h = tf.maximum(size[0] - hw[0], 0)
  pad_w = tf.maximum(size[1] - hw[1], 0)
  paddings = [[0, pad_h], [0, pad_w]]
  image = tf.pad(features["image"], paddings + [[0, 0]])
  mask = tf.pad(features["mask"], paddings, constant_values=ignore_label)
  return {**features, "image": image, "mask": mask}


def random_crop(features: dict, seed, size: tuple[int, int], ignore_label: int = 255) -> dict:
  """A random `size` window, the same for image and mask (padding first if smaller)."""
  features = pad_to_size(features, size, ignore_label)
  hw = tf.shape(features["image"])[:2]
  max_offset = hw - tf.constant(size)
  offset = tf.random.stateless_uniform([2], seed, 0, tf.int32.max, dtype=tf.int32) % (
    max_offset + 1
  )
  image = tf.slice(features["image"], [offset[0], offset[1], 0], [size[0], size[1], 3])
  mask = tf.slice(features["mask"], offset, size)
  return {**features, "image": image, "mask": mask}


def random_flip_left_right(features: dict, seed) -> dict:
  """Mirrors image and mask together with probability 1/2."""
  flip = tf.random.stateless_uniform([], seed) < 0.5
  image = tf.cond(flip, lambda: features["image"][:, ::-1], lambda: features["image"])
  mask = tf.cond(flip, lambda: features["mask"][:, ::-1], lambda: features["mask"])
  return {**features, "image": image, "mask": mask}


def normalize(features: dict, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> dict:
  """Float32 image standardized per channel; the mask becomes int32."""
  image = (tf.cast(features["image"], tf.float32) - mean) / std
  return {**features, "image": image, "mask": tf.cast(features["mask"], tf.int32)}

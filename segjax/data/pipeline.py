"""The tf.data input pipeline for semantic segmentation: source -> augment -> batch.

Training batches are infinite, shuffled, augmented and of fixed shape. Evaluation batches
cover this process's share of the split exactly once, padded at the end to full batches
with `example_mask == False` so that jitted code sees one shape and metrics skip padding
(big_vision `input_pipeline.make_for_inference`). Evaluation either resizes every image and
mask to `image_size` or keeps the masks at native size, padded to one canvas per split
(`config.evaluation`, `evaluation_settings`, `eval_canvas`).

Batches are dicts of numpy-convertible tensors:
  image: (B, H, W, 3) float32, normalized.  mask: (B, H, W) int32, `ignore_label` = unlabeled.
  example_mask: (B,) bool (evaluation only), False on padding rows.
  image_size, mask_size: (B, 2) int32 (whole/slide evaluation only), content sizes.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable

import ml_collections
import numpy as np
import tensorflow as tf

from segjax.data import ops
from segjax.data.folder import image_folder
from segjax.data.iteration import numpy_batches
from segjax.data.shapes import shapes
from segjax.data.tfds_sources import cityscapes, oxford_iiit_pet
from segjax.errors import ConfigError

SOURCES: dict[str, Callable[..., tf.data.Dataset]] = {
  "shapes": shapes,
  "oxford_iiit_pet": oxford_iiit_pet,
  "cityscapes": cityscapes,
  "folder": image_folder,
}


# `dataset.KEY`s passed to the sources whose signature takes them (the folder's layout).
SOURCE_KEYS = ("images_dir", "masks_dir", "mask_pattern", "ignore_label")


def source_accepts(dataset_config: ml_collections.ConfigDict, parameter: str) -> bool:
  """Whether the source of `dataset_config.name` takes the keyword `parameter`."""
  return parameter in inspect.signature(_source(dataset_config)).parameters


def _source(dataset_config: ml_collections.ConfigDict) -> Callable[..., tf.data.Dataset]:
  if dataset_config.name not in SOURCES:
    raise ConfigError(f"Unknown dataset.name {dataset_config.name!r}; known: {sorted(SOURCES)}.")
  return SOURCES[dataset_config.name]


def make_source(
  dataset_config: ml_collections.ConfigDict,
  split: str,
  *,
  process_index: int,
  process_count: int,
  num_classes: int | None = None,
  shuffle_seed: int | None = None,
  shuffle_buffer: int | None = None,
  **kwargs,
) -> tf.data.Dataset:
  """This process's share of `split` from the source named by `dataset_config.name`, given
  the `SOURCE_KEYS` of `dataset_config`, `num_classes` (the mask values allowed besides
  `ignore_label`) and `shuffle_seed` when its signature takes them; `kwargs` as they are."""
  source = _source(dataset_config)
  accepted = inspect.signature(source).parameters
  optional = {
    k: dataset_config[k] for k in SOURCE_KEYS if k in accepted and dataset_config.get(k) is not None
  }
  optional.update(
    {
      k: v
      for k, v in dict(
        num_classes=num_classes, shuffle_seed=shuffle_seed, shuffle_buffer=shuffle_buffer
      ).items()
      if k in accepted and v is not None
    }
  )
  return source(
    split,
    data_dir=dataset_config.data_dir,
    process_index=process_index,
    process_count=process_count,
    **optional,
    **kwargs,
  )


def dataset_options() -> tf.data.Options:
  options = tf.data.Options()
  options.deterministic = True
  options.experimental_symbolic_checkpoint = True  # Small iterator checkpoints.
  return options


def numbered(ds: tf.data.Dataset) -> tf.data.Dataset:
  """`(i, element)` pairs, i = 0, 1, ...: `ds.enumerate()` written as a scan. After a shuffle,
  enumerate's iterator fails to restore from a symbolic checkpoint that was itself saved after
  a restore (TensorFlow 2.21: "Expected 2 components but got 0" at a run's second resume)."""
  return ds.scan(tf.constant(0, tf.int64), lambda i, element: (i + 1, (i, element)))


def _augment(features, seed, *, config):
  scale_seed, crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 3))
  aug = config.augment
  if aug.max_scale > aug.min_scale or aug.min_scale != 1.0:
    features = ops.random_scale(features, scale_seed, aug.min_scale, aug.max_scale)
  features = ops.random_crop(
    features, crop_seed, tuple(config.image_size), config.dataset.ignore_label
  )
  if aug.flip:
    features = ops.random_flip_left_right(features, flip_seed)
  return ops.normalize(features)


def train_dataset(
  config: ml_collections.ConfigDict,
  *,
  local_batch_size: int,
  process_index: int = 0,
  process_count: int = 1,
) -> tf.data.Dataset:
  """Infinite augmented batches of `local_batch_size` for this process.

  The augmentation of the i-th example this process reads is seeded by (config.seed,
  process_index, i): reproducible, and different on every host and epoch. Sources that take a
  `shuffle_seed` (the folder) shuffle file names before decoding, in a buffer of
  `dataset.shuffle_buffer` names; the others are shuffled in a buffer of that many decoded
  examples, which iterator checkpoints hold.
  """
  seed = config.seed + process_index
  names_shuffled = source_accepts(config.dataset, "shuffle_seed")
  ds = make_source(
    config.dataset,
    config.dataset.train_split,
    process_index=process_index,
    process_count=process_count,
    num_classes=config.model.get("num_classes"),
    shuffle_seed=seed if names_shuffled else None,
    shuffle_buffer=config.dataset.get("shuffle_buffer"),
    **config.dataset.get("train_kwargs", {}),
  )
  if not names_shuffled:  # A buffer of decoded examples (which iterator checkpoints hold).
    ds = ds.shuffle(config.dataset.shuffle_buffer, seed=seed)
  ds = numbered(ds.repeat())
  base_seed = tf.constant([config.seed, process_index], tf.int64)

  @tf.autograph.experimental.do_not_convert
  def augment(index, features):
    seed = tf.random.experimental.stateless_fold_in(base_seed, index)
    return _augment({k: features[k] for k in ("image", "mask")}, seed, config=config)

  ds = ds.map(augment, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.batch(local_batch_size, drop_remainder=True)
  return ds.prefetch(tf.data.AUTOTUNE).with_options(dataset_options())


EVALUATION_MODES = ("resize", "whole", "slide")


def evaluation_settings(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`config.evaluation` with every key present, checked; a config without the section
  evaluates as before it existed (`mode="resize"`). Keys:

    mode: "resize": images and labels resized to `image_size` (labels by nearest neighbour).
      "whole": each image at native size (or resized by `shorter_side`), one model call,
      logits resized back to the original label map, scored against it. "slide": as
      "whole", by mmseg's sliding `crop_size` windows every `stride` pixels.
    shorter_side: whole/slide: resize images (not labels) so that the shorter side has this
      length; 0 or None keeps the native size.
    max_size: whole/slide: (h, w) of the largest mask (native size) of the split, which the
      canvases are made for (`eval_canvas`); None: measured on the split once.
    crop_size, stride: slide: (h, w) windows, multiples of the model's stride, and steps.
    flip: whole/slide: also predict the mirrored image and average (TTA).
    scales: whole/slide: image scales predicted and averaged (TTA), (1.0,) = none.
  """
  defaults = dict(
    mode="resize",
    shorter_side=0,
    max_size=None,
    crop_size=None,
    stride=None,
    flip=False,
    scales=(1.0,),
  )
  given = config.get("evaluation") or {}
  given = given.to_dict() if isinstance(given, ml_collections.ConfigDict) else dict(given)
  unknown = set(given) - set(defaults)
  if unknown:
    raise ConfigError(
      f"Unknown config.evaluation keys {sorted(unknown)}; known: {sorted(defaults)}."
    )
  settings = ml_collections.ConfigDict({**defaults, **given})
  if settings.mode not in EVALUATION_MODES:
    raise ConfigError(f"evaluation.mode={settings.mode!r}; known: {EVALUATION_MODES}.")
  pairs = {"max_size": settings.max_size}
  if settings.mode == "slide":
    pairs.update(crop_size=settings.crop_size, stride=settings.stride)
  for key, value in pairs.items():
    if value is None and key == "max_size":
      continue
    if (
      not isinstance(value, (tuple, list))
      or len(value) != 2
      or not all(isinstance(v, int) and v > 0 for v in value)
    ):
      raise ConfigError(f"evaluation.{key}={value!r} must be (height, width), positive ints.")
  if not settings.scales or not all(s > 0 for s in settings.scales):
    raise ConfigError(f"evaluation.scales={settings.scales!r} must be positive factors.")
  if settings.shorter_side is not None and settings.shorter_side < 0:
    raise ConfigError(f"evaluation.shorter_side={settings.shorter_side!r} must be >= 0.")
  return settings


def eval_image_size(hw: tf.Tensor, shorter_side: int | None) -> tf.Tensor:
  """(2,) int32: the size an image of size `hw` is evaluated at, its shorter side
  `shorter_side` (aspect ratio kept, rounded), or `hw` when it is 0/None."""
  hw = tf.cast(hw, tf.int32)
  if not shorter_side:
    return hw
  scale = shorter_side / tf.cast(tf.reduce_min(hw), tf.float32)
  return tf.maximum(tf.cast(tf.round(tf.cast(hw, tf.float32) * scale), tf.int32), 1)


def eval_canvas(
  config: ml_collections.ConfigDict,
  *,
  multiple: int,
  process_index: int = 0,
  process_count: int = 1,
) -> tuple[tuple[int, int], tuple[int, int]]:
  """(image canvas, mask canvas), each (H, W): what whole/slide batches pad images (after
  `shorter_side` resizing) and native masks to. The largest mask: `evaluation.max_size`, or
  else measured on this process's share (reading it once); the largest image: that of the
  measured images, or `max_size` resized. The image canvas is rounded up to `multiple` (the
  model's stride) and at least the slide window; without resizing, both canvases are that one
  (so that image and mask align pixel for pixel). Processes must agree: take the maximum over
  them (`segjax.train.evaluator.Evaluator` does)."""
  settings = evaluation_settings(config)
  if settings.max_size is not None:
    masks = tf.constant(tuple(settings.max_size), tf.int32)
    largest = tf.stack([masks, eval_image_size(masks, settings.shorter_side)])
  else:
    ds = make_source(
      config.dataset,
      config.dataset.eval_split,
      process_index=process_index,
      process_count=process_count,
      num_classes=config.model.get("num_classes"),
      **config.dataset.get("eval_kwargs", {}),
    )

    @tf.autograph.experimental.do_not_convert
    def sizes(features):
      hw = tf.shape(features["mask"])[:2]
      return tf.stack([hw, eval_image_size(hw, settings.shorter_side)])

    ds = ds.map(sizes, num_parallel_calls=tf.data.AUTOTUNE).batch(256)
    largest = np.zeros([2, 2], np.int32)
    for batch in numpy_batches(ds, "evaluation data"):  # Data errors name the file.
      largest = np.maximum(largest, batch.max(0))
  (mask_h, mask_w), images = np.asarray(largest).tolist()
  minimum = settings.crop_size if settings.mode == "slide" else (0, 0)
  image_canvas = tuple(
    max(-(-int(s) // multiple) * multiple, int(m)) for s, m in zip(images, minimum)
  )
  return image_canvas, (image_canvas if not settings.shorter_side else (mask_h, mask_w))


def eval_dataset(
  config: ml_collections.ConfigDict,
  *,
  local_batch_size: int,
  process_index: int = 0,
  process_count: int = 1,
  num_batches: int | None = None,
  canvas: tuple | None = None,
) -> tuple[tf.data.Dataset, int]:
  """(dataset, num_batches): this process's share of the eval split, padded to full batches.

  Every process must run the same number of batches; pass the largest `num_batches` over
  processes (as `segjax.train.evaluator.Evaluator` does) when the shares differ in size.

  `evaluation.mode` "resize" (`evaluation_settings`): image and mask resized to
  `image_size`. "whole"/"slide": the image resized by `evaluation.shorter_side` (or kept),
  the mask at native size, padded bottom and right to `canvas` = (image canvas, mask canvas)
  (`eval_canvas`), the image with zeros after normalization, the mask with `ignore_label`;
  the batch also holds
    image_size: (B, 2) int32, the image's (h, w) in its canvas, and
    mask_size: (B, 2) int32, the original (h, w): where predictions are scored.
  Padding rows have sizes (1, 1).
  """
  settings = evaluation_settings(config)
  ds = make_source(
    config.dataset,
    config.dataset.eval_split,
    process_index=process_index,
    process_count=process_count,
    num_classes=config.model.get("num_classes"),
    **config.dataset.get("eval_kwargs", {}),
  )
  ignore = tf.constant(config.dataset.ignore_label, tf.int32)
  if settings.mode == "resize":
    size = mask_canvas = tuple(config.image_size)
    padding = {}
  else:
    if canvas is None:
      raise ValueError(f"evaluation.mode={settings.mode!r} needs the canvas; see eval_canvas.")
    size, mask_canvas = (tuple(int(c) for c in part) for part in canvas)
    one = tf.ones([2], tf.int32)
    padding = {"image_size": one, "mask_size": one}

  @tf.autograph.experimental.do_not_convert
  def prepare(features):
    features = {k: features[k] for k in ("image", "mask")}
    if settings.mode == "resize":
      features = ops.normalize(ops.resize(features, size))
      return {**features, "example_mask": tf.constant(True)}
    mask_size = tf.shape(features["mask"])[:2]
    image_size = eval_image_size(mask_size, settings.shorter_side)
    image = features["image"]
    if settings.shorter_side:
      image = tf.image.resize(image, image_size, method="bilinear")
    features = ops.normalize({"image": image, "mask": features["mask"]})
    fits = tf.reduce_all(image_size <= size) & tf.reduce_all(mask_size <= mask_canvas)
    with tf.control_dependencies(
      [
        tf.debugging.Assert(
          fits,
          [
            "An evaluation image is larger than the canvas (evaluation.max_size): image, mask, "
            "image canvas, mask canvas:",
            image_size,
            mask_size,
            size,
            mask_canvas,
          ],
        )
      ]
    ):
      # Both pads after the check: otherwise one may fail first, on negative padding.
      image = tf.pad(
        features["image"], [[0, size[0] - image_size[0]], [0, size[1] - image_size[1]], [0, 0]]
      )
      mask = tf.pad(
        features["mask"],
        [[0, mask_canvas[0] - mask_size[0]], [0, mask_canvas[1] - mask_size[1]]],
        constant_values=ignore,
      )
    image.set_shape(size + (3,))
    mask.set_shape(mask_canvas)
    return {
      "image": image,
      "mask": mask,
      "image_size": image_size,
      "mask_size": mask_size,
      "example_mask": tf.constant(True),
    }

  padding.update(
    {
      "image": tf.zeros(size + (3,), tf.float32),
      "mask": tf.fill(mask_canvas, ignore),
      "example_mask": tf.constant(False),
    }
  )
  ds = ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  return padded_batches(
    ds,
    padding,
    local_batch_size=local_batch_size,
    num_batches=num_batches,
    name=f"{config.dataset.name!r} split {config.dataset.eval_split!r}",
  )


def padded_batches(
  ds: tf.data.Dataset, padding: dict, *, local_batch_size: int, num_batches: int | None, name: str
) -> tuple[tf.data.Dataset, int]:
  """(batches, num_batches): every element of `ds` once, then `padding` rows to fill
  `num_batches` full batches (by default just enough)."""
  num_examples = int(ds.cardinality())
  if num_examples < 0:
    raise ValueError(f"Source {name} has unknown cardinality; the evaluator needs a known size.")
  needed = math.ceil(num_examples / local_batch_size)
  if num_batches is None:
    num_batches = needed
  elif num_batches < needed:
    raise ValueError(
      f"num_batches={num_batches} would drop examples: this process's "
      f"{num_examples} examples need {needed} batches of {local_batch_size}."
    )
  ds = ds.concatenate(tf.data.Dataset.from_tensors(padding).repeat())
  ds = ds.take(num_batches * local_batch_size).batch(local_batch_size, drop_remainder=True)
  return ds.prefetch(tf.data.AUTOTUNE).with_options(dataset_options()), num_batches

"""The tf.data pipeline for instance segmentation (Mask R-CNN, He et al. 2017; detectron2 style).

source -> resize by shorter/longer side -> flip -> normalize -> pad to a fixed size -> pad the
instances to `max_instances` -> batch. Training batches are infinite, shuffled and of fixed
shape; evaluation batches cover this process's share of the split exactly once, padded at the
end with `example_mask == False` rows (as `segjax.data.pipeline.eval_dataset`).

Batches (B = local batch size, (H, W) = config.image_size, K = config.dataset.max_instances):
  image: (B, H, W, 3) float32, normalized with the ImageNet mean and std; 0 on padding.
  boxes: (B, K, 4) float32 `[x1, y1, x2, y2]` absolute pixels of the padded image.
  classes: (B, K) int32 contiguous labels 1..C; 0 on padding rows.
  instance_masks: (B, K, H, W) uint8 in {0, 1}; in training batches with
    config.dataset.cropped_mask_size = S > 0, `cropped_masks` instead:
  cropped_masks: (B, K, S, S) float32 in [0, 1], each mask cropped to its box and resized,
    bilinear values at the centres of an S x S grid over the box
    (`instance_ops.crop_and_resize_masks`); 0 on rows that are not `valid`. Cropped after
    resizing, flipping and padding, so in the frame of `boxes`. TPU Mask R-CNN's
    `cropped_gt_masks`: 4 K S^2 bytes per image instead of K H W (the model's
    `segjax.ops.mask_targets_from_crops` reads them).
  valid: (B, K) bool, instances to learn from.
  is_crowd: (B, K) bool, COCO crowd regions (`valid` False there): exclude them from matching.
  image_size: (B, 2) int32 (h, w) of the image content before padding; rows
    `image_size[0]:` and columns `image_size[1]:` are padding.
Evaluation batches add:
  image_id: (B,) int64 the COCO image id (shapes: the example index); -1 on padding rows.
  scale: (B,) float32 resized / original size; original coordinates = coordinates / scale.
  original_size: (B, 2) int32 (h, w) of the original image, for pasting masks back exactly.
  example_mask: (B,) bool, False on padding rows.

Config keys read:
  config.image_size: (H, W) padded size, multiples of 32 (the FPN's largest stride).
  config.seed: shuffling and augmentation seed.
  config.augment.flip: random horizontal flip in training.
  config.dataset.name: a source of `segjax.data.instance_sources`: "shapes" (with
    instances), "coco" or "instance_folder" (PNG masks of instance ids, converted to COCO
    JSON, then read as "coco"; its keys images_dir, masks_dir, mask_pattern, classes_dir,
    classes_file, class_names).
  config.dataset.data_dir, .train_split, .eval_split: where the source reads.
  config.dataset.cropped_mask_size: S of `cropped_masks` in training batches; 0 or absent:
    full `instance_masks` (evaluation batches always hold those: COCO evaluation needs them).
  config.dataset.max_instances: K. config.dataset.overflow: "truncate" | "skip" | "error"
    for images with more instances (coco only; evaluation never skips: "skip" truncates).
  config.dataset.min_size, .max_size: detectron2 `ResizeShortestEdge` shorter side and
    longest side (COCO: 800, 1333); None or absent: no resizing. max_size must not exceed
    min(config.image_size), so that every orientation fits the padded size.
  config.model.conventions: "torchvision" resizes as torchvision does (sizes floored, torch's
    bilinear on the float image: `instance_ops.resize_shorter_longer`); default "detectron2".
  config.dataset.shuffle_buffer: shapes' shuffle buffer (its examples live in memory). COCO
    permutes image indices before decoding instead, so no decoded image waits in a buffer.
  config.dataset.train_kwargs, .eval_kwargs (optional): extra source arguments, e.g. shapes'
    num_examples, image_size, seed, max_shapes, or coco's annotation_file, image_dir.
"""

from __future__ import annotations

import ml_collections
import tensorflow as tf

from segjax.data import instance_ops, instance_sources
from segjax.data.pipeline import dataset_options, numbered, padded_batches
from segjax.errors import ConfigError

TRAIN_KEYS = ("image", "boxes", "classes", "instance_masks", "valid", "is_crowd", "image_size")
EVAL_KEYS = TRAIN_KEYS + ("image_id", "scale", "original_size", "example_mask")
# Training batches of config.dataset.cropped_mask_size > 0.
CROPPED_TRAIN_KEYS = tuple("cropped_masks" if k == "instance_masks" else k for k in TRAIN_KEYS)


def make_instance_source(
  config: ml_collections.ConfigDict,
  split: str,
  *,
  process_index: int,
  process_count: int,
  overflow: str,
  shuffle_seed: int | None = None,
  **kwargs,
) -> tf.data.Dataset:
  """This process's share of `split` from the source named by `config.dataset.name`
  (`segjax.data.instance_sources`)."""
  dataset = config.dataset
  source = instance_sources.get(config)
  return source.dataset(
    split,
    data_dir=dataset.get("data_dir"),
    process_index=process_index,
    process_count=process_count,
    max_instances=dataset.max_instances,
    overflow=overflow,
    shuffle_seed=shuffle_seed,
    **source.source_kwargs(dataset),
    **kwargs,
  )


def _check_sizes(config) -> tuple[tuple[int, int], int | None, int | None]:
  size = tuple(int(s) for s in config.image_size)
  min_size, max_size = config.dataset.get("min_size"), config.dataset.get("max_size")
  if size[0] % 32 or size[1] % 32:
    raise ConfigError(f"config.image_size={size} must be multiples of 32 (the FPN's strides).")
  if max_size is not None and max_size > min(size):
    raise ConfigError(
      f"config.dataset.max_size={max_size} exceeds min(config.image_size)="
      f"{min(size)}: a resized image could overflow the padded size."
    )
  return size, min_size, max_size


def cropped_mask_size(config) -> int:
  """`config.dataset.cropped_mask_size`, 0 when absent (full masks); checked."""
  size = config.dataset.get("cropped_mask_size", 0) or 0
  if isinstance(size, bool) or not isinstance(size, int) or size < 0:
    raise ConfigError(
      f"config.dataset.cropped_mask_size={size!r} must be an int >= 0 (0: full masks)."
    )
  return size


def _prepare(features, flip_seed, *, config, keys, crop_size=0):
  """Resize, flip (when `flip_seed` is given), normalize and pad one example; with
  `crop_size`, masks cropped to their boxes last."""
  size, min_size, max_size = _check_sizes(config)
  original_size = tf.cast(tf.shape(features["image"])[:2], tf.int32)
  features = instance_ops.with_size(features)
  if min_size is not None:
    features = instance_ops.resize_shorter_longer(
      features, min_size, max_size, config.get("model", {}).get("conventions", "detectron2")
    )
  if flip_seed is not None:
    features = instance_ops.random_flip_left_right(features, flip_seed)
  features = instance_ops.normalize(features)
  features = instance_ops.pad_to_multiple(features, size)
  features = instance_ops.pad_instances(features, config.dataset.max_instances)
  if crop_size:
    features = instance_ops.crop_instance_masks(features, crop_size)
  features = {**features, "original_size": original_size, "example_mask": tf.constant(True)}
  return {k: features[k] for k in keys}


def instance_train_dataset(
  config: ml_collections.ConfigDict,
  *,
  local_batch_size: int,
  process_index: int = 0,
  process_count: int = 1,
) -> tf.data.Dataset:
  """Infinite augmented batches of `local_batch_size` for this process (contract above).

  The flip of the i-th example this process reads is seeded by (config.seed, process_index,
  i): reproducible, and different on every host and epoch.
  """
  _check_sizes(config)
  crop_size = cropped_mask_size(config)
  keys = CROPPED_TRAIN_KEYS if crop_size else TRAIN_KEYS
  ds = make_instance_source(
    config,
    config.dataset.train_split,
    process_index=process_index,
    process_count=process_count,
    overflow=config.dataset.get("overflow", "truncate"),
    shuffle_seed=config.seed + process_index,
    **config.dataset.get("train_kwargs", {}),
  )
  ds = numbered(ds.repeat())
  base_seed = tf.constant([config.seed, process_index], tf.int64)
  flip = config.augment.get("flip", False)

  @tf.autograph.experimental.do_not_convert  # Plain tf ops; no Python control flow to convert.
  def augment(index, features):
    seed = tf.random.experimental.stateless_fold_in(base_seed, index)
    flip_seed = seed if flip else None
    return _prepare(features, flip_seed, config=config, keys=keys, crop_size=crop_size)

  ds = ds.map(augment, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.batch(local_batch_size, drop_remainder=True)
  return ds.prefetch(tf.data.AUTOTUNE).with_options(dataset_options())


def instance_eval_dataset(
  config: ml_collections.ConfigDict,
  *,
  local_batch_size: int,
  process_index: int = 0,
  process_count: int = 1,
  num_batches: int | None = None,
) -> tuple[tf.data.Dataset, int]:
  """(dataset, num_batches): this process's share of the eval split, padded to full batches.

  Every process must run the same number of batches; pass the largest `num_batches` over
  processes when the shares differ in size. An image is never skipped in evaluation
  (overflow "skip" truncates), so that the scores cover the whole split.
  """
  _check_sizes(config)
  overflow = config.dataset.get("overflow", "truncate")
  ds = make_instance_source(
    config,
    config.dataset.eval_split,
    process_index=process_index,
    process_count=process_count,
    overflow="truncate" if overflow == "skip" else overflow,
    **config.dataset.get("eval_kwargs", {}),
  )

  @tf.autograph.experimental.do_not_convert
  def prepare(features):
    return _prepare(features, None, config=config, keys=EVAL_KEYS)

  ds = ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  padding = {k: tf.zeros(s.shape, s.dtype) for k, s in ds.element_spec.items()}
  padding["image_id"] = tf.constant(-1, tf.int64)
  padding["scale"] = tf.constant(1.0)  # Never divide by zero on padding rows.
  return padded_batches(
    ds,
    padding,
    local_batch_size=local_batch_size,
    num_batches=num_batches,
    name=f"{config.dataset.name!r} split {config.dataset.eval_split!r}",
  )

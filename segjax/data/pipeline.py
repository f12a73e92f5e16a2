"""The tf.data input pipeline for semantic segmentation: source -> augment -> batch.

Training batches are infinite, shuffled, augmented and of fixed shape. Evaluation batches
cover this process's share of the split exactly once, padded at the end to full batches
with `example_mask == False` so that jitted code sees one shape and metrics skip padding
(big_vision `input_pipeline.make_for_inference`).

Batches are dicts of numpy-convertible tensors:
  image: (B, H, W, 3) float32, normalized.  mask: (B, H, W) int32, `ignore_label` = unlabeled.
  example_mask: (B,) bool (evaluation only), False on padding rows.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import ml_collections
import tensorflow as tf

from segjax.data import ops
from segjax.data.folder import image_folder
from segjax.data.shapes import shapes
from segjax.data.tfds_sources import cityscapes, oxford_iiit_pet

SOURCES: dict[str, Callable[..., tf.data.Dataset]] = {
  "shapes": shapes,
  "oxford_iiit_pet": oxford_iiit_pet,
  "cityscapes": cityscapes,
  "folder": image_folder,
}


def make_source(dataset_config: ml_collections.ConfigDict, split: str, *, process_index: int,
                process_count: int, **kwargs) -> tf.data.Dataset:
  """This process's share of `split` from the source named by `dataset_config.name`."""
  if dataset_config.name not in SOURCES:
    raise ValueError(f"Unknown dataset.name {dataset_config.name!r}; "
                     f"known: {sorted(SOURCES)}.")
  source = SOURCES[dataset_config.name]
  return source(split, data_dir=dataset_config.data_dir, process_index=process_index,
                process_count=process_count, **kwargs)


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
  features = ops.random_crop(features, crop_seed, tuple(config.image_size),
                             config.dataset.ignore_label)
  if aug.flip:
    features = ops.random_flip_left_right(features, flip_seed)
  return ops.normalize(features)


def train_dataset(config: ml_collections.ConfigDict, *, local_batch_size: int,
                  process_index: int = 0, process_count: int = 1) -> tf.data.Dataset:
  """Infinite augmented batches of `local_batch_size` for this process.

  The augmentation of the i-th example this process reads is seeded by (config.seed,
  process_index, i): reproducible, and different on every host and epoch.
  """
  ds = make_source(config.dataset, config.dataset.train_split, process_index=process_index,
                   process_count=process_count, **config.dataset.get("train_kwargs", {}))
  ds = ds.shuffle(config.dataset.shuffle_buffer, seed=config.seed + process_index)
  ds = numbered(ds.repeat())
  base_seed = tf.constant([config.seed, process_index], tf.int64)

  @tf.autograph.experimental.do_not_convert
  def augment(index, features):
    seed = tf.random.experimental.stateless_fold_in(base_seed, index)
    return _augment({k: features[k] for k in ("image", "mask")}, seed, config=config)

  ds = ds.map(augment, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.batch(local_batch_size, drop_remainder=True)
  return ds.prefetch(tf.data.AUTOTUNE).with_options(dataset_options())


def eval_dataset(config: ml_collections.ConfigDict, *, local_batch_size: int,
                 process_index: int = 0, process_count: int = 1,
                 num_batches: int | None = None) -> tuple[tf.data.Dataset, int]:
  """(dataset, num_batches): this process's share of the eval split, padded to full batches.

  Every process must run the same number of batches; pass the largest `num_batches` over
  processes (as `segjax.train.evaluator.Evaluator` does) when the shares differ in size.
  """
  ds = make_source(config.dataset, config.dataset.eval_split, process_index=process_index,
                   process_count=process_count, **config.dataset.get("eval_kwargs", {}))
  size = tuple(config.image_size)

  @tf.autograph.experimental.do_not_convert
  def prepare(features):
    features = ops.normalize(ops.resize({k: features[k] for k in ("image", "mask")}, size))
    return {**features, "example_mask": tf.constant(True)}

  padding = {
    "image": tf.zeros(size + (3,), tf.float32),
    "mask": tf.fill(size, tf.constant(config.dataset.ignore_label, tf.int32)),
    "example_mask": tf.constant(False),
  }
  ds = ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  return padded_batches(ds, padding, local_batch_size=local_batch_size, num_batches=num_batches,
                        name=f"{config.dataset.name!r} split {config.dataset.eval_split!r}")


def padded_batches(ds: tf.data.Dataset, padding: dict, *, local_batch_size: int,
                   num_batches: int | None, name: str) -> tuple[tf.data.Dataset, int]:
  """(batches, num_batches): every element of `ds` once, then `padding` rows to fill
  `num_batches` full batches (by default just enough)."""
  num_examples = int(ds.cardinality())
  if num_examples < 0:
    raise ValueError(f"Source {name} has unknown cardinality; the evaluator needs a known "
                     "size.")
  needed = math.ceil(num_examples / local_batch_size)
  if num_batches is None:
    num_batches = needed
  elif num_batches < needed:
    raise ValueError(f"num_batches={num_batches} would drop examples: this process's "
                     f"{num_examples} examples need {needed} batches of {local_batch_size}.")
  ds = ds.concatenate(tf.data.Dataset.from_tensors(padding).repeat())
  ds = ds.take(num_batches * local_batch_size).batch(local_batch_size, drop_remainder=True)
  return ds.prefetch(tf.data.AUTOTUNE).with_options(dataset_options()), num_batches

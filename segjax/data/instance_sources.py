"""Instance-segmentation data sets behind one seam: `INSTANCE_SOURCES[config.dataset.name]`.

An `InstanceSource` gives what training, evaluation and prediction need of a data set: its
examples (`dataset`, the contract of `segjax.data.coco.coco_instances`), the COCO ground truth
of its eval split with the category id of each label (`ground_truth`), and its
`(category_ids, class_names)` (`categories`, which prediction reads without ground truth where
the config holds both). A new source is one entry here:
  shapes: the embedded generated set (`segjax.data.shapes`), ground truth generated alike.
  coco: a COCO instances JSON and its images (`segjax.data.coco`).
  instance_folder: PNG masks of instance ids (`segjax.data.instance_folder`), converted to a
    COCO JSON that both training and evaluation read.
Label l (1..C) is category `category_ids[l - 1]`; `class_names[0]` is the background.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import ml_collections
import tensorflow as tf
from pycocotools.coco import COCO

from segjax.data import coco, instance_folder, instance_ops, shapes
from segjax.errors import ConfigError

Categories = tuple[tuple[int, ...], tuple[str, ...]]


@dataclasses.dataclass(frozen=True)
class InstanceSource:
  """dataset(split, *, data_dir, process_index, process_count, max_instances, overflow,
  shuffle_seed, **source_kwargs) -> tf.data.Dataset; source_kwargs(config.dataset) -> the
  source's own keys; ground_truth(config) -> (COCO, category_ids);
  categories(config) -> (category_ids, class_names)."""

  dataset: Callable[..., tf.data.Dataset]
  source_kwargs: Callable[[ml_collections.ConfigDict], dict]
  ground_truth: Callable[[ml_collections.ConfigDict], tuple[COCO, tuple[int, ...]]]
  categories: Callable[[ml_collections.ConfigDict], Categories]


def check_class_names(names, num_classes: int, source: str) -> None:
  """`names` (background first) must name `num_classes` labels, as `source` counts them."""
  if len(names) != num_classes:
    raise ConfigError(
      f"dataset.class_names has {len(names)} names (background first) for "
      f"{num_classes - 1} labels ({source}): give {num_classes}."
    )


# shapes


def shapes_instances(
  split: str,
  *,
  data_dir: str | None,
  process_index: int = 0,
  process_count: int = 1,
  max_instances: int = 8,
  overflow: str = "truncate",
  shuffle_seed: int | None = None,
  shuffle_buffer: int = 1000,
  category_ids=None,
  **kwargs,
) -> tf.data.Dataset:
  """The shapes set in the instance source contract of `segjax.data.coco`.

  `image_id` is the example index in the split, so `segjax.coco_eval.shapes_to_coco` builds
  the matching ground truth. Shapes never overflow (`max_shapes <= max_instances` is checked).
  Its labels are its class indices: `category_ids` must be unset.
  """
  del overflow
  if category_ids is not None:
    raise ConfigError(
      "dataset.category_ids maps labels to the categories of COCO-format data; "
      "the shapes set labels its classes 1..C itself: unset it."
    )
  ds = shapes.shapes(
    split,
    data_dir=data_dir,
    process_index=process_index,
    process_count=process_count,
    max_instances=max_instances,
    with_instances=True,
    **kwargs,
  )

  @tf.autograph.experimental.do_not_convert  # Plain tf ops; no Python control flow to convert.
  def to_instances(i, features):
    # shapes gives process p the examples p, p + n, p + 2n, ... (its docstring).
    image_id = tf.cast(process_index + i * process_count, tf.int64)
    return {
      **{k: features[k] for k in instance_ops.INSTANCE_KEYS if k in features},
      "image": features["image"],
      "is_crowd": tf.zeros_like(features["valid"]),
      "image_id": image_id,
    }

  ds = ds.enumerate().map(to_instances)
  if shuffle_seed is not None:  # Shapes' examples live in memory: shuffling them is cheap.
    ds = ds.shuffle(shuffle_buffer, seed=shuffle_seed)
  return ds


def _shapes_kwargs(dataset: ml_collections.ConfigDict) -> dict:
  return {"shuffle_buffer": dataset.get("shuffle_buffer", 1000), **_category_ids_kwargs(dataset)}


def _shapes_ground_truth(config: ml_collections.ConfigDict):
  from segjax import coco_eval  # Lazy: pycocotools evaluation is not needed to read data.

  dataset = config.dataset
  kwargs = dict(dataset.get("eval_kwargs", {}))
  gt = coco_eval.shapes_to_coco(dataset.eval_split, max_instances=dataset.max_instances, **kwargs)
  return gt, tuple(sorted(gt.getCatIds()))


def _shapes_categories(config: ml_collections.ConfigDict) -> Categories:
  names = tuple(config.dataset.get("class_names") or shapes.CLASS_NAMES)
  return tuple(range(1, len(names))), names


# COCO-format sources: ground truth and categories from the eval split's JSON.


def _coco_annotation_file(config: ml_collections.ConfigDict) -> str:
  dataset = config.dataset
  return dict(dataset.get("eval_kwargs", {})).get("annotation_file") or (
    coco.default_annotation_file(dataset.data_dir, dataset.eval_split)
  )


def _instance_folder_annotation_file(config: ml_collections.ConfigDict) -> str:
  dataset = config.dataset
  return instance_folder.annotation_file(
    dataset.data_dir, dataset.eval_split, **instance_folder.conversion_kwargs(dataset)
  )


def _coco_info(config: ml_collections.ConfigDict, annotation_file: str) -> coco.CocoInfo:
  """The eval split's annotation file, its labels mapped by `dataset.category_ids` when set."""
  dataset = config.dataset
  category_ids = dataset.get("category_ids")
  info = coco.load_coco(annotation_file, None if category_ids is None else tuple(category_ids))
  if dataset.get("class_names"):
    check_class_names(
      dataset.class_names,
      info.num_classes,
      f"dataset.category_ids or {annotation_file}'s categories",
    )
  return info


def _coco_format_source(dataset_fn, annotation_file_fn, source_kwargs) -> InstanceSource:
  def ground_truth(config):
    info = _coco_info(config, annotation_file_fn(config))
    return info.coco, info.category_ids

  def categories(config):
    """`dataset.category_ids` and `class_names` when both are set (torchvision's imported
    models predict without an annotation file), else the eval annotation file's."""
    dataset = config.dataset
    ids, names = dataset.get("category_ids"), dataset.get("class_names")
    if ids and names:
      check_class_names(names, len(ids) + 1, "dataset.category_ids")
      return tuple(int(c) for c in ids), tuple(names)
    info = _coco_info(config, annotation_file_fn(config))
    return info.category_ids, tuple(names or info.class_names)

  return InstanceSource(dataset_fn, source_kwargs, ground_truth, categories)


def _category_ids_kwargs(dataset: ml_collections.ConfigDict) -> dict:
  ids = dataset.get("category_ids")
  return {} if ids is None else {"category_ids": tuple(ids)}


INSTANCE_SOURCES: dict[str, InstanceSource] = {
  "shapes": InstanceSource(
    shapes_instances, _shapes_kwargs, _shapes_ground_truth, _shapes_categories
  ),
  "coco": _coco_format_source(coco.coco_instances, _coco_annotation_file, _category_ids_kwargs),
  "instance_folder": _coco_format_source(
    instance_folder.instance_folder,
    _instance_folder_annotation_file,
    lambda d: {**_category_ids_kwargs(d), **instance_folder.conversion_kwargs(d)},
  ),
}


def get(config: ml_collections.ConfigDict) -> InstanceSource:
  name = config.dataset.name
  if name not in INSTANCE_SOURCES:
    raise ConfigError(
      f"Unknown dataset.name {name!r} for instance segmentation; known: {sorted(INSTANCE_SOURCES)}."
    )
  return INSTANCE_SOURCES[name]

"""COCO-format instance segmentation data (Lin et al. 2014), read as detectron2 reads it.

Layout (COCO 2017 by default, `split="train2017"`):

  <data_dir>/annotations/instances_<split>.json   (or `annotation_file`)
  <data_dir>/<split>/<file_name>                   (or `image_dir`; JPEG or PNG)

`coco_instances` yields one unbatched example per image, sorted by image id:
  image: uint8 (H, W, 3) as stored (grey expanded to RGB).
  boxes: float32 (N, 4) `[x1, y1, x2, y2]` absolute pixels, from the COCO `bbox` `[x, y, w, h]`,
    clipped to the image.
  classes: int32 (N,) labels 1..C: label l is the l-th smallest category id, or with
    `category_ids` given (`config.dataset.category_ids`), the category `category_ids[l - 1]`.
  instance_masks: uint8 (N, H, W), pycocotools `annToMask` of polygons, compressed RLE or
    uncompressed RLE.
  valid: bool (N,) True for instances to learn from. is_crowd: bool (N,) True for `iscrowd`
    regions, which have `valid == False`: a model that reads only `valid` drops them as
    detectron2 does, a matcher that reads `is_crowd` can ignore proposals on them.
  image_id: int64 (), the COCO image id.
N <= `max_instances` varies per image; `segjax.data.instance_pipeline` pads it to
`max_instances` after resizing, so that no empty rows are resized.

Overflow (`overflow`), for images with more than `max_instances` annotations (crowd included):
"truncate" keeps the `max_instances` largest by `area` (the default), "skip" drops the image,
"error" raises naming it. Counts are logged. `python -m segjax.data.scan_instances` reports
the distribution of instance counts to choose `max_instances`.

As detectron2's `load_coco_json`, polygons of fewer than 3 points are ignored, and
annotations left without a polygon or with a box of no area are dropped, with a logged count.

Category ids map to labels with `CocoInfo.category_ids` (label l <-> category_ids[l - 1]),
which `segjax.coco_eval.detections_to_coco_json` uses to write results. By default they are
the file's categories, sorted; `load_coco(..., category_ids=...)` fixes them instead, e.g.
torchvision's 91-label COCO models (`segjax.weights.torchvision`: label l is category id l,
1..90, ids absent from COCO 2017 included). Ids of that list missing from the file are named
"N/A"; an annotation of a category not in the list is an error naming it, as in detectron2.

Process `process_index` of `process_count` reads a contiguous part of the sorted images, the
first parts taking the remainder (as `tfds.even_splits`); the parts are disjoint and cover the
split. Cardinality is known. With `shuffle_seed`, the part's images are permuted (anew on each
pass when repeated) before decoding, so no decoded image waits in a shuffle buffer.

Errors, naming the file and the field, when the source is built: a missing or unparsable JSON,
a missing top-level key or image/annotation/category field, duplicate ids, an annotation on an
unknown image or category, a missing image file (of this process's part). When an example is
decoded: an image that cannot be read (truncated, not an image) or whose size differs from
its JSON `height`/`width`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
from collections import Counter
from collections.abc import Sequence

import numpy as np
import tensorflow as tf
from absl import logging
from pycocotools.coco import COCO

from segjax.data.images import read_image
from segjax.errors import ConfigError

OVERFLOW_POLICIES = ("truncate", "skip", "error")


@dataclasses.dataclass(frozen=True)
class CocoInfo:
  """What evaluation needs to map labels and images back to the JSON.

  Attributes:
    annotation_file: path of the instances JSON.
    category_ids: label l (1..C) is category `category_ids[l - 1]`: the sorted COCO category
      ids, or those `load_coco` was given.
    class_names: ("background", name of label 1, ..., name of label C), "N/A" for an id the
      file does not have.
    coco: the pycocotools ground truth, for `segjax.coco_eval.evaluate_coco`.
  """

  annotation_file: str
  category_ids: tuple[int, ...]
  class_names: tuple[str, ...]
  coco: COCO

  @property
  def num_classes(self) -> int:
    """C + 1: the labels plus background."""
    return len(self.category_ids) + 1


def default_annotation_file(data_dir: str, split: str) -> str:
  return os.path.join(data_dir, "annotations", f"instances_{split}.json")


def load_coco(annotation_file: str, category_ids: Sequence[int] | None = None) -> CocoInfo:
  """Parses and checks an instances JSON; raises naming the file and field at fault.

  `category_ids` (`config.dataset.category_ids`), when given, is the label -> category id map
  (label l is `category_ids[l - 1]`) in place of the file's sorted categories; a ConfigError
  names any annotated category it lacks.
  """
  if not os.path.isfile(annotation_file):
    raise FileNotFoundError(f"COCO annotation file {annotation_file} does not exist.")
  try:
    with open(annotation_file) as f:
      data = json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f"{annotation_file} is not valid JSON: {e}") from e
  if not isinstance(data, dict):
    raise ValueError(
      f"{annotation_file}: the top level must be an object with 'images', "
      "'annotations' and 'categories'."
    )
  for key in ("images", "annotations", "categories"):
    if key not in data:
      raise ValueError(f"{annotation_file}: missing top-level key {key!r}.")
    if not isinstance(data[key], list):
      raise ValueError(f"{annotation_file}: {key!r} must be a list.")
  _check_entries(annotation_file, "images", data["images"], ("id", "file_name", "height", "width"))
  _check_entries(annotation_file, "categories", data["categories"], ("id",))
  _check_entries(
    annotation_file,
    "annotations",
    data["annotations"],
    ("id", "image_id", "category_id", "bbox", "segmentation"),
  )
  sizes = {image["id"]: [image["height"], image["width"]] for image in data["images"]}
  known = {category["id"] for category in data["categories"]}
  for ann in data["annotations"]:
    where = f"{annotation_file}: annotation id {ann['id']}"
    if ann["image_id"] not in sizes:
      raise ValueError(f"{where} has image_id {ann['image_id']}, which no image has.")
    if ann["category_id"] not in known:
      raise ValueError(f"{where} has category_id {ann['category_id']}, which no category has.")
    if not (isinstance(ann["bbox"], (list, tuple)) and len(ann["bbox"]) == 4):
      raise ValueError(f"{where}: 'bbox' must be [x, y, width, height], got {ann['bbox']!r}.")
    segm = ann["segmentation"]
    if not isinstance(segm, list) and not (
      isinstance(segm, dict) and "counts" in segm and "size" in segm
    ):
      raise ValueError(
        f"{where}: 'segmentation' must be a list of polygons or an RLE dict "
        f"with 'counts' and 'size'."
      )
    if isinstance(segm, dict) and list(segm["size"]) != sizes[ann["image_id"]]:
      raise ValueError(
        f"{where}: RLE 'size' {segm['size']} differs from its image's "
        f"[height, width] {sizes[ann['image_id']]}."
      )
  coco = COCO()
  coco.dataset = data
  with contextlib.redirect_stdout(io.StringIO()):  # createIndex prints progress.
    coco.createIndex()
  names = {c["id"]: str(c.get("name", c["id"])) for c in data["categories"]}
  if category_ids is None:
    category_ids = sorted(names)
  else:
    category_ids = _check_category_ids(annotation_file, category_ids, data, names)
  return CocoInfo(
    annotation_file=annotation_file,
    category_ids=tuple(category_ids),
    class_names=("background",) + tuple(names.get(c, "N/A") for c in category_ids),
    coco=coco,
  )


def _check_category_ids(
  path: str, category_ids: Sequence[int], data: dict, names: dict
) -> tuple[int, ...]:
  """`category_ids` as ints, after checking they are distinct and cover every annotation."""
  ids = tuple(int(c) for c in category_ids)
  if not ids or len(set(ids)) != len(ids):
    raise ConfigError(
      f"dataset.category_ids={list(ids)} must be distinct category ids, one per label 1..C."
    )
  listed = set(ids)
  unlisted = Counter(
    a["category_id"] for a in data["annotations"] if a["category_id"] not in listed
  )
  if unlisted:
    found = ", ".join(
      f"{c} ({names[c]!r}, {n} annotation{'s' * (n != 1)})" for c, n in sorted(unlisted.items())
    )
    raise ConfigError(
      f"{path} has annotations of categories that dataset.category_ids "
      f"(label -> category id) does not list: {found}. Add them to "
      "dataset.category_ids (and model.roi_heads.num_classes), or unset it to "
      "label the file's categories 1..C."
    )
  return ids


def _check_entries(path: str, key: str, entries: list, fields: tuple[str, ...]) -> None:
  seen = set()
  for i, entry in enumerate(entries):
    if not isinstance(entry, dict):
      raise ValueError(f"{path}: {key}[{i}] is not an object.")
    for field in fields:
      if field not in entry:
        name = f"{key}[{i}]" + (f" (id {entry['id']})" if "id" in entry else "")
        raise ValueError(f"{path}: {name} has no {field!r} field.")
    if entry["id"] in seen:
      raise ValueError(f"{path}: two {key} have id {entry['id']}.")
    seen.add(entry["id"])


def valid_polygons(segm):
  """RLE unchanged; polygons of 3 points or more only (pycocotools fails on shorter ones).

  As detectron2 `load_coco_json`, which drops the rest of an annotation's parts.
  """
  if isinstance(segm, dict):
    return segm
  return [p for p in segm if isinstance(p, list) and len(p) % 2 == 0 and len(p) >= 6]


def _has_mask(segm) -> bool:
  return isinstance(segm, dict) or bool(valid_polygons(segm))


def _area(ann: dict) -> float:
  return float(ann["area"]) if "area" in ann else float(ann["bbox"][2] * ann["bbox"][3])


def select_annotations(
  info: CocoInfo, *, max_instances: int, overflow: str
) -> list[tuple[dict, list[dict]]]:
  """[(image, kept annotations sorted by id)] sorted by image id, after the overflow policy."""
  if overflow not in OVERFLOW_POLICIES:
    raise ValueError(f"dataset.overflow={overflow!r}; expected one of {OVERFLOW_POLICIES}.")
  if max_instances < 1:
    raise ValueError(f"max_instances={max_instances} must be at least 1.")
  coco, path = info.coco, info.annotation_file
  dropped = truncated = skipped = 0
  most = 0
  selected = []
  for image_id in sorted(coco.imgs):
    image = coco.imgs[image_id]
    anns = sorted(coco.imgToAnns.get(image_id, []), key=lambda a: a["id"])
    usable = [
      a for a in anns if _has_mask(a["segmentation"]) and a["bbox"][2] > 0 and a["bbox"][3] > 0
    ]
    dropped += len(anns) - len(usable)
    if len(usable) > max_instances:
      most = max(most, len(usable))
      if overflow == "error":
        raise ValueError(
          f"{path}: image id {image_id} ({image['file_name']}) has "
          f"{len(usable)} instances, more than max_instances={max_instances} "
          "(dataset.overflow='error'; 'truncate' keeps the largest)."
        )
      if overflow == "skip":
        skipped += 1
        continue
      truncated += 1
      # Keep the largest: small ones are the hardest to learn and the least missed.
      largest = sorted(usable, key=lambda a: (-_area(a), a["id"]))[:max_instances]
      usable = sorted(largest, key=lambda a: a["id"])
    selected.append((image, usable))
  if dropped:
    logging.warning(
      "%s: dropped %d annotations without a valid polygon or box area.", path, dropped
    )
  if truncated:
    logging.warning(
      "%s: %d images have more than max_instances=%d instances (at most %d); "
      "kept the largest of each.",
      path,
      truncated,
      max_instances,
      most,
    )
  if skipped:
    logging.warning(
      "%s: skipped %d images with more than max_instances=%d instances (at most %d).",
      path,
      skipped,
      max_instances,
      most,
    )
  return selected


def _part_bounds(n: int, index: int, count: int) -> tuple[int, int]:
  """[begin, end) of part `index` of `count` over n items, the first n % count one longer."""
  size, remainder = divmod(n, count)
  begin = index * size + min(index, remainder)
  return begin, begin + size + (index < remainder)


def coco_instances(
  split: str,
  *,
  data_dir: str | None,
  process_index: int = 0,
  process_count: int = 1,
  annotation_file: str | None = None,
  image_dir: str | None = None,
  max_instances: int = 100,
  overflow: str = "truncate",
  shuffle_seed: int | None = None,
  info: CocoInfo | None = None,
  category_ids: Sequence[int] | None = None,
) -> tf.data.Dataset:
  """This process's part of a COCO-format split (see the module docstring).

  `info` reuses an already loaded `load_coco(annotation_file, category_ids)`;
  `category_ids` is the label -> category id map (default: the file's, sorted).
  """
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} is not in [0, {process_count}).")
  if annotation_file is None or image_dir is None:
    if data_dir is None:
      raise ValueError("coco_instances needs data_dir, or both annotation_file and image_dir.")
  annotation_file = annotation_file or default_annotation_file(data_dir, split)
  image_dir = image_dir or os.path.join(data_dir, split)
  info = info or load_coco(annotation_file, category_ids)
  if category_ids is not None and tuple(category_ids) != info.category_ids:
    raise ValueError(
      f"info.category_ids {info.category_ids} differ from category_ids {tuple(category_ids)}."
    )
  selected = select_annotations(info, max_instances=max_instances, overflow=overflow)
  begin, end = _part_bounds(len(selected), process_index, process_count)
  part = selected[begin:end]
  if not part:
    raise ValueError(
      f"{annotation_file}: no images for process {process_index} of "
      f"{process_count} ({len(selected)} images in all)."
    )
  paths = []
  for image, _ in part:
    path = os.path.join(image_dir, image["file_name"])
    if not os.path.isfile(path):
      raise FileNotFoundError(
        f"Image file {path} of image id {image['id']} in {annotation_file} does not exist."
      )
    paths.append(path)
  label_of = {c: i + 1 for i, c in enumerate(info.category_ids)}
  coco = info.coco

  def annotations(index):
    image, anns = part[index]
    pixels = read_image(paths[index])
    height, width = int(image["height"]), int(image["width"])
    if pixels.shape[:2] != (height, width):
      raise ValueError(
        f"Image {paths[index]} is {pixels.shape[0]}x{pixels.shape[1]} but "
        f"{annotation_file} says height={height}, width={width} (image id "
        f"{image['id']})."
      )
    n = len(anns)
    masks = np.zeros((n, height, width), np.uint8)
    boxes = np.zeros((n, 4), np.float32)
    classes = np.zeros((n,), np.int32)
    is_crowd = np.zeros((n,), bool)
    for i, ann in enumerate(anns):
      masks[i] = coco.annToMask({**ann, "segmentation": valid_polygons(ann["segmentation"])})
      x, y, w, h = ann["bbox"]
      boxes[i] = np.clip([x, y, x + w, y + h], 0, [width, height, width, height])
      classes[i] = label_of[ann["category_id"]]
      is_crowd[i] = bool(ann.get("iscrowd", 0))
    return pixels, masks, boxes, classes, ~is_crowd, is_crowd

  @tf.autograph.experimental.do_not_convert  # Plain tf ops; no Python control flow to convert.
  def decode(index, image_id):
    # Pillow reads the image (`segjax.data.images`): its errors name the file.
    image, masks, boxes, classes, valid, is_crowd = tf.numpy_function(
      annotations,
      [index],
      [tf.uint8, tf.uint8, tf.float32, tf.int32, tf.bool, tf.bool],
      stateful=False,
    )
    image.set_shape([None, None, 3])
    masks.set_shape([None, None, None])
    boxes.set_shape([None, 4])
    for t in (classes, valid, is_crowd):
      t.set_shape([None])
    return {
      "image": image,
      "boxes": boxes,
      "classes": classes,
      "instance_masks": masks,
      "valid": valid,
      "is_crowd": is_crowd,
      "image_id": image_id,
    }

  ds = tf.data.Dataset.from_tensor_slices(
    (tf.range(len(part), dtype=tf.int64), tf.constant([image["id"] for image, _ in part], tf.int64))
  )
  if shuffle_seed is not None:
    ds = ds.shuffle(len(part), seed=shuffle_seed, reshuffle_each_iteration=True)
  return ds.map(decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)

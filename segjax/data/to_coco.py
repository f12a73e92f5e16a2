"""Instance-mask folders as COCO instances JSON: `instance_folder_to_coco`, and its command.

An instance-mask folder is laid out as the semantic folder source (`segjax.data.folder`:
`images_dir`, `masks_dir` templates under `data_dir`, `mask_pattern`, split names or slices
such as `all[:120]`), its masks holding one instance id per pixel, 0 = background (8- or
16-bit grey or palette PNG): PennFudanPed (`images_dir="PNGImages"`, `masks_dir="PedMasks"`,
`mask_pattern="{stem}_mask.png"`), CVPPP, most microscopy sets. Each instance's class is
  * 1 (one class, `class_names=("background", "object")`) by default;
  * with `classes_dir` (a template like `masks_dir`, file names by `mask_pattern`): a second
    PNG of class ids per pixel, the instance's class the most frequent non-zero one under it;
  * with `classes_file`: a JSON `{stem: {instance id: class id}}` (ids as strings or ints).
Category ids are the class ids 1..C, named by `class_names[1:]`.

  python -m segjax.data.to_coco --data_dir PennFudanPed --images_dir PNGImages \
      --masks_dir PedMasks --mask_pattern '{stem}_mask.png' --split 'all[:120]' \
      --output PennFudanPed/annotations/instances_train.json

Images are referenced by absolute path (`file_name`), so the JSON works with any `image_dir`.
Every annotation is a compressed RLE with its box and area (pycocotools). Errors name the file:
a mask of another size than its image, an instance without a class, a class id beyond
`class_names`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import numpy as np
from PIL import Image
from pycocotools import mask as mask_util

from segjax.data.folder import list_pairs
from segjax.data.splits import parse_split
from segjax.errors import DataError

DEFAULT_CLASS_NAMES = ("background", "object")
INSTANCE_MASK_MODES = ("L", "P", "I", "I;16")


def read_id_map(path: str) -> np.ndarray:
  """(H, W) int64 ids of a single-channel PNG; other files are a DataError naming them."""
  try:
    with Image.open(path) as image:
      mode, ids = image.mode, np.asarray(image)
  except (OSError, ValueError, SyntaxError) as e:
    raise DataError(f"Cannot read {path}: {e}") from None
  if mode not in INSTANCE_MASK_MODES or ids.ndim != 2:
    raise DataError(
      f"{path} is a {mode} image; instance masks and class maps must be "
      "single-channel (8- or 16-bit grey, or palette) PNGs of ids."
    )
  return ids.astype(np.int64)


def _classes_from_file(path: str) -> dict[str, dict[int, int]]:
  with open(path) as f:
    table = json.load(f)
  if not isinstance(table, dict):
    raise DataError(f"{path}: expected {{image stem: {{instance id: class id}}}}.")
  return {stem: {int(k): int(v) for k, v in ids.items()} for stem, ids in table.items()}


def instance_folder_to_coco(
  data_dir: str,
  split: str = "all",
  *,
  images_dir: str = "{split}/images",
  masks_dir: str = "{split}/masks",
  mask_pattern: str = "{stem}.png",
  classes_dir: str | None = None,
  classes_file: str | None = None,
  class_names: Sequence[str] = DEFAULT_CLASS_NAMES,
) -> dict:
  """The COCO instances dict of one split of an instance-mask folder (module docstring)."""
  image_paths, mask_paths = list_pairs(
    split, data_dir, images_dir=images_dir, masks_dir=masks_dir, mask_pattern=mask_pattern
  )
  num_classes = len(class_names) - 1
  if num_classes < 1:
    raise DataError(f"class_names={tuple(class_names)} needs the background and one class.")
  table = _classes_from_file(classes_file) if classes_file else None
  classes_root = (
    os.path.join(data_dir, classes_dir.format(split=parse_split(split).name))
    if classes_dir
    else None
  )
  images, annotations = [], []
  for image_id, (image_path, mask_path) in enumerate(zip(image_paths, mask_paths), start=1):
    stem = os.path.splitext(os.path.basename(image_path))[0]
    with Image.open(image_path) as image:
      width, height = image.size
    ids = read_id_map(mask_path)
    if ids.shape != (height, width):
      raise DataError(
        f"{mask_path} is {ids.shape[0]}x{ids.shape[1]} but image {image_path} "
        f"is {height}x{width} (HxW)."
      )
    class_map = None
    if classes_root:
      class_path = os.path.join(classes_root, mask_pattern.format(stem=stem))
      class_map = read_id_map(class_path)
      if class_map.shape != ids.shape:
        raise DataError(f"{class_path} is {class_map.shape} but {mask_path} is {ids.shape}.")
    images.append(
      {"id": image_id, "file_name": os.path.abspath(image_path), "height": height, "width": width}
    )
    for instance in np.unique(ids[ids > 0]):
      binary = ids == instance
      if class_map is not None:
        counts = np.bincount(class_map[binary], minlength=num_classes + 1)
        counts[0] = 0
        label = int(counts.argmax()) if counts.any() else 0
        where = class_path
      elif table is not None:
        label = table.get(stem, {}).get(int(instance), 0)
        where = f"{classes_file} entry {stem!r}"
      else:
        label, where = 1, mask_path
      if not 1 <= label <= num_classes:
        raise DataError(
          f"Instance {int(instance)} of {mask_path}: class {label} from {where} "
          f"is not in 1..{num_classes} (class_names {tuple(class_names)})."
        )
      rle = mask_util.encode(np.asfortranarray(binary.astype(np.uint8)))
      annotations.append(
        {
          "id": len(annotations) + 1,
          "image_id": image_id,
          "category_id": label,
          "segmentation": {"size": [height, width], "counts": rle["counts"].decode("ascii")},
          "area": float(mask_util.area(rle)),
          "bbox": [float(v) for v in mask_util.toBbox(rle)],
          "iscrowd": 0,
        }
      )
  categories = [{"id": c, "name": str(class_names[c])} for c in range(1, num_classes + 1)]
  return {"images": images, "annotations": annotations, "categories": categories}


def _define_flags() -> None:
  from absl import flags

  flags.DEFINE_string("data_dir", None, "Folder holding the images and masks.")
  flags.DEFINE_string(
    "split", "all", "Split name (with {split} templates) or slice, e.g. all[:80%]."
  )
  flags.DEFINE_string("images_dir", "{split}/images", "Image directory template under data_dir.")
  flags.DEFINE_string("masks_dir", "{split}/masks", "Instance-id PNG directory template.")
  flags.DEFINE_string("mask_pattern", "{stem}.png", "A mask's file name from its image's stem.")
  flags.DEFINE_string("classes_dir", None, "Class-id PNG directory template (optional).")
  flags.DEFINE_string("classes_file", None, "JSON {stem: {instance id: class id}} (optional).")
  flags.DEFINE_list("class_names", list(DEFAULT_CLASS_NAMES), "Names by class id, 0 first.")
  flags.DEFINE_string("output", None, "COCO instances JSON to write.")
  flags.mark_flags_as_required(["data_dir", "output"])


def main(argv) -> None:
  del argv
  from absl import flags

  f = flags.FLAGS
  data = instance_folder_to_coco(
    f.data_dir,
    f.split,
    images_dir=f.images_dir,
    masks_dir=f.masks_dir,
    mask_pattern=f.mask_pattern,
    classes_dir=f.classes_dir,
    classes_file=f.classes_file,
    class_names=f.class_names,
  )
  os.makedirs(os.path.dirname(os.path.abspath(f.output)), exist_ok=True)
  tmp = f.output + ".tmp"
  with open(tmp, "w") as out:
    json.dump(data, out)
  os.replace(tmp, f.output)
  print(
    f"Wrote {f.output}: {len(data['images'])} images, {len(data['annotations'])} "
    f"instances, {len(data['categories'])} categories.",
    flush=True,
  )


if __name__ == "__main__":
  from segjax import cli

  _define_flags()
  cli.run(main)

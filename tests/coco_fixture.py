"""A tiny COCO-format data set written by the tests, with the masks it encodes.

Split "val" under `data_dir`: `annotations/instances_val.json` and `val/<file_name>`.
Images, in image-id order:
  5   many.png   32x32 RGB: five squares of different sizes (overflow tests), category 1.
  7   photo.jpg  24x16 grey JPEG: a triangle with a stray two-point part that a reader must
                 ignore (category 1), an uncompressed RLE (category 3), and an annotation whose
                 only polygon has two points, which a reader must drop.
  42  scene.png  20x30 RGB: a two-part polygon (3), a compressed RLE (90), a crowd region as
                 uncompressed RLE (1).
  100 empty.png  16x16 RGB: no annotations.
Categories are listed as 90, 1, 3, so labels are 1 -> 1, 3 -> 2, 90 -> 3. Each image is filled
with one colour, `COLOURS[image_id]`, so a test can tell which file it got.
"""

import dataclasses
import json
import os

import numpy as np
from PIL import Image
from pycocotools import mask as mask_util

SPLIT = "val"
CATEGORY_IDS = (1, 3, 90)
LABEL_OF_CATEGORY = {1: 1, 3: 2, 90: 3}
COLOURS = {5: (200, 30, 30), 7: (128, 128, 128), 42: (30, 30, 200), 100: (30, 200, 30)}
IMAGE_IDS = (5, 7, 42, 100)
DROPPED_ANNOTATION = 72


@dataclasses.dataclass(frozen=True)
class CocoFixture:
  """Attributes:
  data_dir: root holding annotations/ and val/.
  annotation_file: the JSON path.
  data: the JSON content.
  masks: annotation id -> (H, W) uint8 mask the annotation encodes, decoded independently.
  sizes: image id -> (height, width).
  """

  data_dir: str
  annotation_file: str
  data: dict
  masks: dict
  sizes: dict

  def annotations(self, image_id):
    """The kept annotations of an image, sorted by id."""
    return sorted(
      (
        a
        for a in self.data["annotations"]
        if a["image_id"] == image_id and a["id"] != DROPPED_ANNOTATION
      ),
      key=lambda a: a["id"],
    )


def uncompressed_rle(mask):
  """COCO uncompressed RLE: column-major run lengths, starting with a run of zeros."""
  flat = mask.T.ravel().astype(np.uint8)
  changes = np.flatnonzero(np.diff(flat)) + 1
  bounds = np.concatenate([[0], changes, [flat.size]])
  counts = np.diff(bounds).tolist()
  if flat[0] == 1:
    counts = [0] + counts
  return {"size": list(mask.shape), "counts": counts}


def compressed_rle(mask):
  rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
  return {"size": list(mask.shape), "counts": rle["counts"].decode("utf-8")}


def polygon_mask(polygons, height, width):
  return mask_util.decode(mask_util.merge(mask_util.frPyObjects(polygons, height, width)))


def rectangle(height, width, y0, x0, y1, x1):
  mask = np.zeros((height, width), np.uint8)
  mask[y0:y1, x0:x1] = 1
  return mask


def write_coco(root, *, with_dropped=True):
  """Writes the data set under `root`; returns a CocoFixture.

  `with_dropped=False` leaves out the annotation a reader drops, so that the ground truth
  scored as detections gets AP 1.
  """
  images = [
    {"id": 42, "file_name": "scene.png", "height": 20, "width": 30},
    {"id": 5, "file_name": "many.png", "height": 32, "width": 32},
    {"id": 100, "file_name": "empty.png", "height": 16, "width": 16},
    {"id": 7, "file_name": "photo.jpg", "height": 24, "width": 16},
  ]
  annotations, masks = [], {}

  def add(ann_id, image_id, category_id, segmentation, mask, iscrowd=0):
    rle = mask_util.encode(np.asfortranarray(mask))
    masks[ann_id] = mask
    annotations.append(
      {
        "id": ann_id,
        "image_id": image_id,
        "category_id": category_id,
        "segmentation": segmentation,
        "iscrowd": iscrowd,
        "area": float(mask_util.area(rle)),
        "bbox": [float(v) for v in mask_util.toBbox(rle)],
      }
    )

  # Image 5: squares of sides 2..6, ids in an order unrelated to size.
  for ann_id, side in zip((51, 52, 53, 54, 55), (4, 2, 6, 3, 5)):
    x0 = 6 * (ann_id - 51)
    poly = [[x0, 1, x0 + side, 1, x0 + side, 1 + side, x0, 1 + side]]
    add(ann_id, 5, 1, poly, polygon_mask(poly, 32, 32))
  # Image 7: a triangle polygon, an uncompressed-RLE rectangle, and an invalid polygon.
  triangle = [[2.0, 2.0, 14.0, 3.0, 6.0, 20.0]]
  add(71, 7, 1, triangle + [[0.0, 0.0, 1.0, 1.0]], polygon_mask(triangle, 24, 16))
  rect = rectangle(24, 16, 15, 3, 22, 12)
  add(73, 7, 3, uncompressed_rle(rect), rect)
  if with_dropped:
    annotations.append(
      {
        "id": DROPPED_ANNOTATION,
        "image_id": 7,
        "category_id": 1,
        "segmentation": [[1.0, 1.0, 3.0, 3.0]],
        "iscrowd": 0,
        "area": 4.0,
        "bbox": [1.0, 1.0, 2.0, 2.0],
      }
    )
  # Image 42: two-part polygon, compressed RLE, crowd region.
  parts = [[1, 1, 8, 1, 8, 6, 1, 6], [10, 2, 14, 2, 14, 9, 10, 9]]
  add(421, 42, 3, parts, polygon_mask(parts, 20, 30))
  blob = rectangle(20, 30, 10, 16, 18, 27)
  blob[12:15, 19:22] = 0  # A hole, which only a mask can express.
  add(422, 42, 90, compressed_rle(blob), blob)
  crowd = rectangle(20, 30, 0, 20, 8, 30)
  add(423, 42, 1, uncompressed_rle(crowd), crowd, iscrowd=1)

  categories = [{"id": 90, "name": "ninety"}, {"id": 1, "name": "one"}, {"id": 3, "name": "three"}]
  data = {"images": images, "annotations": annotations[::-1], "categories": categories}
  ann_dir = os.path.join(root, "annotations")
  image_dir = os.path.join(root, SPLIT)
  os.makedirs(ann_dir, exist_ok=True)
  os.makedirs(image_dir, exist_ok=True)
  annotation_file = os.path.join(ann_dir, f"instances_{SPLIT}.json")
  with open(annotation_file, "w") as f:
    json.dump(data, f)
  for image in images:
    h, w = image["height"], image["width"]
    path = os.path.join(image_dir, image["file_name"])
    if path.endswith(".jpg"):
      Image.fromarray(np.full((h, w), COLOURS[image["id"]][0], np.uint8)).save(path, quality=95)
    else:
      Image.fromarray(np.full((h, w, 3), COLOURS[image["id"]], np.uint8)).save(path)
  sizes = {image["id"]: (image["height"], image["width"]) for image in images}
  return CocoFixture(str(root), annotation_file, data, masks, sizes)

"""segjax/data/to_coco.py on instance-mask folders in PennFudanPed's layout, written here."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_util
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from segjax.data.to_coco import instance_folder_to_coco
from segjax.errors import DataError

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LAYOUT = dict(images_dir="PNGImages", masks_dir="PedMasks", mask_pattern="{stem}_mask.png")


def write_pennfudan(root, count=3, seed=0):
  """Images and instance-id masks (rectangles, ids 1..k, some touching) as PennFudanPed;
  returns {stem: ids (H, W)}."""
  rng = np.random.default_rng(seed)
  os.makedirs(root / "PNGImages")
  os.makedirs(root / "PedMasks")
  masks = {}
  for n in range(count):
    h, w = 40 + 8 * n, 56
    ids = np.zeros((h, w), np.uint8)
    for k in range(1, 2 + n):
      y, x = rng.integers(0, h - 12), rng.integers(0, w - 12)
      ids[y : y + rng.integers(4, 12), x : x + rng.integers(4, 12)] = k
    stem = f"FudanPed{n + 1:05d}"
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(
      root / "PNGImages" / f"{stem}.png"
    )
    Image.fromarray(ids).save(root / "PedMasks" / f"{stem}_mask.png")
    masks[stem] = ids
  return masks


def test_instances_are_the_masks_ids_with_their_boxes_and_areas(tmp_path):
  masks = write_pennfudan(tmp_path)
  data = instance_folder_to_coco(str(tmp_path), **LAYOUT)
  assert [os.path.basename(i["file_name"]) for i in data["images"]] == [
    f"{stem}.png" for stem in sorted(masks)
  ]
  assert data["categories"] == [{"id": 1, "name": "object"}]
  by_image = {}
  for ann in data["annotations"]:
    by_image.setdefault(ann["image_id"], []).append(ann)
  for image, stem in zip(data["images"], sorted(masks)):
    ids = masks[stem]
    present = [k for k in range(1, 256) if (ids == k).any()]
    anns = by_image.get(image["id"], [])
    assert len(anns) == len(present)
    for ann, k in zip(anns, present):
      binary = ids == k
      decoded = mask_util.decode(
        {**ann["segmentation"], "counts": ann["segmentation"]["counts"].encode()}
      )
      np.testing.assert_array_equal(decoded, binary)
      ys, xs = np.nonzero(binary)
      assert ann["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
      assert ann["area"] == binary.sum() and ann["category_id"] == 1


def test_ground_truth_as_detections_scores_ap_1(tmp_path):
  write_pennfudan(tmp_path, count=4)
  path = tmp_path / "instances.json"
  path.write_text(json.dumps(instance_folder_to_coco(str(tmp_path), **LAYOUT)))
  gt = COCO(str(path))
  results = [
    {
      "image_id": a["image_id"],
      "category_id": a["category_id"],
      "score": 1.0,
      "bbox": a["bbox"],
      "segmentation": a["segmentation"],
    }
    for a in gt.anns.values()
  ]
  for kind in ("bbox", "segm"):
    evaluator = COCOeval(gt, gt.loadRes(results), kind)
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    assert evaluator.stats[0] == pytest.approx(1.0)


def test_classes_from_a_class_map_or_a_json_file(tmp_path):
  masks = write_pennfudan(tmp_path)
  os.makedirs(tmp_path / "Classes")
  table = {}
  for stem, ids in masks.items():
    classes = np.where(ids > 0, (ids % 2) + 1, 0).astype(np.uint8)  # Odd ids 2, even ids 1.
    Image.fromarray(classes).save(tmp_path / "Classes" / f"{stem}_mask.png")
    table[stem] = {str(k): int(k % 2) + 1 for k in np.unique(ids[ids > 0])}
  names = ("background", "adult", "child")
  from_map = instance_folder_to_coco(
    str(tmp_path), **LAYOUT, classes_dir="Classes", class_names=names
  )
  (tmp_path / "classes.json").write_text(json.dumps(table))
  from_file = instance_folder_to_coco(
    str(tmp_path), **LAYOUT, classes_file=str(tmp_path / "classes.json"), class_names=names
  )
  assert [a["category_id"] for a in from_map["annotations"]] == [
    a["category_id"] for a in from_file["annotations"]
  ]
  assert {a["category_id"] for a in from_map["annotations"]} == {1, 2}
  assert from_map["categories"] == [{"id": 1, "name": "adult"}, {"id": 2, "name": "child"}]
  with pytest.raises(DataError, match=r"class 2 from .* is not in 1\.\.1"):
    instance_folder_to_coco(str(tmp_path), **LAYOUT, classes_dir="Classes")


def test_bad_masks_name_the_file(tmp_path):
  write_pennfudan(tmp_path)
  Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(
    tmp_path / "PedMasks" / "FudanPed00002_mask.png"
  )
  with pytest.raises(DataError, match=r"FudanPed00002_mask\.png is a RGB image"):
    instance_folder_to_coco(str(tmp_path), **LAYOUT)
  Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "PedMasks" / "FudanPed00002_mask.png")
  with pytest.raises(DataError, match=r"FudanPed00002_mask\.png is 8x8 but image"):
    instance_folder_to_coco(str(tmp_path), **LAYOUT)


def test_command_writes_the_split(tmp_path):
  write_pennfudan(tmp_path, count=5)
  output = tmp_path / "annotations" / "instances_train.json"
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "segjax.data.to_coco",
      "--data_dir",
      str(tmp_path),
      "--images_dir",
      "PNGImages",
      "--masks_dir",
      "PedMasks",
      "--mask_pattern",
      "{stem}_mask.png",
      "--split",
      "all[:60%]",
      "--output",
      str(output),
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert proc.returncode == 0, proc.stderr
  data = json.loads(output.read_text())
  assert [os.path.basename(i["file_name"]) for i in data["images"]] == [
    f"FudanPed{n:05d}.png" for n in (1, 2, 3)
  ]

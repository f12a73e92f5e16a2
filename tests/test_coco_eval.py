"""Tests for segjax/coco_eval.py: the results JSON round-trips and ground truth scores AP 1."""

import json
import math

import ml_collections
import numpy as np
import pytest
from pycocotools import mask as mask_util

from segjax import coco_eval
from segjax.data import coco, instance_pipeline
from tests.coco_fixture import CATEGORY_IDS, SPLIT, write_coco

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


@pytest.fixture(scope="module")
def coco_data(tmp_path_factory):
  return write_coco(tmp_path_factory.mktemp("coco_data"))


@pytest.fixture(scope="module")
def clean_coco_data(tmp_path_factory):
  return write_coco(tmp_path_factory.mktemp("clean_coco_data"), with_dropped=False)


KEYS = {f"{kind}_{name}" for kind in ("box", "mask") for name in coco_eval.AP_NAMES}


def make_config(name, image_size, *, min_size=None, max_size=None, **dataset):
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.image_size = image_size
  config.augment = ml_collections.ConfigDict({"flip": False})
  config.dataset = ml_collections.ConfigDict(
    {
      "name": name,
      "data_dir": None,
      "train_split": SPLIT,
      "eval_split": SPLIT,
      "max_instances": 8,
      "overflow": "truncate",
      "min_size": min_size,
      "max_size": max_size,
      "shuffle_buffer": 10,
      "eval_kwargs": {},
    }
  )
  config.dataset.update(dataset)
  return config


def ground_truth_as_detections(config, category_ids, batch_size=3):
  """Results JSON of the eval pipeline's own ground truth, scored 1, crowd regions left out."""
  ds, _ = instance_pipeline.instance_eval_dataset(config, local_batch_size=batch_size)
  results = []
  for batch in ds.as_numpy_iterator():
    results += coco_eval.detections_to_coco_json(
      image_ids=batch["image_id"],
      boxes=batch["boxes"],
      scores=np.ones(batch["valid"].shape),
      classes=batch["classes"],
      valid=batch["valid"],
      masks=batch["instance_masks"],
      category_ids=category_ids,
      scale=batch["scale"],
      image_size=batch["image_size"],
      original_size=batch["original_size"],
      example_mask=batch["example_mask"],
    )
  return results


def test_results_format_maps_back_to_the_original_image(coco_data):
  # Two detections on image 42 (20x30) resized by 2 into a 64x64 canvas, a padding row after.
  boxes = np.zeros((2, 3, 4), np.float32)
  boxes[0, 0] = [2, 4, 20, 12]
  boxes[0, 1] = [30, 20, 70, 50]  # Beyond the 40x60 content: clipped to the image.
  masks = np.zeros((2, 3, 64, 64), np.float32)
  small = np.zeros((20, 30), np.uint8)
  small[2:6, 1:10] = 1
  masks[0, 0, :40, :60] = np.kron(small, np.ones((2, 2))) * 0.9
  masks[0, 0, 50:, :] = 1.0  # In the padding: must be cropped away.
  results = coco_eval.detections_to_coco_json(
    image_ids=np.array([42, -1]),
    boxes=boxes,
    scores=np.array([[0.9, 0.4, 0.1], [1, 1, 1]]),
    classes=np.array([[1, 3, 2], [1, 1, 1]]),
    valid=np.array([[True, True, False]] * 2),
    masks=masks,
    category_ids=CATEGORY_IDS,
    scale=np.array([2.0, 1.0]),
    image_size=np.array([[40, 60], [0, 0]]),
    original_size=np.array([[20, 30], [0, 0]]),
    example_mask=np.array([True, False]),
  )
  assert len(results) == 2
  first, second = results
  assert first["image_id"] == 42 and first["category_id"] == 1 and first["score"] == 0.9
  assert first["bbox"] == [1.0, 2.0, 9.0, 4.0]
  assert second["category_id"] == 90 and second["bbox"] == [15.0, 10.0, 15.0, 10.0]
  assert isinstance(first["segmentation"]["counts"], str)
  np.testing.assert_array_equal(mask_util.decode(first["segmentation"]), small)
  assert not mask_util.decode(second["segmentation"]).any()
  json.dumps(results)
  loaded = coco_data and coco.load_coco(coco_data.annotation_file).coco.loadRes(results)
  assert len(loaded.getAnnIds()) == 2


def test_boxes_divide_by_scale_without_sizes():
  results = coco_eval.detections_to_coco_json(
    image_ids=[7],
    boxes=np.array([[[3.0, 6.0, 9.0, 12.0]]]),
    scores=[[0.5]],
    classes=[[2]],
    valid=[[True]],
    category_ids=CATEGORY_IDS,
    scale=[3.0],
  )
  assert results == [{"image_id": 7, "category_id": 3, "bbox": [1.0, 2.0, 2.0, 2.0], "score": 0.5}]
  with pytest.raises(ValueError, match="needs image_size"):
    coco_eval.detections_to_coco_json(
      image_ids=[7],
      boxes=np.zeros((1, 1, 4)),
      scores=[[0.5]],
      classes=[[2]],
      valid=[[True]],
      category_ids=CATEGORY_IDS,
      scale=[1.0],
      masks=np.zeros((1, 1, 4, 4)),
    )


@pytest.mark.parametrize("min_size, max_size", [(None, None), (32, 64)])
def test_coco_ground_truth_scores_ap_one(clean_coco_data, tmp_path, min_size, max_size):
  info = coco.load_coco(clean_coco_data.annotation_file)
  config = make_config(
    "coco", (64, 64), data_dir=clean_coco_data.data_dir, min_size=min_size, max_size=max_size
  )
  results = ground_truth_as_detections(config, info.category_ids)
  assert len(results) == 9  # Five squares, two on image 7, two non-crowd on image 42.
  path = tmp_path / "detections.json"
  path.write_text(json.dumps(results))
  metrics = coco_eval.evaluate_coco(clean_coco_data.annotation_file, str(path))
  assert set(metrics) == KEYS
  assert metrics["box_AP"] == 1.0 and metrics["box_AP50"] == 1.0
  if min_size is None:  # Exact round trip; resizing by 1.6-2 moves mask edges by a pixel.
    assert metrics["mask_AP"] == 1.0
  assert metrics["mask_AP50"] == 1.0
  assert math.isnan(metrics["box_APl"])  # No large objects in tiny images: NaN, not -1.


def test_shapes_ground_truth_scores_ap_one():
  kwargs = dict(num_examples=8, image_size=(32, 32))
  gt = coco_eval.shapes_to_coco("validation", **kwargs)
  assert len(gt.getImgIds()) == 8 and sorted(gt.getCatIds()) == [1, 2, 3, 4]
  # Resized by 2 (exact for nearest up, bilinear down) and padded.
  config = make_config(
    "shapes", (64, 64), min_size=64, max_size=64, eval_split="validation", eval_kwargs=kwargs
  )
  results = ground_truth_as_detections(config, (1, 2, 3, 4))
  metrics = coco_eval.evaluate_coco(gt, results)
  assert metrics["box_AP"] == 1.0 and metrics["mask_AP"] == 1.0
  for result in results[:3]:
    mask = mask_util.decode(result["segmentation"])
    assert mask.shape == (32, 32)
  # A wrong box for every detection scores lower.
  shifted = [{**r, "bbox": [r["bbox"][0] + 3, *r["bbox"][1:]]} for r in results]
  assert coco_eval.evaluate_coco(gt, shifted)["box_AP"] < 0.9


def test_empty_and_box_only_results(coco_data):
  gt = coco.load_coco(coco_data.annotation_file).coco
  empty = coco_eval.evaluate_coco(gt, [])
  # Nothing detected scores as one detection that matches nothing: 0 where the images have
  # ground truth in the size range, NaN where they have none; masks as boxes.
  junk = {"image_id": 42, "category_id": 3, "bbox": [0.0, 0.0, 1.0, 1.0], "score": 1.0}
  junk["segmentation"] = coco_eval.encode_mask(np.pad(np.ones((1, 1), np.uint8), ((0, 9), (0, 9))))
  missed = coco_eval.evaluate_coco(gt, [junk])
  np.testing.assert_equal(empty, missed)
  assert empty["box_AP"] == 0.0 and empty["mask_AP"] == 0.0
  for image_ids in ([42], []):
    subset = coco_eval.evaluate_coco(gt, [], image_ids=image_ids)
    np.testing.assert_equal(subset, coco_eval.evaluate_coco(gt, [junk], image_ids=image_ids))
  ann = gt.loadAnns([421])[0]
  box_only = coco_eval.evaluate_coco(
    gt, [{"image_id": 42, "category_id": 3, "bbox": ann["bbox"], "score": 1.0}]
  )
  assert 0 < box_only["box_AP"] < 1 and math.isnan(box_only["mask_AP"])
  subset = coco_eval.evaluate_coco(
    gt, [{"image_id": 42, "category_id": 3, "bbox": ann["bbox"], "score": 1.0}], image_ids=[42]
  )
  assert subset["box_AP"] < 1  # Image 42's category 90 instance is still missed.

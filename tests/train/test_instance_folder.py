"""Mask R-CNN on an instance-mask folder in PennFudanPed's layout (`dataset.name =
"instance_folder"`): batches hold the masks' instances, evaluation scores against the same
masks converted to COCO, and a tiny model trains and evaluates through the loop."""

import math

import jax
import numpy as np
import pytest

from configs import mask_rcnn_folder
from segjax import coco_eval
from segjax.data import instance_pipeline
from segjax.train import instance, loop
from tests.data.test_to_coco import write_pennfudan
from tests.markers import long_test


@pytest.fixture
def config(tmp_path, monkeypatch):
  monkeypatch.setenv("SEGJAX_CACHE_DIR", str(tmp_path / "cache"))
  masks = write_pennfudan(tmp_path / "PennFudanPed", count=6)
  config = mask_rcnn_folder.get_config("1,tiny")
  config.dataset.update(
    dict(
      data_dir=str(tmp_path / "PennFudanPed"),
      images_dir="PNGImages",
      masks_dir="PedMasks",
      mask_pattern="{stem}_mask.png",
      train_split="all[:4]",
      eval_split="all[4:]",
    )
  )
  return config, masks


def test_batches_hold_each_masks_instances(config):
  config, masks = config
  dataset, _ = instance_pipeline.instance_eval_dataset(config, local_batch_size=2)
  batch = next(dataset.as_numpy_iterator())
  for row, stem in enumerate(sorted(masks)[4:]):
    ids = masks[stem]
    count = len(np.unique(ids[ids > 0]))
    assert batch["valid"][row].sum() == count
    assert (batch["classes"][row][:count] == 1).all()
    h, w = ids.shape  # Resized so that the longer side is 64.
    scale = 64 / max(h, w)
    areas = sorted(batch["instance_masks"][row][:count].sum((1, 2)))
    expected = sorted((ids == k).sum() * scale**2 for k in np.unique(ids[ids > 0]))
    np.testing.assert_allclose(areas, expected, rtol=0.35)


def test_ground_truth_as_detections_scores_ap_1(config):
  config, _ = config
  gt, category_ids = instance.ground_truth(config)
  assert category_ids == (1,) and len(gt.imgs) == 2
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
  ap = coco_eval.evaluate_coco(gt, results)
  assert ap["box_AP"] == pytest.approx(1.0) and ap["mask_AP"] == pytest.approx(1.0)


@long_test  # In CI, training: tests/train/test_mask_rcnn_train.py.
def test_tiny_model_trains_and_evaluates(config, tmp_path):
  config, _ = config
  previous = jax.config.jax_default_prng_impl
  jax.config.update("jax_default_prng_impl", "rbg")  # Compiles faster on CPU.
  try:
    metrics = loop.train_and_evaluate(config, str(tmp_path / "workdir"))
  finally:
    jax.config.update("jax_default_prng_impl", previous)
  assert {"box_AP", "mask_AP", "box_AP50"} <= metrics.keys()
  assert all(0.0 <= metrics[k] <= 1.0 or math.isnan(metrics[k]) for k in ("box_AP", "mask_AP"))

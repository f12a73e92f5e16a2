"""End-to-end Mask R-CNN: the tiny shapes model trains through `train_and_evaluate`, logging
each loss, long enough that the evaluator the loop runs scores box and mask AP above 0, and
evaluation writes box and mask AP and the COCO detections."""

import json
import math
import os

import jax
import numpy as np
import pytest
from PIL import Image

from segjax import visualize
from segjax.data import instance_pipeline
from segjax.train import evaluation
from tests.trained_models import XDIST_GROUP, trained_mask_rcnn

LOSSES = ("loss_rpn_cls", "loss_rpn_loc", "loss_cls", "loss_box_reg", "loss_mask")
AP_KEYS = tuple(
  f"{p}_{n}" for p in ("box", "mask") for n in ("AP", "AP50", "AP75", "APs", "APm", "APl")
)
pytestmark = pytest.mark.xdist_group(XDIST_GROUP)


@pytest.fixture(scope="session")  # Kept across modules: built once per worker.
def trained(tmp_path_factory):
  config, workdir, eval_metrics = trained_mask_rcnn(tmp_path_factory)
  previous = jax.config.jax_default_prng_impl
  jax.config.update("jax_default_prng_impl", "rbg")  # As trained.
  try:
    checkpoint_metrics = evaluation.evaluate_checkpoint(config, workdir, num_visualizations=2)
  finally:
    jax.config.update("jax_default_prng_impl", previous)
  return config, workdir, eval_metrics, checkpoint_metrics


def _in_unit_interval_or_nan(value):
  return value is None or math.isnan(value) or 0.0 <= value <= 1.0


def test_training_logs_each_loss_and_lowers_the_total(trained):
  config, workdir, _, _ = trained
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  train = [r for r in records if "loss" in r]
  assert [r["step"] for r in train] == list(range(5, config.num_train_steps + 1, 5))
  for r in train:
    assert set(LOSSES) <= r.keys() and math.isfinite(r["loss"])
    assert r["loss"] == pytest.approx(sum(r[k] for k in LOSSES), rel=1e-4)
  assert train[-1]["loss"] < 0.85 * train[0]["loss"], [r["loss"] for r in train]
  evals = [r for r in records if "eval/box_AP" in r]
  assert [r["step"] for r in evals] == [config.num_train_steps]
  assert all(_in_unit_interval_or_nan(evals[0][f"eval/{k}"]) for k in AP_KEYS)


def test_trained_model_detects_and_segments(trained):
  # AP above 0 takes true positives at IoU 0.5 or more: the wiring (sampling keys, train vs
  # test proposal settings, each loss's normalisation, box decoding, mask pasting, the COCO
  # conversion) is right enough to learn and to be scored, on the evaluator the loop runs.
  _, _, eval_metrics, _ = trained
  for key in ("box_AP", "box_AP50", "mask_AP", "mask_AP50"):
    assert math.isfinite(eval_metrics[key]) and 0.0 < eval_metrics[key] <= 1.0, (key, eval_metrics)
  assert eval_metrics["box_AP50"] >= eval_metrics["box_AP"]


def test_evaluation_writes_ap_and_coco_detections(trained):
  config, workdir, eval_metrics, checkpoint_metrics = trained
  assert set(AP_KEYS) <= eval_metrics.keys()
  assert checkpoint_metrics["step"] == config.num_train_steps
  with open(os.path.join(workdir, "eval_metrics.json")) as f:
    written = json.load(f)
  assert all(_in_unit_interval_or_nan(written[k]) for k in AP_KEYS)
  for k in AP_KEYS:  # The same weights score the same, in training and from the checkpoint.
    assert checkpoint_metrics[k] == pytest.approx(eval_metrics[k], nan_ok=True)
  with open(os.path.join(workdir, "detections.json")) as f:
    detections = json.load(f)
  num_images = config.dataset.eval_kwargs.num_examples
  assert detections and {d["image_id"] for d in detections} <= set(range(num_images))
  assert {d["category_id"] for d in detections} <= {1, 2, 3, 4}
  assert {"bbox", "score", "segmentation"} <= detections[0].keys()


def test_visualizations_show_image_truth_and_detections(trained):
  config, workdir, _, _ = trained
  directory = os.path.join(workdir, "visualizations")
  assert sorted(os.listdir(directory)) == ["0000.png", "0001.png"]
  dataset, _ = instance_pipeline.instance_eval_dataset(config, local_batch_size=2)
  batch = next(dataset.as_numpy_iterator())
  h, w = config.image_size
  scale = -(-256 // max(h, w))
  for i, name in enumerate(["0000.png", "0001.png"]):
    panel = np.asarray(Image.open(os.path.join(directory, name)))
    assert panel.shape == (visualize.TITLE_HEIGHT + h * scale, 3 * w * scale + 4, 3)
    panel = panel[visualize.TITLE_HEIGHT :]  # Below the titles; panels 2 px apart.
    image = np.repeat(np.repeat(visualize.denormalize(batch["image"][i]), scale, 0), scale, 1)
    np.testing.assert_array_equal(panel[:, : w * scale], image)
    assert not np.array_equal(panel[:, w * scale + 2 : 2 * w * scale + 2], image)  # Truth drawn.

"""torchvision's preprocessing as segjax's `conventions="torchvision"` (segjax/data/instance_ops.py,
segjax/train/instance.py), and the Predictor on an imported workdir (issue #10): a uint8 image
that torchvision resizes gets torchvision's detections."""

import copy
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from segjax.data import instance_ops
from tests.markers import long_test
from tests.weights.conftest import MASK_RCNN

try:
  import torch
  import torchvision  # noqa: F401
except ImportError:  # As tests/weights/test_torchvision.py: CI installs the torch extra.
  torch = pytest.importorskip("torch")

pytestmark = pytest.mark.xdist_group("torchvision_import")
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]  # torchvision's Mask R-CNN transform.


def torch_resize(image, min_size, max_size):
  """torchvision's `_resize_image_and_masks` of an (H, W, 3) float image, as (h, w, 3)."""
  from torchvision.models.detection.transform import _resize_image_and_masks

  x = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))
  return _resize_image_and_masks(x, min_size, max_size)[0].numpy().transpose(1, 2, 0)


@pytest.mark.parametrize(
  "h, w, min_size, max_size",
  [
    (352, 416, 800, 1333),  # Up 2.27x: 800 x 945.
    (480, 640, 800, 1333),
    (97, 150, 800, 1333),  # 97 * (800 / 97) < 800 in float64: 799 rows.
    (1000, 1500, 800, 1333),  # Down: 800 x 1200.
    (1200, 37, 800, 1333),  # Capped by the longer side: 1333 x 41.
    (33, 17, 20, 30),
    (31, 45, 19, 41),
  ],
)  # Odd sizes, down.
def test_resize_matches_torchvision(h, w, min_size, max_size):
  image = np.random.default_rng(h * w).uniform(0, 255, (h, w, 3)).astype(np.float32)
  ref = torch_resize(image, min_size, max_size)
  new_h, new_w, scale = instance_ops.resize_output_size(h, w, min_size, max_size, "torchvision")
  assert (int(new_h), int(new_w)) == ref.shape[:2]
  assert float(scale) == pytest.approx(min(min_size / min(h, w), max_size / max(h, w)))
  out = instance_ops.resize_shorter_longer(
    {
      "image": image,
      "boxes": np.zeros((0, 4), np.float32),
      "instance_masks": np.zeros((0, h, w), np.uint8),
    },
    min_size,
    max_size,
    "torchvision",
  )
  assert out["image"].dtype == tf.float32
  np.testing.assert_array_equal(out["image_size"], ref.shape[:2])
  np.testing.assert_allclose(out["image"], ref, rtol=0, atol=1e-4)


@pytest.mark.parametrize(
  "size, out", [((37, 53), (64, 29)), ((64, 29), (37, 53)), ((10, 10), (10, 10)), ((5, 80), (1, 3))]
)
@pytest.mark.parametrize("in_dataset", [False, True])
def test_bilinear_resize_matches_torch_interpolate(size, out, in_dataset):
  """Any output size, eagerly and in tf.data: torch's `F.interpolate(scale_factor=...,
  recompute_scale_factor=True)` computes the in/out size ratio of the floored size."""
  image = np.random.default_rng(size[0]).uniform(0, 255, (*size, 3)).astype(np.float32)
  factors = [(o + 0.5) / s for o, s in zip(out, size)]  # Floors to `out`.
  assert [math.floor(s * f) for s, f in zip(size, factors)] == list(out)
  ref = torch.nn.functional.interpolate(
    torch.from_numpy(image.transpose(2, 0, 1).copy())[None],
    scale_factor=factors,
    mode="bilinear",
    recompute_scale_factor=True,
    align_corners=False,
  )[0].numpy()
  if in_dataset:
    ds = tf.data.Dataset.from_tensors(image).map(
      lambda x: instance_ops.resize_bilinear_torch(x, tf.constant(out))
    )
    got = next(ds.as_numpy_iterator())
  else:
    got = instance_ops.resize_bilinear_torch(image, out).numpy()
  np.testing.assert_allclose(got, ref.transpose(1, 2, 0), rtol=0, atol=1e-4)
  if size == out:
    np.testing.assert_array_equal(got, image)


def test_preprocessing_gives_torchvisions_input():
  """`instance.preprocess` then `segjax.predict`'s padding and normalization: the images and
  sizes of torchvision's `GeneralizedRCNNTransform` (normalize, resize, pad to 32); the eval
  pipeline's the same on its fixed canvas."""
  from torchvision.models.detection.transform import GeneralizedRCNNTransform

  from segjax import predict
  from segjax.data import instance_pipeline
  from segjax.train import instance
  from segjax.weights import torchvision as tvw

  config = tvw.model_config(MASK_RCNN)
  image = np.random.default_rng(3).integers(0, 256, (352, 416, 3), dtype=np.uint8)
  transform = GeneralizedRCNNTransform(800, 1333, MEAN, STD).eval()
  ref = transform([torch.from_numpy(image.transpose(2, 0, 1).copy()).float() / 255])[0]
  resized, meta = instance.preprocess(config, image)
  assert resized.dtype == np.float32 and meta["image_size"] == (800, 945) == ref.image_sizes[0]
  padded = np.zeros((1, *predict.padded_size(resized.shape, 32), 3), np.float32)
  padded[0, :800, :945] = resized
  got = predict.normalize_padded(padded, np.array([[800, 945]]))
  expected = ref.tensors.numpy().transpose(0, 2, 3, 1)
  assert got.shape == expected.shape == (1, 800, 960, 3)
  np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)  # ~2 std units: float32 ulps.
  features = {
    "image": image,
    "boxes": np.zeros((0, 4), np.float32),
    "classes": np.zeros(0, np.int32),
    "instance_masks": np.zeros((0, 352, 416), np.uint8),
    "valid": np.zeros(0, bool),
    "is_crowd": np.zeros(0, bool),
  }
  batch = instance_pipeline._prepare(features, None, config=config, keys=("image", "image_size"))
  assert batch["image"].shape == (*config.image_size, 3)
  np.testing.assert_array_equal(batch["image_size"], [800, 945])
  np.testing.assert_allclose(batch["image"][:800, :960], got[0], rtol=0, atol=1e-5)
  assert not np.any(batch["image"][800:]) and not np.any(batch["image"][:, 960:])


@pytest.fixture(scope="module")
def sharpened(tv_mask_rcnn, tmp_path_factory):
  """(torchvision model, its .pth): `tv_mask_rcnn` with class scores sharpened 4x, as in
  test_torchvision.py's end-to-end test, so that detections pass the 0.05 score threshold."""
  model = copy.deepcopy(tv_mask_rcnn[0])
  with torch.no_grad():
    model.roi_heads.box_predictor.cls_score.weight *= 4.0
    model.roi_heads.box_predictor.cls_score.bias *= 4.0
  path = str(tmp_path_factory.mktemp("tv_sharp") / "maskrcnn.pth")
  torch.save(model.state_dict(), path)
  return model.eval(), path


@long_test  # In CI, torchvision's detections: test_torchvision.py's end-to-end test.
def test_predictor_on_an_imported_workdir_returns_torchvisions_detections(sharpened, tmp_path):
  from segjax.predict import Predictor

  tv_model, path = sharpened
  workdir = tmp_path / "imported"
  result = subprocess.run(
    [
      sys.executable,
      "-m",
      "segjax.weights.torchvision",
      f"--arch={MASK_RCNN}",
      f"--input={path}",
      f"--workdir={workdir}",
    ],
    capture_output=True,
    text=True,
    timeout=600,
    env={**os.environ, "JAX_PLATFORMS": "cpu"},
  )
  assert result.returncode == 0, result.stderr[-3000:]
  image = np.random.default_rng(5).integers(0, 256, (352, 416, 3), dtype=np.uint8)
  with torch.no_grad():
    (ref,) = tv_model([torch.from_numpy(image.transpose(2, 0, 1).copy()).float() / 255])
  predictor = Predictor.from_workdir(str(workdir), score_threshold=0.0)
  assert predictor.padded_size(predictor.task.preprocess(predictor.config, image)[0].shape) == (
    800,
    960,
  )
  got = predictor(image)
  n = len(ref["scores"])
  assert len(got["scores"]) == n > 20  # torchvision keeps at most 100.
  # Both sorted by score: detections whose scores tie to float rounding may trade places.
  order = _matching(got, {k: v.numpy() for k, v in ref.items()}, score_atol=1e-3, box_atol=0.05)
  np.testing.assert_allclose(got["scores"], ref["scores"].numpy(), rtol=0, atol=1e-3)
  np.testing.assert_array_equal(got["classes"], got["labels"])  # Category l is label l.
  ref_masks = ref["masks"][:, 0].numpy() >= 0.5
  assert got["masks"].shape == ref_masks.shape == (n, 352, 416)
  assert ref_masks.any(axis=(1, 2)).sum() > n // 2  # Masks to compare, not empty ones.
  assert np.mean(np.asarray(got["masks"])[order] != ref_masks) < 1e-3


def _matching(got, ref, *, score_atol, box_atol):
  """For each of torchvision's detections, the index of segjax's with its label, score and
  box (within the tolerances); each used once."""
  order = []
  for label, score, box in zip(ref["labels"], ref["scores"], ref["boxes"], strict=True):
    close = (
      (got["labels"] == label)
      & (np.abs(got["scores"] - score) <= score_atol)
      & (np.abs(got["boxes"] - box).max(axis=1) <= box_atol)
    )
    close[order] = False
    assert close.any(), (label, score, box)
    order.append(int(np.argmax(close)))
  return np.array(order)

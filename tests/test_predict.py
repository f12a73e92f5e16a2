"""Prediction on new images (`segjax.predict`, `predict.py`) against the evaluators' numerics:
original sizes, padding cropped away, the evaluator's argmax and COCO detections, the files
the command writes."""

import copy
import functools
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_util
from pycocotools.coco import COCO

from configs import unet_shapes
from segjax import visualize
from segjax.data import instance_pipeline, pipeline
from segjax.data.images import read_image
from segjax.data.ops import IMAGENET_MEAN, IMAGENET_STD
from segjax.data.shapes import shapes
from segjax.predict import Predictor, list_images, normalize_padded
from segjax.train import instance, loop, parallel, semantic
from tests.trained_models import XDIST_GROUP, trained_mask_rcnn

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Both trained models are built once per worker, for this file and tests/test_export.py.
pytestmark = pytest.mark.xdist_group(XDIST_GROUP)
_TRAINED, _PREDICTORS = {}, {}


def trained(kind: str, tmp_path_factory) -> tuple:
  """(config, workdir) of the tiny shapes model `kind` ("unet" or "mask_rcnn"), trained once
  per process (Mask R-CNN: tests/trained_models.py's, 100 steps)."""
  if kind == "mask_rcnn":
    return trained_mask_rcnn(tmp_path_factory)[:2]
  if kind not in _TRAINED:
    config = unet_shapes.get_config("tiny")
    workdir = str(tmp_path_factory.mktemp(f"predict_{kind}"))
    previous = jax.config.jax_default_prng_impl
    jax.config.update("jax_default_prng_impl", "rbg")  # Compiles much faster on CPU.
    try:
      loop.train_and_evaluate(config, workdir)
    finally:
      jax.config.update("jax_default_prng_impl", previous)
    _TRAINED[kind] = config, workdir
  return _TRAINED[kind]


def predictor(kind: str, tmp_path_factory) -> Predictor:
  """The Predictor of `trained(kind)`, one per process, so that its compiled shapes are shared:
  the U-Net in batches of 2, Mask R-CNN in the evaluator's batches keeping every detection."""
  if kind not in _PREDICTORS:
    config, workdir = trained(kind, tmp_path_factory)
    kwargs = (
      dict(batch_size=2)
      if kind == "unet"
      else dict(batch_size=config.eval_batch_size, score_threshold=0.0)
    )  # Compiled as the evaluator's.
    _PREDICTORS[kind] = Predictor.from_workdir(workdir, **kwargs)
  return _PREDICTORS[kind]


@pytest.fixture(scope="session")
def unet(tmp_path_factory):
  return (*trained("unet", tmp_path_factory), predictor("unet", tmp_path_factory))


@pytest.fixture(scope="session")
def mask_rcnn(tmp_path_factory):
  return (*trained("mask_rcnn", tmp_path_factory), predictor("mask_rcnn", tmp_path_factory))


def _like(predictor, **kwargs):
  """Another Predictor of the same model and variables (nothing restored again)."""
  return Predictor(predictor.config, predictor.variables, model=predictor.model, **kwargs)


def _random_image(height, width, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _validation_images(config) -> np.ndarray:
  source = shapes(config.dataset.eval_split, **config.dataset.eval_kwargs)
  return np.stack([e["image"] for e in source.as_numpy_iterator()])


@functools.cache
def _logits_fn(model):
  return jax.jit(lambda v, x: semantic.apply_model(model, v, x, None, train=False)[0])


def _softmax(logits):
  e = np.exp(logits - logits.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


@pytest.mark.parametrize("size", [(97, 131), (360, 480)])
def test_semantic_prediction_has_the_image_size(unet, size):
  config, _, predictor = unet
  assert predictor.padded_size(size) == tuple(-(-s // 4) * 4 for s in size)  # Stride 2**2.
  out = predictor(_random_image(*size))
  assert out["labels"].shape == size and out["labels"].dtype == np.int32
  assert out["probs"].shape == (*size, config.model.num_classes)
  assert out["probs"].dtype == np.float32
  np.testing.assert_allclose(out["probs"].sum(-1), 1.0, rtol=1e-5)
  np.testing.assert_array_equal(out["labels"], out["probs"].argmax(-1))


def test_semantic_labels_equal_the_evaluators_argmax(unet):
  config, _, predictor = unet
  count = config.dataset.eval_kwargs.num_examples
  dataset, _ = pipeline.eval_dataset(config, local_batch_size=count)
  batch = next(dataset.as_numpy_iterator())  # The evaluator's normalized 32 x 32 images.
  logits = np.asarray(_logits_fn(predictor.model)(predictor.variables, batch["image"]))
  images = _validation_images(config)
  assert images.shape == (count, *config.image_size, 3)
  outputs = predictor.predict_batch(list(images))
  labels = np.stack([o["labels"] for o in outputs])
  np.testing.assert_array_equal(labels, logits.argmax(-1))
  np.testing.assert_allclose(
    np.stack([o["probs"] for o in outputs]), _softmax(logits), rtol=1e-5, atol=1e-6
  )
  assert len(np.unique(labels)) > 1  # Trained enough to tell shapes from the background.


def test_semantic_prediction_is_the_crop_of_the_padded_prediction(unet):
  predictor = _like(unet[2], bucket=64)
  image = _random_image(45, 70, seed=1)
  out = predictor(image)
  # Reference: normalized as segjax.data.ops.normalize, padded with 0 bottom and right to the
  # bucket, the model, cropped.
  bucket = predictor.padded_size(image.shape)
  assert bucket == (64, 128)
  normalized = (image.astype(np.float32) - np.float32(IMAGENET_MEAN)) / np.float32(IMAGENET_STD)
  padded = np.pad(normalized, ((0, bucket[0] - 45), (0, bucket[1] - 70), (0, 0)))
  logits = np.asarray(_logits_fn(predictor.model)(predictor.variables, padded[None]))[0]
  np.testing.assert_array_equal(out["labels"], logits.argmax(-1)[:45, :70])
  np.testing.assert_allclose(out["probs"], _softmax(logits)[:45, :70], rtol=1e-5, atol=1e-6)


def test_batches_of_mixed_sizes_equal_single_predictions_and_compile_per_bucket(unet):
  predictor = _like(unet[2], batch_size=2, bucket=64)
  sizes = [(40, 50), (97, 131), (60, 33), (100, 128), (64, 64)]  # Buckets 64x64, 128x192...
  images = [_random_image(*s, seed=i) for i, s in enumerate(sizes)]
  together = predictor.predict_batch(images)
  assert {predictor.padded_size(s) for s in sizes} == {(64, 64), (128, 192), (128, 128)}
  assert predictor.infer._cache_size() == 3  # One compile per bucket, however many images.
  for image, batched in zip(images, together):
    alone = predictor(image)
    np.testing.assert_array_equal(batched["labels"], alone["labels"])
    np.testing.assert_allclose(batched["probs"], alone["probs"], rtol=1e-5, atol=1e-6)
  assert predictor.infer._cache_size() == 3


def test_predictor_rejects_non_uint8_images(unet):
  with pytest.raises(ValueError, match="uint8"):
    unet[2](np.zeros((8, 8, 3), np.float32))


def test_instance_prediction_is_in_original_pixels(mask_rcnn):
  config, _, predictor = mask_rcnn
  out = predictor(_random_image(97, 131))
  n = len(out["scores"])
  assert n > 0
  assert out["masks"].shape == (n, 97, 131) and out["masks"].dtype == bool
  assert out["boxes"].shape == (n, 4) and out["boxes"].dtype == np.float32
  assert np.all(out["boxes"] >= 0) and np.all(out["boxes"][:, [0, 2]] <= 131)
  assert np.all(out["boxes"][:, [1, 3]] <= 97)
  assert set(out["labels"]) <= {1, 2, 3, 4} and np.all(np.diff(out["scores"]) <= 0)
  strict = copy.copy(predictor)  # The same jitted function: no second compile.
  strict.score_threshold = 0.15
  kept = strict(_random_image(97, 131))
  np.testing.assert_array_equal(kept["scores"], out["scores"][out["scores"] >= 0.15])


def test_instance_preprocessing_resizes_and_normalizes_as_the_eval_pipeline(mask_rcnn):
  config, _, predictor = mask_rcnn
  config = config.copy_and_resolve_references()
  config.dataset.min_size, config.dataset.max_size = 40, 56  # 64 x 64 shapes become 40 x 40.
  count = config.dataset.eval_kwargs.num_examples
  dataset, _ = instance_pipeline.instance_eval_dataset(config, local_batch_size=count)
  batch = next(dataset.as_numpy_iterator())
  for i, image in enumerate(_validation_images(config)):
    resized, meta = predictor.task.preprocess(config, image)
    assert resized.dtype == np.uint8
    assert meta["image_size"] == resized.shape[:2] == tuple(batch["image_size"][i]) == (40, 40)
    assert meta["original_size"] == tuple(batch["original_size"][i]) == (64, 64)
    assert meta["scale"] == pytest.approx(batch["scale"][i], rel=1e-6)
    padded = np.zeros((1, 64, 64, 3), np.uint8)
    padded[0, :40, :40] = resized
    normalized = np.asarray(normalize_padded(padded, np.array([meta["image_size"]])))[0]
    np.testing.assert_allclose(normalized, batch["image"][i], rtol=1e-6, atol=1e-6)


def test_instance_predictions_equal_the_evaluators_coco_results(mask_rcnn):
  config, _, predictor = mask_rcnn
  evaluator = instance.Evaluator(config, model=predictor.model, mesh=parallel.make_mesh())
  results, image_ids = evaluator.detections(predictor.variables)
  outputs = predictor.predict_batch(list(_validation_images(config)))
  assert image_ids == list(range(len(outputs)))
  assert len(results) == sum(len(o["scores"]) for o in outputs) > 0
  for image_id, out in enumerate(outputs):
    mine = [r for r in results if r["image_id"] == image_id]
    np.testing.assert_allclose([r["score"] for r in mine], out["scores"], rtol=1e-5)
    np.testing.assert_array_equal([r["category_id"] for r in mine], out["labels"])
    xywh = out["boxes"].astype(np.float64)
    xywh[:, 2:] -= xywh[:, :2]
    boxes = np.array([r["bbox"] for r in mine]).reshape(-1, 4)  # An image may have none.
    np.testing.assert_allclose(boxes, xywh.reshape(-1, 4), atol=1e-3)
    for r, mask in zip(mine, out["masks"]):
      np.testing.assert_array_equal(mask_util.decode(r["segmentation"]).astype(bool), mask)


def _run(args):
  env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
  return subprocess.run(
    [sys.executable, *args],
    cwd=REPO,
    env=env,
    text=True,
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    timeout=300,
  )


def test_predict_py_writes_palette_pngs_of_the_predictor_labels(unet, tmp_path):
  config, workdir, predictor = unet
  predictor = _like(predictor, bucket=64)  # predict.py's default.
  inputs = tmp_path / "in"
  (inputs / "more").mkdir(parents=True)
  Image.fromarray(_random_image(97, 131)).save(inputs / "a.png")
  Image.fromarray(_random_image(40, 50, seed=2)).save(inputs / "more" / "b.jpg")
  Image.fromarray(_random_image(33, 20, seed=3)).save(inputs / "more" / "c.png")
  out = tmp_path / "out"
  proc = _run(
    [
      "predict.py",
      "--workdir",
      workdir,
      "--input",
      str(inputs / "a.png"),
      str(inputs / "more" / "*.jpg"),
      "--input",
      str(inputs / "more" / "c.png"),
      "--output",
      str(out),
      "--overlay",
      "--batch_size",
      "2",
    ]
  )
  assert proc.returncode == 0, proc.stdout
  assert "3/3 images" in proc.stdout and "images/s" in proc.stdout
  assert sorted(os.listdir(out)) == [
    "a.png",
    "a_overlay.png",
    "b.png",
    "b_overlay.png",
    "c.png",
    "c_overlay.png",
  ]
  colours = visualize.palette(config.model.num_classes)[: config.model.num_classes]
  for name, path in [
    ("a", inputs / "a.png"),
    ("b", inputs / "more" / "b.jpg"),
    ("c", inputs / "more" / "c.png"),
  ]:
    png = Image.open(out / f"{name}.png")
    assert png.mode == "P"
    labels = predictor(read_image(str(path)))["labels"]
    np.testing.assert_array_equal(np.asarray(png), labels)
    np.testing.assert_array_equal(np.asarray(png.getpalette()[: colours.size]), colours.ravel())
    overlay = np.asarray(Image.open(out / f"{name}_overlay.png"))
    assert overlay.shape[0] > labels.shape[0] and overlay.shape[1] >= labels.shape[1]  # Legend.


def test_predict_py_fails_naming_an_unreadable_file(unet, tmp_path):
  _, workdir, _ = unet
  (tmp_path / "broken.png").write_text("not an image")
  proc = _run(
    [
      "predict.py",
      "--workdir",
      workdir,
      "--input",
      str(tmp_path / "broken.png"),
      "--output",
      str(tmp_path / "out"),
    ]
  )
  assert proc.returncode != 0
  assert f"Cannot read image {tmp_path / 'broken.png'}" in proc.stdout


def test_semantic_overlay_blends_classes_and_adds_a_legend_of_those_present():
  image = _random_image(20, 30)
  labels = np.zeros((20, 30), np.int32)
  labels[5:10, 5:25] = 3
  panel = visualize.semantic_overlay(
    image, labels, num_classes=5, class_names=("background", "a", "b", "a long class name")
  )
  assert panel.shape[0] == 20 + 2 * 14 + 4 and panel.shape[1] > 30  # Two lines, widened.
  np.testing.assert_array_equal(panel[:20, :30][labels == 0], image[labels == 0])
  colour = visualize.palette(5)[3].astype(np.float32)
  np.testing.assert_allclose(
    panel[:20, :30][labels == 3], np.round(0.5 * image[labels == 3] + 0.5 * colour), atol=1
  )


def test_list_images_expands_directories_and_globs(tmp_path):
  for name in ("b.png", "a.JPG", "notes.txt"):
    (tmp_path / name).write_bytes(b"")
  assert list_images([str(tmp_path)]) == [str(tmp_path / "a.JPG"), str(tmp_path / "b.png")]
  assert list_images([str(tmp_path / "*.png"), str(tmp_path / "b.png")]) == [
    str(tmp_path / "b.png")
  ]
  with pytest.raises(FileNotFoundError, match="nothing"):
    list_images([str(tmp_path / "*.gif")])


def test_predict_py_writes_coco_results_that_pycocotools_loads(mask_rcnn, tmp_path):
  _, workdir, predictor = mask_rcnn
  sizes = {"x": (50, 61), "y": (64, 64)}  # Both padded to 64 x 64 with buckets of 32 or 64.
  for i, (name, size) in enumerate(sizes.items()):
    Image.fromarray(_random_image(*size, seed=i)).save(tmp_path / f"{name}.png")
  out = tmp_path / "out"
  proc = _run(
    [
      "predict.py",
      "--workdir",
      workdir,
      "--input",
      str(tmp_path / "*.png"),
      "--output",
      str(out),
      "--score_threshold",
      "0.0",
      "--overlay",
      "--batch_size",
      str(predictor.batch_size),
    ]
  )  # The fixture's compiled shapes.
  assert proc.returncode == 0, proc.stdout
  assert sorted(os.listdir(out)) == ["predictions.json", "x_overlay.png", "y_overlay.png"]
  with open(out / "predictions.json") as f:
    results = json.load(f)
  gt = COCO()
  gt.dataset = {
    "images": [{"id": i, "height": h, "width": w} for i, (h, w) in enumerate(sizes.values())],
    "annotations": [],
    "categories": [{"id": c} for c in range(1, 5)],
  }
  gt.createIndex()
  loaded = gt.loadRes(results)
  assert len(loaded.anns) == len(results) > 0
  for i, name in enumerate(sizes):
    expected = predictor(read_image(str(tmp_path / f"{name}.png")))
    mine = [r for r in results if r["image_id"] == i]
    assert {r["file_name"] for r in mine} <= {name}  # An image may have no detections.
    np.testing.assert_allclose([r["score"] for r in mine], expected["scores"], rtol=1e-5)
    for r, mask in zip(mine, expected["masks"]):
      assert tuple(r["segmentation"]["size"]) == sizes[name]
      np.testing.assert_array_equal(mask_util.decode(r["segmentation"]).astype(bool), mask)

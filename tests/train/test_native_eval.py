"""Whole/slide evaluation end to end (segjax/train/evaluator.py, semantic.py, evaluation.py):
metrics of the original label PNGs, never of padding."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from configs import unet_folder
from segjax import metrics
from segjax.errors import ConfigError
from segjax.models import build_model
from segjax.train import evaluation, parallel, semantic
from segjax.train.evaluator import Evaluator
from tests.markers import TEST_XLA_FLAGS, long_test

IGNORE = 255
MEAN = 255 * np.array([0.485, 0.456, 0.406])
STD = 255 * np.array([0.229, 0.224, 0.225])
SIZES = [(97, 131), (60, 80), (33, 17)]  # Not multiples of the stride (4).
NUM_CLASSES = 3


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  """A validation folder of random images and masks (10% ignore), and a tiny U-Net."""
  data_dir = tmp_path_factory.mktemp("folder")
  rng = np.random.default_rng(0)
  for sub in ("images", "masks"):
    os.makedirs(data_dir / "validation" / sub)
  for n, (h, w) in enumerate(SIZES):
    mask = rng.integers(0, NUM_CLASSES, (h, w)).astype(np.uint8)
    mask[rng.random((h, w)) < 0.1] = IGNORE
    # Image colour encodes the class, so that the model's predictions vary with it.
    image = mask[..., None] * np.array([60, 0, 90]) % 256 + rng.integers(0, 40, (h, w, 3))
    Image.fromarray(image.astype(np.uint8)).save(data_dir / "validation" / "images" / f"{n}.png")
    Image.fromarray(mask).save(data_dir / "validation" / "masks" / f"{n}.png")
  config = unet_folder.get_config(str(NUM_CLASSES))
  config.image_size = (32, 32)
  config.eval_batch_size = 2
  config.model.depth, config.model.base_width = 2, 8
  config.dataset.data_dir = str(data_dir)
  model = build_model(config)
  init = jax.jit(lambda key, x: model.init(key, x, train=False))  # Eager init is slow.
  variables = init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  return config, model, variables, str(data_dir)


def evaluate(config, model, variables):
  evaluator = Evaluator(config, model=model, mesh=parallel.make_mesh())
  return evaluator, evaluator.run(variables)


def reference_confusion(config, model, variables, data_dir, canvas):
  """From the PNGs: each image normalized and zero-padded to the canvas as a plain array, the
  model, its prediction cropped to the image, counted against the PNG mask in numpy."""
  total = np.zeros((NUM_CLASSES, NUM_CLASSES), np.int64)
  for n in range(len(SIZES)):
    image = np.asarray(Image.open(os.path.join(data_dir, "validation", "images", f"{n}.png")))
    mask = np.asarray(Image.open(os.path.join(data_dir, "validation", "masks", f"{n}.png")))
    h, w = mask.shape
    x = np.zeros((1, *canvas, 3), np.float32)
    x[0, :h, :w] = (image - MEAN) / STD
    logits, _ = model.apply(variables, x, train=False)
    predicted = np.asarray(logits)[0, :h, :w].argmax(-1)
    keep = mask != IGNORE
    np.add.at(total, (mask[keep].astype(int), predicted[keep]), 1)
  return total


def test_whole_metrics_equal_a_numpy_reference_on_the_original_pngs(folder):
  config, model, variables, data_dir = folder
  evaluator, result = evaluate(config, model, variables)
  assert evaluator.canvas == ((100, 132), (100, 132))
  expected = reference_confusion(config, model, variables, data_dir, evaluator.canvas[0])
  # Every labelled pixel of the PNGs counted once: none of the canvas's padding.
  labelled = sum(
    int(
      (
        np.asarray(Image.open(os.path.join(data_dir, "validation", "masks", f"{n}.png"))) != IGNORE
      ).sum()
    )
    for n in range(len(SIZES))
  )
  assert expected.sum() == labelled
  reference = metrics.segmentation_metrics(expected)
  assert result["pixel_accuracy"] == pytest.approx(reference["pixel_accuracy"], abs=1e-9)
  assert result["mean_iou"] == pytest.approx(reference["mean_iou"], abs=1e-9)
  np.testing.assert_allclose(result["per_class_iou"], reference["per_class_iou"], atol=1e-9)
  assert 0 < reference["pixel_accuracy"] < 1


def test_slide_with_the_canvas_as_window_equals_whole(folder):
  config, model, variables, _ = folder
  whole = evaluate(config, model, variables)[1]
  config = config.copy_and_resolve_references()
  config.evaluation.update(mode="slide", crop_size=(100, 132), stride=(64, 64))
  evaluator, slide = evaluate(config, model, variables)
  assert evaluator.canvas == ((100, 132), (100, 132))
  for key in ("pixel_accuracy", "mean_iou", "top5_accuracy"):
    assert slide[key] == pytest.approx(whole[key], abs=1e-9)


def test_slide_and_tta_run_through_the_evaluator(folder):
  config, model, variables, _ = folder
  config = config.copy_and_resolve_references()
  config.evaluation.update(
    mode="slide", crop_size=(32, 32), stride=(24, 24), flip=True, scales=(0.75, 1.0)
  )
  _, result = evaluate(config, model, variables)
  assert 0 < result["pixel_accuracy"] < 1 and np.isfinite(result["mean_iou"])


def test_padding_pixels_are_never_counted():
  """Labels past `mask_size` hold a real class (as if the pipeline padded wrongly) that the
  prediction gets right: counting them would change every number."""
  mask = np.full((1, 8, 8), 1, np.int32)
  mask[0, :4, :6] = 0  # The image: 4x6 of class 0, predicted class 1 everywhere.
  scores = jnp.zeros((1, 8, 8, 2)).at[..., 1].set(1.0)
  batch = {
    "mask": jnp.asarray(mask),
    "example_mask": jnp.asarray([True]),
    "mask_size": jnp.asarray([[4, 6]], jnp.int32),
  }
  counts = semantic.eval_counts(scores, batch, num_classes=2)
  np.testing.assert_array_equal(counts["confusion_matrix"], [[0, 24], [0, 0]])
  assert int(counts["num_pixels"]) == 24 and int(counts["top5_correct"]) == 24


def test_other_splits_write_their_own_metrics_file(tmp_path):
  config = unet_folder.get_config("3")
  assert evaluation.split_filename("validation[:50%]") == "validation_-50pct"
  assert evaluation.split_filename("validation[50%:]") == "validation_50pct-"
  assert evaluation.split_filename("a/b c") == "a_b_c"
  assert evaluation.metrics_filename(config, str(tmp_path)) == "eval_metrics.json"
  (tmp_path / "config.json").write_text('{"dataset": {"eval_split": "validation"}}')
  assert evaluation.metrics_filename(config, str(tmp_path)) == "eval_metrics.json"
  config.dataset.eval_split = "train[:10%]"
  assert evaluation.metrics_filename(config, str(tmp_path)) == "eval_metrics_train_-10pct.json"


def test_shorter_side_predictions_are_resized_back_to_the_original_masks(folder):
  """Images resized to a shorter side of 24, the model, its logits cropped and resized back
  bilinearly to each PNG's size (tf.image.resize as the reference), scored there."""
  import tensorflow as tf

  config, model, variables, data_dir = folder
  config = config.copy_and_resolve_references()
  config.evaluation.shorter_side = 24
  evaluator, result = evaluate(config, model, variables)
  canvas = evaluator.canvas[0]
  assert evaluator.canvas == ((48, 32), (97, 131))  # 33x17 becomes 47x24.
  total = np.zeros((NUM_CLASSES, NUM_CLASSES), np.int64)
  for n in range(len(SIZES)):
    image = np.asarray(Image.open(os.path.join(data_dir, "validation", "images", f"{n}.png")))
    mask = np.asarray(Image.open(os.path.join(data_dir, "validation", "masks", f"{n}.png")))
    h, w = mask.shape
    rh, rw = np.maximum(np.round(np.array([h, w]) * 24 / min(h, w)), 1).astype(int)
    x = np.zeros((1, *canvas, 3), np.float32)
    x[0, :rh, :rw] = (tf.image.resize(image, (rh, rw), "bilinear").numpy() - MEAN) / STD
    logits = np.asarray(model.apply(variables, x, train=False)[0])[0, :rh, :rw]
    predicted = tf.image.resize(logits, (h, w), "bilinear").numpy().argmax(-1)
    keep = mask != IGNORE
    np.add.at(total, (mask[keep].astype(int), predicted[keep]), 1)
  reference = metrics.segmentation_metrics(total)
  assert result["pixel_accuracy"] == pytest.approx(reference["pixel_accuracy"], abs=1e-3)
  assert result["mean_iou"] == pytest.approx(reference["mean_iou"], abs=2e-3)


def test_slide_window_not_a_multiple_of_the_stride_is_an_error(folder):
  config, model, _, _ = folder
  config = config.copy_and_resolve_references()
  config.evaluation.update(mode="slide", crop_size=(30, 32), stride=(16, 16))
  with pytest.raises(ConfigError, match="crop_size"):
    Evaluator(config, model=model, mesh=parallel.make_mesh())


TWO_DEVICES = """
import json, sys
import jax, jax.numpy as jnp
from configs import unet_folder
from segjax.train import parallel
from segjax.train.evaluator import Evaluator
from segjax.models import build_model

config = unet_folder.get_config("3")
config.image_size, config.eval_batch_size = (32, 32), 2
config.model.depth, config.model.base_width = 2, 8
config.dataset.data_dir = sys.argv[1]
config.evaluation.update(json.loads(sys.argv[2]))
model = build_model(config)
variables = jax.jit(lambda k, x: model.init(k, x, train=False))(
  jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
results = {}
for parallelism in ("jit", "pmap"):
  config.parallelism = parallelism
  evaluator = Evaluator(config, model=model, mesh=parallel.make_mesh())
  run = parallel.to_pmap_state(variables) if parallelism == "pmap" else variables
  results[parallelism] = evaluator.run(run)["mean_iou"]
print("RESULT", json.dumps(results))
"""


@long_test  # In CI, devices: tests/train/test_parallel.py.
def test_two_devices_jit_and_pmap_evaluate_like_one(folder):
  """Sizes and windows sharded over devices (a subprocess, ~30 s): the same metrics."""
  import json
  import subprocess
  import sys

  settings = dict(mode="slide", crop_size=(32, 32), stride=(24, 24), flip=True)
  config, model, variables, data_dir = folder
  config = config.copy_and_resolve_references()
  config.evaluation.update(settings)
  expected = evaluate(config, model, variables)[1]["mean_iou"]
  repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  env = {
    **os.environ,
    "TF_CPP_MIN_LOG_LEVEL": "2",
    "XLA_FLAGS": f"{TEST_XLA_FLAGS} --xla_force_host_platform_device_count=2",
  }
  out = subprocess.run(
    [sys.executable, "-c", TWO_DEVICES, data_dir, json.dumps(settings)],
    cwd=repo,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert out.returncode == 0, out.stdout + out.stderr
  results = json.loads(out.stdout.split("RESULT", 1)[1])
  assert results["jit"] == pytest.approx(expected, abs=1e-6)
  assert results["pmap"] == pytest.approx(expected, abs=1e-6)


def test_visualizations_of_resized_whole_evaluation_show_each_mask_at_its_size(folder, tmp_path):
  from segjax.train import visualizations

  config, model, variables, _ = folder
  config = config.copy_and_resolve_references()
  config.evaluation.shorter_side = 24
  evaluator = Evaluator(config, model=model, mesh=parallel.make_mesh())
  paths = visualizations.write_semantic(config, evaluator, model, variables, str(tmp_path), 3)
  widths = [np.asarray(Image.open(p)).shape[1] for p in paths]
  scales = [-(-256 // max(h, w)) for h, w in SIZES]  # Image | truth | prediction, upscaled.
  assert widths == [3 * w * s + 4 for (h, w), s in zip(SIZES, scales)]


def test_mious_of_predicted_pngs_equal_the_evaluators(folder, tmp_path):
  """What predict.py writes (`predict_to_directory`), scored in numpy against the original
  label PNGs, gives evaluate.py's metrics, flip TTA included: the Predictor runs the evaluator's
  inference. The images share one size, so the evaluator's canvas is the Predictor's padding."""
  from segjax.predict import Predictor, predict_to_directory

  config, model, variables, _ = folder
  data_dir = tmp_path / "data"
  rng = np.random.default_rng(1)
  for sub in ("images", "masks"):
    os.makedirs(data_dir / "validation" / sub)
  for n in range(3):
    mask = rng.integers(0, NUM_CLASSES, (97, 131)).astype(np.uint8)
    mask[rng.random(mask.shape) < 0.1] = IGNORE
    image = mask[..., None] * np.array([60, 0, 90]) % 256 + rng.integers(0, 40, (97, 131, 3))
    Image.fromarray(image.astype(np.uint8)).save(data_dir / "validation" / "images" / f"{n}.png")
    Image.fromarray(mask).save(data_dir / "validation" / "masks" / f"{n}.png")
  config = config.copy_and_resolve_references()
  config.dataset.data_dir = str(data_dir)
  config.evaluation.flip = True
  _, result = evaluate(config, model, variables)

  predictor = Predictor(config, variables, model=model, batch_size=2)
  images = sorted((data_dir / "validation" / "images").iterdir())
  predict_to_directory(predictor, [str(p) for p in images], str(tmp_path / "out"), log=str)
  total = np.zeros((NUM_CLASSES, NUM_CLASSES), np.int64)
  for path in images:
    predicted = np.asarray(Image.open(tmp_path / "out" / path.name))
    mask = np.asarray(Image.open(data_dir / "validation" / "masks" / path.name))
    assert predicted.shape == mask.shape
    keep = mask != IGNORE
    np.add.at(total, (mask[keep].astype(int), predicted[keep].astype(int)), 1)
  confusion = total.astype(np.float64)
  iou = np.diag(confusion) / (confusion.sum(0) + confusion.sum(1) - np.diag(confusion))
  assert result["mean_iou"] == pytest.approx(iou.mean(), abs=1e-12)
  assert result["pixel_accuracy"] == pytest.approx(np.trace(confusion) / confusion.sum(), abs=1e-12)

"""Tests for segjax/metrics.py against numpy formulas."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from segjax import metrics


def np_confusion(labels, preds, k, ignore_label=255):
  cm = np.zeros((k, k), np.int64)
  valid = labels != ignore_label
  np.add.at(cm, (labels[valid], preds[valid]), 1)
  return cm


def test_confusion_matrix_matches_numpy_and_accumulates():
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 5, size=(4, 6, 7))
  labels[rng.uniform(size=labels.shape) < 0.2] = 255
  preds = rng.integers(0, 5, size=labels.shape)
  cm = metrics.confusion_matrix(labels, preds, 5)
  assert cm.shape == (5, 5) and cm.dtype == jnp.int32
  np.testing.assert_array_equal(cm, np_confusion(labels, preds, 5))
  # Rows are the true class.
  cm_one = metrics.confusion_matrix(np.array([1, 1, 1]), np.array([2, 2, 0]), 3)
  np.testing.assert_array_equal(cm_one, [[0, 0, 0], [1, 0, 2], [0, 0, 0]])
  # Jitted, summed over batches == over everything at once.
  fn = jax.jit(metrics.confusion_matrix, static_argnums=2)
  total = sum(fn(labels[i : i + 2], preds[i : i + 2], 5) for i in (0, 2))
  np.testing.assert_array_equal(total, cm)


def test_confusion_matrix_weights_drop_padded_examples():
  rng = np.random.default_rng(1)
  labels = rng.integers(0, 3, size=(4, 5, 5))
  preds = rng.integers(0, 3, size=labels.shape)
  is_real = np.array([1, 1, 1, 0])  # the last example pads the batch
  cm = metrics.confusion_matrix(labels, preds, 3, weights=is_real[:, None, None])
  np.testing.assert_array_equal(cm, np_confusion(labels[:3], preds[:3], 3))


def test_confusion_matrix_skips_out_of_range_and_other_ignore_labels():
  labels = np.array([0, 1, 7, -1, 2])
  preds = np.array([0, 1, 1, 1, 2])
  cm = metrics.confusion_matrix(labels, preds, 3, ignore_label=-1)
  np.testing.assert_array_equal(cm, np.eye(3))
  cm_all = metrics.confusion_matrix(np.array([0, 1]), np.array([1, 1]), 2, ignore_label=None)
  np.testing.assert_array_equal(cm_all, [[0, 1], [0, 1]])


# K = 4: class 2 is predicted but never labelled, class 3 appears nowhere.
LABELS = np.array([0, 0, 0, 0, 1, 1, 1, 255, 255])
PREDS = np.array([0, 0, 1, 2, 1, 1, 0, 3, 2])
CM = np_confusion(LABELS, PREDS, 4)


def np_reference(cm):
  """The formulas of the metrics module docstring, written out directly."""
  cm = cm.astype(float)
  tp, t, p = np.diag(cm), cm.sum(1), cm.sum(0)
  union = t + p - tp
  iou = np.array([tp[i] / union[i] if union[i] else np.nan for i in range(len(cm))])
  present = [i for i in range(len(cm)) if union[i]]
  labelled = [i for i in range(len(cm)) if t[i]]
  return {
    "pixel_accuracy": tp.sum() / cm.sum(),
    "mean_class_accuracy": np.mean([tp[i] / t[i] for i in labelled]),
    "per_class_iou": iou,
    "mean_iou": np.mean(iou[present]),
    "frequency_weighted_iou": sum(t[i] / t.sum() * iou[i] for i in labelled),
  }


def test_hand_computed_example():
  # cm rows: class 0 -> [2, 1, 1, 0], class 1 -> [1, 2, 0, 0]; 7 counted pixels.
  np.testing.assert_array_equal(CM, [[2, 1, 1, 0], [1, 2, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]])
  assert metrics.pixel_accuracy(CM) == pytest.approx(4 / 7)
  assert metrics.mean_class_accuracy(CM) == pytest.approx((2 / 4 + 2 / 3) / 2)
  iou = metrics.per_class_iou(CM)
  np.testing.assert_allclose(iou[:3], [2 / 5, 2 / 4, 0.0])  # tp / (t + p - tp)
  assert np.isnan(iou[3])
  # Class 2 (predicted only) counts with IoU 0; class 3 (absent) is left out.
  assert metrics.mean_iou(CM) == pytest.approx((2 / 5 + 2 / 4 + 0) / 3)
  assert metrics.frequency_weighted_iou(CM) == pytest.approx(4 / 7 * 2 / 5 + 3 / 7 * 2 / 4)


@pytest.mark.parametrize("as_jax", [False, True])
def test_metrics_match_numpy_formulas_on_random_matrices(as_jax):
  rng = np.random.default_rng(2)
  for _ in range(3):
    cm = rng.integers(0, 20, size=(6, 6))
    cm[2, :] = 0  # class 2 never labelled ...
    cm[:, 4] = 0  # ... class 4 never predicted ...
    cm[5, :] = cm[:, 5] = 0  # ... class 5 absent
    ref = np_reference(cm)
    arg = jnp.asarray(cm) if as_jax else cm
    for name in ("pixel_accuracy", "mean_class_accuracy", "mean_iou", "frequency_weighted_iou"):
      value = getattr(metrics, name)(arg)
      assert isinstance(value, jax.Array if as_jax else float), name
      np.testing.assert_allclose(value, ref[name], rtol=1e-6, err_msg=name)
    iou = metrics.per_class_iou(arg)
    assert isinstance(iou, jax.Array if as_jax else np.ndarray)
    np.testing.assert_allclose(iou, ref["per_class_iou"], rtol=1e-6)


def test_metrics_under_jit_and_from_accumulated_device_matrix():
  cm = metrics.confusion_matrix(LABELS, PREDS, 4)
  value = jax.jit(metrics.mean_iou)(cm)
  assert value == pytest.approx(np_reference(CM)["mean_iou"])


def test_perfect_and_empty_matrices():
  perfect = np.diag([3, 0, 5])
  assert metrics.pixel_accuracy(perfect) == 1.0
  assert metrics.mean_iou(perfect) == 1.0  # class 1 absent, left out
  assert metrics.mean_class_accuracy(perfect) == 1.0
  assert metrics.frequency_weighted_iou(perfect) == 1.0
  empty = np.zeros((3, 3), np.int64)
  with np.errstate(all="raise"):  # no division warnings either
    for fn in (
      metrics.pixel_accuracy,
      metrics.mean_class_accuracy,
      metrics.mean_iou,
      metrics.frequency_weighted_iou,
    ):
      assert math.isnan(fn(empty))
  assert np.all(np.isnan(metrics.per_class_iou(jnp.zeros((3, 3), jnp.int32))))


def test_segmentation_metrics_dict():
  out = metrics.segmentation_metrics(jnp.asarray(CM), class_names=["a", "b", "c", "d"])
  ref = np_reference(CM)
  for name in ("pixel_accuracy", "mean_class_accuracy", "mean_iou", "frequency_weighted_iou"):
    assert type(out[name]) is float
    assert out[name] == pytest.approx(ref[name])
  assert isinstance(out["per_class_iou"], list) and len(out["per_class_iou"]) == 4
  np.testing.assert_allclose(out["per_class_iou"], ref["per_class_iou"])
  assert out["per_class_iou/b"] == pytest.approx(2 / 4)
  assert math.isnan(out["per_class_iou/d"])
  assert set(metrics.segmentation_metrics(CM)) == {
    "pixel_accuracy",
    "mean_class_accuracy",
    "mean_iou",
    "frequency_weighted_iou",
    "per_class_iou",
  }
  with pytest.raises(ValueError, match="2 class names"):
    metrics.segmentation_metrics(CM, class_names=["a", "b"])


@pytest.mark.parametrize("k", [1, 5])
def test_topk_accuracy_matches_argsort(k):
  rng = np.random.default_rng(3)
  logits = rng.normal(size=(50, 10)).astype(np.float32)
  labels = rng.integers(0, 10, size=50)
  top = np.argsort(-logits, axis=-1)[:, :k]
  expected = np.mean([labels[i] in top[i] for i in range(50)])
  np.testing.assert_allclose(metrics.topk_accuracy(logits, labels, k), expected, rtol=1e-6)
  # With ignored labels, and extra leading axes.
  labels_ign = labels.copy()
  labels_ign[::3] = -1
  keep = labels_ign != -1
  expected_ign = np.mean([labels[i] in top[i] for i in np.flatnonzero(keep)])
  value = jax.jit(metrics.topk_accuracy, static_argnums=(2, 3))(
    logits.reshape(5, 10, 10), labels_ign.reshape(5, 10), k, -1
  )
  np.testing.assert_allclose(value, expected_ign, rtol=1e-6)


def test_topk_accuracy_edge_cases():
  logits = np.array([[0.0, 1.0, 2.0]])
  assert metrics.topk_accuracy(logits, np.array([1]), 1) == 0.0
  assert metrics.topk_accuracy(logits, np.array([1]), 2) == 1.0
  assert metrics.topk_accuracy(logits, np.array([0]), 3) == 1.0
  assert np.isnan(metrics.topk_accuracy(logits, np.array([255]), 1, ignore_label=255))

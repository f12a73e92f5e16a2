"""Evaluation sums past int32: counts are added on the host in int64 (segjax/train/evaluator.py)."""

import numpy as np

from segjax import metrics
from segjax.train.evaluator import add_counts


def test_counts_add_past_int32_exactly():
  big = np.iinfo(np.int32).max  # One batch's counts fit int32; their sum does not.
  batch = {
    "confusion_matrix": np.array([[big, 7], [3, big]], np.int32),
    "num_pixels": np.int32(big),
    "top5_correct": np.int32(big - 1),
  }
  total = None
  for _ in range(3):
    total = add_counts(total, batch)
  assert total["confusion_matrix"].dtype == np.int64
  np.testing.assert_array_equal(total["confusion_matrix"], [[3 * big, 21], [9, 3 * big]])
  assert total["num_pixels"] == 3 * big and total["top5_correct"] == 3 * (big - 1)


def test_metrics_of_counts_past_int32():
  cm = np.array([[3_000_000_000, 1_000_000_000], [0, 2_000_000_000]], np.int64)
  result = metrics.segmentation_metrics(cm)
  assert result["pixel_accuracy"] == 5 / 6
  np.testing.assert_allclose(result["per_class_iou"], [3 / 4, 2 / 3])
  assert result["mean_iou"] == (3 / 4 + 2 / 3) / 2

"""Semantic segmentation metrics from a confusion matrix (Long et al., FCN, 2015, section 5).

Evaluation accumulates one (K, K) confusion matrix by summing `confusion_matrix` over batches
(and devices) and computes every metric from the total, never by averaging per-batch values.
`cm[i, j]` counts pixels of true class i predicted as class j. With n_ij = cm[i, j],
t_i = sum_j n_ij (pixels of class i), p_j = sum_i n_ij (pixels predicted j), N = sum t_i:

  pixel_accuracy          sum_i n_ii / N
  mean_class_accuracy     mean over classes with t_i > 0 of n_ii / t_i
  per_class_iou           IoU_i = n_ii / (t_i + p_i - n_ii); NaN when t_i + p_i = 0
  mean_iou                mean of IoU_i over the classes that are not NaN
  frequency_weighted_iou  sum over classes with t_i > 0 of (t_i / N) * IoU_i

Absent-class rule: a class that appears in neither labels nor predictions (t_i = p_i = 0) has
an undefined IoU (NaN) and is left out of `mean_iou`; a class predicted but never labelled
(t_i = 0 < p_i) has IoU 0 and counts. `mean_class_accuracy` averages only the classes present
in the labels. A metric with nothing to average (an empty matrix) is NaN.

The functions of a confusion matrix accept numpy arrays (returning Python floats and numpy
arrays) or jax arrays (returning jax arrays, usable under jit).
"""

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def confusion_matrix(
  labels: jax.Array,
  preds: jax.Array,
  num_classes: int,
  ignore_label: int | None = 255,
  weights: jax.Array | None = None,
) -> jax.Array:
  """Counts (true class, predicted class) pairs over valid pixels; jittable.

  Args:
    labels: (...) integer true classes, e.g. (B, H, W).
    preds: (...) integer predicted classes, same shape as `labels`.
    num_classes: K.
    ignore_label: pixels with this label are not counted (None: count all).
    weights: optional mask broadcastable to `labels` (e.g. (B, 1, 1) to drop padded examples
      of the last evaluation batch); pixels where it is 0 are not counted, others count once.

  Returns:
    (K, K) int32 matrix, rows the true class and columns the predicted one. Labels or
    predictions outside [0, K) are not counted. Sum matrices across batches to accumulate
    (int32 holds about 2e9 pixels; accumulate on the host in int64 beyond that).
  """
  labels = jnp.asarray(labels)
  preds = jnp.asarray(preds)
  if labels.shape != preds.shape:
    raise ValueError(
      f"labels and preds must have the same shape; got {labels.shape} and {preds.shape}."
    )
  valid = (labels >= 0) & (labels < num_classes) & (preds >= 0) & (preds < num_classes)
  if ignore_label is not None:
    valid &= labels != ignore_label
  if weights is not None:
    valid &= jnp.broadcast_to(jnp.asarray(weights) != 0, labels.shape)
  index = jnp.where(valid, labels * num_classes + preds, 0).astype(jnp.int32)
  counts = jnp.bincount(
    index.ravel(), weights=valid.ravel().astype(jnp.int32), length=num_classes * num_classes
  )
  return counts.reshape(num_classes, num_classes).astype(jnp.int32)


def _setup(cm: Any):
  """Returns (array module, float confusion matrix) for numpy or jax input."""
  xp = jnp if isinstance(cm, jax.Array) else np
  cm = xp.asarray(cm)
  if cm.ndim != 2 or cm.shape[0] != cm.shape[1]:
    raise ValueError(f"Expected a square (K, K) confusion matrix, got shape {cm.shape}.")
  dtype = jnp.float32 if xp is jnp else np.float64
  return xp, cm.astype(dtype)


def _out(xp, value):
  """Python float for numpy scalars, the array itself for jax."""
  return value if xp is jnp else float(value)


def _safe_div(xp, num, den):
  """num / den, NaN where den == 0, without division warnings."""
  return xp.where(den > 0, num / xp.where(den > 0, den, 1), xp.nan)


def _masked_mean(xp, values, mask):
  """Mean of `values` where `mask`; NaN when the mask is empty."""
  return _safe_div(xp, xp.sum(xp.where(mask, values, 0)), xp.sum(mask))


def pixel_accuracy(cm: Any):
  """Fraction of counted pixels predicted correctly; NaN for an empty matrix."""
  xp, cm = _setup(cm)
  return _out(xp, _safe_div(xp, xp.trace(cm), xp.sum(cm)))


def mean_class_accuracy(cm: Any):
  """Mean per-class recall n_ii / t_i over classes present in the labels."""
  xp, cm = _setup(cm)
  totals = cm.sum(axis=1)
  recall = _safe_div(xp, xp.diagonal(cm), totals)
  return _out(xp, _masked_mean(xp, recall, totals > 0))


def per_class_iou(cm: Any):
  """(K,) IoU per class; NaN for classes absent from both labels and predictions."""
  xp, cm = _setup(cm)
  tp = xp.diagonal(cm)
  union = cm.sum(axis=0) + cm.sum(axis=1) - tp
  return _safe_div(xp, tp, union)


def mean_iou(cm: Any):
  """Mean IoU over the classes present in labels or predictions (see module docstring)."""
  xp, _ = _setup(cm)
  iou = per_class_iou(cm)
  return _out(xp, _masked_mean(xp, iou, ~xp.isnan(iou)))


def frequency_weighted_iou(cm: Any):
  """IoU per class weighted by the class's share of the labelled pixels."""
  xp, cmf = _setup(cm)
  totals = cmf.sum(axis=1)
  iou = per_class_iou(cm)
  freq = _safe_div(xp, totals, xp.sum(totals))
  value = xp.sum(xp.where(totals > 0, freq * xp.where(xp.isnan(iou), 0, iou), 0))
  return _out(xp, xp.where(xp.sum(totals) > 0, value, xp.nan))


def segmentation_metrics(cm: Any, class_names: Sequence[str] | None = None) -> dict[str, Any]:
  """All confusion-matrix metrics as host Python values, for logging and eval_metrics.json.

  Args:
    cm: (K, K) confusion matrix (numpy or jax; fetched to the host).
    class_names: optional K names; adds one "per_class_iou/{name}" float per class.

  Returns:
    {"pixel_accuracy", "mean_class_accuracy", "mean_iou", "frequency_weighted_iou"}: floats,
    and "per_class_iou": a list of K floats (NaN for absent classes).
  """
  cm = np.asarray(jax.device_get(cm), dtype=np.int64)
  iou = per_class_iou(cm)
  out = {
    "pixel_accuracy": pixel_accuracy(cm),
    "mean_class_accuracy": mean_class_accuracy(cm),
    "mean_iou": mean_iou(cm),
    "frequency_weighted_iou": frequency_weighted_iou(cm),
    "per_class_iou": [float(v) for v in iou],
  }
  if class_names is not None:
    if len(class_names) != cm.shape[0]:
      raise ValueError(
        f"Got {len(class_names)} class names for a {cm.shape[0]}-class confusion matrix."
      )
    for name, value in zip(class_names, iou):
      out[f"per_class_iou/{name}"] = float(value)
  return out


def topk_accuracy(
  logits: jax.Array, labels: jax.Array, k: int, ignore_label: int | None = None
) -> jax.Array:
  """Fraction of labels whose logit is among the k largest; jittable.

  A label counts as correct when fewer than k logits are strictly greater than its own, so
  ties are resolved in the label's favour (no sort needed).

  Args:
    logits: (..., K) scores.
    labels: (...) integer classes in [0, K) (or `ignore_label`).
    k: how many top classes count as correct.
    ignore_label: labels with this value are left out (None: use all).

  Returns:
    A float32 scalar; NaN when no label is valid.
  """
  logits = jnp.asarray(logits)
  labels = jnp.asarray(labels)
  if logits.shape[:-1] != labels.shape:
    raise ValueError(
      f"logits (..., K) and labels (...) disagree: {logits.shape} vs {labels.shape}."
    )
  valid = jnp.ones(labels.shape, bool) if ignore_label is None else labels != ignore_label
  safe_labels = jnp.where(valid, labels, 0)
  label_logit = jnp.take_along_axis(logits, safe_labels[..., None], axis=-1)
  rank = jnp.sum(logits > label_logit, axis=-1)
  correct = (rank < k) & valid
  return _safe_div(jnp, jnp.sum(correct).astype(jnp.float32), jnp.sum(valid))

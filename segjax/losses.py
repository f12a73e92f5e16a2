"""Losses shared by the models: per-pixel softmax cross-entropy for semantic segmentation
(Long et al., FCN, 2015) and the smooth L1 of box regression (Girshick, Fast R-CNN, 2015).

Shapes: `...` any leading axes (usually B), H, W image size, K classes.
"""

import jax
import jax.numpy as jnp


def pixel_cross_entropy(
  logits: jax.Array,
  labels: jax.Array,
  ignore_label: int = 255,
  class_weights: jax.Array | None = None,
) -> jax.Array:
  """Softmax cross-entropy averaged over the pixels whose label is not `ignore_label`.

  Without `class_weights` this is `mean(ce)` over valid pixels; with them it is the weighted
  mean `sum(w[y] * ce) / sum(w[y])`, as `torch.nn.CrossEntropyLoss(weight=w,
  ignore_index=ignore_label)` computes it.

  Args:
    logits: (..., H, W, K) unnormalized scores, any float dtype (computed in float32).
    labels: (..., H, W) integer class ids. Every label must be in [0, K) or equal
      `ignore_label`; other values are not checked (they would silently count as zero loss
      with full weight), so map them to `ignore_label` in the data pipeline.
    ignore_label: label value excluded from the loss.
    class_weights: optional (K,) non-negative per-class weights.

  Returns:
    A float32 scalar; 0.0 (with a finite, zero gradient) when no pixel is valid.
  """
  if logits.shape[:-1] != labels.shape:
    raise ValueError(
      f"logits (..., H, W, K) and labels (..., H, W) disagree: {logits.shape} vs {labels.shape}."
    )
  num_classes = logits.shape[-1]
  valid = labels != ignore_label
  safe_labels = jnp.where(valid, labels, 0)  # ignored pixels index a real class, then weigh 0
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  onehot = jax.nn.one_hot(safe_labels, num_classes, dtype=jnp.float32)
  ce = -jnp.sum(onehot * log_probs, axis=-1)

  weights = valid.astype(jnp.float32)
  if class_weights is not None:
    class_weights = jnp.asarray(class_weights, jnp.float32)
    if class_weights.shape != (num_classes,):
      raise ValueError(
        f"class_weights must have shape ({num_classes},), got {class_weights.shape}."
      )
    weights = weights * class_weights[safe_labels]
  total = jnp.sum(weights)
  # Double `where` so that an empty batch gives 0 and a finite (zero) gradient, not 0/0.
  safe_total = jnp.where(total > 0, total, 1.0)
  return jnp.where(total > 0, jnp.sum(weights * ce) / safe_total, 0.0)


def smooth_l1_loss(x: jax.Array, beta: float) -> jax.Array:
  """Elementwise smooth L1 of residuals `x` (fvcore); plain L1 `|x|` when `beta < 1e-5`."""
  ax = jnp.abs(x)
  if beta < 1e-5:
    return ax
  return jnp.where(ax < beta, 0.5 * x * x / beta, ax - 0.5 * beta)

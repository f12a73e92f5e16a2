"""Greedy non-maximum suppression with a static output size (torchvision `ops.nms` semantics).

Exactly the greedy result: boxes are visited by descending score, ties by lower index, and a
box is kept iff no higher-ranked kept box overlaps it with IoU > `iou_threshold`. Boxes with
`score <= score_threshold` (default -inf, so a -inf score marks padding) are never kept.

Under `jit` the output is `max_output` slots: kept indices in descending score order, then
padding (index 0, `valid` False). The loop runs once per kept box (at most `max_output`
iterations, each O(N)): it takes the best remaining box and drops everything it suppresses,
which is the greedy algorithm without visiting suppressed boxes, and needs no N x N matrix.
"""

from functools import partial

import jax
import jax.numpy as jnp

from segjax.ops.boxes import box_iou

Array = jax.Array


def _greedy_nms(
  boxes: Array,
  scores: Array,
  classes: Array | None,
  iou_threshold,
  max_output: int,
  score_threshold,
) -> tuple[Array, Array]:
  n = boxes.shape[0]
  if n == 0 or max_output == 0:
    return jnp.zeros((max_output,), jnp.int32), jnp.zeros((max_output,), bool)
  # Stable sort of -score: equal scores keep index order, as the greedy invariant requires.
  order = jnp.argsort(-scores, stable=True).astype(jnp.int32)
  sorted_boxes = boxes[order]
  remaining = scores[order] > score_threshold
  sorted_classes = None if classes is None else classes[order]

  def cond(state):
    count, remaining, _ = state
    return (count < max_output) & jnp.any(remaining)

  def body(state):
    count, remaining, keep = state
    best = jnp.argmax(remaining)  # first remaining = highest score left
    iou = box_iou(sorted_boxes[best][None], sorted_boxes)[0]
    suppress = iou > iou_threshold
    if sorted_classes is not None:
      suppress &= sorted_classes == sorted_classes[best]
    remaining = remaining & ~suppress
    remaining = remaining.at[best].set(False)  # an empty box has IoU 0 with itself
    return count + 1, remaining, keep.at[count].set(best.astype(jnp.int32))

  keep = jnp.zeros((max_output,), jnp.int32)
  count, _, keep = jax.lax.while_loop(cond, body, (jnp.int32(0), remaining, keep))
  valid = jnp.arange(max_output) < count
  return jnp.where(valid, order[keep], 0), valid


def nms(
  boxes: Array,
  scores: Array,
  iou_threshold: float,
  max_output: int,
  score_threshold: float = -jnp.inf,
) -> tuple[Array, Array]:
  """Greedy NMS of one set of boxes.

  Args:
    boxes: `(N, 4)` boxes `[x1, y1, x2, y2]`.
    scores: `(N,)` scores; give padded boxes -inf.
    iou_threshold: suppress boxes with IoU strictly above this (may be traced).
    max_output: static number of output slots K.
    score_threshold: only boxes scoring strictly above it are kept (may be traced).

  Returns:
    indices: `(K,)` int32 into `boxes`, kept boxes in descending score order, then 0s.
    valid: `(K,)` bool, True for the kept boxes.
  """
  return _greedy_nms(boxes, scores, None, iou_threshold, max_output, score_threshold)


def batched_nms(
  boxes: Array,
  scores: Array,
  classes: Array,
  iou_threshold: float,
  max_output: int,
  score_threshold: float = -jnp.inf,
) -> tuple[Array, Array]:
  """Class-aware NMS: boxes suppress only boxes of the same class (torchvision `batched_nms`).

  Same as running `nms` per class and merging by score, without torchvision's coordinate
  offset trick, whose large offsets cost float32 precision. `classes` is `(N,)` int.
  Returns `(indices (K,), valid (K,))` as `nms`, in descending score order across classes.
  """
  return _greedy_nms(boxes, scores, classes, iou_threshold, max_output, score_threshold)


def nms_per_image(
  boxes: Array,
  scores: Array,
  iou_threshold: float,
  max_output: int,
  score_threshold: float = -jnp.inf,
  classes: Array | None = None,
) -> tuple[Array, Array]:
  """`nms` for a batch of images: boxes `(B, N, 4)`, scores `(B, N)`.

  With `classes` `(B, N)` it is `batched_nms` per image. Returns `(indices (B, K), valid
  (B, K))`; the loop runs until the slowest image is done.
  """
  if classes is None:
    fn = partial(
      nms, iou_threshold=iou_threshold, max_output=max_output, score_threshold=score_threshold
    )
    return jax.vmap(fn)(boxes, scores)
  fn = partial(
    batched_nms, iou_threshold=iou_threshold, max_output=max_output, score_threshold=score_threshold
  )
  return jax.vmap(fn)(boxes, scores, classes)

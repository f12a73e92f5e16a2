"""Axis-aligned boxes: area, pairwise IoU, clipping and format conversions (detectron2 `Boxes`).

Every box here is `[x1, y1, x2, y2]` in absolute pixels with `x2 >= x1` for a non-empty box,
the convention of detectron2 `structures/boxes.py` and torchvision `ops/boxes.py`; widths are
`x2 - x1` (no legacy "+1"). COCO annotations use `[x, y, w, h]` (`xywh`); box regression and
DETR-style code use centre/size `[cx, cy, w, h]` (`cxcywh`). All functions take any leading
shape `(..., 4)`, are pure and work under `jit` and `vmap`. Padded rows are never removed,
only flagged: callers keep a `valid` mask alongside.
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp

Array = jax.Array
# (height, width) as Python numbers, or a traced array of 2 so it can vary per image under vmap.
ImageSize = Sequence[int] | Array


def box_area(boxes: Array) -> Array:
  """Areas `(...)` of boxes `(..., 4)`; inverted boxes count as empty (area 0)."""
  w = jnp.maximum(boxes[..., 2] - boxes[..., 0], 0.0)
  h = jnp.maximum(boxes[..., 3] - boxes[..., 1], 0.0)
  return w * h


def box_intersection(boxes1: Array, boxes2: Array) -> Array:
  """Pairwise intersection areas `(N, M)` of boxes1 `(N, 4)` and boxes2 `(M, 4)`."""
  lt = jnp.maximum(boxes1[:, None, :2], boxes2[None, :, :2])
  rb = jnp.minimum(boxes1[:, None, 2:], boxes2[None, :, 2:])
  wh = jnp.maximum(rb - lt, 0.0)
  return wh[..., 0] * wh[..., 1]


def box_iou(boxes1: Array, boxes2: Array) -> Array:
  """Pairwise intersection over union `(N, M)` of boxes1 `(N, 4)` and boxes2 `(M, 4)`.

  Pairs that do not overlap (including any pair with an empty box) get IoU 0, never NaN,
  as in detectron2 `pairwise_iou`, so padded rows of zeros are harmless.
  """
  inter = box_intersection(boxes1, boxes2)
  union = box_area(boxes1)[:, None] + box_area(boxes2)[None, :] - inter
  # inter > 0 implies union > 0; the inner where keeps the untaken branch finite for grads.
  return jnp.where(inter > 0, inter / jnp.where(inter > 0, union, 1.0), 0.0)


def clip_boxes(boxes: Array, image_size: ImageSize) -> Array:
  """Clips boxes `(..., 4)` to an image of `image_size = (height, width)`: x in [0, W], y in [0, H].

  A box wholly outside the image becomes empty (zero width or height), not removed.
  """
  h, w = image_size[0], image_size[1]
  x1 = jnp.clip(boxes[..., 0], 0, w)
  y1 = jnp.clip(boxes[..., 1], 0, h)
  x2 = jnp.clip(boxes[..., 2], 0, w)
  y2 = jnp.clip(boxes[..., 3], 0, h)
  return jnp.stack([x1, y1, x2, y2], axis=-1)


def nonempty_boxes(boxes: Array, min_size: float = 0.0) -> Array:
  """Flags `(...)` boxes whose width and height both exceed `min_size` (detectron2 `nonempty`).

  Static-shape stand-in for removing degenerate or small boxes (torchvision
  `remove_small_boxes`): combine it with the `valid` mask instead of dropping rows.
  """
  w = boxes[..., 2] - boxes[..., 0]
  h = boxes[..., 3] - boxes[..., 1]
  return (w > min_size) & (h > min_size)


def xyxy_to_cxcywh(boxes: Array) -> Array:
  """`[x1, y1, x2, y2]` to `[cx, cy, w, h]`, shape `(..., 4)`."""
  x1, y1, x2, y2 = jnp.moveaxis(boxes, -1, 0)
  return jnp.stack([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1], axis=-1)


def cxcywh_to_xyxy(boxes: Array) -> Array:
  """`[cx, cy, w, h]` to `[x1, y1, x2, y2]`, shape `(..., 4)`."""
  cx, cy, w, h = jnp.moveaxis(boxes, -1, 0)
  return jnp.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=-1)


def xyxy_to_xywh(boxes: Array) -> Array:
  """`[x1, y1, x2, y2]` to COCO `[x, y, w, h]` (top-left corner and size), shape `(..., 4)`."""
  return jnp.concatenate([boxes[..., :2], boxes[..., 2:] - boxes[..., :2]], axis=-1)


def xywh_to_xyxy(boxes: Array) -> Array:
  """COCO `[x, y, w, h]` to `[x1, y1, x2, y2]`, shape `(..., 4)`."""
  return jnp.concatenate([boxes[..., :2], boxes[..., :2] + boxes[..., 2:]], axis=-1)

"""Box coder: (dx, dy, dw, dh) regression deltas of R-CNN (Girshick et al. 2014, appendix C).

Follows detectron2 `modeling/box_regression.py` `Box2BoxTransform`, whose numbers torchvision
`BoxCoder` shares: widths are `x2 - x1`, centres `x1 + w / 2`, and

  dx = wx * (gx - ax) / aw      dw = ww * log(gw / aw)
  dy = wy * (gy - ay) / ah      dh = wh * log(gh / ah)

with per-coordinate `weights = (wx, wy, ww, wh)`: (1, 1, 1, 1) for the RPN, (10, 10, 5, 5) for
the Fast R-CNN box head. `decode_boxes` clamps dw and dh at `log(1000 / 16)` before `exp`, so a
wild prediction cannot overflow.
"""

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp

Array = jax.Array

RPN_WEIGHTS = (1.0, 1.0, 1.0, 1.0)
BOX_HEAD_WEIGHTS = (10.0, 10.0, 5.0, 5.0)
SCALE_CLAMP = math.log(1000.0 / 16)

# Keeps padded (all-zero) boxes finite: log(0) would give -inf deltas and NaN gradients later,
# even when a mask multiplies them out. Real boxes are far larger than this.
_MIN_SIZE = 1e-6


def _centre_size(boxes: Array):
  w = boxes[..., 2] - boxes[..., 0]
  h = boxes[..., 3] - boxes[..., 1]
  return boxes[..., 0] + 0.5 * w, boxes[..., 1] + 0.5 * h, w, h


def encode_boxes(gt_boxes: Array, anchors: Array, weights: Sequence[float] = RPN_WEIGHTS) -> Array:
  """Regression targets `(..., 4)` that turn `anchors` into `gt_boxes` (both `(..., 4)`).

  Shapes broadcast, so `(N, 4)` against `(N, 4)` or `(B, N, 4)` against `(N, 4)` both work.
  Empty boxes (padding) give finite but meaningless deltas; mask them out.
  """
  wx, wy, ww, wh = weights
  ax, ay, aw, ah = _centre_size(anchors)
  gx, gy, gw, gh = _centre_size(gt_boxes)
  aw, ah = jnp.maximum(aw, _MIN_SIZE), jnp.maximum(ah, _MIN_SIZE)
  gw, gh = jnp.maximum(gw, _MIN_SIZE), jnp.maximum(gh, _MIN_SIZE)
  return jnp.stack(
    [
      wx * (gx - ax) / aw,
      wy * (gy - ay) / ah,
      ww * jnp.log(gw / aw),
      wh * jnp.log(gh / ah),
    ],
    axis=-1,
  )


def decode_boxes(
  deltas: Array,
  anchors: Array,
  weights: Sequence[float] = RPN_WEIGHTS,
  scale_clamp: float = SCALE_CLAMP,
) -> Array:
  """Boxes `(..., 4)` from `deltas` `(..., 4)` applied to `anchors` `(..., 4)`; inverse of encode.

  For class-specific deltas `(N, K * 4)` reshape to `(N, K, 4)` and pass `anchors[:, None]`.
  """
  wx, wy, ww, wh = weights
  ax, ay, aw, ah = _centre_size(anchors)
  dx = deltas[..., 0] / wx
  dy = deltas[..., 1] / wy
  dw = jnp.minimum(deltas[..., 2] / ww, scale_clamp)
  dh = jnp.minimum(deltas[..., 3] / wh, scale_clamp)
  cx = dx * aw + ax
  cy = dy * ah + ay
  w = jnp.exp(dw) * aw
  h = jnp.exp(dh) * ah
  return jnp.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], axis=-1)

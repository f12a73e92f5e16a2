"""Tests for segjax/ops/box_coder.py: the R-CNN delta formulas and their round trip."""

import math

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from segjax.ops import box_coder as C


def encode_ref(gt, anchors, weights):
  wx, wy, ww, wh = weights
  aw, ah = anchors[:, 2] - anchors[:, 0], anchors[:, 3] - anchors[:, 1]
  ax, ay = anchors[:, 0] + 0.5 * aw, anchors[:, 1] + 0.5 * ah
  gw, gh = gt[:, 2] - gt[:, 0], gt[:, 3] - gt[:, 1]
  gx, gy = gt[:, 0] + 0.5 * gw, gt[:, 1] + 0.5 * gh
  return np.stack(
    [wx * (gx - ax) / aw, wy * (gy - ay) / ah, ww * np.log(gw / aw), wh * np.log(gh / ah)], 1
  )


def decode_ref(d, anchors, weights, clamp=math.log(1000 / 16)):
  wx, wy, ww, wh = weights
  aw, ah = anchors[:, 2] - anchors[:, 0], anchors[:, 3] - anchors[:, 1]
  ax, ay = anchors[:, 0] + 0.5 * aw, anchors[:, 1] + 0.5 * ah
  cx, cy = d[:, 0] / wx * aw + ax, d[:, 1] / wy * ah + ay
  w = np.exp(np.minimum(d[:, 2] / ww, clamp)) * aw
  h = np.exp(np.minimum(d[:, 3] / wh, clamp)) * ah
  return np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], 1)


def boxes_from(a):
  """(N, 4) of [x, y, w, h] draws to positive-size xyxy boxes."""
  return np.concatenate([a[:, :2], a[:, :2] + a[:, 2:]], 1)


_encode = jax.jit(C.encode_boxes, static_argnames="weights")
_decode = jax.jit(C.decode_boxes, static_argnames="weights")
_WEIGHTS = [C.RPN_WEIGHTS, C.BOX_HEAD_WEIGHTS]


def test_encode_decode_match_reference():
  rng = np.random.default_rng(0)
  anchors = boxes_from(
    np.concatenate([rng.uniform(-20, 500, (9, 2)), rng.uniform(1, 300, (9, 2))], 1)
  ).astype(np.float32)
  gt = boxes_from(
    np.concatenate([rng.uniform(-20, 500, (9, 2)), rng.uniform(1, 300, (9, 2))], 1)
  ).astype(np.float32)
  for w in _WEIGHTS:
    np.testing.assert_allclose(
      _encode(gt, anchors, weights=w), encode_ref(gt, anchors, w), rtol=1e-4, atol=1e-4
    )
    d = rng.normal(0, 2, (9, 4)).astype(np.float32)
    np.testing.assert_allclose(
      _decode(d, anchors, weights=w), decode_ref(d, anchors, w), rtol=1e-4, atol=1e-3
    )


def test_decode_clamps_scale():
  anchors = np.array([[0.0, 0, 16, 16]], np.float32)
  out = np.asarray(
    _decode(np.array([[0, 0, 50.0, 50.0]], np.float32), anchors, weights=C.RPN_WEIGHTS)
  )
  np.testing.assert_allclose(out, [[8 - 500, 8 - 500, 8 + 500, 8 + 500]], rtol=1e-5)
  assert np.isfinite(
    np.asarray(_decode(np.full((1, 4), 1e4, np.float32), anchors, weights=C.BOX_HEAD_WEIGHTS))
  ).all()


@settings(max_examples=40, deadline=None)
@given(
  hnp.arrays(np.float32, (8, 4), elements=st.floats(0.5, 400, width=32)),
  hnp.arrays(np.float32, (8, 4), elements=st.floats(0.5, 400, width=32)),
  st.sampled_from(_WEIGHTS),
)
def test_round_trip(gt, anchors, weights):
  gt, anchors = boxes_from(gt), boxes_from(anchors)
  # Keep the size ratio inside the decode clamp (exp(clamp) = 62.5), where decode inverts.
  ratio = (gt[:, 2:] - gt[:, :2]) / (anchors[:, 2:] - anchors[:, :2])
  if np.any(ratio > 60):
    return
  back = _decode(_encode(gt, anchors, weights=weights), anchors, weights=weights)
  np.testing.assert_allclose(back, gt, rtol=1e-4, atol=2e-3)


def test_padding_is_finite_and_broadcasting():
  zeros = jnp.zeros((3, 4))
  assert np.isfinite(np.asarray(C.encode_boxes(zeros, zeros))).all()
  anchors = jnp.array([[0.0, 0, 10, 10], [5, 5, 25, 15]])
  gt = jnp.stack([anchors + 1, anchors * 2])  # (2, N, 4) against (N, 4)
  out = jax.vmap(C.encode_boxes, in_axes=(0, None))(gt, anchors)
  np.testing.assert_allclose(out, C.encode_boxes(gt, anchors), rtol=1e-6)
  # Class-specific deltas (N, K, 4) against anchors (N, 1, 4).
  d = jnp.zeros((2, 3, 4))
  np.testing.assert_allclose(
    C.decode_boxes(d, anchors[:, None]), jnp.broadcast_to(anchors[:, None], (2, 3, 4)), atol=1e-5
  )

"""Tests for segjax/ops/boxes.py against plain NumPy box formulas."""

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from segjax.ops import boxes as B


def iou_ref(a, b):
  """Textbook IoU, pair by pair; 0 when the boxes do not overlap."""
  out = np.zeros((len(a), len(b)))
  for i, p in enumerate(a):
    for j, q in enumerate(b):
      iw = min(p[2], q[2]) - max(p[0], q[0])
      ih = min(p[3], q[3]) - max(p[1], q[1])
      if iw <= 0 or ih <= 0:
        continue
      inter = iw * ih
      area = lambda r: max(r[2] - r[0], 0) * max(r[3] - r[1], 0)
      out[i, j] = inter / (area(p) + area(q) - inter)
  return out


def random_boxes(rng, n, size=100.0):
  xy = rng.uniform(-10, size, (n, 2))
  wh = rng.uniform(0, size / 2, (n, 2))
  return np.concatenate([xy, xy + wh], 1).astype(np.float32)


_iou = jax.jit(B.box_iou)

# Boxes from corners sorted per axis, so x2 >= x1; widths down to 0 included. No subnormal
# coordinates: the CPU flushes them (and sides or overlaps made of them) to zero.
_coords = st.floats(-50, 150, width=32, allow_nan=False, allow_subnormal=False)
_box_arrays = hnp.arrays(np.float32, (6, 4), elements=_coords).map(
  lambda a: np.concatenate([np.minimum(a[:, :2], a[:, 2:]), np.maximum(a[:, :2], a[:, 2:])], 1)
)


def test_iou_matches_reference_with_edge_cases():
  a = np.array(
    [
      [0, 0, 10, 10],
      [5, 5, 15, 15],
      [20, 20, 20, 30],  # zero width
      [0, 0, 0, 0],  # padding
      [-5, -5, 5, 5],  # partly outside an image
    ],
    np.float32,
  )
  b = np.concatenate([a, random_boxes(np.random.default_rng(0), 5)])
  got = np.asarray(_iou(a, b))
  np.testing.assert_allclose(got, iou_ref(a, b), rtol=1e-6, atol=1e-7)
  assert got[0, 1] == pytest.approx(25 / 175)
  assert np.all(got[2:4] == 0) and np.isfinite(got).all()


@settings(max_examples=40, deadline=None)
@given(_box_arrays, _box_arrays)
def test_iou_properties(a, b):
  got = np.asarray(_iou(a, b))
  np.testing.assert_allclose(got, iou_ref(a, b), rtol=1e-4, atol=1e-5)
  assert np.all((got >= 0) & (got <= 1 + 1e-6))
  np.testing.assert_allclose(np.asarray(_iou(b, a)), got.T, rtol=1e-6)
  self_iou = np.diag(np.asarray(_iou(a, a)))
  width, height = a[:, 2] - a[:, 0], a[:, 3] - a[:, 1]
  # Sides below float32's normal range (1.2e-38) flush to zero on CPU: skip those.
  nonempty = (width > 1e-6) & (height > 1e-6)
  np.testing.assert_allclose(self_iou[nonempty], 1.0, rtol=1e-5)
  assert np.all(self_iou[(width <= 0) | (height <= 0)] == 0)


def test_iou_gradient_is_finite_for_padding():
  a = jnp.array([[0.0, 0, 0, 0], [0, 0, 4, 4]])
  g = jax.grad(lambda x: B.box_iou(x, x).sum())(a)
  assert np.isfinite(np.asarray(g)).all()


def test_area_and_intersection():
  a = np.array([[0, 0, 4, 3], [2, 2, 1, 5], [1, 1, 1, 1]], np.float32)
  np.testing.assert_allclose(B.box_area(a), [12, 0, 0])
  np.testing.assert_allclose(B.box_intersection(a[:1], a[:1]), [[12]])


def test_clip_boxes_and_nonempty():
  boxes = np.array([[-5, -5, 30, 10], [50, 50, 60, 60], [3, 4, 8, 9]], np.float32)
  clipped = np.asarray(B.clip_boxes(boxes, (20, 40)))  # H=20, W=40
  np.testing.assert_allclose(clipped, [[0, 0, 30, 10], [40, 20, 40, 20], [3, 4, 8, 9]])
  np.testing.assert_array_equal(B.nonempty_boxes(clipped), [True, False, True])
  np.testing.assert_array_equal(B.nonempty_boxes(clipped, min_size=5.0), [True, False, False])
  # Per-image sizes under vmap: image_size may be traced.
  sizes = jnp.array([[20, 40], [100, 100]])
  out = jax.jit(jax.vmap(B.clip_boxes))(jnp.stack([boxes, boxes]), sizes)
  np.testing.assert_allclose(out[0], clipped)
  np.testing.assert_allclose(out[1], [[0, 0, 30, 10], [50, 50, 60, 60], [3, 4, 8, 9]])


def test_conversions_round_trip():
  boxes = random_boxes(np.random.default_rng(1), 7)
  np.testing.assert_allclose(B.xyxy_to_xywh(boxes)[:, 2:], boxes[:, 2:] - boxes[:, :2])
  np.testing.assert_allclose(B.xywh_to_xyxy(B.xyxy_to_xywh(boxes)), boxes, atol=1e-4)
  c = np.asarray(B.xyxy_to_cxcywh(boxes))
  np.testing.assert_allclose(c[:, 0], (boxes[:, 0] + boxes[:, 2]) / 2, rtol=1e-6)
  np.testing.assert_allclose(B.cxcywh_to_xyxy(c), boxes, atol=1e-4)
  np.testing.assert_allclose(B.xywh_to_xyxy(np.array([[1.0, 2, 3, 4]])), [[1, 2, 4, 6]])


def test_vmap_over_images():
  rng = np.random.default_rng(2)
  a = np.stack([random_boxes(rng, 4) for _ in range(3)])
  b = np.stack([random_boxes(rng, 5) for _ in range(3)])
  got = jax.jit(jax.vmap(B.box_iou))(a, b)
  for i in range(3):
    np.testing.assert_allclose(got[i], iou_ref(a[i], b[i]), rtol=1e-5, atol=1e-6)

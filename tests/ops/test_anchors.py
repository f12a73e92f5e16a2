"""Tests for segjax/ops/anchors.py: detectron2 DefaultAnchorGenerator numbers."""

import numpy as np

from segjax.ops import anchors as A


def test_matches_detectron2_golden():
  # detectron2 tests/modeling/test_anchor_generator.py::test_default_anchor_generator:
  # sizes (32, 64), aspect ratios (0.25, 1, 4), stride 4, a 1 x 2 feature map.
  (got,) = A.multilevel_anchors([(1, 2)], strides=[4], sizes=[(32, 64)], aspect_ratios=(0.25, 1, 4))
  expected = [
    [-32.0, -8.0, 32.0, 8.0],
    [-16.0, -16.0, 16.0, 16.0],
    [-8.0, -32.0, 8.0, 32.0],
    [-64.0, -16.0, 64.0, 16.0],
    [-32.0, -32.0, 32.0, 32.0],
    [-16.0, -64.0, 16.0, 64.0],
    [-28.0, -8.0, 36.0, 8.0],
    [-12.0, -16.0, 20.0, 16.0],
    [-4.0, -32.0, 12.0, 32.0],
    [-60.0, -16.0, 68.0, 16.0],
    [-28.0, -32.0, 36.0, 32.0],
    [-12.0, -64.0, 20.0, 64.0],
  ]
  np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_cell_anchor_formula_and_order():
  cells = A.cell_anchors((32, 64), (0.5, 1.0, 2.0))
  for k, (s, r) in enumerate([(s, r) for s in (32, 64) for r in (0.5, 1.0, 2.0)]):
    w, h = cells[k, 2] - cells[k, 0], cells[k, 3] - cells[k, 1]
    np.testing.assert_allclose([w * h, h / w], [s * s, r], rtol=1e-5)
    np.testing.assert_allclose(cells[k, :2], -cells[k, 2:])  # centred on the origin


def test_grid_order_and_offset():
  cells = A.cell_anchors((16,), (0.5, 1.0, 2.0))
  grid = A.grid_anchors((2, 3), 8, cells, offset=0.5).reshape(2, 3, 3, 4)
  centres = (grid[..., :2] + grid[..., 2:]) / 2
  for i in range(2):
    for j in range(3):
      np.testing.assert_allclose(centres[i, j], [[(j + 0.5) * 8, (i + 0.5) * 8]] * 3)
  np.testing.assert_allclose(grid[1, 2] - grid[0, 0], [[16, 8, 16, 8]] * 3, rtol=1e-5)


def test_fpn_counts_are_static():
  sizes = A.feature_grid_sizes((800, 1333))
  assert sizes == ((200, 334), (100, 167), (50, 84), (25, 42), (13, 21))
  levels = A.multilevel_anchors(sizes)
  assert [len(a) for a in levels] == [h * w * 3 for h, w in sizes]
  assert A.image_anchors((800, 1333)).shape == (A.num_anchors((800, 1333)), 4) == (267069, 4)
  # Level l has anchors of size 32 * 2**(l - 2), centred on the stride grid from (0, 0).
  for lvl, (a, s) in enumerate(zip(levels, A.FPN_STRIDES)):
    side = np.sqrt((a[:3, 2] - a[:3, 0]) * (a[:3, 3] - a[:3, 1]))
    np.testing.assert_allclose(side, 32 * 2**lvl, rtol=1e-5)
    np.testing.assert_allclose((a[3, :2] + a[3, 2:]) / 2, [s, 0], atol=1e-4)

"""Tests for segjax/ops/masks.py `mask_targets_from_crops`: targets from masks cropped to their
boxes on the host (segjax/data/instance_ops.py `crop_and_resize_masks`) against `mask_targets`
from the full masks, the previous and reference implementation."""

import functools

import jax
import numpy as np

from segjax import ops
from segjax.data import instance_ops

H, W, G, R, M = 96, 128, 6, 64, 28


def random_image(rng):
  """G ellipse or rectangle masks with their tight boxes (the first touching the left border,
  the second the bottom one), and R ROIs matched to them: jittered boxes, many partly
  outside their ground truth's box, every 16th one tiny."""
  masks = np.zeros((G, H, W), np.uint8)
  boxes = np.zeros((G, 4), np.float32)
  yy, xx = np.mgrid[:H, :W] + 0.5
  for k in range(G):
    bw, bh = rng.integers(2, (W // 2, H // 2))
    x1 = 0 if k == 0 else rng.integers(0, W - bw + 1)
    y1 = H - bh if k == 1 else rng.integers(0, H - bh + 1)
    if rng.uniform() < 0.5:
      masks[k, y1 : y1 + bh, x1 : x1 + bw] = 1
    else:
      ellipse = ((xx - x1 - bw / 2) / (bw / 2)) ** 2 + ((yy - y1 - bh / 2) / (bh / 2)) ** 2
      masks[k] = ellipse <= 1
    ys, xs = np.nonzero(masks[k])
    boxes[k] = [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
  index = rng.integers(0, G, R).astype(np.int32)
  gt = boxes[index]
  size = gt[:, 2:] - gt[:, :2]
  centre = (gt[:, :2] + gt[:, 2:]) / 2 + rng.normal(size=(R, 2)) * size * 0.25
  half = size * np.exp(rng.normal(size=(R, 2)) * 0.4) / 2
  rois = np.concatenate([centre - half, centre + half], 1)
  rois[::16, 2:] = rois[::16, :2] + rng.uniform(0.3, 3, (len(rois[::16]), 2))
  return masks, boxes, index, rois.astype(np.float32)


def random_squares(rng, side):
  """Random-pixel masks, square integer boxes of `side`, and ROIs between their boxes' first
  and last pixel centres."""
  masks = (rng.uniform(size=(G, H, W)) < 0.5).astype(np.uint8)
  corner = np.stack([rng.integers(0, W - side, G), rng.integers(0, H - side, G)], 1)
  boxes = np.concatenate([corner, corner + side], 1).astype(np.float32)
  index = rng.integers(0, G, R).astype(np.int32)
  ends = np.sort(rng.uniform(0.5, side - 0.5, (R, 2, 2)), axis=1)  # (R, start/end, x/y)
  rois = ends.reshape(R, 4) + np.tile(boxes[index, :2], 2)
  return masks, boxes, index, rois.astype(np.float32)


@functools.cache
def targets_fn(threshold):
  full = jax.jit(lambda m, i, r: ops.mask_targets(m, i, r, M, threshold))
  crop = jax.jit(lambda c, b, i, r: ops.mask_targets_from_crops(c, b, i, r, M, threshold))
  return full, crop


def both_targets(masks, boxes, index, rois, size, threshold=0.5):
  full, crop = targets_fn(threshold)
  crops = instance_ops.crop_and_resize_masks(masks, boxes, size).numpy()
  return np.asarray(full(masks, index, rois)), np.asarray(crop(crops, boxes, index, rois))


def inside(rois, boxes, index):
  gt = boxes[index]
  return np.all(rois[:, :2] >= gt[:, :2] + 1, 1) & np.all(rois[:, 2:] <= gt[:, 2:] - 1, 1)


def test_targets_from_crops_agree_with_full_masks():
  agreement, interior = {}, {}
  for size in (112, 256):
    rng = np.random.default_rng(0)
    same, same_inside = [], []
    for _ in range(10):
      masks, boxes, index, rois = random_image(rng)
      full, crop = both_targets(masks, boxes, index, rois, size)
      same.append((full == crop).reshape(-1))
      same_inside.append((full == crop)[inside(rois, boxes, index)].reshape(-1))
    agreement[size] = np.concatenate(same).mean()
    interior[size] = np.concatenate(same_inside).mean()
  # Measured: 99.44 % (S = 112) and 99.34 % (256) of the target pixels; 99.98 % for both on
  # ROIs inside their box. Not higher at 256: the targets differ where ROI bins straddle a
  # box edge, where the full mask's bilinear taper runs half a pixel past the box and the
  # crop stops half a (smaller) cell past it. 28: 98.4 %, 56: 99.3 %.
  assert agreement[112] >= 0.992 and agreement[256] >= 0.99, agreement
  assert min(interior.values()) >= 0.999, interior


def test_crops_at_multiples_of_integer_boxes_agree_more():
  # S = the boxes' integer side: crop cells are the box's pixels, so for ROIs between the
  # box's first and last pixel centres the soft targets are mask_targets', to rounding. At an
  # odd multiple the crop's bilinear interpolant still is the mask's there; only the sample
  # counts per bin differ. Measured on random-pixel masks: 100 %, 99.89 % at 3 x 24, 99.64 %
  # at 112 (not a multiple), 95.25 % at 33.
  rng = np.random.default_rng(1)
  masks, boxes, index, rois = random_squares(rng, 24)
  full, crop = both_targets(masks, boxes, index, rois, 24, threshold=None)
  np.testing.assert_allclose(crop, full, atol=1e-5)
  agreement = {}
  for size in (24, 72, 112, 33):
    full, crop = both_targets(masks, boxes, index, rois, size)
    agreement[size] = np.mean(full == crop)
  assert agreement[24] == 1.0, agreement
  assert agreement[72] >= 0.998 and agreement[72] > agreement[112] > agreement[33], agreement


def test_targets_from_crops_of_padding_and_empty_images():
  crops = np.ones((3, 8, 8), np.float32)
  boxes = np.array([[4, 4, 12, 12], [0, 0, 0, 0], [2, 2, 30, 20]], np.float32)
  rois = np.array([[4, 4, 12, 12], [0, 0, 5, 5], [100, 100, 110, 110]], np.float32)
  targets = jax.jit(ops.mask_targets_from_crops, static_argnums=4)
  out = np.asarray(targets(crops, boxes, np.array([0, 1, 2]), rois, 7))
  assert out.shape == (3, 7, 7) and np.isfinite(out).all()
  np.testing.assert_array_equal(out[0], 1.0)  # The ROI is the box: all of the crop.
  np.testing.assert_array_equal(out[1:], 0.0)  # An empty box; a ROI outside its box.
  empty = ops.mask_targets_from_crops(np.zeros((0, 8, 8)), np.zeros((0, 4)), np.zeros(3), rois)
  assert empty.shape == (3, 28, 28)
  # vmapped over images, as ROIHeads.losses calls it.
  batched = jax.vmap(lambda c, b, i, r: ops.mask_targets_from_crops(c, b, i, r, 7))(
    np.stack([crops, crops]),
    np.stack([boxes, boxes]),
    np.zeros((2, 3), np.int32),
    np.stack([rois, rois]),
  )
  assert batched.shape == (2, 3, 7, 7)

"""Tests for segjax/ops/masks.py: detectron2 mask targets and mask pasting."""

import math

import jax
import jax.numpy as jnp
import numpy as np

from segjax.ops import masks as K
from tests.ops.test_roi_align import roi_align_ref


def grid_sample_ref(mask, gx, gy):
  """torch grid_sample(bilinear, zeros padding, align_corners=False) at one normalized point."""
  m_h, m_w = mask.shape
  ix = ((gx + 1) * m_w - 1) / 2
  iy = ((gy + 1) * m_h - 1) / 2
  x0, y0 = math.floor(ix), math.floor(iy)
  out = 0.0
  for yy, wy in ((y0, 1 - (iy - y0)), (y0 + 1, iy - y0)):
    for xx, wx in ((x0, 1 - (ix - x0)), (x0 + 1, ix - x0)):
      if 0 <= yy < m_h and 0 <= xx < m_w:
        out += wy * wx * mask[yy, xx]
  return out


def paste_ref(masks, boxes, h, w):
  """detectron2 _do_paste_mask evaluated at every pixel; (N, H, W) probabilities."""
  out = np.zeros((len(masks), h, w))
  for n, (mask, (x0, y0, x1, y1)) in enumerate(zip(masks, boxes.astype(np.float64))):
    if x1 <= x0 or y1 <= y0:
      continue
    for py in range(h):
      gy = (py + 0.5 - y0) / (y1 - y0) * 2 - 1
      for px in range(w):
        gx = (px + 0.5 - x0) / (x1 - x0) * 2 - 1
        out[n, py, px] = grid_sample_ref(mask, gx, gy)
  return out


def assert_thresholded_equal(got, ref_probs, threshold=0.5):
  """Binary outputs agree wherever the reference is not within rounding of the threshold."""
  clear = np.abs(ref_probs - threshold) > 1e-4
  np.testing.assert_array_equal(np.asarray(got)[clear], (ref_probs >= threshold)[clear])


RNG = np.random.default_rng(0)
GT = np.zeros((3, 30, 40), bool)
GT[0, 5:20, 8:30] = True
GT[1, 10:28, 2:12] = True
GT[1, 12:15, 5:9] = False  # a hole
GT[2] = RNG.uniform(size=(30, 40)) < 0.5
ROIS = np.array(
  [
    [6, 4, 32, 22],
    [0, 8, 15, 30],
    [-5, -5, 45, 35],
    [10, 10, 10.3, 10.2],
    [20, 3, 60, 25],
    [0, 0, 0, 0],
  ],
  np.float32,
)
MATCHED = np.array([0, 1, 2, 0, 0, 1], np.int32)


def targets_ref(rois, matched, m):
  return np.stack(
    [
      roi_align_ref(GT[g].astype(np.float64)[..., None], rois[i : i + 1], (m, m), 1.0, 0, True)[
        0, ..., 0
      ]
      for i, g in enumerate(matched)
    ]
  )


def test_mask_targets_match_crop_and_resize():
  run = jax.jit(K.mask_targets, static_argnames=("mask_size", "threshold"))
  ref = targets_ref(ROIS, MATCHED, 7)
  soft = run(GT, MATCHED, ROIS, mask_size=7, threshold=None)
  np.testing.assert_allclose(soft, ref, atol=1e-5)
  hard = run(GT, MATCHED, ROIS, mask_size=7)
  assert hard.dtype == jnp.float32 and set(np.unique(np.asarray(hard))) <= {0.0, 1.0}
  assert_thresholded_equal(hard, ref)
  np.testing.assert_array_equal(hard[5], 0)  # padding ROI
  # Batch of images with padded ground truth, and an image without any.
  batched = jax.vmap(lambda g, i, b: K.mask_targets(g, i, b, 7))(
    np.stack([GT, GT[::-1]]), np.stack([MATCHED, 2 - MATCHED]), np.stack([ROIS, ROIS])
  )
  np.testing.assert_array_equal(batched[0], batched[1])
  assert K.mask_targets(np.zeros((0, 30, 40), bool), MATCHED, ROIS).shape == (6, 28, 28)


def test_paste_masks_match_grid_sample():
  masks = RNG.uniform(size=(5, 6, 6)).astype(np.float32)
  masks[0] = 1.0  # a full mask: the pasted region is the box, borders interpolated
  boxes = np.array(
    [[4.3, 2.7, 15.2, 11.1], [-6, -3, 9, 8], [18, 10, 30, 20], [5, 5, 5, 9], [10, 4, 10.5, 4.4]],
    np.float32,
  )  # outside on the right/bottom; empty; tiny
  probs = np.asarray(jax.jit(K.paste_mask_probs, static_argnums=2)(masks, boxes, (14, 22)))
  ref = paste_ref(masks, boxes, 14, 22)
  np.testing.assert_allclose(probs, ref, atol=1e-5)
  pasted = jax.jit(K.paste_masks, static_argnums=2)(masks, boxes, (14, 22))
  assert pasted.shape == (5, 14, 22) and pasted.dtype == jnp.bool_
  assert_thresholded_equal(pasted, ref)
  assert not np.asarray(pasted[3]).any()  # empty box
  inside = np.zeros((14, 22), bool)
  inside[3:11, 5:15] = True  # pixel centres well inside box 0
  assert np.asarray(pasted[0])[inside].all() and not np.asarray(pasted[0])[:, 17:].any()


def test_paste_masks_vmap_over_images():
  masks = RNG.uniform(size=(2, 3, 6, 6)).astype(np.float32)
  boxes = np.array([[[1, 1, 9, 7], [0, 0, 4, 4], [3, 2, 12, 10]]] * 2, np.float32)
  boxes[1] += 2
  fn = jax.jit(jax.vmap(lambda m, b: K.paste_masks(m, b, (12, 14))))
  got = fn(masks, boxes)
  for i in range(2):
    np.testing.assert_array_equal(got[i], K.paste_masks(masks[i], boxes[i], (12, 14)))

"""Tests for segjax/ops/matcher.py against a NumPy port of detectron2's Matcher."""

import jax
import jax.numpy as jnp
import numpy as np

from segjax.ops import matcher as M

RPN = dict(thresholds=(0.3, 0.7), labels=(0, -1, 1), allow_low_quality_matches=True)
ROI = dict(thresholds=(0.5,), labels=(0, 1), allow_low_quality_matches=False)


def match_ref(quality, valid, thresholds, labels, allow_low_quality_matches):
  """detectron2 Matcher.__call__ on the valid rows; low-quality matches skip best IoU 0."""
  q = quality[valid]
  n = quality.shape[1]
  if len(q) == 0:
    return np.zeros(n, np.int64), np.full(n, labels[0])
  rows = np.flatnonzero(valid)
  vals, matches = q.max(0), rows[q.argmax(0)]
  out = np.zeros(n, np.int64)
  bounds = [-np.inf, *thresholds, np.inf]
  for lab, lo, hi in zip(labels, bounds[:-1], bounds[1:]):
    out[(vals >= lo) & (vals < hi)] = lab
  if allow_low_quality_matches:
    best = q.max(1)
    for g in range(len(q)):
      if best[g] > 0:
        out[q[g] == best[g]] = 1
  return matches, out


_match = jax.jit(
  M.match_by_quality, static_argnames=("thresholds", "labels", "allow_low_quality_matches")
)


def test_matches_reference_on_random_iou():
  rng = np.random.default_rng(0)
  for _ in range(6):
    q = rng.uniform(0, 1, (5, 40)).astype(np.float32) ** 2
    q[rng.uniform(size=q.shape) < 0.3] = 0
    q[:, 3] = 0.7  # exactly on a threshold: foreground
    q[:, 4] = 0.3  # exactly on the lower one: ignored
    valid = rng.uniform(size=5) < 0.8
    for cfg in (RPN, ROI):
      idx, lab = _match(q, valid, **cfg)
      ref_idx, ref_lab = match_ref(q, valid, **cfg)
      np.testing.assert_array_equal(lab, ref_lab)
      fg = ref_lab == 1
      np.testing.assert_array_equal(np.asarray(idx)[fg], ref_idx[fg])
      assert idx.dtype == jnp.int32 and lab.dtype == jnp.int32


def test_boundaries_and_low_quality_ties():
  q = np.array(
    [
      [0.1, 0.2, 0.2, 0.7, 0.0],  # gt 0: best 0.7, unique
      [0.25, 0.0, 0.0, 0.0, 0.0],  # gt 1: best 0.25 below bg threshold: anchor 0 promoted
      [0.0, 0.2, 0.2, 0.0, 0.3],  # gt 2: best 0.3 at anchor 4, exactly the bg threshold
    ],
    np.float32,
  )
  idx, lab = _match(q, None, **RPN)
  np.testing.assert_array_equal(lab, [1, 0, 0, 1, 1])
  np.testing.assert_array_equal(idx, [1, 0, 0, 0, 2])  # argmax, ties to the first gt
  q2 = np.array([[0.2, 0.2, 0.1]], np.float32)  # ties: both best anchors become foreground
  np.testing.assert_array_equal(_match(q2, None, **RPN)[1], [1, 1, 0])


def test_no_ground_truth_and_padding():
  q = np.random.default_rng(1).uniform(size=(4, 9)).astype(np.float32)
  for cfg in (RPN, ROI):
    idx, lab = _match(q, np.zeros(4, bool), **cfg)
    np.testing.assert_array_equal(lab, 0)
    np.testing.assert_array_equal(idx, 0)
    idx, lab = M.match_by_quality(jnp.zeros((0, 9)), **cfg)  # statically empty
    assert lab.shape == (9,) and np.all(np.asarray(lab) == 0)
  # A padded row of high IoU must not win.
  q = np.array([[0.9, 0.9], [0.6, 0.1]], np.float32)
  idx, lab = _match(q, np.array([False, True]), **ROI)
  np.testing.assert_array_equal(idx, [1, 1])
  np.testing.assert_array_equal(lab, [1, 0])


def test_zero_iou_ground_truth_adds_no_matches():
  # A ground truth overlapping nothing (e.g. zero area) must not make every anchor foreground.
  q = np.array([[0.0, 0.0, 0.0], [0.0, 0.8, 0.1]], np.float32)
  np.testing.assert_array_equal(_match(q, None, **RPN)[1], [0, 1, 0])


def test_match_boxes_vmaps_over_images():
  gt = jnp.array([[[0.0, 0, 10, 10], [20, 20, 30, 30]], [[0, 0, 1, 1], [0, 0, 0, 0]]])
  valid = jnp.array([[True, True], [True, False]])
  anchors = jnp.array([[0.0, 0, 10, 10], [1, 1, 11, 11], [20, 21, 30, 31], [50, 50, 60, 60]])
  fn = jax.jit(jax.vmap(lambda g, v: M.match_boxes(g, anchors, v, **RPN)))
  idx, lab = fn(gt, valid)
  np.testing.assert_array_equal(lab[0], [1, -1, 1, 0])  # IoU 81/119 is in the ignored band
  np.testing.assert_array_equal(idx[0, [0, 2]], [0, 1])
  np.testing.assert_array_equal(lab[1], [1, 0, 0, 0])  # only its best anchor: low quality

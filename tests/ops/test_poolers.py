"""Tests for segjax/ops/poolers.py: FPN level assignment and multi-level ROIAlign."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from segjax.ops import poolers as P
from tests.ops.test_roi_align import roi_align_ref


def level_ref(boxes, lo=2, hi=5, canonical=224.0, level0=4):
  """FPN paper Eq. 1 as detectron2 writes it."""
  size = np.sqrt(np.prod(np.clip(boxes[:, 2:] - boxes[:, :2], 0, None), 1))
  return np.clip(np.floor(level0 + np.log2(size / canonical + 1e-8)), lo, hi).astype(int)


def square(side, x=0.0, y=0.0):
  return [x, y, x + side, y + side]


def test_assign_boxes_to_levels():
  boxes = np.array([square(s) for s in (0, 10, 111, 112, 223, 224, 447, 448, 2000)], np.float32)
  got = np.asarray(jax.jit(P.assign_boxes_to_levels)(boxes))
  np.testing.assert_array_equal(got, [2, 2, 2, 3, 3, 4, 4, 5, 5])
  np.testing.assert_array_equal(got, level_ref(boxes))


RNG = np.random.default_rng(0)
# An image of 64 x 96 pixels: P2..P5 of 16 x 24 .. 2 x 3, two channels.
MAPS = [RNG.normal(size=(64 // 2**l, 96 // 2**l, 2)).astype(np.float32) for l in range(2, 6)]
# canonical_box_size 32 puts sides < 16 on P2, [16, 32) on P3, [32, 64) on P4, >= 64 on P5.
BOXES = np.array(
  [
    square(6, 3, 4),
    square(20, 30, 10),
    [40, 8, 90, 50],
    square(80, -8, -4),
    square(12, 80, 50),
    [0, 0, 0, 0],
  ],
  np.float32,
)


def pooled_ref(boxes, output_size, sampling_ratio):
  levels = level_ref(boxes, canonical=32.0)
  return np.concatenate(
    [
      roi_align_ref(MAPS[l - 2], boxes[i : i + 1], output_size, 2.0**-l, sampling_ratio, True)
      for i, l in enumerate(levels)
    ]
  )


def test_matches_per_level_roi_align():
  assert sorted(set(level_ref(BOXES, canonical=32.0))) == [2, 3, 4, 5]
  run = jax.jit(
    P.multilevel_roi_align,
    static_argnums=(2, 3),
    static_argnames=("canonical_box_size", "max_sampling_ratio"),
  )
  for sr in (0, 2):
    got = run(MAPS, BOXES, (3, 2), sr, canonical_box_size=32.0, max_sampling_ratio=8)
    np.testing.assert_allclose(got, pooled_ref(BOXES, (3, 2), sr), rtol=1e-5, atol=1e-5)
  as_dict = run(
    {f"p{l}": m for l, m in zip(range(2, 6), MAPS)}, BOXES, (3, 2), 2, canonical_box_size=32.0
  )
  np.testing.assert_allclose(as_dict, pooled_ref(BOXES, (3, 2), 2), rtol=1e-5, atol=1e-5)


def test_vmap_over_images_and_gradient():
  maps = [np.stack([m, 3 * m]) for m in MAPS]
  fn = lambda ms, b: P.multilevel_roi_align(ms, b, (2, 2), 2, canonical_box_size=32.0)
  got = jax.jit(jax.vmap(fn))(maps, np.stack([BOXES, BOXES]))
  np.testing.assert_allclose(got[1], 3 * got[0], rtol=1e-5, atol=1e-5)
  grads = jax.grad(lambda ms: fn(ms, BOXES).sum())([jnp.asarray(m) for m in MAPS])
  assert all(np.abs(np.asarray(g)).sum() > 0 for g in grads)  # every level is used


def test_batched_equals_vmap_forward_and_gradient():
  """One flat table for every image and level: the same values and feature gradients as
  `vmap(multilevel_roi_align)`, with different boxes per image (padding rows included) and
  images whose maps differ."""
  rng = np.random.default_rng(1)
  maps = {
    f"p{l}": jnp.asarray(rng.normal(size=(3,) + m.shape).astype(np.float32))
    for l, m in zip(range(2, 6), MAPS)
  }
  boxes = np.stack([BOXES, BOXES[::-1] + 1.5, np.roll(BOXES, 2, axis=0) * 0.7])
  cotangent = rng.normal(size=(3, len(BOXES), 3, 2, 2)).astype(np.float32)
  kw = dict(canonical_box_size=32.0)
  one = lambda ms, b: P.multilevel_roi_align(ms, b, (3, 2), 0, **kw)
  batched = lambda ms: P.batched_multilevel_roi_align(ms, boxes, (3, 2), 0, **kw)
  vmapped = lambda ms: jax.vmap(one)(ms, boxes)
  out = jax.jit(batched)(maps)
  np.testing.assert_allclose(out, jax.jit(vmapped)(maps), rtol=1e-6, atol=1e-6)
  grad = lambda f: jax.jit(jax.grad(lambda ms: jnp.sum(f(ms) * cotangent)))(maps)
  got, want = grad(batched), grad(vmapped)
  for k in maps:
    assert np.abs(np.asarray(want[k])).sum() > 0, k
    np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-6)
  for i in range(3):  # each image reads its own maps only
    lone = {k: v[i] for k, v in maps.items()}
    np.testing.assert_allclose(out[i], jax.jit(one)(lone, boxes[i]), rtol=1e-6, atol=1e-6)


def test_batched_rejects_mismatched_shapes():
  maps = [jnp.zeros((2,) + m.shape) for m in MAPS]
  with pytest.raises(ValueError, match=r"\(B=2, R, 4\) boxes"):
    P.batched_multilevel_roi_align(maps, jnp.zeros((3, 5, 4)), (2, 2))
  with pytest.raises(ValueError, match="maps"):
    P.batched_multilevel_roi_align(
      maps[:1] + [jnp.zeros(MAPS[1].shape)], jnp.zeros((2, 5, 4)), (2, 2)
    )

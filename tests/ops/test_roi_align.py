"""Tests for segjax/ops/roi_align.py against a NumPy port of torchvision's ROIAlign loop."""

import functools
import math
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

# segjax.ops.roi_align is the function (the public API), so import from the module path.
from segjax.ops.roi_align import roi_align
from tests.ops import previous_roi_align

# As tests/weights/conftest.py: triton (imported by torchvision.ops in CUDA builds of torch)
# segfaults when loaded after TensorFlow, which tests/conftest.py imports; no test needs it.
sys.modules.setdefault("triton", None)
try:
  import torch
  import torchvision
except ImportError:  # CI installs the torch extra; without it the torchvision test skips.
  torch = torchvision = None


def bilinear_ref(f, y, x):
  """torchvision roi_align_kernel bilinear_interpolate, one point of an (H, W, C) map."""
  h, w, _ = f.shape
  if y < -1.0 or y > h or x < -1.0 or x > w:
    return np.zeros(f.shape[2])
  y, x = max(y, 0.0), max(x, 0.0)
  y0, x0 = int(y), int(x)
  if y0 >= h - 1:
    y0 = y1 = h - 1
    y = float(y0)
  else:
    y1 = y0 + 1
  if x0 >= w - 1:
    x0 = x1 = w - 1
    x = float(x0)
  else:
    x1 = x0 + 1
  ly, lx = y - y0, x - x0
  hy, hx = 1 - ly, 1 - lx
  return hy * hx * f[y0, x0] + hy * lx * f[y0, x1] + ly * hx * f[y1, x0] + ly * lx * f[y1, x1]


def roi_align_ref(f, boxes, output_size, scale, sampling_ratio, aligned):
  """torchvision ROIAlign forward, loop for loop, on an (H, W, C) map: (R, h, w, C)."""
  oh, ow = output_size
  out = np.zeros((len(boxes), oh, ow, f.shape[2]))
  off = 0.5 if aligned else 0.0
  for r, b in enumerate(np.asarray(boxes, np.float64)):
    x1, y1 = b[0] * scale - off, b[1] * scale - off
    rw, rh = b[2] * scale - off - x1, b[3] * scale - off - y1
    if not aligned:
      rw, rh = max(rw, 1.0), max(rh, 1.0)
    bh, bw = rh / oh, rw / ow
    gh = sampling_ratio if sampling_ratio > 0 else math.ceil(rh / oh)
    gw = sampling_ratio if sampling_ratio > 0 else math.ceil(rw / ow)
    count = max(gh * gw, 1)
    for ph in range(oh):
      for pw in range(ow):
        acc = np.zeros(f.shape[2])
        for iy in range(gh):
          y = y1 + ph * bh + (iy + 0.5) * bh / gh
          for ix in range(gw):
            x = x1 + pw * bw + (ix + 0.5) * bw / gw
            acc += bilinear_ref(f, y, x)
        out[r, ph, pw] = acc / count
  return out


_roi_align = jax.jit(
  roi_align, static_argnums=(2, 4, 5), static_argnames=("max_sampling_ratio", "adaptive_layout")
)

FEATURES = np.random.default_rng(0).normal(size=(13, 17, 3)).astype(np.float32)
# Image of 52 x 68 pixels at scale 1/4.
BOXES = np.array(
  [
    [3, 4, 40, 30],
    [-10, -5, 20, 10],  # partly outside
    [50, 40, 90, 80],  # mostly outside, past the bottom-right corner
    [100, 100, 120, 120],  # wholly outside: zeros
    [10, 10, 10, 10],  # zero area
    [5.2, 5.3, 5.4, 5.35],  # smaller than a feature pixel
    [0, 0, 68, 52],  # the whole image
    [60, 2, 70, 60],  # tall and thin, at the right edge
    [0, 0, 0, 0],  # padding
  ],
  np.float32,
)


@pytest.mark.parametrize("sampling_ratio", [0, 1, 2])
@pytest.mark.parametrize("aligned", [True, False])
def test_matches_torchvision_reference(sampling_ratio, aligned):
  # A cap of 8 covers the whole-image box's adaptive grid of 5 x 5: exact.
  got = np.asarray(
    _roi_align(FEATURES, BOXES, (3, 4), 0.25, sampling_ratio, aligned, max_sampling_ratio=8)
  )
  ref = roi_align_ref(FEATURES, BOXES, (3, 4), 0.25, sampling_ratio, aligned)
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
  assert got.shape == (len(BOXES), 3, 4, 3) and got.dtype == jnp.float32
  np.testing.assert_array_equal(got[3], 0)
  if aligned and sampling_ratio == 0:  # empty ROIs get an empty adaptive grid
    np.testing.assert_array_equal(got[[4, 8]], 0)


def test_adaptive_grid_capped():
  # Adaptive grids of 9 x 13 (one big box) exceed a cap of 3: it pools as sampling_ratio
  # (3 + 1) // 2 = 2 ("pairs", the previous layout: as the cap, 3); the small box stays exact.
  boxes = np.array([[0, 0, 68, 52], [4, 4, 12, 12]], np.float32)
  ref0 = roi_align_ref(FEATURES, boxes[1:], (1, 1), 0.25, 0, True)
  for layout, spread in (("window", 2), ("pairs", 3)):
    got = _roi_align(
      FEATURES, boxes, (1, 1), 0.25, 0, True, max_sampling_ratio=3, adaptive_layout=layout
    )
    ref = roi_align_ref(FEATURES, boxes[:1], (1, 1), 0.25, spread, True)
    np.testing.assert_allclose(got, np.concatenate([ref, ref0]), rtol=1e-5, atol=1e-6)


def _random_boxes(rng, n, image_hw):
  """Boxes of log-uniform sides 0.01 to 2x the image, anywhere around it (some wholly or
  partly outside), a few of zero width or height, one of zero area."""
  h, w = image_hw
  wh = np.exp(rng.uniform(np.log(0.01), np.log(2 * max(h, w)), (n, 2)))
  xy = rng.uniform(-0.3, 1.1, (n, 2)) * np.array([w, h])
  boxes = np.concatenate([xy, xy + wh], 1)
  boxes[: n // 10, 2] = boxes[: n // 10, 0]
  boxes[n // 10 : n // 5, 3] = boxes[n // 10 : n // 5, 1]
  boxes[-1] = [5, 5, 5, 5]
  return boxes.astype(np.float32)


@pytest.mark.parametrize(
  "cap, aligned, sampling_ratio", [(4, True, 0), (4, False, 0), (8, True, 0), (4, False, 2)]
)
def test_window_layout_equals_previous_implementation_within_the_cap(cap, aligned, sampling_ratio):
  rng = np.random.default_rng(2)
  feats = jnp.asarray(rng.normal(size=(13, 17, 3)), jnp.float32)
  boxes = _random_boxes(rng, 200, (52, 68))
  cot = jnp.asarray(rng.normal(size=(len(boxes), 7, 5, 3)), jnp.float32)
  size = np.maximum((boxes[:, 2:] - boxes[:, :2]) * 0.25, 0 if aligned else 1.0)
  grid = np.ceil(size / np.array([5, 7]))  # (x, y) adaptive grids
  exact = np.all(grid <= cap, 1) if sampling_ratio == 0 else np.ones(len(boxes), bool)
  assert exact.sum() > 100 and (sampling_ratio > 0 or cap == 8 or (~exact).sum() > 10)
  # The feature gradient of ROIs within the cap: the cotangent of the others zeroed.
  cot = jnp.where(jnp.asarray(exact)[:, None, None, None], cot, 0.0)

  @jax.jit
  def outputs_and_grads(f):
    def one(impl):
      fn = lambda f: impl.roi_align(
        f, boxes, (7, 5), 0.25, sampling_ratio, aligned, max_sampling_ratio=cap
      )
      out, vjp = jax.vjp(fn, f)
      return out, vjp(cot)[0]

    return one(sys.modules[roi_align.__module__]), one(previous_roi_align)

  (new, new_grad), (old, old_grad) = outputs_and_grads(feats)
  np.testing.assert_allclose(new[exact], old[exact], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(new_grad, old_grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("aligned, sampling_ratio", [(True, 0), (False, 2)])
def test_forward_and_backward_match_torchvision(aligned, sampling_ratio):
  # detectron2's convention (aligned, adaptive) and torchvision's (sampling_ratio 2); a cap of
  # 32 covers every adaptive grid here, so both must be exact.
  if torchvision is None:
    pytest.skip("needs torchvision")
  rng = np.random.default_rng(3)
  feats = rng.normal(size=(13, 17, 3)).astype(np.float32)
  boxes = _random_boxes(rng, 120, (52, 68))
  cot = rng.normal(size=(len(boxes), 7, 6, 3)).astype(np.float32)
  fn = lambda f: roi_align(f, boxes, (7, 6), 0.25, sampling_ratio, aligned, max_sampling_ratio=32)
  out, vjp = jax.vjp(jax.jit(fn), jnp.asarray(feats))
  (grad,) = vjp(jnp.asarray(cot))
  tf = torch.tensor(feats).permute(2, 0, 1)[None].requires_grad_()
  tout = torchvision.ops.roi_align(tf, [torch.tensor(boxes)], (7, 6), 0.25, sampling_ratio, aligned)
  tout.backward(torch.tensor(cot).permute(0, 3, 1, 2))
  np.testing.assert_allclose(out, tout.detach().permute(0, 2, 3, 1).numpy(), atol=2e-5, rtol=1e-4)
  np.testing.assert_allclose(grad, tf.grad[0].permute(1, 2, 0).numpy(), atol=1e-4, rtol=1e-4)


def test_gradient_flows_to_features():
  rng = np.random.default_rng(1)
  fn = functools.partial(
    roi_align,
    boxes=jnp.asarray(BOXES),
    output_size=(3, 4),
    spatial_scale=0.25,
    sampling_ratio=0,
    max_sampling_ratio=8,
  )
  out, vjp = jax.vjp(lambda f: fn(f), jnp.asarray(FEATURES))
  cot = rng.normal(size=out.shape).astype(np.float32)
  (grad,) = jax.jit(vjp)(cot)
  assert np.abs(np.asarray(grad)).sum() > 0
  # ROIAlign is linear in the features, so its VJP must be its transpose:
  # <vjp(cot), F'> == <cot, roi_align(F')> for any F'.
  for _ in range(2):
    other = rng.normal(size=FEATURES.shape).astype(np.float32)
    lhs = np.vdot(np.asarray(grad, np.float64), other)
    rhs = np.vdot(cot.astype(np.float64), roi_align_ref(other, BOXES, (3, 4), 0.25, 0, True))
    np.testing.assert_allclose(lhs, rhs, rtol=1e-4)
  # Boxes are constants (no gradient), as in torchvision.
  gb = jax.grad(lambda b: roi_align(jnp.asarray(FEATURES), b, (3, 4), 0.25, 2).sum())(
    jnp.asarray(BOXES)
  )
  np.testing.assert_array_equal(gb, 0)


def test_vmap_over_images_and_dtypes():
  feats = np.stack([FEATURES, -2 * FEATURES])
  boxes = np.stack([BOXES, BOXES[::-1]])
  fn = jax.jit(jax.vmap(lambda f, b: roi_align(f, b, (2, 2), 0.25, 2)))
  got = fn(feats, boxes)
  for i in range(2):
    np.testing.assert_allclose(
      got[i], roi_align_ref(feats[i], boxes[i], (2, 2), 0.25, 2, True), rtol=1e-5, atol=1e-5
    )
  half = roi_align(jnp.asarray(FEATURES, jnp.bfloat16), BOXES, (2, 2), 0.25, 2)
  assert half.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(half, np.float32), got[0], atol=0.05)
  assert roi_align(jnp.asarray(FEATURES), jnp.zeros((0, 4)), (2, 2), 0.25, 2).shape == (0, 2, 2, 3)

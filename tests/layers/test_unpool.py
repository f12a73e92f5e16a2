"""Tests for segjax/layers/unpool.py against numpy loops."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from segjax.layers import max_pool_with_argmax, max_unpool, nearest_unpool


def np_pool_with_argmax(x, window):
  """Reference: loops over (B, H, W, C) windows; first maximum in row-major order."""
  b, h, w, c = x.shape
  pooled = np.zeros((b, h // window, w // window, c), x.dtype)
  indices = np.zeros((b, h // window, w // window, c), np.int64)
  for n in range(b):
    for i in range(h // window):
      for j in range(w // window):
        for ch in range(c):
          win = x[n, i * window : (i + 1) * window, j * window : (j + 1) * window, ch]
          dy, dx = np.unravel_index(np.argmax(win), win.shape)
          pooled[n, i, j, ch] = win[dy, dx]
          indices[n, i, j, ch] = (i * window + dy) * w + j * window + dx
  return pooled, indices


def np_unpool(pooled, indices, h, w):
  b, _, _, c = pooled.shape
  out = np.zeros((b, h * w, c), pooled.dtype)
  for n in range(b):
    for ch in range(c):
      out[n, indices[n, ..., ch].ravel(), ch] = pooled[n, ..., ch].ravel()
  return out.reshape(b, h, w, c)


@pytest.mark.parametrize("shape,window", [((2, 4, 6, 3), 2), ((1, 6, 9, 2), 3)])
def test_pool_matches_numpy(shape, window):
  x = np.random.default_rng(0).normal(size=shape).astype(np.float32)
  pooled, indices = max_pool_with_argmax(jnp.asarray(x), window)
  ref_pooled, ref_indices = np_pool_with_argmax(x, window)
  assert indices.dtype == jnp.int32
  np.testing.assert_array_equal(pooled, ref_pooled)
  np.testing.assert_array_equal(indices, ref_indices)


def test_ties_take_first_position():
  x = jnp.ones((1, 4, 4, 1))
  _, indices = max_pool_with_argmax(x)
  # Top-left of each window: rows 0 and 2, columns 0 and 2 of a 4-wide plane.
  np.testing.assert_array_equal(indices[0, ..., 0], [[0, 2], [8, 10]])


def test_pool_then_unpool_restores_maxima_and_zeros_elsewhere():
  # Positive values so that only positions that were not a maximum are zero.
  x = np.random.default_rng(1).uniform(1.0, 2.0, size=(2, 8, 6, 3)).astype(np.float32)
  pooled, indices = max_pool_with_argmax(jnp.asarray(x))
  out = np.asarray(max_unpool(pooled, indices, x.shape))
  np.testing.assert_array_equal(out, np_unpool(np.asarray(pooled), np.asarray(indices), 8, 6))
  is_max = out != 0
  np.testing.assert_array_equal(out[is_max], x[is_max])
  # Exactly one maximum per window and channel.
  assert (
    is_max.reshape(2, 4, 2, 3, 2, 3).sum(axis=(2, 4)).tolist()
    == np.ones((2, 4, 3, 3), int).tolist()
  )
  # output_shape may also be given as (H, W).
  np.testing.assert_array_equal(max_unpool(pooled, indices, (8, 6)), out)


def test_unpool_arbitrary_values_matches_numpy():
  rng = np.random.default_rng(2)
  x = rng.normal(size=(1, 4, 4, 2)).astype(np.float32)
  _, indices = max_pool_with_argmax(jnp.asarray(x))
  values = rng.normal(size=indices.shape).astype(np.float32)
  out = max_unpool(jnp.asarray(values), indices, x.shape)
  np.testing.assert_array_equal(out, np_unpool(values, np.asarray(indices), 4, 4))


def test_pool_gradient_only_at_argmax():
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.normal(size=(2, 4, 4, 3)).astype(np.float32))
  w = jnp.asarray(rng.uniform(1.0, 2.0, size=(2, 2, 2, 3)).astype(np.float32))
  grad = jax.grad(lambda x: jnp.sum(max_pool_with_argmax(x)[0] * w))(x)
  _, indices = max_pool_with_argmax(x)
  expected = np_unpool(np.asarray(w), np.asarray(indices), 4, 4)
  np.testing.assert_allclose(grad, expected)
  # With ties the whole gradient goes to the first position, not split.
  grad_tied = jax.grad(lambda x: jnp.sum(max_pool_with_argmax(x)[0]))(jnp.ones((1, 2, 2, 1)))
  np.testing.assert_array_equal(grad_tied[0, ..., 0], [[1, 0], [0, 0]])


def test_unpool_gradient_flows_to_pooled_values():
  rng = np.random.default_rng(4)
  x = jnp.asarray(rng.normal(size=(1, 4, 6, 2)).astype(np.float32))
  pooled, indices = max_pool_with_argmax(x)
  g = jnp.asarray(rng.normal(size=x.shape).astype(np.float32))
  grad = jax.grad(lambda p: jnp.sum(max_unpool(p, indices, x.shape) * g))(pooled)
  # d/dp sum(unpool(p) * g) = g read at each argmax position.
  flat_g = np.asarray(g).reshape(1, -1, 2)
  expected = np.stack(
    [flat_g[0, np.asarray(indices)[0, ..., c].ravel(), c].reshape(2, 3) for c in range(2)], axis=-1
  )[None]
  np.testing.assert_allclose(grad, expected)


def test_jit_and_vmap():
  x = np.random.default_rng(5).normal(size=(3, 2, 4, 4, 2)).astype(np.float32)  # (N, B, H, W, C)

  def roundtrip(x):
    pooled, indices = max_pool_with_argmax(x)
    return max_unpool(pooled, indices, x.shape)

  # Any leading axes are batch axes, so vmap down to single (H, W, C) images agrees; jitted
  # because op-by-op vmap is slow to dispatch.
  expected = np_unpool(
    *[np.asarray(a).reshape(6, 2, 2, 2) for a in max_pool_with_argmax(x)], 4, 4
  ).reshape(x.shape)
  np.testing.assert_array_equal(jax.jit(roundtrip)(x), expected)
  np.testing.assert_array_equal(jax.jit(jax.vmap(jax.vmap(roundtrip)))(x), expected)


def test_indivisible_size_is_an_error():
  with pytest.raises(ValueError, match="5x4"):
    max_pool_with_argmax(jnp.zeros((1, 5, 4, 1)))


def test_nearest_unpool_matches_repeat():
  x = np.arange(2 * 3 * 2 * 2, dtype=np.float32).reshape(2, 3, 2, 2)
  expected = np.repeat(np.repeat(x, 3, axis=1), 3, axis=2)
  np.testing.assert_array_equal(nearest_unpool(jnp.asarray(x), 3), expected)
  assert nearest_unpool(jnp.zeros((4, 5, 1)), 2).shape == (8, 10, 1)

"""Tests for segjax/layers/pool.py against flax's reduce_window max pooling."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from segjax.layers import max_pool_2x2


def _reference(x):
  return nn.max_pool(x, (2, 2), strides=(2, 2))


@pytest.mark.parametrize(
  "name, shape",
  [("normal", (2, 6, 8, 3)), ("ties", (2, 6, 8, 3)), ("odd size", (1, 5, 7, 2))],
)
def test_max_pool_2x2_matches_reduce_window_values_and_gradients(name, shape):
  rng = np.random.default_rng(0)
  x = rng.normal(size=shape).astype(np.float32)
  if name == "ties":  # Most windows hold equal maxima: the gradient must pick the same one.
    x = np.round(x).clip(0, None)
    x[0, :2, :2, :] = 1.0  # One window all equal.
  x = jnp.asarray(x)
  g = jnp.asarray(rng.normal(size=_reference(x).shape), jnp.float32)
  np.testing.assert_array_equal(max_pool_2x2(x), _reference(x))
  grad = lambda pool: jax.jit(jax.grad(lambda x: jnp.sum(pool(x) * g)))(x)
  np.testing.assert_array_equal(grad(max_pool_2x2), grad(_reference))

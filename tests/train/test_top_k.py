"""`semantic.in_top_k` against `jax.lax.top_k` membership."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from segjax.train.semantic import in_top_k


@pytest.mark.parametrize("num_classes, k", [(3, 5), (5, 5), (19, 5), (19, 1), (8, 7)])
def test_in_top_k_matches_top_k(num_classes, k):
  rng = np.random.default_rng(num_classes * 10 + k)
  scores = rng.normal(size=(4, 9, num_classes)).astype(np.float32)
  scores[0] = np.round(scores[0])  # Ties: top_k keeps the lower class index.
  scores[1] = 0.0  # All tied.
  scores[2, :, ::2] *= -0.0  # Signed zeros and a NaN: top_k's total order.
  scores[3, 0, 1] = np.nan
  scores = jnp.asarray(scores)
  labels = jnp.asarray(rng.integers(0, num_classes, (4, 9)))
  top = jax.lax.top_k(scores, min(k, num_classes))[1]
  expected = (top == labels[..., None]).any(-1)
  np.testing.assert_array_equal(in_top_k(scores, labels, k), expected)

"""Tests for segjax/losses.py against numpy formulas."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from segjax.losses import pixel_cross_entropy, smooth_l1_loss

K = 4


def np_pixel_ce(logits, labels, ignore_label=255, class_weights=None):
  """sum(w[y] * ce) / sum(w[y]) over pixels with y != ignore_label; 0 if there are none."""
  logits = logits.astype(np.float64)
  m = logits.max(-1, keepdims=True)
  log_probs = logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))
  valid = labels != ignore_label
  y = labels[valid].astype(int)
  ce = -log_probs[valid][np.arange(y.size), y]
  w = np.ones(y.size) if class_weights is None else np.asarray(class_weights)[y]
  return 0.0 if w.sum() == 0 else float((w * ce).sum() / w.sum())


def random_batch(seed, shape=(2, 5, 6), ignore_fraction=0.3, ignore_label=255):
  rng = np.random.default_rng(seed)
  logits = rng.normal(scale=3.0, size=(*shape, K)).astype(np.float32)
  labels = rng.integers(0, K, size=shape)
  labels[rng.uniform(size=shape) < ignore_fraction] = ignore_label
  return logits, labels


def test_matches_numpy_with_ignore_label():
  logits, labels = random_batch(0)
  assert (labels == 255).any()
  loss = pixel_cross_entropy(jnp.asarray(logits), jnp.asarray(labels))
  assert loss.shape == () and loss.dtype == jnp.float32
  np.testing.assert_allclose(loss, np_pixel_ce(logits, labels), rtol=1e-5)


def test_ignored_pixels_do_not_matter():
  logits, labels = random_batch(1)
  changed = np.where((labels == 255)[..., None], 1e3, logits).astype(np.float32)
  np.testing.assert_allclose(
    pixel_cross_entropy(logits, labels), pixel_cross_entropy(changed, labels), rtol=1e-6
  )


def test_no_ignored_pixels_is_the_plain_mean():
  logits, labels = random_batch(2, ignore_fraction=0.0)
  np.testing.assert_allclose(
    pixel_cross_entropy(logits, labels), np_pixel_ce(logits, labels), rtol=1e-5
  )


@pytest.mark.parametrize("ignore_fraction", [0.0, 0.4])
def test_class_weights_match_numpy_weighted_mean(ignore_fraction):
  logits, labels = random_batch(3, ignore_fraction=ignore_fraction)
  weights = np.array([0.5, 2.0, 1.0, 3.0], np.float32)
  loss = pixel_cross_entropy(logits, labels, class_weights=weights)
  np.testing.assert_allclose(loss, np_pixel_ce(logits, labels, class_weights=weights), rtol=1e-5)
  # The same as repeating each pixel w times when w are integers.
  int_weights = np.array([1, 2, 1, 3], np.float32)
  valid = labels != 255
  reps = int_weights[np.where(valid, labels, 0)].astype(int) * valid
  rep_logits = np.repeat(logits.reshape(-1, K), reps.ravel(), axis=0)
  rep_labels = np.repeat(labels.ravel(), reps.ravel())
  np.testing.assert_allclose(
    pixel_cross_entropy(logits, labels, class_weights=int_weights),
    np_pixel_ce(rep_logits, rep_labels),
    rtol=1e-5,
  )


def test_all_ignored_gives_zero_loss_and_finite_gradient():
  logits, _ = random_batch(4)
  labels = np.full(logits.shape[:-1], 255)
  loss, grad = jax.value_and_grad(pixel_cross_entropy)(jnp.asarray(logits), labels)
  assert loss == 0.0
  assert np.all(np.isfinite(grad)) and np.all(grad == 0)
  # Also when all valid pixels have class weight 0.
  labels[0, 0, 0] = 1
  loss, grad = jax.value_and_grad(pixel_cross_entropy)(
    jnp.asarray(logits), labels, class_weights=jnp.array([1.0, 0.0, 1.0, 1.0])
  )
  assert loss == 0.0 and np.all(np.isfinite(grad))


def test_gradient_is_softmax_minus_onehot_over_valid_pixels():
  logits, labels = random_batch(5)
  grad = jax.grad(pixel_cross_entropy)(jnp.asarray(logits), labels)
  valid = labels != 255
  probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  expected = (probs - np.eye(K)[np.where(valid, labels, 0)]) * valid[..., None] / valid.sum()
  np.testing.assert_allclose(grad, expected, atol=1e-6)


def test_large_logits_stay_finite():
  logits, labels = random_batch(6)
  loss = pixel_cross_entropy(jnp.asarray(logits) * 1e4, labels)
  assert np.isfinite(loss)


def test_dtypes_shapes_and_jit():
  logits, labels = random_batch(7, shape=(3, 4))  # no batch axis: (H, W, K)
  expected = np_pixel_ce(logits, labels)
  np.testing.assert_allclose(
    pixel_cross_entropy(logits, labels.astype(np.uint8)), expected, rtol=1e-5
  )
  loss_bf16 = pixel_cross_entropy(jnp.asarray(logits, jnp.bfloat16), labels)
  assert loss_bf16.dtype == jnp.float32
  np.testing.assert_allclose(loss_bf16, expected, rtol=3e-2)
  jitted = jax.jit(pixel_cross_entropy, static_argnames="ignore_label")
  np.testing.assert_allclose(jitted(logits, labels, ignore_label=255), expected, rtol=1e-5)
  # A different ignore value.
  logits, labels = random_batch(8, ignore_label=-1)
  np.testing.assert_allclose(
    pixel_cross_entropy(logits, labels, ignore_label=-1),
    np_pixel_ce(logits, labels, ignore_label=-1),
    rtol=1e-5,
  )


def test_shape_mismatch_is_an_error():
  with pytest.raises(ValueError, match="disagree"):
    pixel_cross_entropy(jnp.zeros((2, 4, 4, K)), jnp.zeros((2, 4, 5), jnp.int32))
  with pytest.raises(ValueError, match="class_weights"):
    pixel_cross_entropy(
      jnp.zeros((2, 4, 4, K)), jnp.zeros((2, 4, 4), jnp.int32), class_weights=jnp.ones(K + 1)
    )


@pytest.mark.parametrize("beta", [0.0, 0.5])
def test_smooth_l1(beta):
  x = jnp.array([-2.0, -0.25, 0.0, 0.1, 3.0])
  expected = (
    np.abs(x)
    if beta == 0
    else np.where(np.abs(x) < beta, 0.5 * x**2 / beta, np.abs(x) - 0.5 * beta)
  )
  np.testing.assert_allclose(smooth_l1_loss(x, beta), expected, rtol=1e-6)

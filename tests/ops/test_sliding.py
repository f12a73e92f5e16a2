"""Tests for segjax/ops/sliding.py: content resizing and flipping, mmseg's windows, TTA."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import tensorflow as tf

from segjax.ops import sliding


def canvas_batch(sizes, shape, channels=3, seed=0):
  """(images (B, H, W, C) random content, 0 padding; sizes (B, 2) int32)."""
  rng = np.random.default_rng(seed)
  images = np.zeros((len(sizes), *shape, channels), np.float32)
  for i, (h, w) in enumerate(sizes):
    images[i, :h, :w] = rng.normal(size=(h, w, channels))
  return jnp.asarray(images), jnp.asarray(sizes, jnp.int32)


def window_context(x):
  """A flip-equivariant stand-in for a model whose output depends on its whole input: each
  pixel's two logits plus the mean of the window it was given (so windows disagree)."""
  mean = x.mean(axis=(1, 2), keepdims=True)
  return jnp.concatenate([x[..., :1] + mean[..., :1], x[..., 1:2] - mean[..., 1:2]], -1)


def test_resize_content_equals_tf_resize_of_the_content_alone():
  images, sizes = canvas_batch([(13, 21), (8, 5)], (16, 24))
  new_sizes = jnp.asarray([[29, 40], [5, 9]], jnp.int32)
  out = jax.vmap(lambda x, s, n: sliding.resize_content(x, s, n, (32, 48)))(
    images, sizes, new_sizes
  )
  for i in range(2):
    (h, w), (nh, nw) = np.asarray(sizes[i]), np.asarray(new_sizes[i])
    expected = tf.image.resize(np.asarray(images[i, :h, :w]), (nh, nw), "bilinear").numpy()
    np.testing.assert_allclose(out[i, :nh, :nw], expected, atol=1e-5)


def test_resize_content_to_its_own_size_is_the_identity():
  images, sizes = canvas_batch([(13, 21)], (16, 24))
  out = sliding.resize_content(images[0], sizes[0], sizes[0], (16, 24))
  np.testing.assert_allclose(out[:13, :21], images[0, :13, :21], atol=1e-6)


def test_flip_content_mirrors_the_content_and_keeps_the_padding():
  x = jnp.arange(2 * 6, dtype=jnp.float32).reshape(2, 6, 1)
  out = sliding.flip_content(x, jnp.asarray([2, 4]))[..., 0]
  np.testing.assert_array_equal(out, [[3, 2, 1, 0, 4, 5], [9, 8, 7, 6, 10, 11]])


def mmseg_slide(fn, image, crop, stride):
  """mmseg `EncoderDecoder.slide_inference` on one unpadded (h, w, C) image, in numpy; a side
  shorter than the window is zero-padded to it first (mmseg would run a smaller window)."""
  (ch, cw), (sh, sw) = crop, stride
  h0, w0 = image.shape[:2]
  image = np.pad(image, [(0, max(ch - h0, 0)), (0, max(cw - w0, 0)), (0, 0)])
  h, w = image.shape[:2]
  total, count = None, np.zeros((h, w, 1))
  for i in range(max(h - ch + sh - 1, 0) // sh + 1):
    for j in range(max(w - cw + sw - 1, 0) // sw + 1):
      y2, x2 = min(i * sh + ch, h), min(j * sw + cw, w)
      y1, x1 = max(y2 - ch, 0), max(x2 - cw, 0)
      logits = np.asarray(fn(jnp.asarray(image[None, y1:y2, x1:x2])))[0]
      total = np.zeros((h, w, logits.shape[-1])) if total is None else total
      total[y1:y2, x1:x2] += logits
      count[y1:y2, x1:x2] += 1
  return (total / count)[:h0, :w0]


def test_slide_logits_follow_mmseg_per_image():
  images, sizes = canvas_batch([(40, 56), (24, 30), (16, 20)], (40, 64))
  out = sliding.slide_logits(window_context, images, sizes, crop=(16, 24), stride=(10, 14))
  for i, (h, w) in enumerate(np.asarray(sizes)):
    expected = mmseg_slide(window_context, np.asarray(images[i, :h, :w]), (16, 24), (10, 14))
    np.testing.assert_allclose(out[i, :h, :w], expected, rtol=1e-5, atol=1e-5)


def test_slide_with_the_canvas_as_window_is_whole():
  images, sizes = canvas_batch([(40, 56), (24, 30)], (48, 64))
  common = dict(label_shape=(48, 64), multiple=16, same_size=True)
  whole = sliding.dense_probabilities(window_context, images, sizes, sizes, **common)
  slide = sliding.dense_probabilities(
    window_context, images, sizes, sizes, crop=(48, 64), stride=(32, 32), **common
  )
  np.testing.assert_allclose(slide, whole, atol=1e-6)


def test_flip_tta_of_a_flip_equivariant_model_changes_nothing():
  """A per-pixel model commutes with mirroring the content (whatever the image), and slide
  windows are placed symmetrically: flip TTA must then give the same probabilities."""
  images, sizes = canvas_batch([(40, 56), (24, 30)], (48, 64))
  per_pixel = lambda x: jnp.einsum(
    "bhwc,ck->bhwk",
    x,
    jnp.asarray(
      [
        [1.0, -2.0],
        [0.5, 1.0],  # noqa: E731
        [0.0, 3.0],
      ]
    ),
  )
  common = dict(label_shape=(48, 64), multiple=16, same_size=True)
  for kwargs in ({}, dict(crop=(16, 16), stride=(16, 16))):
    plain = sliding.dense_probabilities(per_pixel, images, sizes, sizes, **common, **kwargs)
    flipped = sliding.dense_probabilities(
      per_pixel, images, sizes, sizes, flip=True, **common, **kwargs
    )
    mask = np.asarray(sliding.content_mask(sizes, (48, 64)))
    np.testing.assert_allclose(np.asarray(flipped)[mask], np.asarray(plain)[mask], atol=1e-6)


def test_flip_tta_of_a_symmetric_image_and_model_changes_nothing():
  """A model that sees the whole window (not per pixel) and a left-right symmetric image."""
  images, sizes = canvas_batch([(24, 30)], (32, 32))
  images = images.at[0, :24, 15:30].set(images[0, :24, :15][:, ::-1])  # Mirror-symmetric.
  common = dict(label_shape=(32, 32), multiple=16, same_size=True)
  plain = sliding.dense_probabilities(window_context, images, sizes, sizes, **common)
  flipped = sliding.dense_probabilities(window_context, images, sizes, sizes, flip=True, **common)
  np.testing.assert_allclose(flipped[0, :24, :30], plain[0, :24, :30], atol=1e-6)


def test_multi_scale_averages_probabilities_at_the_label_size():
  images, sizes = canvas_batch([(20, 28)], (32, 32))
  labels = jnp.asarray([[40, 56]], jnp.int32)  # Images were halved; labels are native.
  fn = functools.partial(jnp.multiply, 1.0)
  out = sliding.dense_probabilities(
    fn, images, sizes, labels, (48, 64), multiple=16, scales=(1.0, 0.5)
  )
  passes = []
  for scale in (1.0, 0.5):
    n = np.maximum(np.round(np.asarray(sizes[0]) * scale), 1).astype(int)
    x = tf.image.resize(np.asarray(images[0, :20, :28]), n, "bilinear")
    logits = tf.image.resize(x, (40, 56), "bilinear").numpy()
    passes.append(np.exp(logits) / np.exp(logits).sum(-1, keepdims=True))
  np.testing.assert_allclose(out[0, :40, :56], np.mean(passes, 0), atol=1e-5)

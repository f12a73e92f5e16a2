"""Tests for segjax/ops/sampling.py: detectron2 subsample_labels counts, with static shapes."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from segjax.ops import sampling as S


@functools.partial(jax.jit, static_argnums=(2, 3, 4))
def _sample_many(keys, labels, num_samples, positive_fraction, bg_label=0):
  fn = lambda k: S.sample_balanced(k, labels, num_samples, positive_fraction, bg_label)
  return jax.vmap(fn)(keys)


def expected_counts(labels, num_samples, fraction, bg_label=0):
  """detectron2 subsample_labels: how many foregrounds and backgrounds it returns."""
  fg = np.sum((labels != -1) & (labels != bg_label))
  bg = np.sum(labels == bg_label)
  num_fg = min(fg, int(num_samples * fraction))
  return num_fg, min(bg, num_samples - num_fg)


def check(labels, num_samples, fraction, bg_label=0, trials=8):
  labels = np.pad(labels, (0, 300 - len(labels)), constant_values=-1)  # one shape, fewer compiles
  keys = jax.random.split(jax.random.key(0), trials)
  idx, valid = map(
    np.asarray, _sample_many(keys, jnp.asarray(labels), num_samples, fraction, bg_label)
  )
  num_fg, num_bg = expected_counts(labels, num_samples, fraction, bg_label)
  for i, v in zip(idx, valid):
    np.testing.assert_array_equal(v, np.arange(num_samples) < num_fg + num_bg)
    got = labels[i[v]]
    assert len(set(i[v])) == v.sum()  # without replacement
    is_fg = (got != -1) & (got != bg_label)
    np.testing.assert_array_equal(is_fg, np.arange(v.sum()) < num_fg)  # fg first
    assert np.all(got[num_fg:] == bg_label)
    np.testing.assert_array_equal(i[~v], 0)
  return idx, valid


def test_counts_match_detectron2():
  rng = np.random.default_rng(0)
  labels = rng.choice([-1, 0, 1], size=300, p=[0.2, 0.75, 0.05])
  check(labels, 64, 0.5)  # few foregrounds: the rest filled with backgrounds
  check(rng.choice([-1, 0, 1], size=300, p=[0.1, 0.2, 0.7]), 64, 0.25)  # fg capped
  check(np.array([-1, 1, 0, 0, -1, 1]), 16, 0.5)  # too few labelled: padding
  check(np.array([-1, -1, -1]), 16, 0.5)  # nothing labelled
  check(np.array([0, 1, 1, 0, 1]), 16, 0.0)  # no foreground allowed


def test_class_labels_with_background_num_classes():
  labels = np.array([3, 80, 80, -1, 5, 80, 0, 80])  # bg_label = num_classes = 80
  check(labels, 6, 0.25, bg_label=80)


def test_uniform_over_candidates():
  labels = np.array([1] * 10 + [0] * 10)
  keys = jax.random.split(jax.random.key(1), 2000)
  idx, valid = _sample_many(keys, jnp.asarray(labels), 8, 0.25)  # 2 fg + 6 bg per draw
  counts = np.bincount(np.asarray(idx)[np.asarray(valid)], minlength=20)
  np.testing.assert_allclose(counts[:10] / 2000, 0.2, atol=0.04)
  np.testing.assert_allclose(counts[10:] / 2000, 0.6, atol=0.05)


def test_mask_unsampled():
  labels = jnp.array([1, 0, -1, 0, 1, 0])
  idx, valid = S.sample_balanced(jax.random.key(3), labels, 4, 0.25)
  out = np.asarray(jax.jit(S.mask_unsampled)(labels, idx, valid))
  chosen = np.asarray(idx)[np.asarray(valid)]
  np.testing.assert_array_equal(out[chosen], np.asarray(labels)[chosen])
  assert np.sum(out != -1) == 4 and np.sum(out == 1) == 1


def test_fewer_predictions_than_samples():
  idx, valid = S.sample_balanced(jax.random.key(0), jnp.array([1, 0, 0]), 8, 0.5)
  np.testing.assert_array_equal(valid, [True] * 3 + [False] * 5)
  assert np.asarray(idx)[0] == 0 and set(np.asarray(idx)[1:3]) == {1, 2}

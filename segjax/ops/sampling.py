"""Balanced sampling of foreground and background examples (Faster R-CNN, Ren et al. 2015).

Static-shape version of detectron2 `modeling/sampling.py` `subsample_labels`: out of the
labelled predictions it draws, uniformly at random without replacement, up to
`int(num_samples * positive_fraction)` foregrounds, then fills the rest of `num_samples`
with backgrounds. RPN: 256 anchors at 0.5; ROI heads: 512 proposals at 0.25.

A random subset is the top-k of i.i.d. uniform priorities restricted to a category, which keeps
the shapes static (`lax.top_k`) where detectron2 uses `randperm` and variable-length indices.
"""

import jax
import jax.numpy as jnp

Array = jax.Array


def _random_top(key: Array, eligible: Array, k: int) -> tuple[Array, Array]:
  """k distinct indices, eligible ones first in random order; `(k,)` int32 and `(k,)` bool."""
  n = eligible.shape[0]
  priority = jnp.where(eligible, jax.random.uniform(key, (n,)), -1.0)
  take = min(k, n)
  _, idx = jax.lax.top_k(priority, take)
  ok = eligible[idx]
  if take < k:  # fewer candidates than slots: pad, never valid
    idx = jnp.concatenate([idx, jnp.zeros((k - take,), idx.dtype)])
    ok = jnp.concatenate([ok, jnp.zeros((k - take,), bool)])
  return idx.astype(jnp.int32), ok


def sample_balanced(
  key: Array,
  labels: Array,
  num_samples: int,
  positive_fraction: float,
  bg_label: int = 0,
) -> tuple[Array, Array]:
  """Draws a balanced sample of predictions.

  Args:
    key: PRNG key.
    labels: `(N,)` int labels: -1 ignored, `bg_label` background, anything else foreground
      (matcher labels in {1, 0, -1}, or class ids with background `num_classes`).
    num_samples: static sample size S.
    positive_fraction: at most `int(S * positive_fraction)` foregrounds.
    bg_label: the background label.

  Returns:
    indices: `(S,)` int32 into `labels`: the sampled foregrounds, then the sampled backgrounds,
      then padding (index 0).
    valid: `(S,)` bool, False for padding (too few labelled predictions).
  """
  fg = (labels != -1) & (labels != bg_label)
  bg = labels == bg_label
  max_fg = int(num_samples * positive_fraction)
  key_fg, key_bg = jax.random.split(key)
  fg_idx, fg_ok = _random_top(key_fg, fg, max_fg)
  bg_idx, bg_ok = _random_top(key_bg, bg, num_samples)
  num_fg = jnp.sum(fg_ok)
  num_bg = jnp.minimum(jnp.sum(bg_ok), num_samples - num_fg)
  # Slot i holds foreground i if i < num_fg, else background i - num_fg.
  slot = jnp.arange(num_samples)
  from_bg = jnp.clip(slot - num_fg, 0, num_samples - 1)
  if max_fg > 0:
    fg_part = fg_idx[jnp.minimum(slot, max_fg - 1)]
    indices = jnp.where(slot < num_fg, fg_part, bg_idx[from_bg])
  else:
    indices = bg_idx[from_bg]
  valid = slot < num_fg + num_bg
  return jnp.where(valid, indices, 0), valid


def mask_unsampled(labels: Array, indices: Array, valid: Array) -> Array:
  """`labels` `(N,)` with every prediction not sampled set to -1 (ignored), as the RPN loss wants.

  `indices`, `valid` `(S,)` come from `sample_balanced`.
  """
  n = labels.shape[0]
  sampled = jnp.zeros((n,), bool).at[jnp.where(valid, indices, n)].set(True, mode="drop")
  return jnp.where(sampled, labels, -1)

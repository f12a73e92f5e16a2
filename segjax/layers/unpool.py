"""Max pooling with argmax and max unpooling, after SegNet (Badrinarayanan et al., 2015).

SegNet's decoder upsamples by putting each value back at the position its encoder's max pooling
took it from, with zeros elsewhere ("max unpooling"), so boundaries stay sharp without learned
upsampling. This module gives that pair as pure array functions, plus nearest-neighbour
unpooling.

Conventions:
  * Arrays are channels-last images `(..., H, W, C)`; any number of leading batch axes, so the
    functions work unchanged under `jax.vmap` and `jax.jit`.
  * Windows are non-overlapping `window x window` squares with stride `window`; H and W must be
    divisible by `window`.
  * `indices` are int32 flat positions `h * W + w` into the input's H*W plane, per channel and
    per image (the convention of `torch.nn.MaxPool2d(return_indices=True)`); they do not
    include the batch or channel.
  * Ties inside a window go to the first position in row-major order.

Everything is built from reshapes and one-hot masks (no scatter), which is cheap on
accelerators and differentiable: the gradient of `max_pool_with_argmax` goes only to each
window's argmax, and the gradient of `max_unpool` flows back to the pooled values.
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp


def _check_divisible(h: int, w: int, window: int) -> None:
  if h % window or w % window:
    raise ValueError(f"Spatial size {h}x{w} is not divisible by the pooling window {window}.")


def _to_windows(x: jax.Array, window: int) -> jax.Array:
  """(..., H, W, C) -> (..., H/s, W/s, C, s*s), with s = window, window positions row-major."""
  *batch, h, w, c = x.shape
  nb = len(batch)
  x = x.reshape(*batch, h // window, window, w // window, window, c)
  # (..., Ho, dy, Wo, dx, C) -> (..., Ho, Wo, C, dy, dx)
  perm = (*range(nb), nb, nb + 2, nb + 4, nb + 1, nb + 3)
  x = x.transpose(perm)
  return x.reshape(*batch, h // window, w // window, c, window * window)


def _from_windows(x: jax.Array, window: int) -> jax.Array:
  """Inverse of `_to_windows`: (..., Ho, Wo, C, s*s) -> (..., Ho*s, Wo*s, C)."""
  *batch, ho, wo, c, _ = x.shape
  nb = len(batch)
  x = x.reshape(*batch, ho, wo, c, window, window)
  # (..., Ho, Wo, C, dy, dx) -> (..., Ho, dy, Wo, dx, C)
  perm = (*range(nb), nb, nb + 3, nb + 1, nb + 4, nb + 2)
  x = x.transpose(perm)
  return x.reshape(*batch, ho * window, wo * window, c)


def max_pool_with_argmax(x: jax.Array, window: int = 2) -> tuple[jax.Array, jax.Array]:
  """Non-overlapping max pooling that also returns where each maximum came from.

  Args:
    x: (..., H, W, C) input; H and W divisible by `window`.
    window: side and stride of the square pooling window.

  Returns:
    pooled: (..., H/window, W/window, C), the window maxima, dtype of `x`.
    indices: (..., H/window, W/window, C) int32 flat positions `h * W + w` of each maximum in
      the input plane (first position on ties).
  """
  *_, h, w, _ = x.shape
  _check_divisible(h, w, window)
  windows = _to_windows(x, window)  # (..., Ho, Wo, C, s*s)
  local = jnp.argmax(windows, axis=-1)  # first maximum on ties
  # Select with a one-hot mask rather than jnp.max so that the gradient goes to the argmax
  # only (jnp.max would split it between tied values).
  onehot = local[..., None] == jnp.arange(window * window)
  pooled = jnp.sum(jnp.where(onehot, windows, jnp.zeros((), x.dtype)), axis=-1)

  ho = jnp.arange(h // window)[:, None, None]  # broadcast over (Ho, Wo, C)
  wo = jnp.arange(w // window)[None, :, None]
  rows = ho * window + local // window
  cols = wo * window + local % window
  indices = (rows * w + cols).astype(jnp.int32)
  return pooled, indices


def max_unpool(pooled: jax.Array, indices: jax.Array, output_shape: Sequence[int]) -> jax.Array:
  """Puts each pooled value back at its argmax position; zeros everywhere else.

  Args:
    pooled: (..., Ho, Wo, C) values, e.g. decoder features with the channel count of the
      encoder level whose indices are used.
    indices: (..., Ho, Wo, C) int flat positions from `max_pool_with_argmax`. Each index must
      lie inside its own pooling window, as `max_pool_with_argmax` guarantees; the one-hot
      formulation relies on it.
    output_shape: the shape of the pooling input, either the full `(..., H, W, C)` or just
      `(H, W)`; H/Ho = W/Wo is the window.

  Returns:
    (..., H, W, C) array, dtype of `pooled`.
  """
  if pooled.shape != indices.shape:
    raise ValueError(
      f"pooled and indices must have the same shape; got {pooled.shape} and {indices.shape}."
    )
  *_, ho, wo, _ = pooled.shape
  h, w = tuple(output_shape)[-3:-1] if len(output_shape) > 2 else tuple(output_shape)
  if h % ho or w % wo or h // ho != w // wo:
    raise ValueError(
      f"Output size {h}x{w} is not a square-window upsampling of the pooled size {ho}x{wo}."
    )
  window = h // ho
  rows, cols = indices // w, indices % w
  local = (rows % window) * window + cols % window  # position inside the window
  onehot = local[..., None] == jnp.arange(window * window)  # (..., Ho, Wo, C, s*s)
  windows = jnp.where(onehot, pooled[..., None], jnp.zeros((), pooled.dtype))
  return _from_windows(windows, window)


def nearest_unpool(x: jax.Array, factor: int = 2) -> jax.Array:
  """Nearest-neighbour upsampling: (..., H, W, C) -> (..., H*factor, W*factor, C)."""
  *batch, h, w, c = x.shape
  # Broadcast-and-reshape instead of two jnp.repeat calls: one copy, no gathers.
  x = jnp.broadcast_to(x[..., :, None, :, None, :], (*batch, h, factor, w, factor, c))
  return x.reshape(*batch, h * factor, w * factor, c)

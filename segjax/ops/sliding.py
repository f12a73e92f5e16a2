"""Dense inference on images of any size under static shapes: mmseg's `whole` and `slide`
modes (`EncoderDecoder.whole_inference`, `slide_inference`) and its flip and multi-scale TTA.

Every image of a batch lies in the top-left corner of one canvas (B, H, W, C), its content
size `(B, 2)` (h, w) int32 traced, the rest padding. So that jit compiles once per split,
what depends on an image's size is computed per image inside the static canvas:
  `resize_content`: bilinear resizing of the content alone (half-pixel centres, no
    antialiasing, edges clamped, as `tf.image.resize` and torch's `F.interpolate(...,
    align_corners=False)`); padding never bleeds into the content.
  `flip_content`: mirrors the content, leaving the padding where it is.
  `slide_logits`: mmseg's window grid of each image's own size; a static number of windows
    (that of the canvas), those an image does not have weighted 0. An image side shorter than
    the window is seen zero-padded to it, where mmseg runs a smaller window (which a U-Net
    could not take unless it were a multiple of its stride).
`dense_probabilities` composes them: each (scale, flip) pass gives logits, resized to the
original label size and turned into softmax probabilities, averaged over passes (mmseg 0.x
`aug_test`); windows of one pass average logits (mmseg's count map).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

Array = jax.Array


def content_mask(size: Array, shape: Sequence[int]) -> Array:
  """(B, H, W) bool: True inside each image's top-left `size` (B, 2) of a (H, W) canvas."""
  rows = jnp.arange(shape[0])[None, :, None] < size[:, 0, None, None]
  cols = jnp.arange(shape[1])[None, None, :] < size[:, 1, None, None]
  return rows & cols


def resize_content(x: Array, size: Array, new_size: Array, shape: Sequence[int]) -> Array:
  """One image's content `x[:h, :w]` (x (H, W, C), `size` (2,) = (h, w)) resized bilinearly
  to `new_size` (2,), at the top left of a `shape` (H', W') canvas; the rest is unspecified.

  The content's last row and column are repeated into the padding first: bilinear weights
  past the edge then read the edge, as clamping does, instead of the padding.
  """
  rows = jnp.minimum(jnp.arange(x.shape[0]), size[0] - 1)
  cols = jnp.minimum(jnp.arange(x.shape[1]), size[1] - 1)
  x = x[rows][:, cols]
  scale = new_size.astype(jnp.float32) / size.astype(jnp.float32)
  return jax.image.scale_and_translate(
    x, (*shape, x.shape[-1]), (0, 1), scale, jnp.zeros(2, jnp.float32), "linear", antialias=False
  )


def flip_content(x: Array, size: Array) -> Array:
  """One image (H, W, C) with its content `x[:h, :w]` mirrored left-right; its own inverse."""
  cols = jnp.arange(x.shape[1])
  return x[:, jnp.where(cols < size[1], size[1] - 1 - cols, cols)]


def window_starts(length: Array, extent: int, crop: int, stride: int) -> tuple[Array, Array]:
  """(starts (B, N), valid (B, N)) along one axis: mmseg's windows over images of `length`
  (B,), N = the number an `extent` canvas needs. mmseg: grids = max(L - crop + stride - 1,
  0) // stride + 1; window i ends at min(i * stride + crop, L) and starts crop before it
  (not before 0)."""
  n = max(extent - crop + stride - 1, 0) // stride + 1
  i = jnp.arange(n)[None]
  grids = jnp.maximum(length[:, None] - crop + stride - 1, 0) // stride + 1
  starts = jnp.maximum(jnp.minimum(i * stride, length[:, None] - crop), 0)
  return starts.astype(jnp.int32), i < grids


def slide_logits(
  apply_fn: Callable[[Array], Array],
  images: Array,
  size: Array,
  *,
  crop: Sequence[int],
  stride: Sequence[int],
) -> Array:
  """(B, H, W, K) float32: `apply_fn` ((B, ch, cw, C) -> (B, ch, cw, K) logits) on mmseg's
  sliding windows of each image, overlapping logits averaged; 0 where no window reaches
  (padding). The canvas must be at least `crop`. Windows run one grid position at a time
  for the whole batch (`lax.scan`), so memory holds one window batch, not all of them."""
  b, h, w, c = images.shape
  ch, cw = crop
  if h < ch or w < cw:
    raise ValueError(f"The canvas {(h, w)} is smaller than the window {tuple(crop)}.")
  ys, y_ok = window_starts(size[:, 0], h, ch, stride[0])
  xs, x_ok = window_starts(size[:, 1], w, cw, stride[1])
  nx = xs.shape[1]
  take = jax.vmap(lambda im, y, x: jax.lax.dynamic_slice(im, (y, x, 0), (ch, cw, im.shape[-1])))

  def add(total, part, y, x):
    window = jax.lax.dynamic_slice(total, (y, x, 0), part.shape)
    return jax.lax.dynamic_update_slice(total, window + part, (y, x, 0))

  def body(carry, g):
    total, count = carry
    y, x = ys[:, g // nx], xs[:, g % nx]
    weight = (y_ok[:, g // nx] & x_ok[:, g % nx]).astype(jnp.float32)[:, None, None, None]
    logits = apply_fn(take(images, y, x)).astype(jnp.float32) * weight
    total = jax.vmap(add)(total, logits, y, x)
    count = jax.vmap(add)(count, jnp.broadcast_to(weight, (b, ch, cw, 1)), y, x)
    return (total, count), None

  k = jax.eval_shape(apply_fn, jax.ShapeDtypeStruct((b, ch, cw, c), images.dtype)).shape[-1]
  init = (jnp.zeros((b, h, w, k), jnp.float32), jnp.zeros((b, h, w, 1), jnp.float32))
  (total, count), _ = jax.lax.scan(body, init, jnp.arange(ys.shape[1] * nx))
  return total / jnp.maximum(count, 1.0)


def scaled_canvas(
  shape: Sequence[int], scale: float, multiple: int, minimum: Sequence[int] = (0, 0)
) -> tuple[int, int]:
  """A canvas for `shape` scaled by `scale`: rounded up to `multiple`, at least `minimum`."""
  return tuple(
    max(-(-math.ceil(s * scale) // multiple) * multiple, m) for s, m in zip(shape[:2], minimum)
  )


def dense_probabilities(
  apply_fn: Callable[[Array], Array],
  images: Array,
  size: Array,
  label_size: Array,
  label_shape: Sequence[int],
  *,
  multiple: int,
  scales: Sequence[float] = (1.0,),
  flip: bool = False,
  crop: Sequence[int] | None = None,
  stride: Sequence[int] | None = None,
  same_size: bool = False,
) -> Array:
  """(B, Hl, Wl, K) float32 class probabilities at each image's original label size.

  Args:
    apply_fn: normalized images (B, h, w, C) -> logits (B, h, w, K), h and w multiples of
      `multiple` (the model's stride).
    images: (B, H, W, C) normalized canvas, content top-left, 0 elsewhere, H and W multiples
      of `multiple` and at least `crop`.
    size: (B, 2) int32 content sizes in `images`. label_size: (B, 2) the original sizes the
      probabilities are resized to (bilinearly, as logits), in a `label_shape` (Hl, Wl)
      canvas; past `label_size` the values are unspecified: the caller ignores them.
    scales: each pass resizes the content by a scale (rounded, at least 1 pixel) into a
      canvas of the scaled size rounded up to `multiple` (at least `crop`).
    flip: also a pass on each scale's left-right mirrored content.
    crop, stride: (h, w) windows and steps of `slide_logits`; None: the whole canvas at once.
    same_size: `size == label_size` for every image (no resizing before the model): scale 1
      then crops instead of resizing, as fast as the model alone.

  Probabilities are averaged over the passes, logits over the windows of a pass (mmseg).
  """
  passes = []
  for scale in scales:
    if scale == 1.0:
      x, x_size = images, size
    else:
      x_size = jnp.maximum(jnp.round(size * scale), 1).astype(jnp.int32)
      shape = scaled_canvas(images.shape[1:3], scale, multiple, crop or (0, 0))
      x = jax.vmap(lambda im, s, n, shape=shape: resize_content(im, s, n, shape))(
        images, size, x_size
      )
      x = jnp.where(content_mask(x_size, shape)[..., None], x, 0.0)
    for flipped in (False, True) if flip else (False,):
      inputs = jax.vmap(flip_content)(x, x_size) if flipped else x
      if crop is None:
        logits = apply_fn(inputs).astype(jnp.float32)
      else:
        logits = slide_logits(apply_fn, inputs, x_size, crop=crop, stride=stride)
      if flipped:
        logits = jax.vmap(flip_content)(logits, x_size)
      if same_size and scale == 1.0:
        logits = logits[:, : label_shape[0], : label_shape[1]]
      else:
        logits = jax.vmap(lambda lg, s, n: resize_content(lg, s, n, label_shape))(
          logits, x_size, label_size
        )
      passes.append(jax.nn.softmax(logits, axis=-1))
  return sum(passes) / len(passes)

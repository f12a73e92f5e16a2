"""The ROIAlign of segjax/ops/roi_align.py before the adaptive grid's window layout, verbatim
(2 slots per sample, `2 * max_sampling_ratio` per bin), the reference of test_roi_align.py."""

import jax
import jax.numpy as jnp

Array = jax.Array

DEFAULT_MAX_SAMPLING_RATIO = 4


def _axis_samples(
  start: Array,
  length: Array,
  bins: int,
  size: Array,
  sampling_ratio: int,
  max_sampling_ratio: int,
) -> tuple[Array, Array]:
  """Per-bin (index, weight) pairs along one axis.

  Args:
    start, length: `(R,)` ROI start and length on this axis, in feature pixels.
    bins: number of output bins h.
    size: `(R,)` or scalar feature size H along this axis.

  Returns:
    index `(R, h, J)` int32 in `[0, H)` and weight `(R, h, J)` float, `J = 2 * g_max`.
  """
  bin_size = length / bins
  if sampling_ratio > 0:
    g_max = sampling_ratio
    grid = jnp.full_like(length, sampling_ratio)
  else:
    g_max = max_sampling_ratio
    grid = jnp.clip(jnp.ceil(bin_size), 0, max_sampling_ratio)
  size = jnp.broadcast_to(jnp.asarray(size), length.shape).astype(length.dtype)
  size, start, bin_size, grid = (a[:, None, None] for a in (size, start, bin_size, grid))
  b = jnp.arange(bins, dtype=length.dtype)[None, :, None]
  i = jnp.arange(g_max, dtype=length.dtype)[None, None, :]
  y = start + b * bin_size + (i + 0.5) * bin_size / jnp.maximum(grid, 1.0)
  # Empty ROIs have grid 0: no samples, output 0 (torchvision divides by max(count, 1)).
  used = (i < grid) & (y >= -1.0) & (y <= size)
  y = jnp.maximum(y, 0.0)
  low = jnp.floor(y)
  at_end = low >= size - 1
  low = jnp.where(at_end, size - 1, low)
  high = jnp.where(at_end, size - 1, low + 1)
  frac = jnp.where(at_end, 0.0, y - low)
  scale = jnp.where(used, 1.0 / jnp.maximum(grid, 1.0), 0.0)
  index = jnp.stack([low, high], axis=-1).astype(jnp.int32)
  weight = jnp.stack([(1.0 - frac) * scale, frac * scale], axis=-1)
  r = length.shape[0]
  return index.reshape(r, bins, 2 * g_max), weight.reshape(r, bins, 2 * g_max)


def _combine_impl(table: Array, row: Array, xi: Array, wy: Array, wx: Array) -> Array:
  """`out[r, p, q] = sum_jl wy[r, p, j] wx[r, q, l] table[row[r, p, j] + xi[r, q, l]]`.

  Written as J*J gathers of `(R, h, w, C)` summed in one expression, which XLA fuses into a
  single loop (no `(R, h, J, w, J, C)` intermediate): 5-20x faster on CPU than an einsum over
  the gathered block. Past 8 x 8 terms the outer sum becomes a loop to bound compile time.
  """
  jy, jx = row.shape[-1], xi.shape[-1]

  def term(rj, wyj):  # (R, h) row starts and weights of one y sample
    inner = 0.0
    for l in range(jx):
      idx = rj[:, :, None] + xi[:, None, :, l]
      inner = inner + wx[:, None, :, l, None] * table[idx].astype(jnp.float32)
    return wyj[:, :, None, None] * inner

  if jy * jx <= 64:
    return sum(term(row[:, :, j], wy[:, :, j]) for j in range(jy))
  out = jnp.zeros(row.shape[:2] + xi.shape[1:2] + table.shape[-1:], jnp.float32)
  return jax.lax.fori_loop(0, jy, lambda j, out: out + term(row[:, :, j], wy[:, :, j]), out)


def _combine_fwd(table, row, xi, wy, wx):
  return _combine_impl(table, row, xi, wy, wx), (table, row, xi, wy, wx)


def _combine_bwd(res, g):
  # Autodiff of the forward would build J*J zero tables and add them. Instead accumulate
  # J*J scatter-adds into one buffer (in place), in a loop to keep compile time flat; flat
  # 1-D indices make XLA's CPU scatter ~3x faster than (R, h, w) ones.
  table, row, xi, wy, wx = res
  c = table.shape[-1]
  jy, jx = row.shape[-1], xi.shape[-1]
  g = g.astype(jnp.float32)

  def body(k, grad):
    j, l = k // jx, k % jx
    rj, wyj = row[:, :, j], wy[:, :, j]  # (R, h)
    xl, wxl = xi[:, :, l], wx[:, :, l]  # (R, w)
    idx = (rj[:, :, None] + xl[:, None, :]).reshape(-1)
    upd = (wyj[:, :, None, None] * wxl[:, None, :, None] * g).reshape(-1, c)
    return grad.at[idx].add(upd)

  grad = jax.lax.fori_loop(0, jy * jx, body, jnp.zeros(table.shape, jnp.float32))
  # Boxes get no gradient (as in torchvision and detectron2); roi_align stops it.
  return grad.astype(table.dtype), None, None, None, None


_combine = jax.custom_vjp(_combine_impl)
_combine.defvjp(_combine_fwd, _combine_bwd)


def roi_align_flat(
  table: Array,
  boxes: Array,
  base: Array,
  height: Array,
  width: Array,
  spatial_scale: Array,
  output_size: tuple[int, int],
  sampling_ratio: int,
  aligned: bool = True,
  max_sampling_ratio: int = DEFAULT_MAX_SAMPLING_RATIO,
) -> Array:
  """ROIAlign of each box `(R, 4)` on its own map inside a flat feature table `(P, C)`.

  ROI r reads the `(height[r], width[r])` map stored row-major at `table[base[r]:]`, with
  `spatial_scale[r]`; `base`, `height`, `width`, `spatial_scale` are `(R,)` or scalars.
  Returns `(R, h, w, C)` in the table's dtype (float32 for integer or bool tables). Building
  block of `roi_align`, `multilevel_roi_align` and `mask_targets`.
  """
  oh, ow = output_size
  r = boxes.shape[0]
  c = table.shape[1]
  dtype = table.dtype if jnp.issubdtype(table.dtype, jnp.floating) else jnp.float32
  if r == 0:
    return jnp.zeros((0, oh, ow, c), dtype)
  boxes = jax.lax.stop_gradient(boxes.astype(jnp.float32))
  bc = lambda a, dt: jnp.broadcast_to(jnp.asarray(a, dt), (r,))
  base, height, width = bc(base, jnp.int32), bc(height, jnp.int32), bc(width, jnp.int32)
  spatial_scale = jax.lax.stop_gradient(bc(spatial_scale, jnp.float32))
  offset = 0.5 if aligned else 0.0
  x1 = boxes[:, 0] * spatial_scale - offset
  y1 = boxes[:, 1] * spatial_scale - offset
  roi_w = boxes[:, 2] * spatial_scale - offset - x1
  roi_h = boxes[:, 3] * spatial_scale - offset - y1
  if not aligned:
    roi_w, roi_h = jnp.maximum(roi_w, 1.0), jnp.maximum(roi_h, 1.0)
  yi, wy = _axis_samples(y1, roi_h, oh, height, sampling_ratio, max_sampling_ratio)
  xi, wx = _axis_samples(x1, roi_w, ow, width, sampling_ratio, max_sampling_ratio)
  row = base[:, None, None] + yi * width[:, None, None]  # (R, h, J) flat row starts
  if jnp.issubdtype(table.dtype, jnp.floating):
    return _combine(table, row, xi, wy, wx).astype(dtype)
  # Integer and bool tables (masks) have no gradient; converting only the gathered values
  # avoids a float copy of every full-resolution mask.
  return _combine_impl(table, row, xi, wy, wx)


def roi_align(
  features: Array,
  boxes: Array,
  output_size: tuple[int, int],
  spatial_scale: float,
  sampling_ratio: int,
  aligned: bool = True,
  max_sampling_ratio: int = DEFAULT_MAX_SAMPLING_RATIO,
) -> Array:
  """ROIAlign of boxes `(R, 4)` (image pixels) on one image's features `(H, W, C)`.

  Args:
    features: `(H, W, C)` feature map.
    boxes: `(R, 4)` boxes `[x1, y1, x2, y2]` in image pixels (padding rows are fine).
    output_size: static `(h, w)`.
    spatial_scale: feature pixels per image pixel, 1 / stride.
    sampling_ratio: static samples per bin and axis; 0 for the adaptive `ceil(bin size)`.
    aligned: half-pixel offset of ROIAlignV2 (detectron2 default for new models).
    max_sampling_ratio: static cap of the adaptive grid (only used when sampling_ratio is 0).

  Returns:
    `(R, h, w, C)` pooled features. `jax.vmap` over images for a batch.
  """
  h, w, c = features.shape
  return roi_align_flat(
    features.reshape(h * w, c),
    boxes,
    0,
    h,
    w,
    spatial_scale,
    output_size,
    sampling_ratio,
    aligned,
    max_sampling_ratio,
  )

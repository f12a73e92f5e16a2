"""Instance masks in and out of boxes: Mask R-CNN targets and pasting (He et al. 2017, Sec. 3).

- `mask_targets`: the `m x m` training target of each ROI is its matched ground-truth mask
  cropped and resized to the ROI, as detectron2 `BitMasks.crop_and_resize`: ROIAlign on the
  binary mask (`aligned=True`, adaptive sampling, scale 1), thresholded at `>= 0.5`.
- `mask_targets_from_crops`: the same targets from ground-truth masks cropped to their boxes
  at a fixed S x S on the host (TPU Mask R-CNN's `cropped_gt_masks`,
  `segjax.data.instance_ops.crop_and_resize_masks`): ROIAlign in the crop's frame.
- `paste_masks`: predicted `m x m` probabilities back into full-image masks at their boxes, as
  detectron2 `layers/mask_ops.py` `_do_paste_mask`: image pixel centre `px + 0.5` samples the
  mask at `(px + 0.5 - x1) / (x2 - x1) * m - 0.5` with bilinear interpolation and zero
  padding (`grid_sample(..., align_corners=False)`), then `>= threshold`. detectron2's CPU
  path evaluates only a window one pixel beyond each box; here every pixel is evaluated (its
  GPU path), which changes only soft values below 0.5 just outside boxes wider than 3 m.

- `paste_mask_probs_torchvision`: torchvision's `paste_masks_in_image` instead: the mask
  zero-padded by one cell and its box enlarged to match, the box truncated to integers
  `[x1, x2]` (inclusive), the padded mask resized to `x2 - x1 + 1` pixels (bilinear,
  `align_corners=False`) and copied in. Used with `MaskRCNN(conventions="torchvision")`.

All are separable: pasting is `Wy @ mask @ Wx^T` with `(H, m)` and `(W, m)` interpolation
matrices, two small matmuls per box.
"""

import jax
import jax.numpy as jnp

from segjax.ops.roi_align import roi_align_flat

Array = jax.Array

# Mask targets average up to 15 x 15 samples per bin: exact for boxes up to 15 * m = 420 pixels
# with m = 28, an even spread of 8 x 8 for larger ones (the 0.5 threshold hides the gap). Its
# 16 x 16 slots cost what the previous layout's cap of 8 did (exact up to 224 pixels).
MASK_MAX_SAMPLING_RATIO = 15


def mask_targets(
  gt_masks: Array,
  gt_index: Array,
  boxes: Array,
  mask_size: int = 28,
  threshold: float | None = 0.5,
  max_sampling_ratio: int = MASK_MAX_SAMPLING_RATIO,
) -> Array:
  """Mask R-CNN mask-head targets.

  Args:
    gt_masks: `(M, H, W)` ground-truth masks (bool, integer or float) of one image.
    gt_index: `(R,)` int, the ground truth matched to each ROI (matcher output).
    boxes: `(R, 4)` ROIs `[x1, y1, x2, y2]` in the masks' pixels.
    mask_size: static side m of the targets.
    threshold: binarize at `>= threshold` (detectron2); None keeps the soft ROIAlign values
      (torchvision `project_masks_on_boxes`).
    max_sampling_ratio: static cap of the adaptive sampling grid (see `roi_align`).

  Returns:
    `(R, m, m)` float32 targets, in {0, 1} when thresholded.
  """
  m, h, w = gt_masks.shape
  if m == 0:  # no ground truth at all: every ROI is background, targets unused
    return jnp.zeros((boxes.shape[0], mask_size, mask_size), jnp.float32)
  out = roi_align_flat(
    gt_masks.reshape(m * h * w, 1),
    boxes,
    gt_index.astype(jnp.int32) * (h * w),
    h,
    w,
    1.0,
    (mask_size, mask_size),
    sampling_ratio=0,
    aligned=True,
    max_sampling_ratio=max_sampling_ratio,
  )[..., 0].astype(jnp.float32)
  if threshold is None:
    return out
  return (out >= threshold).astype(jnp.float32)


def mask_targets_from_crops(
  crops: Array,
  gt_boxes: Array,
  gt_index: Array,
  boxes: Array,
  mask_size: int = 28,
  threshold: float | None = 0.5,
  max_sampling_ratio: int = MASK_MAX_SAMPLING_RATIO,
) -> Array:
  """`mask_targets` from masks cropped to their boxes instead of full-image masks.

  Each ROI moves into its ground truth's crop frame, `u = (x - gx1) * S / (gx2 - gx1)` (the
  same for y), and is ROIAligned there as `mask_targets` does on the full mask. The crop holds
  the full mask's bilinear values at its cell centres, so the two differ by the resampling
  (the crop resolves `(gx2 - gx1) / S` pixels; adaptive grids count crop cells, not pixels)
  and at the box's edges: the full mask's bilinear values taper to 0 over half a pixel past
  the box, the crop stops half a cell past it. On random shapes 99.4 % of the thresholded
  targets agree at S = 112 (tests/ops/test_mask_targets_from_crops.py).

  Args:
    crops: `(G, S, S)` masks cropped to `gt_boxes` (float in [0, 1], or bool, integer).
    gt_boxes: `(G, 4)` the boxes `[x1, y1, x2, y2]` the crops cover, in image pixels.
    gt_index: `(R,)` int, the ground truth matched to each ROI.
    boxes: `(R, 4)` ROIs in image pixels.
    mask_size, threshold, max_sampling_ratio: as `mask_targets`.

  Returns:
    `(R, m, m)` float32 targets, in {0, 1} when thresholded.
  """
  crops = jnp.asarray(crops)
  g, sh, sw = crops.shape
  if g == 0:
    return jnp.zeros((boxes.shape[0], mask_size, mask_size), jnp.float32)
  gt_index = gt_index.astype(jnp.int32)
  gt = gt_boxes.astype(jnp.float32)[gt_index]  # (R, 4)
  # Empty boxes (padding) scale ROIs far outside the crop: zero targets, never NaN.
  size = jnp.maximum(gt[:, 2:] - gt[:, :2], 1e-6)
  scale = jnp.array([sw, sh], jnp.float32) / size  # (R, 2) crop cells per pixel
  local = (boxes.astype(jnp.float32) - jnp.tile(gt[:, :2], 2)) * jnp.tile(scale, 2)
  return mask_targets(crops, gt_index, local, mask_size, threshold, max_sampling_ratio)


def _interpolation_matrix(start: Array, stop: Array, size: int, m: int) -> Array:
  """`(N, size, m)` bilinear weights of image pixels `[0, size)` on an m-cell box axis."""
  length = stop - start
  ok = length > 0
  scale = m / jnp.where(ok, length, 1.0)
  pix = jnp.arange(size, dtype=jnp.float32) + 0.5
  pos = (pix[None, :] - start[:, None]) * scale[:, None] - 0.5  # (N, size) in mask cells
  low = jnp.floor(pos)
  frac = pos - low
  low = low.astype(jnp.int32)
  # one_hot of an index outside [0, m) is all zeros: grid_sample's zero padding.
  weights = (
    jax.nn.one_hot(low, m) * (1.0 - frac)[..., None] + jax.nn.one_hot(low + 1, m) * frac[..., None]
  )
  return jnp.where(ok[:, None, None], weights, 0.0)


def paste_mask_probs(masks: Array, boxes: Array, image_size: tuple[int, int]) -> Array:
  """Bilinearly pastes `(N, m, m)` mask probabilities at boxes `(N, 4)`; `(N, H, W)` float32.

  `image_size = (H, W)` is static. Empty boxes paste nothing (all zeros).
  """
  h, w = image_size
  mh, mw = masks.shape[1:]
  boxes = boxes.astype(jnp.float32)
  wy = _interpolation_matrix(boxes[:, 1], boxes[:, 3], h, mh)  # (N, H, m)
  wx = _interpolation_matrix(boxes[:, 0], boxes[:, 2], w, mw)  # (N, W, m)
  # HIGHEST: default TPU/GPU matmul precision would move values across the threshold.
  hp = jax.lax.Precision.HIGHEST
  rows = jnp.einsum("nyk,nkl->nyl", wy, masks.astype(jnp.float32), precision=hp)
  return jnp.einsum("nyl,nxl->nyx", rows, wx, precision=hp)


def _torchvision_matrix(start: Array, stop: Array, size: int, m: int) -> Array:
  """`(N, size, m)` weights of torchvision's paste along one axis of boxes `[start, stop]`."""
  # expand_masks / expand_boxes (padding 1), then the int64 cast, which truncates.
  centre, half = (start + stop) * 0.5, (stop - start) * 0.5 * (m + 2) / m
  lo, hi = jnp.trunc(centre - half), jnp.trunc(centre + half)
  length = jnp.maximum(hi - lo + 1.0, 1.0)
  j = jnp.arange(size, dtype=jnp.float32)[None, :] - lo[:, None]  # index in the resized mask
  inside = (j >= 0) & (j < length[:, None])
  # F.interpolate(mode="bilinear", align_corners=False) of the m + 2 padded cells.
  src = jnp.maximum((j + 0.5) * (m + 2) / length[:, None] - 0.5, 0.0)
  low = jnp.floor(src)
  frac = src - low
  low = low.astype(jnp.int32)
  high = jnp.minimum(low + 1, m + 1)
  padded = (
    jax.nn.one_hot(low, m + 2) * (1.0 - frac)[..., None]
    + jax.nn.one_hot(high, m + 2) * frac[..., None]
  )
  return jnp.where(inside[..., None], padded[..., 1:-1], 0.0)  # The padding cells are zero.


def paste_mask_probs_torchvision(masks: Array, boxes: Array, image_size: tuple[int, int]) -> Array:
  """`paste_mask_probs` as torchvision's `paste_masks_in_image(masks, boxes, image_size,
  padding=1)`; `(N, H, W)` float32."""
  h, w = image_size
  mh, mw = masks.shape[1:]
  boxes = boxes.astype(jnp.float32)
  wy = _torchvision_matrix(boxes[:, 1], boxes[:, 3], h, mh)
  wx = _torchvision_matrix(boxes[:, 0], boxes[:, 2], w, mw)
  hp = jax.lax.Precision.HIGHEST
  rows = jnp.einsum("nyk,nkl->nyl", wy, masks.astype(jnp.float32), precision=hp)
  return jnp.einsum("nyl,nxl->nyx", rows, wx, precision=hp)


PASTE = {"detectron2": paste_mask_probs, "torchvision": paste_mask_probs_torchvision}


def paste_masks(
  masks: Array,
  boxes: Array,
  image_size: tuple[int, int],
  threshold: float = 0.5,
  convention: str = "detectron2",
) -> Array:
  """Full-image instance masks `(N, H, W)` bool: `paste_mask_probs(...) >= threshold`.

  Args:
    masks: `(N, m, m)` predicted mask probabilities (after the sigmoid), one per box.
    boxes: `(N, 4)` boxes `[x1, y1, x2, y2]` in output-image pixels.
    image_size: static `(H, W)` of the output masks.
    threshold: binarization threshold.
    convention: "detectron2" (`paste_mask_probs`) or "torchvision"
      (`paste_mask_probs_torchvision`).
  """
  if convention not in PASTE:
    raise ValueError(f"Unknown paste convention {convention!r}; known: {list(PASTE)}.")
  return PASTE[convention](masks, boxes, image_size) >= threshold

"""Multi-level ROI pooling over FPN levels (Lin et al. 2017, "Feature Pyramid Networks", Eq. 1).

As detectron2 `modeling/poolers.py` `ROIPooler`: a box of size `s = sqrt(area)` goes to level
`floor(4 + log2(s / 224 + 1e-8))` (canonical box 224 pixels at level 4), clamped to the levels
present (P2-P5 for Mask R-CNN), and is ROIAligned there with `spatial_scale = 1 / 2**level`.

With static shapes every box must be pooled in one pass: the levels are flattened into one
`(sum_l H_l W_l, C)` table and each box reads its own level through a per-box base offset,
row length and scale (`roi_align_flat`), so the cost is that of one ROIAlign over the R boxes,
not one per level.
"""

import re
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from segjax.ops.boxes import box_area
from segjax.ops.roi_align import DEFAULT_MAX_SAMPLING_RATIO, roi_align_flat

Array = jax.Array
# A list of (H_l, W_l, C) maps, finest first, or a dict keyed by level: 2 or "p2".
Features = Sequence[Array] | Mapping[int | str, Array]


def assign_boxes_to_levels(
  boxes: Array,
  min_level: int = 2,
  max_level: int = 5,
  canonical_box_size: float = 224.0,
  canonical_level: int = 4,
) -> Array:
  """FPN level `(R,)` int32 in `[min_level, max_level]` of each box `(R, 4)` (image pixels).

  Empty boxes (padding) go to `min_level`.
  """
  size = jnp.sqrt(box_area(boxes))
  level = jnp.floor(canonical_level + jnp.log2(size / canonical_box_size + 1e-8))
  return jnp.clip(level, min_level, max_level).astype(jnp.int32)


def _levels(features: Features, min_level: int) -> tuple[tuple[int, ...], tuple[Array, ...]]:
  if isinstance(features, Mapping):
    items = sorted((int(re.sub(r"^[pP]", "", str(k))), v) for k, v in features.items())
    levels = tuple(k for k, _ in items)
    if levels != tuple(range(levels[0], levels[0] + len(levels))):
      raise ValueError(f"FPN levels must be consecutive, got {levels}")
    return levels, tuple(v for _, v in items)
  return tuple(range(min_level, min_level + len(features))), tuple(features)


def multilevel_roi_align(
  features: Features,
  boxes: Array,
  output_size: tuple[int, int],
  sampling_ratio: int = 0,
  aligned: bool = True,
  *,
  min_level: int = 2,
  canonical_box_size: float = 224.0,
  canonical_level: int = 4,
  max_sampling_ratio: int = DEFAULT_MAX_SAMPLING_RATIO,
  adaptive_layout: str = "window",
) -> Array:
  """ROIAlign of each box on its FPN level.

  Args:
    features: FPN maps `(H_l, W_l, C)` of stride `2**l`, as a list starting at `min_level`
      or a dict keyed by level (`{2: p2, ...}` or `{"p2": p2, ...}`). Pass P2-P5 only, not P6.
    boxes: `(R, 4)` boxes `[x1, y1, x2, y2]` in image pixels; padding rows are fine.
    output_size: static `(h, w)`: (7, 7) for the box head, (14, 14) for the mask head.
    sampling_ratio: samples per bin and axis; 0 (detectron2's default) for adaptive.
    aligned: ROIAlignV2 half-pixel offset.
    min_level: level of `features[0]` when `features` is a list.
    canonical_box_size, canonical_level: the level assignment of `assign_boxes_to_levels`.
    max_sampling_ratio, adaptive_layout: the adaptive grid's cap and slot layout (see
      `roi_align`).

  Returns:
    `(R, h, w, C)` pooled features; `batched_multilevel_roi_align` for a batch.
  """
  out = batched_multilevel_roi_align(
    _map_levels(features, lambda m: m[None]),
    boxes[None],
    output_size,
    sampling_ratio,
    aligned,
    min_level=min_level,
    canonical_box_size=canonical_box_size,
    canonical_level=canonical_level,
    max_sampling_ratio=max_sampling_ratio,
    adaptive_layout=adaptive_layout,
  )
  return out[0]


def batched_multilevel_roi_align(
  features: Features,
  boxes: Array,
  output_size: tuple[int, int],
  sampling_ratio: int = 0,
  aligned: bool = True,
  *,
  min_level: int = 2,
  canonical_box_size: float = 224.0,
  canonical_level: int = 4,
  max_sampling_ratio: int = DEFAULT_MAX_SAMPLING_RATIO,
  adaptive_layout: str = "window",
) -> Array:
  """`multilevel_roi_align` of a batch: maps `(B, H_l, W_l, C)`, boxes `(B, R, 4)`, result
  `(B, R, h, w, C)`.

  Equal to `jax.vmap(multilevel_roi_align)`, but every image and level is one flat table and
  every box one row of a single 1-D gather (vmapped, the gathers and the gradient's scatters
  carry an image index): 1.05-1.12x faster forward and backward for the box and mask heads'
  pooling of a batch of 2 at 512x512 on CPU.
  """
  levels, maps = _levels(features, min_level)
  b, c = maps[0].shape[0], maps[0].shape[-1]
  if any(m.ndim != 4 or m.shape[0] != b or m.shape[-1] != c for m in maps):
    raise ValueError(f"need (B, H, W, {c}) maps, got {[m.shape for m in maps]}")
  if boxes.ndim != 3 or boxes.shape[0] != b or boxes.shape[-1] != 4:
    raise ValueError(f"need (B={b}, R, 4) boxes, got {boxes.shape}")
  r = boxes.shape[1]
  sizes = np.array([m.shape[1:3] for m in maps], np.int32)  # (L, 2)
  cells = sizes[:, 0] * sizes[:, 1]
  cells_before = np.concatenate([[0], np.cumsum(cells)[:-1]]).astype(np.int32)
  scales = np.array([2.0**-l for l in levels], np.float32)
  table = jnp.concatenate([m.reshape(-1, c) for m in maps], axis=0)
  flat_boxes = boxes.reshape(-1, 4)
  level = (
    assign_boxes_to_levels(flat_boxes, levels[0], levels[-1], canonical_box_size, canonical_level)
    - levels[0]
  )
  # Table rows: level-major, then image, then pixel; a box reads its image's map of its level.
  # B may be symbolic (`jax.export`): it stays out of numpy.
  image = jnp.broadcast_to(jnp.arange(b, dtype=jnp.int32)[:, None], (b, r)).reshape(-1)
  base = b * jnp.asarray(cells_before)[level] + image * jnp.asarray(cells)[level]
  out = roi_align_flat(
    table,
    flat_boxes,
    base,
    jnp.asarray(sizes[:, 0])[level],
    jnp.asarray(sizes[:, 1])[level],
    jnp.asarray(scales)[level],
    output_size,
    sampling_ratio,
    aligned,
    max_sampling_ratio,
    adaptive_layout,
  )
  return out.reshape((b, r) + out.shape[1:])


def _map_levels(features: Features, fn) -> Features:
  """`features` with `fn` applied to every map, in the same container."""
  if isinstance(features, Mapping):
    return {k: fn(v) for k, v in features.items()}
  return [fn(v) for v in features]

"""Anchors for FPN levels (Lin et al. 2017, "Feature Pyramid Networks", Sec. 4.1).

Numbers follow detectron2 `modeling/anchor_generator.py` `DefaultAnchorGenerator`:
- cell anchors are centred on (0, 0): for each size `s` (outer loop) and aspect ratio `r = h / w`
  (inner loop), `w = sqrt(s * s / r)`, `h = r * w`, box `[-w/2, -h/2, w/2, h/2]` (not rounded,
  unlike torchvision, which rounds them to whole pixels);
- a level with stride `t` and a `(Hf, Wf)` feature map places them at `((j + offset) * t,
  (i + offset) * t)`, offset 0 by default (torchvision's placement too);
- the anchors of a level are ordered `(i, j, a)`, row-major locations then cell anchors, so the
  flat index of anchor `a` at location `(i, j)` is `(i * Wf + j) * A + a`, matching a conv head
  output `(Hf, Wf, A * k)` reshaped to `(Hf * Wf * A, k)`.

torchvision's `AnchorGenerator` differs in two ways, both optional here: it rounds the cell
anchors to whole pixels (`cell_anchors(..., rounded=True)`; it also orders several sizes per
level ratio-major, which a single size per level, the FPN setting, does not show), and it
places level l's anchors with the stride `image_size // grid_size` per axis of the padded
image rather than the nominal one (`anchor_strides`), which differs where the image is not a
multiple of the coarsest stride (P6 of a 352 x 416 image: 58 x 59, not 64).

Shapes depend only on the (static) image size, so the anchors are NumPy constants that `jit`
folds in; nothing here depends on data.
"""

import math
from collections.abc import Sequence

import numpy as np

FPN_STRIDES = (4, 8, 16, 32, 64)  # levels P2..P6
FPN_SIZES = ((32,), (64,), (128,), (256,), (512,))
ASPECT_RATIOS = (0.5, 1.0, 2.0)


def cell_anchors(
  sizes: Sequence[float], aspect_ratios: Sequence[float], rounded: bool = False
) -> np.ndarray:
  """Anchors `(A, 4)`, `A = len(sizes) * len(aspect_ratios)`, centred on the origin; with
  `rounded`, rounded to whole pixels (half to even) as torchvision's."""
  out = []
  for size in sizes:
    area = float(size) ** 2
    for ratio in aspect_ratios:
      w = math.sqrt(area / ratio)
      h = ratio * w
      out.append([-w / 2, -h / 2, w / 2, h / 2])
  out = np.asarray(out, np.float32)
  return np.round(out) if rounded else out


def grid_anchors(
  grid_size: tuple[int, int],
  stride: float | tuple[float, float],
  cells: np.ndarray,
  offset: float = 0.0,
) -> np.ndarray:
  """Anchors `(Hf * Wf * A, 4)` of one level: `cells` `(A, 4)` shifted to every grid location;
  `stride` is one number or `(stride_y, stride_x)`."""
  hf, wf = grid_size
  stride_y, stride_x = stride if isinstance(stride, (tuple, list)) else (stride, stride)
  shift_x = (np.arange(wf, dtype=np.float32) + offset) * stride_x
  shift_y = (np.arange(hf, dtype=np.float32) + offset) * stride_y
  sy, sx = np.meshgrid(shift_y, shift_x, indexing="ij")
  shifts = np.stack([sx, sy, sx, sy], axis=-1).reshape(-1, 1, 4)
  return (shifts + cells[None]).reshape(-1, 4).astype(np.float32)


def feature_grid_sizes(
  image_size: tuple[int, int], strides: Sequence[int] = FPN_STRIDES
) -> tuple[tuple[int, int], ...]:
  """Feature map sizes `((Hf, Wf), ...)` of a backbone with these strides: `ceil(size / stride)`.

  That is what stride-2 convolutions with 'SAME' padding (and FPN's P6 max-pool) produce; pass
  the real feature shapes to `multilevel_anchors` if a backbone differs.
  """
  h, w = image_size
  return tuple((-(-h // s), -(-w // s)) for s in strides)


def anchor_strides(
  image_shape: tuple[int, int], grid_sizes: Sequence[tuple[int, int]]
) -> tuple[tuple[int, int], ...]:
  """torchvision's per-level `(stride_y, stride_x)`: padded image size // grid size."""
  return tuple((image_shape[0] // hf, image_shape[1] // wf) for hf, wf in grid_sizes)


def multilevel_anchors(
  grid_sizes: Sequence[tuple[int, int]],
  strides: Sequence[int | tuple[int, int]] = FPN_STRIDES,
  sizes: Sequence[Sequence[float]] = FPN_SIZES,
  aspect_ratios: Sequence[float] = ASPECT_RATIOS,
  offset: float = 0.0,
  rounded: bool = False,
) -> tuple[np.ndarray, ...]:
  """Anchors of every level, a tuple of `(Hf_l * Wf_l * A, 4)`, finest level first.

  Defaults are detectron2's Mask R-CNN FPN setting: one size per level 32..512, aspect ratios
  0.5/1/2 (3 anchors per location), strides 4..64. Concatenate the levels (`np.concatenate`)
  for matching; keep them apart to pair them with per-level head outputs. `rounded` and
  per-axis strides (`anchor_strides`) give torchvision's anchors.
  """
  if not len(grid_sizes) == len(strides) == len(sizes):
    raise ValueError(
      f"need one grid size, stride and size list per level, got {len(grid_sizes)}, "
      f"{len(strides)} and {len(sizes)}"
    )
  return tuple(
    grid_anchors(g, s, cell_anchors(z, aspect_ratios, rounded), offset)
    for g, s, z in zip(grid_sizes, strides, sizes)
  )


def image_anchors(
  image_size: tuple[int, int],
  strides: Sequence[int] = FPN_STRIDES,
  sizes: Sequence[Sequence[float]] = FPN_SIZES,
  aspect_ratios: Sequence[float] = ASPECT_RATIOS,
  offset: float = 0.0,
) -> np.ndarray:
  """All anchors `(N, 4)` of an image of `(H, W)` pixels, levels concatenated finest first.

  `N = sum_l ceil(H / s_l) * ceil(W / s_l) * A` is static (`num_anchors`): 267,069 for the
  default levels on an (800, 1333) image.
  """
  return np.concatenate(
    multilevel_anchors(
      feature_grid_sizes(image_size, strides), strides, sizes, aspect_ratios, offset
    )
  )


def num_anchors(
  image_size: tuple[int, int],
  strides: Sequence[int] = FPN_STRIDES,
  sizes: Sequence[Sequence[float]] = FPN_SIZES,
  aspect_ratios: Sequence[float] = ASPECT_RATIOS,
) -> int:
  """The static anchor count `N` of `image_anchors` for an image of `(H, W)` pixels."""
  return sum(
    hf * wf * len(z) * len(aspect_ratios)
    for (hf, wf), z in zip(feature_grid_sizes(image_size, strides), sizes)
  )

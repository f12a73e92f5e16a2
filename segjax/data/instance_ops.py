"""Instance data ops: detectron2's detection transforms on feature dicts (Wu et al. 2019).

Resizing follows detectron2 `ResizeShortestEdge` (the Mask R-CNN recipe of He et al. 2017:
shorter side 800, longer at most 1333), or torchvision's `GeneralizedRCNNTransform` for models
of `conventions="torchvision"` (the same rule, sizes floored, torch's bilinear), padding follows
`ImageList.from_tensors` (bottom and right, normalized image padded with 0, i.e. the mean
colour), flipping `HFlipTransform`.

Every op has the contract `op(features: dict, ...) -> dict` over these keys:
  image: (H, W, 3) uint8 or float32.
  boxes: (K, 4) float32 `[x1, y1, x2, y2]` absolute pixels of the current image.
  classes: (K,) int, 1..C; 0 on padding rows.
  instance_masks: (K, H, W) uint8 in {0, 1}.
  valid: (K,) bool, instances to learn from. is_crowd: (K,) bool, COCO crowd regions to keep
    out of matching; a crowd row has `valid == False`; padding rows have both False.
  image_size: (2,) int32 true (h, w) of the image content, before padding.
  scale: () float32, resized size / original size (original coordinates = these / scale).
K may be dynamic until `pad_instances`. Boxes, masks and image always move together. Random
ops take a stateless `seed` (shape (2,) int), as in `segjax.data.ops`.
"""

from __future__ import annotations

import tensorflow as tf

from segjax.data.ops import IMAGENET_MEAN, IMAGENET_STD

INSTANCE_KEYS = ("boxes", "classes", "instance_masks", "valid", "is_crowd")


def with_size(features: dict) -> dict:
  """Adds `image_size` (the image's (h, w)) and `scale` 1.0, unless a resize set them."""
  size = tf.shape(features["image"])[:2]
  return {"image_size": tf.cast(size, tf.int32), "scale": tf.constant(1.0), **features}


# How each `model.conventions` resizes (`resize_shorter_longer`): detectron2 `ResizeShortestEdge`
# rounds sides half up; torchvision `GeneralizedRCNNTransform` floors them (F.interpolate's
# output size for a scale factor) and resizes the float image with torch's own bilinear rule.
RESIZE_CONVENTIONS = ("detectron2", "torchvision")


def _check_convention(convention: str) -> None:
  if convention not in RESIZE_CONVENTIONS:
    raise ValueError(f"Unknown resize convention {convention!r}; known: {RESIZE_CONVENTIONS}.")


def resize_output_size(
  height, width, shorter: int, longer: int | None, convention: str = "detectron2"
):
  """(new_h, new_w, scale) of the shortest-edge rule.

  Scales so that the shorter side becomes `shorter`, unless the longer side would then exceed
  `longer`, in which case the longer side becomes `longer`. "detectron2"
  (`ResizeShortestEdge.get_output_shape`): sides round half up. "torchvision"
  (`_resize_image_and_masks`): sides are `floor(side * scale)` computed in float64 as Python
  computes them, so that e.g. a shorter side of 97 becomes 799, not 800.
  """
  _check_convention(convention)
  dtype = tf.float64 if convention == "torchvision" else tf.float32
  height = tf.cast(height, dtype)
  width = tf.cast(width, dtype)
  scale = shorter / tf.minimum(height, width)
  if longer is not None:
    scale = tf.minimum(scale, longer / tf.maximum(height, width))
  offset = 0.0 if convention == "torchvision" else 0.5
  new_h = tf.cast(tf.floor(height * scale + offset), tf.int32)
  new_w = tf.cast(tf.floor(width * scale + offset), tf.int32)
  return new_h, new_w, tf.cast(scale, tf.float32)


def _torch_linear_weights(n_in, n_out):
  """(low, high, weight of high) of torch's bilinear resize along one axis, n_in -> n_out
  (`align_corners=False`, scale n_in / n_out in float32): source coordinate
  `max(scale * (i + 0.5) - 0.5, 0)` rounded once to float32, as torch's CPU kernel computes it
  with a fused multiply-add (the product is exact in float64)."""
  scale = tf.cast(tf.cast(n_in, tf.float32) / tf.cast(n_out, tf.float32), tf.float64)
  source = tf.cast(scale * (tf.range(n_out, dtype=tf.float64) + 0.5) - 0.5, tf.float32)
  source = tf.maximum(source, 0.0)
  low = tf.floor(source)
  weight = source - low
  low = tf.cast(low, tf.int32)
  return low, tf.minimum(low + 1, n_in - 1), weight


def resize_bilinear_torch(image, size):
  """(H, W, C) image -> float32 (h, w, C) as torch's `F.interpolate(mode="bilinear",
  align_corners=False)` of a float image to `size` (h, w), which is what torchvision's
  `scale_factor=..., recompute_scale_factor=True` computes: half-pixel centres, source
  coordinates clamped at 0, no antialiasing, columns interpolated first. Differs from
  `tf.image.resize` only in rounding (up to ~0.01 on 0..255 values)."""
  x = tf.cast(image, tf.float32)
  hw = tf.shape(x)[:2]
  x0, x1, wx = _torch_linear_weights(hw[1], size[1])
  y0, y1, wy = _torch_linear_weights(hw[0], size[0])
  cols = tf.gather(x, x0, axis=1) * (1.0 - wx)[:, None] + tf.gather(x, x1, axis=1) * wx[:, None]
  return tf.gather(cols, y0) * (1.0 - wy)[:, None, None] + tf.gather(cols, y1) * wy[:, None, None]


def resize_shorter_longer(
  features: dict, shorter: int, longer: int | None = None, convention: str = "detectron2"
) -> dict:
  """Resizes image (bilinear), masks (nearest) and boxes by the shortest-edge rule.

  Boxes scale by new_w / w and new_h / h, exactly as the pixels move; `scale` records the
  (pre-rounding) factor and `image_size` the new (h, w). `convention` (`resize_output_size`):
  "detectron2" resizes with `tf.image.resize` and keeps a uint8 image uint8 (rounded);
  "torchvision" floors the sizes and returns the float32 image of `resize_bilinear_torch`,
  unrounded, as torchvision resizes its float image.
  """
  features = with_size(features)
  hw = tf.shape(features["image"])[:2]
  new_h, new_w, scale = resize_output_size(hw[0], hw[1], shorter, longer, convention)
  size = tf.stack([new_h, new_w])
  if convention == "torchvision":
    image = resize_bilinear_torch(features["image"], size)
  else:
    image = tf.image.resize(features["image"], size, method="bilinear")
    if features["image"].dtype == tf.uint8:  # Keep uint8 so that later ops see one dtype.
      image = tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)
  masks = tf.image.resize(features["instance_masks"][..., None], size, method="nearest")[..., 0]
  factors = tf.cast(size, tf.float32) / tf.cast(hw, tf.float32)
  boxes = features["boxes"] * tf.stack([factors[1], factors[0], factors[1], factors[0]])
  return {
    **features,
    "image": image,
    "instance_masks": masks,
    "boxes": boxes,
    "image_size": size,
    "scale": features["scale"] * scale,
  }


def random_flip_left_right(features: dict, seed) -> dict:
  """Mirrors image, masks and boxes together with probability 1/2: x1' = W - x2, x2' = W - x1.

  W is the current image width, so flip before padding. Padding rows stay all zeros.
  """
  flip = tf.random.stateless_uniform([], seed) < 0.5
  width = tf.cast(tf.shape(features["image"])[1], tf.float32)
  boxes = features["boxes"]
  present = features["valid"] | features.get("is_crowd", tf.zeros_like(features["valid"]))
  flipped_boxes = tf.where(
    present[:, None],
    tf.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], axis=-1),
    boxes,
  )
  image = tf.cond(flip, lambda: features["image"][:, ::-1], lambda: features["image"])
  masks = tf.cond(
    flip, lambda: features["instance_masks"][:, :, ::-1], lambda: features["instance_masks"]
  )
  boxes = tf.cond(flip, lambda: flipped_boxes, lambda: boxes)
  return {**features, "image": image, "instance_masks": masks, "boxes": boxes}


def normalize(features: dict, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> dict:
  """Float32 image standardized per channel; classes int32, boxes float32."""
  image = (tf.cast(features["image"], tf.float32) - mean) / std
  return {
    **features,
    "image": image,
    "classes": tf.cast(features["classes"], tf.int32),
    "boxes": tf.cast(features["boxes"], tf.float32),
  }


def pad_to_multiple(
  features: dict, size: tuple[int, int] | None = None, multiple: int = 32
) -> dict:
  """Pads image (zeros) and masks (zeros) bottom and right; boxes and `image_size` unchanged.

  With `size` (h, w), a multiple of `multiple`, the output has that static shape and an image
  larger than `size` raises; without it, each side rounds up to a multiple of `multiple`
  (a dynamic shape, so not for jitted training).
  """
  features = with_size(features)
  hw = tf.shape(features["image"])[:2]
  if size is None:
    target = (hw + multiple - 1) // multiple * multiple
  else:
    size = tuple(int(s) for s in size)
    if size[0] % multiple or size[1] % multiple:
      raise ValueError(
        f"Padded size {size} is not a multiple of {multiple}; the FPN's strides need it."
      )
    target = tf.constant(size)
    check = tf.debugging.assert_less_equal(
      hw,
      target,
      message=f"An image resized to more than the padded size {size} (h, w); "
      "lower dataset.max_size or raise image_size.",
    )
    with tf.control_dependencies([check]):
      hw = tf.identity(hw)
  pad_h, pad_w = target[0] - hw[0], target[1] - hw[1]
  image = tf.pad(features["image"], [[0, pad_h], [0, pad_w], [0, 0]])
  masks = tf.pad(features["instance_masks"], [[0, 0], [0, pad_h], [0, pad_w]])
  if size is not None:
    image = tf.ensure_shape(image, size + (3,))
    masks = tf.ensure_shape(masks, (None,) + size)
  return {**features, "image": image, "instance_masks": masks}


def pad_instances(features: dict, max_instances: int) -> dict:
  """Pads the instance rows with zeros to a static `max_instances`; more rows raise.

  Sources truncate to `max_instances` already (see `segjax.data.coco`), so the check only
  catches a wiring mistake.
  """
  count = tf.shape(features["classes"])[0]
  check = tf.debugging.assert_less_equal(
    count, max_instances, message=f"More than max_instances={max_instances} instance rows."
  )
  with tf.control_dependencies([check]):
    pad = max_instances - count
  out = dict(features)
  if "is_crowd" not in out:
    out["is_crowd"] = tf.zeros_like(features["valid"])
  for key in INSTANCE_KEYS:
    value = out[key]
    paddings = [[0, pad]] + [[0, 0]] * (len(value.shape) - 1)
    padded = tf.pad(value, paddings)
    out[key] = tf.ensure_shape(padded, (max_instances,) + tuple(value.shape[1:]))
  return out


def _cell_samples(start, stop, size: int, length):
  """Along one axis, for boxes `[start, stop]` `(K,)`: the low and high pixels `(K, S)` int64
  of the S cell centres, the high one's bilinear weight, and whether the sample counts."""
  cells = (tf.range(size, dtype=tf.float32) + 0.5) / size
  coords = start[:, None] + cells[None, :] * (stop - start)[:, None] - 0.5  # Pixel indices.
  length = tf.cast(length, tf.float32)
  inside = (coords >= -1.0) & (coords <= length)
  coords = tf.clip_by_value(coords, 0.0, length - 1.0)
  low = tf.floor(coords)
  high = tf.minimum(low + 1.0, length - 1.0)
  return tf.cast(low, tf.int64), tf.cast(high, tf.int64), coords - low, inside


def crop_and_resize_masks(masks, boxes, size: int):
  """Each mask `(K, H, W)` cropped to its box `(K, 4)` and resized to float32 `(K, S, S)`.

  Cell `(i, j)` of a crop is the mask's bilinear value at the centre of cell `(i, j)` of an
  S x S grid over the box `[x1, x2] x [y1, y2]` (pixel-area coordinates, pixel x covering
  `[x, x + 1]`): at pixel-index column `x1 + (j + 0.5) (x2 - x1) / S - 0.5`, the same for rows.
  That is ROIAlign of the box (`aligned=True`, one sample per bin), with its border rule: a
  sample within a pixel outside the mask reads the border pixel, one further reads 0. Values
  are in [0, 1] for {0, 1} masks (as TPU Mask R-CNN's `cropped_gt_masks`).

  `tf.image.crop_and_resize` samples the same points given the box rows normalized as
  `y1n = (y1 + h / 2S - 0.5) / (H - 1)`, `y2n = (y2 - h / 2S - 0.5) / (H - 1)` (h = y2 - y1;
  it samples row `y1n (H - 1) + i (y2n - y1n) (H - 1) / (S - 1)`: normalized coordinates
  address pixel centres, not areas), and the columns alike. But it reads 0 past the border,
  which would cut half a cell off objects at the image's top or left edge; padding the
  masks by a replicated pixel for it (tf.pad "SYMMETRIC") takes 1.4 s per COCO image
  (K = 100, 1344^2) on a CPU core, these four gathers of K S^2 values 0.07 s.
  """
  masks = tf.convert_to_tensor(masks)
  boxes = tf.cast(boxes, tf.float32)
  shape = tf.shape(masks, out_type=tf.int64)
  x1, y1, x2, y2 = tf.unstack(boxes, axis=-1)
  y_low, y_high, y_frac, y_in = _cell_samples(y1, y2, size, shape[1])
  x_low, x_high, x_frac, x_in = _cell_samples(x1, x2, size, shape[2])
  flat = tf.reshape(masks, [-1])
  base = tf.range(shape[0])[:, None, None] * shape[1] * shape[2]
  crops = 0.0
  for rows, wy in ((y_low, 1.0 - y_frac), (y_high, y_frac)):
    for cols, wx in ((x_low, 1.0 - x_frac), (x_high, x_frac)):
      values = tf.gather(flat, base + rows[:, :, None] * shape[2] + cols[:, None, :])
      crops += wy[:, :, None] * wx[:, None, :] * tf.cast(values, tf.float32)
  counts = tf.cast(y_in[:, :, None] & x_in[:, None, :], tf.float32)
  return crops * counts


def crop_instance_masks(features: dict, size: int) -> dict:
  """`instance_masks` replaced by `cropped_masks` `(K, S, S)` float32, each mask cropped to its
  box (`crop_and_resize_masks`) and zero on rows that are not `valid` (padding, crowds).

  Call it last, after every op that moves pixels, so that the boxes and the masks it crops
  are in the same (padded) frame.
  """
  crops = crop_and_resize_masks(features["instance_masks"], features["boxes"], size)
  crops = tf.where(features["valid"][:, None, None], crops, 0.0)
  features = {k: v for k, v in features.items() if k != "instance_masks"}
  return {**features, "cropped_masks": crops}

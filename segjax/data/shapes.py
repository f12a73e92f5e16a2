"""Shapes: a procedurally generated segmentation data set, segjax's embedded default.

Each image shows 1 to `max_shapes` filled shapes (circle, square, triangle, cross) of random
size, colour, position and overlap on a textured, noisy background. The class is the shape,
never the colour: colours are drawn independently of the class. Later shapes occlude earlier
ones; a shape is only placed if every earlier shape keeps at least half of its area visible,
so each instance stays recognisable.

Every example is a pure function of (seed, split, index), so any image size and any number
of examples can be generated, on any host, without downloads. Besides the semantic `mask`,
each example carries the instance annotations Mask R-CNN needs (visible masks, boxes,
classes), padded to `max_instances` with a `valid` flag.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

CLASS_NAMES = ("background", "circle", "square", "triangle", "cross")
NUM_CLASSES = len(CLASS_NAMES)
SPLITS = {"train": 0, "validation": 1, "test": 2}

_MIN_VISIBLE_FRACTION = 0.5
_MIN_COLOUR_DISTANCE = 60.0
_MIN_SIDE = 16  # A shape needs 16 pixels; smaller images could never hold one.


def _regular_polygon(cx, cy, radius, num_vertices, angle):
  t = angle + 2 * np.pi * np.arange(num_vertices) / num_vertices
  return np.stack([cx + radius * np.cos(t), cy + radius * np.sin(t)], axis=-1)


def _inside_convex_polygon(xx, yy, vertices):
  """Pixels on the inner side of every edge of a counter-clockwise convex polygon."""
  inside = np.ones(xx.shape, bool)
  for (x0, y0), (x1, y1) in zip(vertices, np.roll(vertices, -1, axis=0)):
    inside &= (x1 - x0) * (yy - y0) - (y1 - y0) * (xx - x0) >= 0
  return inside


def _shape_mask(class_id, xx, yy, cx, cy, radius, angle):
  if CLASS_NAMES[class_id] == "circle":
    return (xx - cx) ** 2 + (yy - cy) ** 2 <= radius**2
  if CLASS_NAMES[class_id] == "square":  # Axis-aligned, so it never looks like a diamond.
    half = radius / np.sqrt(2)
    return (np.abs(xx - cx) <= half) & (np.abs(yy - cy) <= half)
  if CLASS_NAMES[class_id] == "triangle":
    return _inside_convex_polygon(xx, yy, _regular_polygon(cx, cy, radius, 3, angle))
  if CLASS_NAMES[class_id] == "cross":  # Axis-aligned plus sign, arms a third as wide.
    half, arm = radius / np.sqrt(2), radius / (3 * np.sqrt(2))
    dx, dy = np.abs(xx - cx), np.abs(yy - cy)
    return ((dx <= half) & (dy <= arm)) | ((dx <= arm) & (dy <= half))
  raise ValueError(f"No shape for class id {class_id}.")


def _background(rng, height, width, xx, yy):
  base = rng.uniform(0, 255, size=3)
  gradient = rng.uniform(-60, 60, size=(2, 3))
  image = (
    base
    + (xx[..., None] / width - 0.5) * gradient[0]
    + (yy[..., None] / height - 0.5) * (gradient[1])
  )
  for _ in range(2):  # Sinusoidal texture so that flat colour alone does not mean background.
    freq = rng.uniform(0.05, 0.4, size=2)
    phase = rng.uniform(0, 2 * np.pi)
    amplitude = rng.uniform(5, 25, size=3)
    image += amplitude * np.sin(freq[0] * xx + freq[1] * yy + phase)[..., None]
  return image


def _contrasting_colour(rng, reference):
  for _ in range(100):
    colour = rng.uniform(0, 255, size=3)
    if np.linalg.norm(colour - reference) >= _MIN_COLOUR_DISTANCE:
      return colour
  return 255.0 - reference


def generate_example(
  seed: int,
  split: str,
  index: int,
  image_size: tuple[int, int] = (64, 64),
  max_shapes: int = 4,
  max_instances: int = 8,
  noise_std: float = 8.0,
) -> dict[str, np.ndarray]:
  """One example as numpy arrays, a pure function of its arguments; sides of 16 pixels or more.

  Returns:
    image: uint8 (H, W, 3). mask: uint8 (H, W), class ids (0 = background).
    instance_masks: uint8 (K, H, W) visible part of each shape, K = max_instances.
    boxes: float32 (K, 4) `[x1, y1, x2, y2]` absolute pixels enclosing the visible part.
    classes: int32 (K,) in 1..NUM_CLASSES-1. valid: bool (K,); padding rows are zeros.
  """
  if split not in SPLITS:
    raise ValueError(f"Unknown shapes split {split!r}; expected one of {sorted(SPLITS)}.")
  if max_shapes > max_instances:
    raise ValueError(f"max_shapes={max_shapes} exceeds max_instances={max_instances}.")
  height, width = image_size
  if min(height, width) < _MIN_SIDE:
    raise ValueError(
      f"image_size={tuple(image_size)} is too small for shapes; both sides must "
      f"be at least {_MIN_SIDE} pixels."
    )
  rng = np.random.default_rng([seed, SPLITS[split], index])
  yy, xx = np.mgrid[0:height, 0:width].astype(np.float32) + 0.5
  image = _background(rng, height, width, xx, yy)
  owner = np.full((height, width), -1, np.int32)  # Index of the shape on top at each pixel.
  full_areas, classes = [], []
  num_shapes = rng.integers(1, max_shapes + 1)
  min_side = min(height, width)
  attempts = 0
  # Draw until the image holds a shape: a small image can reject 10 draws in a row.
  while len(classes) < num_shapes and (attempts < 10 * num_shapes or not classes):
    attempts += 1
    class_id = int(rng.integers(1, NUM_CLASSES))
    radius = rng.uniform(0.15, 0.3) * min_side
    cx, cy = rng.uniform(0.1, 0.9) * width, rng.uniform(0.1, 0.9) * height
    shape = _shape_mask(class_id, xx, yy, cx, cy, radius, rng.uniform(0, 2 * np.pi))
    if shape.sum() < 16:
      continue
    new_owner = np.where(shape, len(classes), owner)
    visible = np.bincount(new_owner[new_owner >= 0].ravel(), minlength=len(classes) + 1)
    if any(visible[i] < _MIN_VISIBLE_FRACTION * full_areas[i] for i in range(len(classes))):
      continue
    colour = _contrasting_colour(rng, image[shape].mean(axis=0))
    image[shape] = colour + rng.normal(0, 10, size=(int(shape.sum()), 3))
    owner = new_owner
    full_areas.append(shape.sum())
    classes.append(class_id)

  image += rng.normal(0, noise_std, size=image.shape)
  instance_masks = np.zeros((max_instances, height, width), np.uint8)
  boxes = np.zeros((max_instances, 4), np.float32)
  padded_classes = np.zeros((max_instances,), np.int32)
  valid = np.zeros((max_instances,), bool)
  for i, class_id in enumerate(classes):
    instance = owner == i
    ys, xs = np.nonzero(instance)
    instance_masks[i] = instance
    boxes[i] = [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
    padded_classes[i] = class_id
    valid[i] = True
  mask = np.where(owner >= 0, np.asarray([0] + classes)[owner + 1], 0).astype(np.uint8)
  return {
    "image": np.clip(image, 0, 255).astype(np.uint8),
    "mask": mask,
    "instance_masks": instance_masks,
    "boxes": boxes,
    "classes": padded_classes,
    "valid": valid,
  }


def shapes(
  split: str,
  *,
  data_dir: str | None = None,
  process_index: int = 0,
  process_count: int = 1,
  num_examples: int = 2000,
  image_size: tuple[int, int] = (64, 64),
  seed: int = 0,
  max_shapes: int = 4,
  max_instances: int = 8,
  with_instances: bool = False,
) -> tf.data.Dataset:
  """This process's share of the shapes split, as an unbatched in-memory tf.data.Dataset.

  Process `p` of `n` gets examples `p, p + n, p + 2n, ...`, so the processes together cover
  the split exactly once. `data_dir` is unused: nothing is read from disk.
  """
  del data_dir
  indices = range(process_index, num_examples, process_count)
  examples = [
    generate_example(seed, split, i, tuple(image_size), max_shapes, max_instances) for i in indices
  ]
  keys = ("image", "mask") + (
    ("instance_masks", "boxes", "classes", "valid") if with_instances else ()
  )
  if not examples:
    raise ValueError(
      f"Shapes split {split!r} has no examples for process {process_index} "
      f"of {process_count} (num_examples={num_examples})."
    )
  return tf.data.Dataset.from_tensor_slices({k: np.stack([e[k] for e in examples]) for k in keys})

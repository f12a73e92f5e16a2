"""Tests for segjax/data/instance_ops.py, each op eagerly and inside tf.data."""

import numpy as np
import pytest
import tensorflow as tf

from segjax.data import instance_ops
from tests.ops.test_roi_align import roi_align_ref


def detectron2_output_shape(h, w, short, max_size):
  """detectron2 `ResizeShortestEdge.get_output_shape`, verbatim."""
  scale = short * 1.0 / min(h, w)
  if h < w:
    newh, neww = short, scale * w
  else:
    newh, neww = scale * h, short
  if max(newh, neww) > max_size:
    scale = max_size * 1.0 / max(newh, neww)
    newh = newh * scale
    neww = neww * scale
  return int(newh + 0.5), int(neww + 0.5)


def example(height=12, width=20, k=3, seed=0):
  """An image with k rectangle instances (the last a padding row) and their boxes."""
  rng = np.random.default_rng(seed)
  image = rng.integers(0, 256, (height, width, 3)).astype(np.uint8)
  masks = np.zeros((k, height, width), np.uint8)
  boxes = np.zeros((k, 4), np.float32)
  for i, (y0, x0, y1, x1) in enumerate([(1, 2, 5, 9), (6, 11, 11, 19)][: k - 1]):
    masks[i, y0:y1, x0:x1] = 1
    boxes[i] = [x0, y0, x1, y1]
  valid = np.arange(k) < k - 1
  return {
    "image": image,
    "boxes": boxes,
    "classes": np.where(valid, 2, 0).astype(np.int32),
    "instance_masks": masks,
    "valid": valid,
    "is_crowd": np.zeros(k, bool),
  }


def run(op, features, in_dataset):
  """The op eagerly, or mapped over a one-element tf.data.Dataset (graph mode)."""
  if not in_dataset:
    return {k: np.asarray(v) for k, v in op(features).items()}
  ds = tf.data.Dataset.from_tensors(features).map(op)
  return next(ds.as_numpy_iterator())


def nearest_resize(array, size):
  """Half-pixel-centre nearest neighbour, the rule of tf.image.resize(method="nearest")."""
  ys = np.minimum(
    ((np.arange(size[0]) + 0.5) * array.shape[-2] / size[0]).astype(int), array.shape[-2] - 1
  )
  xs = np.minimum(
    ((np.arange(size[1]) + 0.5) * array.shape[-1] / size[1]).astype(int), array.shape[-1] - 1
  )
  return array[..., ys[:, None], xs]


@pytest.mark.parametrize(
  "h, w, short, long",
  [
    (480, 640, 800, 1333),
    (640, 480, 800, 1333),
    (427, 640, 800, 1333),
    (200, 1000, 800, 1333),
    (1000, 200, 800, 1333),
    (12, 20, 16, 24),
    (64, 64, 64, 64),
    (333, 500, 600, 1000),
  ],
)
def test_output_size_matches_detectron2(h, w, short, long):
  new_h, new_w, scale = instance_ops.resize_output_size(h, w, short, long)
  assert (int(new_h), int(new_w)) == detectron2_output_shape(h, w, short, long)
  assert float(scale) == pytest.approx(min(short / min(h, w), long / max(h, w)))


def test_torchvision_output_size_floors_in_float64():
  """torchvision's `math.floor(side * scale)`: 97 * (800 / 97) is 799.99999999999989."""
  for (h, w), expected in {
    (97, 150): (799, 1237),
    (352, 416): (800, 945),
    (1200, 37): (1333, 41),
    (480, 640): (800, 1066),
  }.items():
    new_h, new_w, _ = instance_ops.resize_output_size(h, w, 800, 1333, "torchvision")
    assert (int(new_h), int(new_w)) == expected
  assert [int(s) for s in instance_ops.resize_output_size(97, 150, 800, 1333)[:2]] == [800, 1237]
  with pytest.raises(ValueError, match="Unknown resize convention 'caffe2'"):
    instance_ops.resize_output_size(97, 150, 800, 1333, "caffe2")


@pytest.mark.parametrize("in_dataset", [False, True])
def test_torchvision_resize_keeps_the_float_image(in_dataset):
  """Unrounded float32 (torch's bilinear: tests/weights/test_torchvision_predict.py compares
  it with torch); boxes and masks move as with detectron2's rule."""
  features = example()
  out = run(
    lambda f: instance_ops.resize_shorter_longer(f, 16, 24, "torchvision"), features, in_dataset
  )
  assert out["image"].shape == (14, 24, 3) and out["image"].dtype == np.float32
  assert not np.array_equal(out["image"], np.round(out["image"]))
  reference = instance_ops.resize_shorter_longer(features, 16, 24)
  for key in ("boxes", "instance_masks", "image_size", "scale"):
    np.testing.assert_array_equal(out[key], reference[key])


@pytest.mark.parametrize("in_dataset", [False, True])
def test_resize_moves_boxes_masks_and_records_size(in_dataset):
  features = example()
  out = run(lambda f: instance_ops.resize_shorter_longer(f, 16, 24), features, in_dataset)
  new_h, new_w = detectron2_output_shape(12, 20, 16, 24)  # Capped by the longer side: 14x24.
  assert (new_h, new_w) == (14, 24)
  assert out["image"].shape == (14, 24, 3) and out["image"].dtype == np.uint8
  np.testing.assert_array_equal(out["image_size"], [14, 24])
  assert out["scale"] == pytest.approx(24 / 20)
  np.testing.assert_array_equal(
    out["instance_masks"], nearest_resize(features["instance_masks"], (14, 24))
  )
  np.testing.assert_allclose(
    out["boxes"], features["boxes"] * [24 / 20, 14 / 12, 24 / 20, 14 / 12], rtol=1e-6
  )
  np.testing.assert_array_equal(out["valid"], features["valid"])


def test_integer_upscale_keeps_masks_exact():
  features = example()
  out = instance_ops.resize_shorter_longer(features, 24, 100)
  np.testing.assert_array_equal(
    out["instance_masks"], np.kron(features["instance_masks"], np.ones((1, 2, 2), np.uint8))
  )
  np.testing.assert_allclose(out["boxes"], 2 * features["boxes"])


def flip_seed(flip: bool):
  for s in range(100):
    if (float(tf.random.stateless_uniform([], [s, 0])) < 0.5) == flip:
      return tf.constant([s, 0])
  raise AssertionError


@pytest.mark.parametrize("in_dataset", [False, True])
def test_flip_moves_image_boxes_and_masks_together(in_dataset):
  features = example()
  flip, keep = flip_seed(True), flip_seed(False)  # Eager: the search is Python control flow.
  out = run(lambda f: instance_ops.random_flip_left_right(f, flip), features, in_dataset)
  np.testing.assert_array_equal(out["image"], features["image"][:, ::-1])
  np.testing.assert_array_equal(out["instance_masks"], features["instance_masks"][:, :, ::-1])
  b = features["boxes"]
  np.testing.assert_allclose(
    out["boxes"][:2], np.stack([20 - b[:2, 2], b[:2, 1], 20 - b[:2, 0], b[:2, 3]], -1)
  )
  np.testing.assert_array_equal(out["boxes"][2], 0)  # Padding rows stay zero.
  for i in range(2):  # The box still encloses exactly its mask.
    ys, xs = np.nonzero(out["instance_masks"][i])
    np.testing.assert_allclose(out["boxes"][i], [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
  same = run(lambda f: instance_ops.random_flip_left_right(f, keep), features, in_dataset)
  for key in ("image", "boxes", "instance_masks"):
    np.testing.assert_array_equal(same[key], features[key])


@pytest.mark.parametrize("in_dataset", [False, True])
def test_pad_to_fixed_size(in_dataset):
  features = instance_ops.normalize(example())
  out = run(lambda f: instance_ops.pad_to_multiple(f, (32, 64)), features, in_dataset)
  assert out["image"].shape == (32, 64, 3) and out["instance_masks"].shape == (3, 32, 64)
  np.testing.assert_array_equal(out["image"][:12, :20], np.asarray(features["image"]))
  assert not out["image"][12:].any() and not out["image"][:, 20:].any()
  assert not out["instance_masks"][:, 12:].any() and not out["instance_masks"][:, :, 20:].any()
  np.testing.assert_array_equal(out["boxes"], features["boxes"])
  np.testing.assert_array_equal(out["image_size"], [12, 20])


def test_pad_static_shape_and_errors():
  ds = tf.data.Dataset.from_tensors(example()).map(
    lambda f: instance_ops.pad_to_multiple(f, (32, 32))
  )
  assert ds.element_spec["image"].shape == (32, 32, 3)
  with pytest.raises(ValueError, match="not a multiple of 32"):
    instance_ops.pad_to_multiple(example(), (40, 64))
  with pytest.raises(tf.errors.InvalidArgumentError, match="more than the padded size"):
    instance_ops.pad_to_multiple(example(height=40), (32, 32))
  dynamic = instance_ops.pad_to_multiple(example(height=33, width=20), multiple=32)
  assert dynamic["image"].shape == (64, 32, 3)


def test_pad_instances_and_normalize():
  features = {k: v[:2] if k != "image" else v for k, v in example().items()}
  del features["is_crowd"]
  ds = tf.data.Dataset.from_tensors(features).map(
    lambda f: instance_ops.pad_instances(instance_ops.normalize(f), 5)
  )
  assert ds.element_spec["boxes"].shape == (5, 4)
  assert ds.element_spec["instance_masks"].shape == (5, 12, 20)
  out = next(ds.as_numpy_iterator())
  np.testing.assert_array_equal(out["valid"], [True, True, False, False, False])
  np.testing.assert_array_equal(out["is_crowd"], np.zeros(5, bool))
  np.testing.assert_array_equal(out["classes"], [2, 2, 0, 0, 0])
  assert out["classes"].dtype == np.int32 and out["image"].dtype == np.float32
  mean = 255 * np.array([0.485, 0.456, 0.406])
  std = 255 * np.array([0.229, 0.224, 0.225])
  np.testing.assert_allclose(out["image"], (features["image"] - mean) / std, rtol=1e-5)
  with pytest.raises(tf.errors.InvalidArgumentError, match="More than max_instances=1"):
    instance_ops.pad_instances(features, 1)


def crop_ref(mask, box, size):
  """A mask's bilinear values at the centres of a size x size grid over the box `[x1, y1, x2,
  y2]` (pixel areas), with ROIAlign's border rule (torchvision `bilinear_interpolate`): a
  sample within a pixel outside the image reads the border, one further reads 0. Float64."""
  x1, y1, x2, y2 = np.asarray(box, np.float64)
  cells = np.arange(size) + 0.5

  def axis(coords, n):  # low and high pixels, the high one's weight, samples that count
    inside = (coords >= -1) & (coords <= n)
    coords = np.clip(coords, 0, n - 1)
    low = np.floor(coords).astype(int)
    return low, np.minimum(low + 1, n - 1), coords - low, inside

  y0, y1_, fy, in_y = axis(y1 + cells * (y2 - y1) / size - 0.5, mask.shape[0])
  x0, x1_, fx, in_x = axis(x1 + cells * (x2 - x1) / size - 0.5, mask.shape[1])
  m = np.asarray(mask, np.float64)
  rows = m[y0] * (1 - fy)[:, None] + m[y1_] * fy[:, None]  # (size, W)
  out = rows[:, x0] * (1 - fx) + rows[:, x1_] * fx
  return out * (in_y[:, None] & in_x[None, :])


CROP_BOXES = np.array(
  [
    [3.0, 4.0, 20.0, 30.0],
    [-0.7, -0.3, 10.3, 5.2],  # past the top-left border
    [40.0, 30.0, 56.0, 40.0],  # touching the bottom-right border
    [50.5, 35.1, 58.0, 42.0],  # partly outside the image
    [12.2, 7.9, 12.6, 8.1],  # smaller than a pixel
    [0.0, 0.0, 0.0, 0.0],  # empty (a padding row)
  ],
  np.float32,
)


@pytest.mark.parametrize("size", [1, 7, 56])
def test_crop_and_resize_masks_sample_cell_centres(size):
  rng = np.random.default_rng(0)
  masks = (rng.uniform(size=(len(CROP_BOXES), 40, 56)) < 0.5).astype(np.uint8)
  got = instance_ops.crop_and_resize_masks(masks, CROP_BOXES, size).numpy()
  assert got.shape == (len(CROP_BOXES), size, size) and got.dtype == np.float32
  ref = np.stack([crop_ref(m, b, size) for m, b in zip(masks, CROP_BOXES)])
  np.testing.assert_allclose(got, ref, atol=1e-5)
  if size == 7:  # One ROIAlign sample per bin (aligned) is the same sampling.
    roi = roi_align_ref(masks[0, ..., None].astype(np.float64), CROP_BOXES[:1], (7, 7), 1, 1, True)
    np.testing.assert_allclose(got[0], roi[0, ..., 0], atol=1e-5)


def test_crop_and_resize_normalization_of_the_docstring():
  # tf.image.crop_and_resize at the documented normalized boxes samples the same points, but
  # reads 0 past the border: the box past the top-left corner differs, the others agree.
  rng = np.random.default_rng(1)
  masks = (rng.uniform(size=(len(CROP_BOXES), 40, 56)) < 0.5).astype(np.float32)
  size, (h, w) = 9, masks.shape[1:]
  x1, y1, x2, y2 = CROP_BOXES.T
  hy, hx = (y2 - y1) / (2 * size), (x2 - x1) / (2 * size)
  normalized = np.stack(
    [(y1 + hy - 0.5) / (h - 1), (x1 + hx - 0.5) / (w - 1), (y2 - hy - 0.5) / (h - 1),
     (x2 - hx - 0.5) / (w - 1)], axis=1
  )  # fmt: skip
  tf_crops = tf.image.crop_and_resize(
    masks[..., None], normalized, np.arange(len(masks)), (size, size)
  ).numpy()[..., 0]
  crops = instance_ops.crop_and_resize_masks(masks, CROP_BOXES, size).numpy()
  away = [0, 2, 4]  # Boxes whose samples stay within the mask.
  np.testing.assert_allclose(crops[away], tf_crops[away], atol=1e-5)
  assert np.abs(crops[1] - tf_crops[1]).max() > 0.1


@pytest.mark.parametrize("in_dataset", [False, True])
def test_crop_instance_masks_replaces_full_masks(in_dataset):
  features = instance_ops.pad_instances(example(), 4)
  out = run(lambda f: instance_ops.crop_instance_masks(f, 8), features, in_dataset)
  assert "instance_masks" not in out and out["cropped_masks"].shape == (4, 8, 8)
  assert out["cropped_masks"].dtype == np.float32
  masks = np.asarray(features["instance_masks"])
  for i in range(2):  # Rectangles filling their boxes: 1 but near the edges (bilinear).
    crop = out["cropped_masks"][i]
    np.testing.assert_allclose(crop, crop_ref(masks[i], out["boxes"][i], 8), atol=1e-5)
    np.testing.assert_allclose(crop[2:-2, 2:-2], 1.0, atol=1e-6)
  assert not out["cropped_masks"][2:].any()  # Padding rows.
  np.testing.assert_array_equal(out["boxes"], np.asarray(features["boxes"]))

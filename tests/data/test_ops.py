"""Tests for segjax/data/ops.py: each op eagerly and inside tf.data, against numpy references.

Images encode what the mask must be, so alignment is checked pixel by pixel:
- `position_image`: pixel (y, x) holds (y, x, 200), padding stays (0, 0, 0); crops and flips
  only move pixels, so the mask at a pixel must equal the source mask where it came from.
- `code_image`: each class is a vertex of the cube {0, 200}^3. Bilinear resizing mixes pixels
  convexly, and a convex mix of distinct vertices is never a vertex, so a pixel that is still
  a vertex came only from pixels of that class; the nearest-neighbour mask pixel is one of
  them (its bilinear weight is at least 1/2), so the mask must equal the class there.
"""

import numpy as np
import pytest
import tensorflow as tf

from segjax.data import ops

IGNORE = 255
# Class id -> cube vertex. Ignore is black, like the zeros that padding puts in the image.
CODES = {0: (200, 0, 0), 1: (0, 200, 0), 2: (0, 0, 200), 3: (200, 200, 0), IGNORE: (0, 0, 0)}


def seed(i):
  return np.array([i, 7], np.int64)


def block_mask(rng, height, width, block=8):
  cells = rng.choice(list(CODES), (height // block, width // block))
  return np.kron(cells, np.ones((block, block), int)).astype(np.uint8)


def position_image(mask):
  height, width = mask.shape
  yy, xx = np.mgrid[:height, :width]
  return np.stack([yy, xx, np.full_like(yy, 200)], -1).astype(np.uint8)


def code_image(mask):
  image = np.zeros(mask.shape + (3,), np.uint8)
  for value, colour in CODES.items():
    image[mask == value] = colour
  return image


def decode_codes(image, atol=0.01):
  """(H, W) class of each pixel that is a cube vertex, -1 where it is a mix."""
  colours = np.array(list(CODES.values()), np.float32)
  distance = np.abs(np.asarray(image, np.float32)[:, :, None] - colours).max(-1)
  classes = np.array(list(CODES))[distance.argmin(-1)]
  return np.where(distance.min(-1) <= atol, classes, -1)


def features_of(mask, image):
  return {"image": image, "mask": mask}


def run_eager(op, features):
  return {k: v.numpy() for k, v in op({k: tf.constant(v) for k, v in features.items()}).items()}


def run_in_dataset(op, features, dynamic):
  """`op` inside `ds.map`, with static shapes or, as sources give them, unknown (H, W)."""
  if dynamic:
    spec = {
      "image": tf.TensorSpec([None, None, 3], tf.as_dtype(features["image"].dtype)),
      "mask": tf.TensorSpec([None, None], tf.as_dtype(features["mask"].dtype)),
    }
    ds = tf.data.Dataset.from_generator(lambda: iter([features]), output_signature=spec)
  else:
    ds = tf.data.Dataset.from_tensors(features)
  return ds.map(op).get_single_element()


def assert_crop_flip_aligned(out, mask_in):
  """Every pixel of `out` (from position_image(mask_in)) carries the mask of its source."""
  image, mask = out["image"], out["mask"]
  real = image[..., 2] == 200
  source = mask_in[image[..., 0].astype(int), image[..., 1].astype(int)]
  np.testing.assert_array_equal(mask[real], source[real])
  assert np.all(mask[~real] == IGNORE) and np.all(image[~real] == 0)


OPS = {
  "resize": lambda f: ops.resize(f, (20, 13)),
  "random_scale": lambda f: ops.random_scale(f, seed(3), 0.5, 1.5),
  "pad_to_size": lambda f: ops.pad_to_size(f, (40, 50)),
  "random_crop": lambda f: ops.random_crop(f, seed(4), (16, 16)),
  "random_crop_padded": lambda f: ops.random_crop(f, seed(4), (40, 16)),
  "random_flip_left_right": lambda f: ops.random_flip_left_right(f, seed(5)),
  "normalize": ops.normalize,
  "chain": lambda f: ops.normalize(
    ops.random_flip_left_right(
      ops.random_crop(ops.random_scale(f, seed(1), 0.5, 2.0), seed(2), (24, 24)), seed(3)
    )
  ),
}


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
@pytest.mark.parametrize("name", list(OPS))
def test_eager_and_in_dataset_agree(name, dynamic):
  mask = block_mask(np.random.default_rng(0), 32, 24)
  features = features_of(mask, code_image(mask))
  eager = run_eager(OPS[name], features)
  in_dataset = run_in_dataset(OPS[name], features, dynamic)
  assert set(eager) == set(in_dataset) == {"image", "mask"}
  for key in eager:
    assert eager[key].dtype == in_dataset[key].dtype.as_numpy_dtype, key
    np.testing.assert_array_equal(eager[key], in_dataset[key].numpy(), err_msg=key)


def nearest_indices(size_in, size_out):
  """TF's nearest neighbour with half-pixel centres: floor((i + 0.5) * in / out)."""
  scale = np.float32(size_in / size_out)
  i = np.floor((np.arange(size_out, dtype=np.float32) + np.float32(0.5)) * scale)
  return np.minimum(i.astype(int), size_in - 1)


def bilinear_matrix(size_in, size_out):
  """(out, in) weights of half-pixel-centred bilinear resizing, edges clamped."""
  centre = (np.arange(size_out) + 0.5) * size_in / size_out - 0.5
  low = np.floor(centre)
  frac = centre - low
  weights = np.zeros((size_out, size_in))
  rows = np.arange(size_out)
  np.add.at(weights, (rows, np.clip(low, 0, size_in - 1).astype(int)), 1 - frac)
  np.add.at(weights, (rows, np.clip(low + 1, 0, size_in - 1).astype(int)), frac)
  return weights


@pytest.mark.parametrize("size", [(20, 13), (9, 40), (7, 6)])
def test_resize_matches_numpy(size):
  rng = np.random.default_rng(1)
  image = rng.integers(0, 256, (12, 17, 3), dtype=np.uint8)
  mask = rng.integers(0, 5, (12, 17), dtype=np.uint8)
  out = run_eager(lambda f: ops.resize(f, size), features_of(mask, image))
  assert out["mask"].dtype == np.uint8 and out["image"].dtype == np.float32
  np.testing.assert_array_equal(
    out["mask"], mask[np.ix_(nearest_indices(12, size[0]), nearest_indices(17, size[1]))]
  )
  expected = np.einsum(
    "yi,ijc,xj->yxc",
    bilinear_matrix(12, size[0]),
    image.astype(float),
    bilinear_matrix(17, size[1]),
  )
  np.testing.assert_allclose(out["image"], expected, atol=1e-3)


def test_random_scale_keeps_image_and_mask_aligned():
  mask = block_mask(np.random.default_rng(2), 48, 40)
  features = features_of(mask, code_image(mask))
  sizes = set()
  for i in range(8):
    out = run_eager(lambda f, i=i: ops.random_scale(f, seed(i), 0.5, 1.5), features)
    height, width = out["mask"].shape
    assert out["image"].shape == (height, width, 3)
    scale = height / 48
    assert 0.5 - 1 / 48 <= scale <= 1.5 + 1 / 48 and abs(width - 40 * scale) <= 1
    assert set(np.unique(out["mask"])) <= set(np.unique(mask))
    decoded = decode_codes(out["image"])
    pure = decoded >= 0
    assert pure.mean() > 0.6  # flat 8x8 blocks keep most pixels unmixed
    np.testing.assert_array_equal(out["mask"][pure], decoded[pure])
    sizes.add((height, width))
  assert len(sizes) >= 4


def test_pad_to_size_matches_numpy():
  rng = np.random.default_rng(3)
  image = rng.integers(1, 256, (10, 30, 3), dtype=np.uint8)
  mask = rng.integers(0, 5, (10, 30), dtype=np.uint8)
  out = run_eager(
    lambda f: ops.pad_to_size(f, (16, 20), ignore_label=250), features_of(mask, image)
  )
  np.testing.assert_array_equal(out["image"], np.pad(image, [(0, 6), (0, 0), (0, 0)]))
  np.testing.assert_array_equal(out["mask"], np.pad(mask, [(0, 6), (0, 0)], constant_values=250))


def test_random_crop_is_an_aligned_window():
  mask = block_mask(np.random.default_rng(4), 40, 32, block=4)
  features = features_of(mask, position_image(mask))
  offsets = set()
  for i in range(10):
    out = run_eager(lambda f, i=i: ops.random_crop(f, seed(i), (16, 24)), features)
    assert out["image"].shape == (16, 24, 3) and out["mask"].shape == (16, 24)
    oy, ox = out["image"][0, 0, :2].astype(int)
    assert 0 <= oy <= 24 and 0 <= ox <= 8
    np.testing.assert_array_equal(out["image"], features["image"][oy : oy + 16, ox : ox + 24])
    np.testing.assert_array_equal(out["mask"], mask[oy : oy + 16, ox : ox + 24])
    assert_crop_flip_aligned(out, mask)
    offsets.add((oy, ox))
  assert len(offsets) >= 5


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_random_crop_pads_smaller_inputs(dynamic):
  mask = block_mask(np.random.default_rng(5), 12, 40, block=4)
  features = features_of(mask, position_image(mask))
  crop = lambda f: ops.random_crop(f, seed(6), (16, 24))
  for out in (run_eager(crop, features), run_in_dataset(crop, features, dynamic)):
    image, out_mask = np.asarray(out["image"]), np.asarray(out["mask"])
    assert image.shape == (16, 24, 3) and out_mask.shape == (16, 24)
    ox = int(image[0, 0, 1])
    padded_image = np.pad(features["image"], [(0, 4), (0, 0), (0, 0)])
    padded_mask = np.pad(mask, [(0, 4), (0, 0)], constant_values=IGNORE)
    np.testing.assert_array_equal(image, padded_image[:, ox : ox + 24])
    np.testing.assert_array_equal(out_mask, padded_mask[:, ox : ox + 24])
    assert np.all(out_mask[12:] == IGNORE) and np.all(image[12:] == 0)
  # Smaller on both sides: nothing to choose, the input sits top left.
  small = features_of(mask[:10, :9], features["image"][:10, :9])
  out = run_eager(crop, small)
  np.testing.assert_array_equal(out["image"][:10, :9], small["image"])
  np.testing.assert_array_equal(out["mask"][:10, :9], small["mask"])
  assert np.all(out["mask"][10:] == IGNORE) and np.all(out["mask"][:, 9:] == IGNORE)
  assert np.all(out["image"][10:] == 0) and np.all(out["image"][:, 9:] == 0)


def test_random_flip_moves_image_and_mask_together():
  mask = block_mask(np.random.default_rng(6), 16, 24, block=4)
  features = features_of(mask, position_image(mask))
  flips = 0
  for i in range(40):
    out = run_eager(lambda f, i=i: ops.random_flip_left_right(f, seed(i)), features)
    flipped = out["image"][0, 0, 1] == 23
    reference = {k: v[:, ::-1] if flipped else v for k, v in features.items()}
    np.testing.assert_array_equal(out["image"], reference["image"])
    np.testing.assert_array_equal(out["mask"], reference["mask"])
    flips += flipped
  assert 10 <= flips <= 30


@pytest.mark.parametrize("name", ["random_scale", "random_crop", "random_flip_left_right"])
def test_random_ops_depend_only_on_the_seed(name):
  ops_by_seed = {
    "random_scale": lambda s: lambda f: ops.random_scale(f, s, 0.5, 2.0),
    "random_crop": lambda s: lambda f: ops.random_crop(f, s, (8, 8)),
    "random_flip_left_right": lambda s: lambda f: ops.random_flip_left_right(f, s),
  }[name]
  mask = block_mask(np.random.default_rng(7), 32, 32, block=4)
  features = features_of(mask, position_image(mask))
  outputs = [run_eager(ops_by_seed(seed(i)), features) for i in range(6)]
  again = run_eager(ops_by_seed(seed(0)), features)
  for key in ("image", "mask"):
    np.testing.assert_array_equal(outputs[0][key], again[key])
  distinct = {(o["image"].shape, o["image"].tobytes()) for o in outputs}
  assert len(distinct) >= 2


def test_normalize_matches_numpy():
  rng = np.random.default_rng(8)
  image = rng.integers(0, 256, (5, 6, 3), dtype=np.uint8)
  mask = rng.integers(0, 5, (5, 6), dtype=np.uint8)
  out = run_eager(ops.normalize, features_of(mask, image))
  mean = 255 * np.array([0.485, 0.456, 0.406])
  std = 255 * np.array([0.229, 0.224, 0.225])
  assert out["image"].dtype == np.float32 and out["mask"].dtype == np.int32
  np.testing.assert_allclose(out["image"], (image - mean) / std, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(out["mask"], mask)
  custom = run_eager(
    lambda f: ops.normalize(f, mean=(1.0, 2.0, 3.0), std=(2.0, 4.0, 8.0)),
    features_of(mask, image.astype(np.float32)),
  )
  np.testing.assert_allclose(custom["image"], (image - [1, 2, 3]) / [2, 4, 8], rtol=1e-6)


def test_ops_keep_other_keys():
  mask = block_mask(np.random.default_rng(9), 16, 16, block=4)
  features = {**features_of(mask, code_image(mask)), "id": tf.constant(3)}
  for op in OPS.values():
    assert op(features)["id"] is features["id"]

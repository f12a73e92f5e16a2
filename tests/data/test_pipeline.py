"""Tests for segjax/data/pipeline.py: fixed shapes, alignment, exact evaluation coverage."""

import os

import numpy as np
import pytest
from PIL import Image

from configs import unet_folder, unet_pets, unet_shapes
from segjax.data import pipeline
from segjax.data.shapes import generate_example

IGNORE = 255
MEAN = 255 * np.array([0.485, 0.456, 0.406])
STD = 255 * np.array([0.229, 0.224, 0.225])
# Folder data: class id -> cube vertex; ignore is black like the zeros padding adds. Bilinear
# scaling mixes vertices convexly, so a pixel that is still a vertex must carry that class.
CODES = {0: (200, 0, 0), 1: (0, 200, 0), 2: (0, 0, 200), IGNORE: (0, 0, 0)}
PET_COLOURS = {1: (220, 40, 40), 0: (40, 40, 220), 2: (40, 220, 40)}  # class -> conftest colour


def denormalize(image):
  return image * STD + MEAN


def take(ds, n):
  return list(ds.take(n).as_numpy_iterator())


def shapes_config(**train_kwargs):
  config = unet_shapes.get_config("tiny")
  config.dataset.train_kwargs = dict(num_examples=12, image_size=(32, 32), **train_kwargs)
  return config


def decode_codes(image, atol=0.01):
  colours = np.array(list(CODES.values()), np.float32)
  distance = np.abs(image[..., None, :] - colours).max(-1)
  return np.where(distance.min(-1) <= atol, np.array(list(CODES))[distance.argmin(-1)], -1)


def assert_fixed_shapes(batch, batch_size, size, num_classes):
  assert set(batch) == {"image", "mask"}
  assert batch["image"].shape == (batch_size, *size, 3) and batch["image"].dtype == np.float32
  assert batch["mask"].shape == (batch_size, *size) and batch["mask"].dtype == np.int32
  assert set(np.unique(batch["mask"])) <= set(range(num_classes)) | {IGNORE}


def test_train_batches_have_fixed_shapes():
  config = shapes_config()
  ds = pipeline.train_dataset(config, local_batch_size=4)
  assert ds.element_spec["image"].shape == (4, 32, 32, 3)
  assert ds.element_spec["mask"].shape == (4, 32, 32)
  batches = take(ds, 4)  # 16 examples: more than the 12 of the split, so it repeats
  for batch in batches:
    assert_fixed_shapes(batch, 4, (32, 32), config.model.num_classes)
  masks = np.concatenate([b["mask"] for b in batches])
  assert len(set(np.unique(masks)) - {0, IGNORE}) >= 3
  # Scales below 1 leave a border to pad: ignore in the mask, zeros in the image.
  padded = masks == IGNORE
  assert padded.any()
  images = denormalize(np.concatenate([b["image"] for b in batches]))
  np.testing.assert_allclose(images[padded], 0, atol=1e-3)


def find_window(image, sources, size):
  """(index, flipped, y, x) of the window of a possibly mirrored source equal to `image`."""
  found = []
  for i, source in enumerate(sources):
    for flipped in (False, True):
      src = source[:, ::-1] if flipped else source
      ys, xs = np.nonzero(np.all(src == image[0, 0], -1))
      for y, x in zip(ys, xs):
        if np.array_equal(src[y : y + size[0], x : x + size[1]], image):
          found.append((i, flipped, y, x))
  return found


def test_shapes_train_crop_and_flip_keep_alignment():
  config = shapes_config()
  config.image_size = (24, 24)
  config.augment.min_scale = config.augment.max_scale = 1.0  # crops and flips only: exact
  sources = [generate_example(config.seed, "train", i, (32, 32)) for i in range(12)]
  flips = []
  for batch in take(pipeline.train_dataset(config, local_batch_size=4), 3):
    for image, mask in zip(np.round(denormalize(batch["image"])).astype(np.uint8), batch["mask"]):
      found = find_window(image, [s["image"] for s in sources], (24, 24))
      assert len(found) == 1
      i, flipped, y, x = found[0]
      src_mask = sources[i]["mask"][:, ::-1] if flipped else sources[i]["mask"]
      np.testing.assert_array_equal(mask, src_mask[y : y + 24, x : x + 24])
      flips.append(flipped)
  assert 0 < sum(flips) < len(flips)


def write_folder(data_dir, split, sizes, seed):
  """PNG images whose 8x8 blocks are coloured by the class of the same-named mask."""
  rng = np.random.default_rng(seed)
  for sub in ("images", "masks"):
    os.makedirs(os.path.join(data_dir, split, sub), exist_ok=True)
  for n, (height, width) in enumerate(sizes):
    mask = np.kron(rng.choice(list(CODES), (height // 8, width // 8)), np.ones((8, 8), int))
    image = np.zeros((height, width, 3), np.uint8)
    for value, colour in CODES.items():
      image[mask == value] = colour
    Image.fromarray(image).save(os.path.join(data_dir, split, "images", f"{n}.png"))
    Image.fromarray(mask.astype(np.uint8)).save(os.path.join(data_dir, split, "masks", f"{n}.png"))


def test_folder_train_augmentation_keeps_alignment(tmp_path):
  write_folder(tmp_path, "train", [(24, 40), (40, 24), (32, 32), (16, 48)], seed=0)
  config = unet_folder.get_config("3")
  config.image_size = (32, 32)
  config.dataset.data_dir = str(tmp_path)
  config.augment.min_scale, config.augment.max_scale = 0.5, 1.5
  batches = take(pipeline.train_dataset(config, local_batch_size=4), 3)
  pure_fraction = []
  for batch in batches:
    assert_fixed_shapes(batch, 4, (32, 32), 3)
    for image, mask in zip(denormalize(batch["image"]), batch["mask"]):
      decoded = decode_codes(image)
      pure = decoded >= 0
      np.testing.assert_array_equal(mask[pure], decoded[pure])
      pure_fraction.append(pure.mean())
  assert np.mean(pure_fraction) > 0.6


def test_train_is_deterministic_per_seed_and_process():
  def first_batch(seed=0, process_index=0, process_count=1):
    config = shapes_config()
    config.seed = seed
    ds = pipeline.train_dataset(
      config, local_batch_size=4, process_index=process_index, process_count=process_count
    )
    return take(ds, 1)[0]

  a, b = first_batch(), first_batch()
  for key in ("image", "mask"):
    np.testing.assert_array_equal(a[key], b[key])
  for other in (first_batch(seed=1), first_batch(process_index=1, process_count=2)):
    assert not np.array_equal(a["image"], other["image"])


def eval_config(num_examples):
  config = shapes_config()
  config.dataset.eval_kwargs = dict(num_examples=num_examples, image_size=(32, 32))
  return config


def eval_rows(ds):
  """(image, mask) of every non-padding row; checks that padding rows are blank."""
  rows = []
  for batch in ds.as_numpy_iterator():
    padding = ~batch["example_mask"]
    assert np.all(batch["mask"][padding] == IGNORE) and np.all(batch["image"][padding] == 0)
    rows += zip(batch["image"][~padding], batch["mask"][~padding])
  return rows


def index_of(row, references):
  matches = [
    i
    for i, r in enumerate(references)
    if np.array_equal(row[1], r["mask"]) and np.allclose(row[0], r["image"], atol=1e-4)
  ]
  assert len(matches) == 1
  return matches[0]


def normalized_eval_examples(config, num_examples):
  examples = [generate_example(config.seed, "validation", i, (32, 32)) for i in range(num_examples)]
  return [{"image": (e["image"] - MEAN) / STD, "mask": e["mask"]} for e in examples]


def test_eval_covers_every_example_once_and_pads_the_last_batch():
  config = eval_config(10)
  ds, num_batches = pipeline.eval_dataset(config, local_batch_size=4)
  assert num_batches == 3
  batches = list(ds.as_numpy_iterator())
  assert len(batches) == 3
  for batch in batches:
    assert batch["image"].shape == (4, 32, 32, 3) and batch["image"].dtype == np.float32
    assert batch["mask"].shape == (4, 32, 32) and batch["mask"].dtype == np.int32
  example_mask = np.concatenate([b["example_mask"] for b in batches])
  np.testing.assert_array_equal(example_mask, np.arange(12) < 10)
  references = normalized_eval_examples(config, 10)
  assert [index_of(row, references) for row in eval_rows(ds)] == list(range(10))


def test_eval_process_shares_are_disjoint_and_cover_the_split():
  config = eval_config(9)  # 5 + 4 examples: 2 and 1 batches of 4
  references = normalized_eval_examples(config, 9)
  own = [
    pipeline.eval_dataset(config, local_batch_size=4, process_index=p, process_count=2)[1]
    for p in range(2)
  ]
  assert own == [2, 1]
  seen = []
  for p in range(2):
    ds, num_batches = pipeline.eval_dataset(
      config, local_batch_size=4, process_index=p, process_count=2, num_batches=max(own)
    )
    assert num_batches == 2 and len(list(ds.as_numpy_iterator())) == 2
    part = [index_of(row, references) for row in eval_rows(ds)]
    assert len(part) == [5, 4][p]
    seen += part
  assert sorted(seen) == list(range(9))


def test_eval_num_batches_too_small_is_an_error():
  with pytest.raises(ValueError, match="num_batches"):
    pipeline.eval_dataset(eval_config(10), local_batch_size=4, num_batches=2)


def pets_config(fake_pets):
  config = unet_pets.get_config("cpu")
  config.image_size = (32, 32)
  config.dataset.data_dir = fake_pets.data_dir
  return config


def assert_pets_aligned(image, mask):
  """Mask vs the class the image colour encodes, away from block edges; padding is blank."""
  colours = np.array(list(PET_COLOURS.values()))
  decoded = np.array(list(PET_COLOURS))[np.abs(image[:, :, None] - colours).sum(-1).argmin(-1)]
  padded = mask == IGNORE
  np.testing.assert_allclose(image[padded], 0, atol=1e-3)
  assert np.all(image[~padded].max(-1) > 60)  # every pet colour mix is far from black
  # Interior pixels: the 3x3 neighbourhood of the mask is one class.
  windows = np.lib.stride_tricks.sliding_window_view(np.pad(mask, 1, mode="edge"), (3, 3))
  interior = (windows.min((-1, -2)) == windows.max((-1, -2))) & ~padded
  assert interior.mean() > 0.3
  np.testing.assert_array_equal(mask[interior], decoded[interior])


def test_pets_train_and_eval_batches_are_aligned(fake_pets):
  config = pets_config(fake_pets)
  for batch in take(pipeline.train_dataset(config, local_batch_size=4), 2):
    assert_fixed_shapes(batch, 4, (32, 32), 3)
    for image, mask in zip(denormalize(batch["image"]), batch["mask"]):
      assert_pets_aligned(image, mask)
  ds, num_batches = pipeline.eval_dataset(config, local_batch_size=4)
  (batch,) = list(ds.as_numpy_iterator())
  assert num_batches == 1
  np.testing.assert_array_equal(batch["example_mask"], [True, True, False, False])
  for image, mask in zip(denormalize(batch["image"][:2]), batch["mask"][:2]):
    assert not np.any(mask == IGNORE)
    assert_pets_aligned(image, mask)


def test_unknown_dataset_name_is_an_error():
  config = shapes_config()
  config.dataset.name = "imagenet_typo"
  with pytest.raises(ValueError, match="imagenet_typo"):
    pipeline.train_dataset(config, local_batch_size=4)
  with pytest.raises(ValueError, match="imagenet_typo"):
    pipeline.eval_dataset(config, local_batch_size=4)


@pytest.mark.parametrize("task", ["semantic", "instance"])
def test_train_iterator_resumes_exactly_twice(tmp_path, task):
  """Saved after a restore, restored again (a run preempted twice): same batches as one
  uninterrupted iterator. enumerate() after a shuffle failed at the second restore."""
  import tensorflow as tf

  from configs import mask_rcnn_shapes
  from segjax.data import instance_pipeline

  if task == "semantic":
    config = unet_shapes.get_config("tiny")
    make = lambda: pipeline.train_dataset(config, local_batch_size=2)  # noqa: E731
  else:
    config = mask_rcnn_shapes.get_config("tiny")
    make = lambda: instance_pipeline.instance_train_dataset(config, local_batch_size=2)  # noqa: E731
  reference = iter(make())
  expected = [next(reference) for _ in range(7)]
  iterator = iter(make())
  for step in range(7):
    if step in (3, 5):
      path = str(tmp_path / f"at_{step}")
      tf.train.Checkpoint(it=iterator).write(path)
      iterator = iter(make())
      tf.train.Checkpoint(it=iterator).read(path).assert_consumed()
    batch = next(iterator)
    for key in batch:
      np.testing.assert_array_equal(batch[key], expected[step][key], err_msg=f"{step} {key}")

"""Tests for segjax/data/instance_pipeline.py: the batch contract, alignment and coverage."""

import ml_collections
import numpy as np
import pytest

from segjax.data import instance_pipeline
from segjax.data.shapes import generate_example
from tests.coco_fixture import COLOURS, LABEL_OF_CATEGORY, SPLIT, write_coco
from tests.data.test_instance_ops import crop_ref

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


@pytest.fixture(scope="module")
def coco_data(tmp_path_factory):
  return write_coco(tmp_path_factory.mktemp("coco_data"))


MEAN = 255 * np.array([0.485, 0.456, 0.406])
STD = 255 * np.array([0.229, 0.224, 0.225])


def make_config(name="shapes", image_size=(32, 32), **dataset):
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.image_size = image_size
  config.augment = ml_collections.ConfigDict({"flip": True})
  config.dataset = ml_collections.ConfigDict(
    {
      "name": name,
      "data_dir": None,
      "train_split": "train",
      "eval_split": "validation",
      "max_instances": 8,
      "overflow": "truncate",
      "min_size": None,
      "max_size": None,
      "shuffle_buffer": 100,
      "train_kwargs": {},
      "eval_kwargs": {},
    }
  )
  config.dataset.update(dataset)
  return config


def shapes_config(num_examples=12, **dataset):
  # ConfigDict kwargs, as configs write them (configs/unet_shapes.py).
  kwargs = ml_collections.ConfigDict(dict(num_examples=num_examples, image_size=(32, 32)))
  return make_config(train_kwargs=kwargs, eval_kwargs=kwargs, **dataset)


def coco_config(data_dir, **dataset):
  return make_config(
    "coco",
    (64, 64),
    data_dir=data_dir,
    train_split=SPLIT,
    eval_split=SPLIT,
    min_size=40,
    max_size=64,
    **dataset,
  )


def denormalize(image):
  return image * STD + MEAN


def nearest_resize(array, size):
  """Half-pixel-centre nearest neighbour, the rule of tf.image.resize(method="nearest")."""
  ys = np.minimum(
    ((np.arange(size[0]) + 0.5) * array.shape[-2] / size[0]).astype(int), array.shape[-2] - 1
  )
  xs = np.minimum(
    ((np.arange(size[1]) + 0.5) * array.shape[-1] / size[1]).astype(int), array.shape[-1] - 1
  )
  return array[..., ys[:, None], xs]


def rows(batches):
  """Batches -> one dict per example."""
  return [{k: v[i] for k, v in b.items()} for b in batches for i in range(len(b["image"]))]


def check_contract(spec_or_batch, b, k, size, keys):
  shapes = {
    "image": (b, *size, 3),
    "boxes": (b, k, 4),
    "classes": (b, k),
    "instance_masks": (b, k, *size),
    "valid": (b, k),
    "is_crowd": (b, k),
    "image_size": (b, 2),
    "image_id": (b,),
    "scale": (b,),
    "original_size": (b, 2),
    "example_mask": (b,),
  }
  dtypes = {
    "image": "float32",
    "boxes": "float32",
    "classes": "int32",
    "instance_masks": "uint8",
    "valid": "bool",
    "is_crowd": "bool",
    "image_size": "int32",
    "image_id": "int64",
    "scale": "float32",
    "original_size": "int32",
    "example_mask": "bool",
  }
  assert set(spec_or_batch) == set(keys)
  for key, value in spec_or_batch.items():
    assert tuple(value.shape) == shapes[key], key
    assert np.dtype(value.dtype.name if hasattr(value.dtype, "name") else value.dtype) == (
      np.dtype(dtypes[key])
    ), key


def test_shapes_train_batches_follow_the_contract_and_stay_aligned():
  config = shapes_config()
  ds = instance_pipeline.instance_train_dataset(config, local_batch_size=4)
  check_contract(ds.element_spec, 4, 8, (32, 32), instance_pipeline.TRAIN_KEYS)
  batches = list(ds.take(6).as_numpy_iterator())  # 24 examples: two passes over 12.
  check_contract(batches[0], 4, 8, (32, 32), instance_pipeline.TRAIN_KEYS)
  originals = [generate_example(0, "train", i, (32, 32), 4, 8) for i in range(12)]
  flips = []
  for row in rows(batches):
    image = np.round(denormalize(row["image"]))
    matches = [
      (e, f)
      for e in originals
      for f in (False, True)
      if np.abs(image - (e["image"][:, ::-1] if f else e["image"])).max() < 1e-3
    ]
    assert len(matches) == 1
    original, flipped = matches[0]
    flips.append(flipped)
    masks = original["instance_masks"][:, :, ::-1] if flipped else original["instance_masks"]
    np.testing.assert_array_equal(row["instance_masks"], masks)
    np.testing.assert_array_equal(row["classes"], original["classes"])
    np.testing.assert_array_equal(row["valid"], original["valid"])
    assert not row["is_crowd"].any()
    np.testing.assert_array_equal(row["image_size"], [32, 32])
    for i in np.flatnonzero(row["valid"]):  # Each box encloses exactly its mask.
      ys, xs = np.nonzero(row["instance_masks"][i])
      np.testing.assert_allclose(row["boxes"][i], [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
    assert not row["boxes"][~row["valid"]].any()
  assert any(flips) and not all(flips)


def test_cropped_train_batches_hold_the_crops_of_the_full_masks():
  # Same seed, same examples and flips: each crop is the full-mask batch's mask cropped.
  full_ds = instance_pipeline.instance_train_dataset(shapes_config(), local_batch_size=4)
  config = shapes_config(cropped_mask_size=56)
  ds = instance_pipeline.instance_train_dataset(config, local_batch_size=4)
  assert set(ds.element_spec) == set(instance_pipeline.CROPPED_TRAIN_KEYS)
  assert ds.element_spec["cropped_masks"].shape == (4, 8, 56, 56)
  assert ds.element_spec["cropped_masks"].dtype.name == "float32"
  full, cropped = rows(full_ds.take(3).as_numpy_iterator()), rows(ds.take(3).as_numpy_iterator())
  for a, b in zip(full, cropped):
    assert "instance_masks" not in b
    for key in set(b) - {"cropped_masks"}:
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    valid = np.flatnonzero(a["valid"])
    assert len(valid) and not b["cropped_masks"][len(valid) :].any()  # Padding rows are 0.
    for i in valid:
      ref = crop_ref(a["instance_masks"][i], a["boxes"][i], 56)
      np.testing.assert_allclose(b["cropped_masks"][i], ref, atol=1e-5)


@pytest.mark.parametrize("process_count", [1, 2])
def test_shapes_eval_covers_the_split_once_with_padding(process_count):
  config = shapes_config(num_examples=10)
  ids = []
  for p in range(process_count):
    ds, num_batches = instance_pipeline.instance_eval_dataset(
      config, local_batch_size=4, process_index=p, process_count=process_count, num_batches=3
    )
    check_contract(ds.element_spec, 4, 8, (32, 32), instance_pipeline.EVAL_KEYS)
    examples = rows(ds.as_numpy_iterator())
    assert len(examples) == 12 and num_batches == 3
    for row in examples:
      if not row["example_mask"]:
        assert row["image_id"] == -1 and row["scale"] == 1.0 and not row["valid"].any()
        continue
      ids.append(int(row["image_id"]))
      original = generate_example(0, "validation", int(row["image_id"]), (32, 32), 4, 8)
      np.testing.assert_allclose(denormalize(row["image"]), original["image"], atol=1e-3)
      np.testing.assert_array_equal(row["instance_masks"], original["instance_masks"])
      assert row["scale"] == 1.0
      np.testing.assert_array_equal(row["original_size"], [32, 32])
  assert sorted(ids) == list(range(10))


def expected_coco_row(row, fixture, max_instances):
  """Checks one eval row of the COCO fixture against the JSON; returns the image id."""
  image_id = int(row["image_id"])
  oh, ow = fixture.sizes[image_id]
  h, w = row["image_size"]
  np.testing.assert_array_equal(row["original_size"], [oh, ow])
  assert row["scale"] == pytest.approx(min(40 / min(oh, ow), 64 / max(oh, ow)))
  assert (h, w) == (int(oh * row["scale"] + 0.5), int(ow * row["scale"] + 0.5))
  image = denormalize(row["image"])
  np.testing.assert_allclose(image[:h, :w].reshape(-1, 3).mean(0), COLOURS[image_id], atol=2)
  assert np.abs(row["image"][h:]).max(initial=0) == 0 and np.abs(row["image"][:, w:]).max() == 0
  anns = fixture.annotations(image_id)
  if len(anns) > max_instances:
    anns = sorted(sorted(anns, key=lambda a: -a["area"])[:max_instances], key=lambda a: a["id"])
  n = len(anns)
  for i, ann in enumerate(anns):
    expected = np.zeros((64, 64), np.uint8)
    expected[:h, :w] = nearest_resize(fixture.masks[ann["id"]], (h, w))
    np.testing.assert_array_equal(row["instance_masks"][i], expected)
    x, y, bw, bh = ann["bbox"]
    np.testing.assert_allclose(
      row["boxes"][i],
      np.array([x, y, x + bw, y + bh]) * [w / ow, h / oh, w / ow, h / oh],
      rtol=1e-6,
    )
    assert row["classes"][i] == LABEL_OF_CATEGORY[ann["category_id"]]
    assert row["is_crowd"][i] == bool(ann["iscrowd"]) and row["valid"][i] != row["is_crowd"][i]
  assert not row["instance_masks"][n:].any() and not row["valid"][n:].any()
  assert not row["classes"][n:].any() and not row["is_crowd"][n:].any()
  return image_id


def test_coco_eval_batches_resize_pad_and_keep_labels(coco_data):
  config = coco_config(coco_data.data_dir, max_instances=4, overflow="skip")
  ds, num_batches = instance_pipeline.instance_eval_dataset(config, local_batch_size=3)
  assert num_batches == 2
  check_contract(ds.element_spec, 3, 4, (64, 64), instance_pipeline.EVAL_KEYS)
  examples = rows(ds.as_numpy_iterator())
  ids = [expected_coco_row(r, coco_data, 4) for r in examples if r["example_mask"]]
  assert ids == [5, 7, 42, 100]  # Evaluation never skips: image 5 is truncated instead.
  assert not examples[-1]["example_mask"] and examples[-1]["image_id"] == -1


def test_coco_train_batches_flip_and_skip(coco_data):
  config = coco_config(coco_data.data_dir, max_instances=4, overflow="skip")
  ds = instance_pipeline.instance_train_dataset(config, local_batch_size=3)
  check_contract(ds.element_spec, 3, 4, (64, 64), instance_pipeline.TRAIN_KEYS)
  colour_ids = {v: k for k, v in COLOURS.items()}
  seen, flips = [], []
  for row in rows(ds.take(4).as_numpy_iterator()):  # Four passes over the three kept images.
    h, w = row["image_size"]
    colour = tuple(np.round(denormalize(row["image"][:h, :w]).reshape(-1, 3).mean(0)))
    image_id = colour_ids[min(colour_ids, key=lambda c: np.abs(np.subtract(c, colour)).sum())]
    seen.append(image_id)
    anns = coco_data.annotations(image_id)
    oh, ow = coco_data.sizes[image_id]
    for i, ann in enumerate(anns):
      mask = nearest_resize(coco_data.masks[ann["id"]], (h, w))
      got = row["instance_masks"][i, :h, :w]
      flipped = not np.array_equal(got, mask)
      np.testing.assert_array_equal(got, mask[:, ::-1] if flipped else mask)
      x, y, bw, bh = ann["bbox"]
      box = np.array([x, y, x + bw, y + bh]) * [w / ow, h / oh, w / ow, h / oh]
      if flipped:
        box = [w - box[2], box[1], w - box[0], box[3]]
      np.testing.assert_allclose(row["boxes"][i], box, rtol=1e-5, atol=1e-4)
      flips.append(flipped)
  assert 5 not in seen and set(seen) == {7, 42, 100}
  assert any(flips) and not all(flips)


def test_config_errors():
  with pytest.raises(ValueError, match="max_size=64 exceeds min"):
    instance_pipeline.instance_train_dataset(
      shapes_config(min_size=32, max_size=64), local_batch_size=2
    )
  with pytest.raises(ValueError, match="multiples of 32"):
    instance_pipeline.instance_eval_dataset(make_config(image_size=(40, 32)), local_batch_size=2)
  with pytest.raises(ValueError, match="cropped_mask_size=-1 must be an int"):
    instance_pipeline.instance_train_dataset(
      shapes_config(cropped_mask_size=-1), local_batch_size=2
    )
  with pytest.raises(ValueError, match="Unknown dataset.name 'pets'"):
    instance_pipeline.instance_train_dataset(make_config("pets"), local_batch_size=2)

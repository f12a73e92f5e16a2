"""Tests for segjax/data/shapes.py: determinism, annotation consistency, colour-blind classes."""

import numpy as np
import pytest
import tensorflow as tf

from segjax.data.shapes import NUM_CLASSES, generate_example, shapes

INSTANCE_KEYS = ("instance_masks", "boxes", "classes", "valid")


def examples(num, size=(32, 32), seed=0, split="train", **kwargs):
  return [generate_example(seed, split, i, size, **kwargs) for i in range(num)]


def test_examples_are_a_function_of_seed_split_and_index():
  a = generate_example(3, "train", 5, (32, 40))
  b = generate_example(3, "train", 5, (32, 40))
  assert set(a) == {"image", "mask", *INSTANCE_KEYS}
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)
  others = [
    generate_example(*args, (32, 40))
    for args in [(4, "train", 5), (3, "validation", 5), (3, "test", 5), (3, "train", 6)]
  ]
  for other in others:
    assert not np.array_equal(a["image"], other["image"])
    assert not np.array_equal(a["mask"], other["mask"])


@pytest.mark.parametrize("size", [(48, 80), (80, 48), (16, 16), (33, 17)])
def test_any_image_size(size):
  height, width = size
  for e in examples(20, size, max_instances=6):
    assert e["image"].shape == (height, width, 3) and e["image"].dtype == np.uint8
    assert e["mask"].shape == (height, width) and e["mask"].dtype == np.uint8
    assert e["instance_masks"].shape == (6, height, width) and e["instance_masks"].dtype == np.uint8
    assert e["boxes"].shape == (6, 4) and e["boxes"].dtype == np.float32
    assert e["classes"].shape == (6,) and e["classes"].dtype == np.int32
    assert e["valid"].shape == (6,) and e["valid"].dtype == bool
    assert 1 <= e["valid"].sum() <= 4  # max_shapes


def test_small_images_still_hold_a_shape():
  # Small images reject many draws (a shape needs 16 pixels); each still gets one shape.
  assert min(e["valid"].sum() for e in examples(300, (16, 16))) >= 1
  with pytest.raises(ValueError, match="too small"):
    generate_example(0, "train", 0, (15, 64))


def test_semantic_mask_is_the_class_of_the_top_instance():
  for e in examples(30, (48, 80)):
    masks = e["instance_masks"].astype(int)
    assert masks.sum(0).max() <= 1  # visible parts never overlap: one instance on top
    np.testing.assert_array_equal(e["mask"], np.einsum("k,khw->hw", e["classes"], masks))
    assert np.all(e["mask"][masks.sum(0) == 0] == 0)
    assert set(np.unique(e["mask"])) <= set(range(NUM_CLASSES))


def test_boxes_are_the_tight_extent_of_each_instance():
  for e in examples(30, (48, 80)):
    for k in np.flatnonzero(e["valid"]):
      ys, xs = np.nonzero(e["instance_masks"][k])
      np.testing.assert_array_equal(e["boxes"][k], [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])


def test_padding_rows_are_zero_and_invalid():
  counts = []
  for e in examples(40, max_shapes=3, max_instances=5):
    n = int(e["valid"].sum())
    counts.append(n)
    np.testing.assert_array_equal(e["valid"], np.arange(5) < n)  # valid rows come first
    assert np.all(e["instance_masks"][n:] == 0) and np.all(e["boxes"][n:] == 0)
    assert np.all(e["classes"][n:] == 0)
    assert np.all((e["classes"][:n] >= 1) & (e["classes"][:n] < NUM_CLASSES))
  assert set(counts) == {1, 2, 3}


def test_every_instance_stays_visible():
  for e in examples(100, (32, 32)):
    areas = e["instance_masks"][e["valid"]].reshape(int(e["valid"].sum()), -1).sum(-1)
    # A shape covers at least 16 pixels and keeps at least half of them.
    assert areas.min() >= 8


def test_class_is_not_predictable_from_colour():
  colours, labels = [], []
  for e in examples(200, (24, 24)):
    for k in np.flatnonzero(e["valid"]):
      colours.append(e["image"][e["instance_masks"][k] == 1].mean(0))
      labels.append(e["classes"][k])
  colours, labels = np.array(colours), np.array(labels)
  classes = np.arange(1, NUM_CLASSES)
  assert all((labels == c).sum() >= 80 for c in classes)
  class_means = np.stack([colours[labels == c].mean(0) for c in classes])
  # Colours are uniform in [0, 255] (std ~74), so a class mean over ~120 instances is within
  # ~7 of the overall mean; a colour tied to the class would move it by far more.
  assert np.abs(class_means - colours.mean(0)).max() < 30
  # Nearest class-mean colour, fitted on one half and scored on the other: chance level.
  half = len(labels) // 2
  fitted = np.stack([colours[:half][labels[:half] == c].mean(0) for c in classes])
  distances = ((colours[half:, None] - fitted) ** 2).sum(-1)
  accuracy = np.mean(classes[distances.argmin(-1)] == labels[half:])
  chance = np.bincount(labels[half:]).max() / len(labels[half:])
  assert accuracy < chance + 0.1


@pytest.mark.parametrize("process_count", [2, 3])
def test_host_shards_are_disjoint_and_cover_the_split(process_count):
  everything = list(
    shapes("validation", num_examples=7, image_size=(16, 16), seed=1).as_numpy_iterator()
  )
  assert len(everything) == 7
  seen = []
  for p in range(process_count):
    ds = shapes(
      "validation",
      num_examples=7,
      image_size=(16, 16),
      seed=1,
      process_index=p,
      process_count=process_count,
    )
    part = list(ds.as_numpy_iterator())
    assert int(ds.cardinality()) == len(part)
    for e in part:
      matches = [i for i, x in enumerate(everything) if np.array_equal(x["image"], e["image"])]
      assert len(matches) == 1
      seen.append(matches[0])
    assert seen[-len(part) :] == list(range(p, 7, process_count))
  assert sorted(seen) == list(range(7))


def test_dataset_matches_generate_example_and_has_instance_keys_on_request():
  ds = shapes(
    "train", num_examples=3, image_size=(24, 40), seed=2, max_instances=6, with_instances=True
  )
  assert ds.element_spec == {
    "image": tf.TensorSpec((24, 40, 3), tf.uint8),
    "mask": tf.TensorSpec((24, 40), tf.uint8),
    "instance_masks": tf.TensorSpec((6, 24, 40), tf.uint8),
    "boxes": tf.TensorSpec((6, 4), tf.float32),
    "classes": tf.TensorSpec((6,), tf.int32),
    "valid": tf.TensorSpec((6,), tf.bool),
  }
  for i, e in enumerate(ds.as_numpy_iterator()):
    reference = generate_example(2, "train", i, (24, 40), max_instances=6)
    for key in reference:
      np.testing.assert_array_equal(e[key], reference[key], err_msg=key)
  plain = shapes("train", num_examples=3, image_size=(24, 40), seed=2)
  assert set(plain.element_spec) == {"image", "mask"}


def test_bad_arguments():
  with pytest.raises(ValueError, match="nope"):
    generate_example(0, "nope", 0)
  with pytest.raises(ValueError, match="max_shapes"):
    generate_example(0, "train", 0, max_shapes=5, max_instances=4)
  with pytest.raises(ValueError, match="no examples"):
    shapes("train", num_examples=2, process_index=2, process_count=3)

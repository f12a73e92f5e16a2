"""Tests for segjax/data/tfds_sources.py on tiny data sets built by the real tfds builders."""

import hashlib

import numpy as np
import pytest
import tensorflow as tf

from segjax.data import tfds_sources
from segjax.data.tfds_sources import cityscapes, oxford_iiit_pet

# Official cityscapesScripts labels.py: trainId of labelIds 0..33, transcribed independently.
OFFICIAL_TRAIN_IDS = [
  255,
  255,
  255,
  255,
  255,
  255,
  255,  # unlabeled .. ground
  0,
  1,
  255,
  255,  # road, sidewalk, parking, rail track
  2,
  3,
  4,
  255,
  255,
  255,  # building, wall, fence, guard rail, bridge, tunnel
  5,
  255,
  6,
  7,  # pole, polegroup, traffic light, traffic sign
  8,
  9,
  10,
  11,
  12,  # vegetation, terrain, sky, person, rider
  13,
  14,
  15,
  255,
  255,  # car, truck, bus, caravan, trailer
  16,
  17,
  18,  # train, motorcycle, bicycle
]


def _examples(ds):
  return list(ds.as_numpy_iterator())


def _fingerprint(example):
  return hashlib.sha1(example["mask"].tobytes() + str(example["mask"].shape).encode()).hexdigest()


def _check_contract(ds, num_examples):
  assert ds.cardinality().numpy() == num_examples
  assert ds.element_spec["image"].dtype == tf.uint8
  assert ds.element_spec["image"].shape.as_list()[-1] == 3
  assert ds.element_spec["mask"].dtype == tf.uint8
  assert ds.element_spec["mask"].shape.rank == 2
  examples = _examples(ds)
  assert len(examples) == num_examples
  for example in examples:
    assert example["image"].shape[:2] == example["mask"].shape
  return examples


@pytest.mark.parametrize("split", ["train", "test"])
def test_pets_masks_are_trimap_classes_aligned_with_images(fake_pets, split):
  ds = oxford_iiit_pet(split, data_dir=fake_pets.data_dir)
  examples = _check_contract(ds, fake_pets.num_examples[split])
  trimap_to_class = {1: 1, 2: 0, 3: 2}  # pet, background, border
  for example in examples:
    trimap = fake_pets.raw_label_of_image(example["image"])
    expected = np.vectorize(trimap_to_class.get)(trimap)
    np.testing.assert_array_equal(example["mask"], expected)
    assert set(np.unique(example["mask"])) == {0, 1, 2}


def test_pets_native_sizes(fake_pets):
  sizes = sorted(
    ex["mask"].shape for ex in _examples(oxford_iiit_pet("train", data_dir=fake_pets.data_dir))
  )
  assert sizes == [(32, 80), (48, 64), (64, 32)]


def test_class_names():
  assert tfds_sources.OXFORD_IIIT_PET_CLASS_NAMES == ("background", "pet", "border")
  names = tfds_sources.CITYSCAPES_CLASS_NAMES
  assert len(names) == 19
  assert (names[0], names[13], names[18]) == ("road", "car", "bicycle")


@pytest.mark.parametrize("process_count", [2, 3])
def test_pets_host_parts_are_disjoint_and_cover_the_split(fake_pets, process_count):
  full = [
    _fingerprint(ex) for ex in _examples(oxford_iiit_pet("train", data_dir=fake_pets.data_dir))
  ]
  parts = []
  for index in range(process_count):
    ds = oxford_iiit_pet(
      "train",
      data_dir=fake_pets.data_dir,
      process_index=index,
      process_count=process_count,
    )
    part = [_fingerprint(ex) for ex in _examples(ds)]
    assert ds.cardinality().numpy() == len(part)
    parts.append(part)
  # 3 examples: 2 + 1 for two processes, the remainder going first.
  assert [len(p) for p in parts] == [
    len(full) // process_count + (i < len(full) % process_count) for i in range(process_count)
  ]
  assert sorted(sum(parts, [])) == sorted(full)
  assert len(set(full)) == len(full)


def test_order_is_deterministic(fake_pets):
  read = lambda: [
    _fingerprint(ex) for ex in _examples(oxford_iiit_pet("train", data_dir=fake_pets.data_dir))
  ]
  assert read() == read()


def test_bad_process_index(fake_pets):
  with pytest.raises(ValueError, match="process_index 2"):
    oxford_iiit_pet("train", data_dir=fake_pets.data_dir, process_index=2, process_count=2)


def test_unprepared_data_set_with_several_processes_is_an_error(tmp_path):
  with pytest.raises(RuntimeError, match="prepare it with a single process"):
    oxford_iiit_pet("train", data_dir=str(tmp_path), process_index=0, process_count=2)


def test_cityscapes_label_table_is_the_official_one():
  table = tfds_sources.CITYSCAPES_LABEL_ID_TO_TRAIN_ID
  assert table.dtype == np.uint8 and table.shape == (256,)
  np.testing.assert_array_equal(table[:34], OFFICIAL_TRAIN_IDS)
  # Ids outside 0..33 (license plate's -1 reads as 255 in uint8) are ignored.
  assert np.all(table[34:] == 255)
  assert sorted(table[table != 255]) == list(range(19))


@pytest.mark.parametrize("split", ["train", "validation"])
def test_cityscapes_masks_are_train_ids_aligned_with_images(fake_cityscapes, split):
  ds = cityscapes(split, data_dir=fake_cityscapes.data_dir)
  examples = _check_contract(ds, fake_cityscapes.num_examples[split])
  for example in examples:
    assert example["image"].shape == (1024, 2048, 3)
    label_ids = fake_cityscapes.raw_label_of_image(example["image"])
    mask = example["mask"]
    np.testing.assert_array_equal(mask, np.array(OFFICIAL_TRAIN_IDS)[label_ids])
    # A few pairs from the official table, each present in every fake image.
    for label_id, train_id in [(7, 0), (26, 13), (0, 255), (1, 255), (33, 18), (29, 255)]:
      assert np.all(mask[label_ids == label_id] == train_id), label_id


def test_cityscapes_host_parts_and_test_split(fake_cityscapes):
  parts = [
    [
      _fingerprint(ex)
      for ex in _examples(
        cityscapes("train", data_dir=fake_cityscapes.data_dir, process_index=i, process_count=2)
      )
    ]
    for i in range(2)
  ]
  assert [len(p) for p in parts] == [1, 1] and parts[0] != parts[1]
  assert cityscapes("test", data_dir=fake_cityscapes.data_dir).cardinality().numpy() == 1


def test_cityscapes_without_manual_files_names_the_manual_dir(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"downloads/manual.*gtFine_trainvaltest\.zip"):
    cityscapes("train", data_dir=str(tmp_path))

"""Tests for segjax/data/coco.py: decoding, labels, crowd, sharding, overflow and errors."""

import json
import logging
import os
import shutil

import numpy as np
import pytest
import tensorflow as tf

from segjax.data import coco
from segjax.errors import ConfigError
from tests.coco_fixture import (
  CATEGORY_IDS,
  COLOURS,
  DROPPED_ANNOTATION,
  IMAGE_IDS,
  LABEL_OF_CATEGORY,
  SPLIT,
  write_coco,
)

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


@pytest.fixture(scope="module")
def coco_data(tmp_path_factory):
  return write_coco(tmp_path_factory.mktemp("coco_data"))


def examples(ds):
  return list(ds.as_numpy_iterator())


def check_example(example, fixture, max_instances=8):
  image_id = int(example["image_id"])
  height, width = fixture.sizes[image_id]
  assert example["image"].shape == (height, width, 3) and example["image"].dtype == np.uint8
  np.testing.assert_allclose(example["image"].reshape(-1, 3).mean(0), COLOURS[image_id], atol=2)
  anns = fixture.annotations(image_id)[:max_instances]
  n = len(anns)
  assert example["instance_masks"].shape == (n, height, width)
  assert example["instance_masks"].dtype == np.uint8
  for i, ann in enumerate(anns):
    np.testing.assert_array_equal(example["instance_masks"][i], fixture.masks[ann["id"]])
    x, y, w, h = ann["bbox"]
    np.testing.assert_allclose(example["boxes"][i], [x, y, x + w, y + h])
    assert example["classes"][i] == LABEL_OF_CATEGORY[ann["category_id"]]
    assert example["is_crowd"][i] == bool(ann["iscrowd"])
    assert example["valid"][i] == (not ann["iscrowd"])
  assert example["boxes"].shape == (n, 4) and example["boxes"].dtype == np.float32
  assert example["classes"].dtype == np.int32


def test_examples_in_image_id_order_with_masks_labels_and_crowd(coco_data):
  ds = coco.coco_instances(SPLIT, data_dir=coco_data.data_dir)
  assert int(ds.cardinality()) == len(IMAGE_IDS)
  got = examples(ds)
  assert [int(e["image_id"]) for e in got] == list(IMAGE_IDS)
  for example in got:
    check_example(example, coco_data)
  by_id = {int(e["image_id"]): e for e in got}
  # Crowd kept apart: valid False, is_crowd True; the invalid polygon is gone.
  np.testing.assert_array_equal(by_id[42]["is_crowd"], [False, False, True])
  np.testing.assert_array_equal(by_id[42]["valid"], [True, True, False])
  assert len(by_id[7]["classes"]) == 2
  assert by_id[100]["instance_masks"].shape == (0, 16, 16)


def test_info_maps_sorted_category_ids_to_contiguous_labels(coco_data):
  info = coco.load_coco(coco_data.annotation_file)
  assert info.category_ids == CATEGORY_IDS
  assert info.class_names == ("background", "one", "three", "ninety")
  assert info.num_classes == 4
  assert sorted(info.coco.getImgIds()) == list(IMAGE_IDS)


def test_explicit_paths_and_dropped_annotation_logged(coco_data, caplog):
  with caplog.at_level(logging.WARNING):
    ds = coco.coco_instances(
      SPLIT,
      data_dir=None,
      annotation_file=coco_data.annotation_file,
      image_dir=os.path.join(coco_data.data_dir, SPLIT),
    )
  assert "dropped 1 annotations" in caplog.text
  assert int(ds.cardinality()) == 4
  assert DROPPED_ANNOTATION not in [a["id"] for a in coco_data.annotations(7)]


@pytest.mark.parametrize("count", [2, 3])
def test_process_parts_are_disjoint_and_cover(coco_data, count):
  parts = [
    [
      int(e["image_id"])
      for e in examples(
        coco.coco_instances(
          SPLIT, data_dir=coco_data.data_dir, process_index=p, process_count=count
        )
      )
    ]
    for p in range(count)
  ]
  assert sorted(sum(parts, [])) == list(IMAGE_IDS)
  assert [len(p) for p in parts] == ([2, 2] if count == 2 else [2, 1, 1])


def test_shuffle_seed_permutes_reproducibly_and_per_epoch(coco_data):
  def order(seed, epochs=1):
    ds = coco.coco_instances(SPLIT, data_dir=coco_data.data_dir, shuffle_seed=seed)
    return [int(e["image_id"]) for e in examples(ds.repeat(epochs))]

  assert order(3) == order(3)
  assert sorted(order(3)) == list(IMAGE_IDS)
  epochs = [tuple(order(s, 4)[4 * i : 4 * i + 4]) for s in (0, 1) for i in range(4)]
  assert len(set(epochs)) > 1  # Reshuffled between epochs or seeds.


def test_overflow_truncate_keeps_largest_and_logs(coco_data, caplog):
  with caplog.at_level(logging.WARNING):
    ds = coco.coco_instances(SPLIT, data_dir=coco_data.data_dir, max_instances=3)
  assert "1 images have more than max_instances=3" in caplog.text
  many = examples(ds)[0]
  assert int(many["image_id"]) == 5
  # Sides 4, 2, 6, 3, 5 for ids 51..55: the largest three are 53, 55, 51, kept in id order.
  kept = {51: 4, 53: 6, 55: 5}
  areas = many["instance_masks"].reshape(3, -1).sum(1)
  np.testing.assert_array_equal(areas, [s * s for s in kept.values()])
  for i, ann_id in enumerate(kept):
    np.testing.assert_array_equal(many["instance_masks"][i], coco_data.masks[ann_id])
  # Image 42 has exactly 3 and is untouched.
  check_example(examples(ds)[2], coco_data)


def test_overflow_skip_drops_the_image(coco_data, caplog):
  with caplog.at_level(logging.WARNING):
    ds = coco.coco_instances(SPLIT, data_dir=coco_data.data_dir, max_instances=3, overflow="skip")
  assert "skipped 1 images" in caplog.text
  assert int(ds.cardinality()) == 3
  assert [int(e["image_id"]) for e in examples(ds)] == [7, 42, 100]


def test_overflow_error_names_the_image(coco_data):
  with pytest.raises(ValueError, match=r"image id 5 \(many.png\) has 5 instances"):
    coco.coco_instances(SPLIT, data_dir=coco_data.data_dir, max_instances=4, overflow="error")
  with pytest.raises(ValueError, match="dataset.overflow='drop'"):
    coco.coco_instances(SPLIT, data_dir=coco_data.data_dir, overflow="drop")


def corrupted(tmp_path, edit):
  fixture = write_coco(tmp_path)
  with open(fixture.annotation_file) as f:
    data = json.load(f)
  edit(data)
  with open(fixture.annotation_file, "w") as f:
    json.dump(data, f)
  return fixture


def _drop_key(key):
  return lambda d: d.pop(key)


def _set_first(section, field, value):
  def edit(d):
    if value is None:
      d[section][0].pop(field)
    else:
      d[section][0][field] = value

  return edit


@pytest.mark.parametrize(
  "edit, message",
  [
    (_drop_key("categories"), "missing top-level key 'categories'"),
    (_set_first("images", "file_name", None), r"images\[0\] \(id 42\) has no 'file_name'"),
    (
      _set_first("annotations", "segmentation", None),
      r"annotations\[0\] \(id 423\) has no "
      "'segmentation'",
    ),
    (
      _set_first("annotations", "image_id", 999),
      "annotation id 423 has image_id 999, which no image has",
    ),
    (
      _set_first("annotations", "category_id", 2),
      "annotation id 423 has category_id 2, which no category has",
    ),
    (_set_first("annotations", "bbox", [1, 2]), r"annotation id 423: 'bbox' must be"),
    (_set_first("images", "id", 5), "two images have id 5"),
    (
      lambda d: d["annotations"][0]["segmentation"].update(size=[30, 20]),
      r"annotation id 423: RLE 'size' \[30, 20\] differs from its image's \[height, width\] "
      r"\[20, 30\]",
    ),
  ],
)
def test_bad_json_raises_naming_file_and_field(tmp_path, edit, message):
  fixture = corrupted(tmp_path, edit)
  with pytest.raises(ValueError, match=message) as info:
    coco.coco_instances(SPLIT, data_dir=fixture.data_dir)
  assert fixture.annotation_file in str(info.value)


def test_missing_or_unparsable_files_raise(tmp_path):
  with pytest.raises(FileNotFoundError, match="instances_val.json does not exist"):
    coco.coco_instances(SPLIT, data_dir=str(tmp_path))
  fixture = write_coco(tmp_path / "a")
  with open(fixture.annotation_file, "w") as f:
    f.write("{not json")
  with pytest.raises(ValueError, match="is not valid JSON"):
    coco.coco_instances(SPLIT, data_dir=fixture.data_dir)
  fixture = write_coco(tmp_path / "b")
  os.remove(os.path.join(fixture.data_dir, SPLIT, "photo.jpg"))
  with pytest.raises(FileNotFoundError, match=r"photo.jpg of image id 7 .* does not exist"):
    coco.coco_instances(SPLIT, data_dir=fixture.data_dir)


def test_image_size_differing_from_json_raises_when_decoded(tmp_path):
  fixture = write_coco(tmp_path)
  shutil.copy(
    os.path.join(fixture.data_dir, SPLIT, "empty.png"),
    os.path.join(fixture.data_dir, SPLIT, "scene.png"),
  )
  ds = coco.coco_instances(SPLIT, data_dir=fixture.data_dir)
  with pytest.raises(tf.errors.OpError, match=r"scene.png is 16x16 but .* height=20, width=30"):
    examples(ds)


@pytest.mark.parametrize("category_ids", [tuple(range(1, 91)), (90, 3, 1)])
def test_category_ids_fix_the_label_of_each_category(coco_data, category_ids):
  # range(1, 91): torchvision's COCO labels, label l is category id l, ids absent from the
  # file included. (90, 3, 1): any order.
  label_of = {c: i + 1 for i, c in enumerate(category_ids)}
  info = coco.load_coco(coco_data.annotation_file, category_ids)
  assert info.category_ids == category_ids and info.num_classes == len(category_ids) + 1
  names = {"one": 1, "three": 3, "ninety": 90}
  for name, category in names.items():
    assert info.class_names[label_of[category]] == name
  assert info.class_names.count("N/A") == len(category_ids) - 3
  got = examples(coco.coco_instances(SPLIT, data_dir=coco_data.data_dir, category_ids=category_ids))
  assert len(got) == len(IMAGE_IDS)
  for example in got:
    anns = coco_data.annotations(int(example["image_id"]))
    assert list(example["classes"]) == [label_of[a["category_id"]] for a in anns]


def test_category_ids_must_list_every_annotated_category_once(coco_data):
  with pytest.raises(ConfigError, match=r"does not list: 90 \('ninety', 1 annotation\)"):
    coco.coco_instances(SPLIT, data_dir=coco_data.data_dir, category_ids=(1, 3))
  with pytest.raises(ConfigError, match="distinct"):
    coco.load_coco(coco_data.annotation_file, (1, 3, 3, 90))

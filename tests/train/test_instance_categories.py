"""`dataset.category_ids` in segjax/train/instance.py: the label -> COCO category id map of a
model whose labels are not the annotation file's sorted categories (torchvision's 91 COCO
labels), used alike by the training data, the evaluation and `categories`."""

import types

import numpy as np
import pytest

from segjax import coco_eval
from segjax.data import instance_pipeline
from segjax.errors import ConfigError
from segjax.train import instance, visualizations
from segjax.weights import torchvision
from tests.coco_fixture import write_coco
from tests.test_coco_eval import ground_truth_as_detections, make_config

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


@pytest.fixture(scope="module")
def clean_coco_data(tmp_path_factory):
  return write_coco(tmp_path_factory.mktemp("clean_coco_data"), with_dropped=False)


@pytest.mark.parametrize("category_ids", [tuple(range(1, 91)), (1, 2, 3, 4, 5, 6, 90), (90, 3, 1)])
def test_labels_train_and_evaluate_as_the_category_ids_map(clean_coco_data, category_ids):
  # The fixture's categories are 1, 3 and 90; the map has ids the file lacks, or another order.
  config = make_config(
    "coco", (64, 64), data_dir=clean_coco_data.data_dir, category_ids=category_ids
  )
  label_of = {c: i + 1 for i, c in enumerate(category_ids)}

  # Training data: a category's label is its position in category_ids, plus one.
  batch = next(
    instance_pipeline.instance_train_dataset(config, local_batch_size=4).take(1).as_numpy_iterator()
  )
  labels = set(np.unique(batch["classes"][batch["valid"]]).tolist())
  assert labels and labels <= {label_of[c] for c in (1, 3, 90)}

  # Evaluation: label l reported as category_ids[l - 1]; the ground truth is the file's.
  gt, ids = instance.ground_truth(config)
  assert ids == category_ids
  assert sorted(gt.getCatIds()) == [1, 3, 90]
  results = ground_truth_as_detections(config, ids)
  assert len(results) == 9
  assert sorted({r["category_id"] for r in results}) == [1, 3, 90]
  metrics = coco_eval.evaluate_coco(gt, results)  # Any wrong category id would lower it.
  assert metrics["box_AP"] == 1.0 and metrics["mask_AP"] == 1.0

  # categories(config), which predictions use: the same ids, named from the file.
  category_list, names = instance.categories(config)
  assert category_list == category_ids and len(names) == len(category_ids) + 1
  assert [names[label_of[c]] for c in (1, 3, 90)] == ["one", "three", "ninety"]
  assert set(names) - {"background", "one", "three", "ninety"} <= {"N/A"}
  evaluator = types.SimpleNamespace(gt=gt, category_ids=ids)
  assert visualizations._class_names(config, evaluator) == names


def test_class_names_must_match_category_ids(clean_coco_data):
  config = make_config(
    "coco",
    (64, 64),
    data_dir=clean_coco_data.data_dir,
    category_ids=(1, 3, 90),
    class_names=("background", "one", "three"),
  )
  with pytest.raises(ConfigError, match="dataset.class_names has 3 names"):
    instance.categories(config)
  config.dataset.class_names = ("background", "a", "b", "c")
  assert instance.categories(config) == ((1, 3, 90), ("background", "a", "b", "c"))
  with pytest.raises(ConfigError, match="dataset.class_names has 5 names"):
    instance.ground_truth(
      make_config(
        "coco",
        (64, 64),
        data_dir=clean_coco_data.data_dir,
        class_names=("background", "a", "b", "c", "d"),
      )
    )


def test_imported_torchvision_model_predicts_coco_ids_without_annotation_file():
  config = torchvision.model_config("maskrcnn_resnet50_fpn")
  assert config.dataset.data_dir is None
  ids, names = instance.categories(config)
  assert ids == tuple(range(1, 91)) and len(ids) == config.model.roi_heads.num_classes
  assert (names[1], names[12], names[90]) == ("person", "N/A", "toothbrush")


def test_unlisted_annotated_category_is_an_error(clean_coco_data):
  config = make_config("coco", (64, 64), data_dir=clean_coco_data.data_dir, category_ids=(1, 3))
  for build in (
    lambda: instance.ground_truth(config),
    lambda: instance_pipeline.instance_train_dataset(config, local_batch_size=2),
  ):
    with pytest.raises(ConfigError, match="dataset.category_ids"):
      build()

"""segjax/data/instance_sources.py: one registry entry is all a new instance data set needs;
training data, evaluation ground truth and prediction categories all come from it."""

import dataclasses

import numpy as np
import pytest

from segjax import coco_eval
from segjax.data import instance_pipeline, instance_sources
from segjax.errors import ConfigError
from segjax.train import instance
from tests.test_coco_eval import ground_truth_as_detections
from tests.test_coco_eval import make_config as coco_config

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

SHAPES_KWARGS = {"num_examples": 6, "image_size": (64, 64), "seed": 3}


def make_config(name, image_size, **dataset):
  return coco_config(
    name, image_size, **{"train_split": "train", "eval_split": "validation", **dataset}
  )


def test_a_registered_source_serves_training_evaluation_and_categories(monkeypatch):
  calls = []

  def dataset(split, **kwargs):
    calls.append((split, kwargs.pop("marker")))
    return instance_sources.shapes_instances(split, **kwargs)

  def categories(config):
    return (11, 12, 13, 14), ("bg", "w", "x", "y", "z")

  def ground_truth(config):  # Shapes' ground truth with its category ids moved by 10.
    gt, _ = instance_sources.INSTANCE_SOURCES["shapes"].ground_truth(config)
    for annotation in gt.dataset["annotations"]:
      annotation["category_id"] += 10
    gt.dataset["categories"] = [{"id": c + 10, "name": n} for c, n in zip(range(1, 5), "wxyz")]
    gt.createIndex()
    return gt, categories(config)[0]

  source = instance_sources.InstanceSource(
    dataset, lambda d: {"marker": d.marker}, ground_truth, categories
  )
  monkeypatch.setitem(instance_sources.INSTANCE_SOURCES, "mine", source)
  config = make_config(
    "mine",
    (64, 64),
    marker="from-config",
    train_kwargs=SHAPES_KWARGS,
    eval_kwargs=SHAPES_KWARGS,
  )

  batch = next(
    instance_pipeline.instance_train_dataset(config, local_batch_size=2).take(1).as_numpy_iterator()
  )
  assert batch["image"].shape == (2, 64, 64, 3) and batch["valid"].any()
  assert calls[0] == ("train", "from-config")

  gt, ids = instance.ground_truth(config)
  assert ids == (11, 12, 13, 14)
  results = ground_truth_as_detections(config, ids)
  assert results and {r["category_id"] for r in results} <= {11, 12, 13, 14}
  metrics = coco_eval.evaluate_coco(gt, results)  # Labels mapped to any other id would miss.
  assert metrics["box_AP"] == 1.0 and metrics["mask_AP"] == 1.0
  assert instance.categories(config) == ((11, 12, 13, 14), ("bg", "w", "x", "y", "z"))


def test_shapes_source_matches_its_ground_truth():
  config = make_config("shapes", (64, 64), eval_kwargs=SHAPES_KWARGS)
  gt, ids = instance.ground_truth(config)
  assert ids == (1, 2, 3, 4) and len(gt.getImgIds()) == SHAPES_KWARGS["num_examples"]
  metrics = coco_eval.evaluate_coco(gt, ground_truth_as_detections(config, ids))
  assert metrics["box_AP"] == 1.0 and metrics["mask_AP"] == 1.0
  ids, names = instance.categories(config)
  assert ids == (1, 2, 3, 4) and names[0] == "background" and len(names) == 5


def test_unknown_source_names_the_known_ones():
  config = make_config("pennfudan", (64, 64))
  with pytest.raises(ConfigError, match=r"'pennfudan'.*coco.*instance_folder.*shapes"):
    instance_pipeline.instance_train_dataset(config, local_batch_size=2)
  with pytest.raises(ConfigError, match="'pennfudan'"):
    instance.ground_truth(config)


def test_shapes_rejects_category_ids():
  config = make_config("shapes", (64, 64), category_ids=(1, 2, 3, 4), eval_kwargs=SHAPES_KWARGS)
  with pytest.raises(ConfigError, match="category_ids"):
    instance_pipeline.instance_eval_dataset(config, local_batch_size=2)


def test_sources_are_complete():
  for name, source in instance_sources.INSTANCE_SOURCES.items():
    assert all(callable(getattr(source, f.name)) for f in dataclasses.fields(source)), name
  assert np.all([s in instance_sources.INSTANCE_SOURCES for s in ("shapes", "coco")])

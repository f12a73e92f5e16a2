"""Config checks before anything is written, and the comparison on resume
(segjax/train/run_config.py)."""

import jax
import pytest

from configs import mask_rcnn_shapes, unet_shapes
from segjax.errors import ConfigError
from segjax.train import run_config


# `--config.image_size=32` arrives as (32,).
@pytest.mark.parametrize(
  "value, expected", [((32,), (32, 32)), ((32, 48), (32, 48)), ([16, 64], (16, 64))]
)
def test_image_size_of_one_int_means_a_square(value, expected):
  config = unet_shapes.get_config("tiny")
  config.image_size = value
  run_config.check(config)
  assert config.image_size == expected
  assert config.dataset.train_kwargs.image_size == expected  # References follow.


@pytest.mark.parametrize(
  "value, message",
  [
    ((32, 32, 3), r"image_size=\(32, 32, 3\): give \(height, width\)"),
    ((0, 32), r"image_size=\(0, 32\)"),
    (
      (30, 32),
      r"image_size=\(30, 32\) must be divisible by the model's stride 4 "
      r"\(2\*\*model.depth\)",
    ),
  ],
)
def test_bad_image_size_names_the_key(value, message):
  config = unet_shapes.get_config("tiny")
  config.image_size = value
  with pytest.raises(ConfigError, match=message):
    run_config.check(config)


def test_mask_rcnn_image_size_needs_no_unet_stride():
  config = mask_rcnn_shapes.get_config("tiny")
  config.image_size = (40, 40)
  run_config.check(config)


def test_bad_counts_name_the_key():
  config = unet_shapes.get_config("tiny")
  config.log_every_steps = 0
  with pytest.raises(ConfigError, match=r"log_every_steps=0 must be a positive integer"):
    run_config.check(config)
  config.log_every_steps, config.eval_every_steps = 1, 0  # 0: never evaluate in training.
  run_config.check(config)
  config.eval_every_steps = -1
  with pytest.raises(ConfigError, match=r"eval_every_steps=-1 must be a positive integer"):
    run_config.check(config)


def test_eval_batch_rounds_up_to_the_device_count(monkeypatch, capsys):
  monkeypatch.setattr(jax, "device_count", lambda: 8)
  config = unet_shapes.get_config()
  assert config.eval_batch_size == 50
  run_config.check(config)
  assert config.eval_batch_size == 56
  assert "eval_batch_size=50 rounded up to 56" in capsys.readouterr().out


def test_differences_name_changed_keys_outside_run_length():
  old = {"learning_rate": 0.003, "num_train_steps": 8, "model": {"depth": 2, "norm": "batch"}}
  new = {
    "learning_rate": 0.1,
    "num_train_steps": 16,
    "model": {"depth": 3},
    "extra": 1,
    "evaluation": {"mode": "slide"},
    "compiler_options": {"cpu": {"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_DEFAULT"}},
  }
  assert run_config.differences(old, new) == [
    "extra: (absent) -> 1",
    "learning_rate: 0.003 -> 0.1",
    "model.depth: 2 -> 3",
    "model.norm: 'batch' -> (absent)",
  ]
  # A section's own key (None or {} in one of the configs) is part of the section.
  assert run_config.differences({"compiler_options": None}, {"compiler_options": {"cpu": {}}}) == []
  assert run_config.differences({"evaluation": None}, {"evaluation": {"mode": "whole"}}) == []
  assert run_config.differences({"evaluations": 1}, {}) == ["evaluations: 1 -> (absent)"]


def test_class_names_must_name_every_class_the_model_outputs():
  config = unet_shapes.get_config("tiny")  # 5 names, model.num_classes 5.
  run_config.check(config)
  config.model.num_classes = 4
  with pytest.raises(ConfigError, match=r"class_names has 5 names but model.num_classes = 4"):
    run_config.check(config)
  config = mask_rcnn_shapes.get_config("tiny")  # Background + 4 names, 4 foreground classes.
  run_config.check(config)
  config.model.roi_heads.num_classes = 5
  with pytest.raises(
    ConfigError,
    match=r"5 names but model.roi_heads.num_classes "
    r"\(foreground\) \+ 1 = 6 classes",
  ):
    run_config.check(config)

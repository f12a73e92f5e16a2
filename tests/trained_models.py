"""The tiny shapes Mask R-CNN trained once per test process, for every module that reads it:
tests/train/test_mask_rcnn_train.py, tests/test_predict.py and tests/test_export.py (one
xdist group, "trained_mask_rcnn", so that one worker trains it)."""

import jax

from configs import mask_rcnn_shapes
from segjax.train import loop

XDIST_GROUP = "trained_mask_rcnn"
_TRAINED = {}


def mask_rcnn_config():
  """The tiny config trained long enough to detect: 100 steps at a constant 5e-3 reach box and
  mask AP of about 0.06 and 0.05 (AP50 0.27) on its 4 validation images, a few seconds more
  than its own 20 steps (box AP 0.01, mask AP 0); 60 steps still score 0. Other seeds and
  jax 0.12's rbg bits give 0.03 to 0.06: positive, with margin."""
  config = mask_rcnn_shapes.get_config("tiny")
  config.num_train_steps = 100
  config.schedule = "constant"
  config.learning_rate = 5e-3
  config.eval_every_steps = config.checkpoint_every_steps = 100
  return config


def trained_mask_rcnn(tmp_path_factory) -> tuple:
  """(config, workdir, the loop's final evaluation metrics), trained on the first call."""
  if "mask_rcnn" not in _TRAINED:
    previous = jax.config.jax_default_prng_impl
    jax.config.update("jax_default_prng_impl", "rbg")  # Compiles much faster on CPU.
    try:
      config = mask_rcnn_config()
      workdir = str(tmp_path_factory.mktemp("mask_rcnn"))
      eval_metrics = loop.train_and_evaluate(config, workdir)
    finally:
      jax.config.update("jax_default_prng_impl", previous)
    _TRAINED["mask_rcnn"] = config, workdir, eval_metrics
  return _TRAINED["mask_rcnn"]

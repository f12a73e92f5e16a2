"""Model variants built from config keys only, trained by the unchanged `train.py`: a U-Net
whose decoder upsamples bilinearly (`--config.model.upsampling=bilinear`) learns, and its
parameter tree is the default U-Net's with each transposed convolution (2x2 kernel) replaced
by a 1x1 convolution; a Mask R-CNN whose mask head upsamples the same way trains too."""

import json
import os
import subprocess
import sys

import jax
import numpy as np

from configs import unet_shapes
from segjax.models import build_model
from segjax.train import checkpoint, parallel, run_config
from segjax.train.state import initial_state
from tests.markers import long_test

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANT = [
  "--config.model.upsampling=bilinear",
  # Long enough to segment shapes, not only the background: predicting background everywhere
  # scores a mean IoU near 0.16 on shapes.
  "--config.model.depth=3",
  "--config.num_train_steps=400",
  "--config.batch_size=8",
  "--config.schedule=constant",
  "--config.log_every_steps=100",
  "--config.eval_every_steps=400",
  "--config.checkpoint_every_steps=400",
  "--config.eval_batch_size=20",
  "--config.dataset.train_kwargs.num_examples=800",
  "--config.dataset.eval_kwargs.num_examples=20",
]
MIOU_FLOOR = 0.2


def _shapes(tree):
  return {jax.tree_util.keystr(p): x.shape for p, x in jax.tree_util.tree_leaves_with_path(tree)}


@long_test
def test_bilinear_unet_from_config_keys_trains_through_train_py(tmp_path):
  workdir = str(tmp_path)
  env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "JAX_DEFAULT_PRNG_IMPL": "rbg"}
  proc = subprocess.run(
    [
      sys.executable,
      "train.py",
      "--config",
      "configs/unet_shapes.py:tiny",
      "--workdir",
      workdir,
      *VARIANT,
    ],
    cwd=REPO,
    env=env,
    text=True,
    capture_output=True,
    timeout=900,
  )
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    evals = [r for r in map(json.loads, f) if "eval/mean_iou" in r]
  assert evals[-1]["eval/mean_iou"] > MIOU_FLOOR, evals[-1]

  config = run_config.load(workdir)  # What train.py recorded: the variant's keys.
  assert config.model.upsampling == "bilinear"
  model = build_model(config)
  _, abstract = initial_state(config, model, parallel.make_mesh(1))
  manager = checkpoint.checkpoint_manager(workdir, save_every_steps=1)
  with manager:
    state, _ = checkpoint.restore(manager, abstract)
  variant = _shapes(state.params)
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(jax.device_get(state.params)))

  default = unet_shapes.get_config("tiny")
  default.model.depth = 3
  default_model = build_model(default)
  reference = _shapes(
    jax.eval_shape(
      lambda: default_model.init(
        jax.random.key(0), np.zeros((1, 32, 32, 3), np.float32), train=False
      )["params"]
    )
  )
  assert variant.keys() == reference.keys()
  upsampling = {k for k in reference if "['upsample']['kernel']" in k}
  assert len(upsampling) == config.model.depth
  for key, shape in reference.items():
    if key in upsampling:  # A 2x2 transposed convolution became a 1x1 convolution.
      assert shape[:2] == (2, 2) and variant[key] == (1, 1, *shape[2:]), key
    else:
      assert variant[key] == shape, key


MASK_VARIANT = [
  "--config.model.roi_heads.mask_upsampling=bilinear",
  # tests/train/test_mask_rcnn_train.py's schedule, after which the default head's mask AP
  # is above 0.
  "--config.num_train_steps=100",
  "--config.schedule=constant",
  "--config.learning_rate=5e-3",
  "--config.log_every_steps=20",
  "--config.eval_every_steps=100",
  "--config.checkpoint_every_steps=100",
]


@long_test
def test_mask_rcnn_with_a_bilinear_mask_head_trains_through_train_py(tmp_path):
  """A Mask R-CNN whose mask head upsamples by a 1x1 conv and a bilinear resize instead of
  its deconvolution (`--config.model.roi_heads.mask_upsampling=bilinear`): the unchanged
  train.py trains it (its mask loss falls, its mask AP is above 0) and its checkpoint holds the
  1x1 layer."""
  workdir = str(tmp_path)
  proc = subprocess.run(
    [
      sys.executable,
      "train.py",
      "--config",
      "configs/mask_rcnn_shapes.py:tiny",
      "--workdir",
      workdir,
      *MASK_VARIANT,
    ],
    cwd=REPO,
    env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
    text=True,
    capture_output=True,
    timeout=900,
  )
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = list(map(json.loads, f))
  losses = [r["loss_mask"] for r in records if "loss_mask" in r]
  assert len(losses) == 5 and losses[-1] < losses[0], losses
  evaluation = [r for r in records if "eval/mask_AP" in r][-1]
  assert 0 < evaluation["eval/mask_AP"] <= 1, evaluation

  config = run_config.load(workdir)
  assert config.model.roi_heads.mask_upsampling == "bilinear"
  model = build_model(config)
  _, abstract = initial_state(config, model, parallel.make_mesh(1))
  manager = checkpoint.checkpoint_manager(workdir, save_every_steps=1)
  with manager:
    state, _ = checkpoint.restore(manager, abstract)
  head = jax.device_get(state.params["roi_heads"]["mask_head"])
  assert "deconv" not in head and head["upsample"]["kernel"].shape[:2] == (1, 1)

"""Tests for segjax/train/init_from.py and the frozen-parameter decay mask of
segjax/train/state.py: fine-tuning imported torchvision weights on the shapes set."""

import json
import os

import jax
import numpy as np
import pytest
from flax import traverse_util

from configs import mask_rcnn_torchvision
from segjax.models import build_model
from segjax.train import evaluation, init_from, loop, parallel
from segjax.train.state import frozen_params
from segjax.weights import torchvision as tvw
from tests.markers import long_test
from tests.weights.conftest import MASK_RCNN

pytest.importorskip("torch")  # Only where the `torch` extra is missing; CI installs it.

pytestmark = pytest.mark.xdist_group("torchvision_import")
PREDICTORS = (
  "params/roi_heads/box_head/cls_score",
  "params/roi_heads/box_head/bbox_pred",
  "params/roi_heads/mask_head/predictor",
)


def small_config(init_dir):
  """R50-FPN at 64 x 64 on 16 shapes images, batch 2, 20 steps, 4 classes."""
  config = mask_rcnn_torchvision.get_config("shapes")
  config.init_from = init_dir
  config.image_size = (64, 64)
  config.batch_size = 2
  config.eval_batch_size = 4
  config.num_train_steps = 20
  config.warmup_steps = 0
  config.learning_rate = 3e-4
  config.weight_decay = 0.1  # Large enough that decay on a frozen weight would show.
  config.log_every_steps = 5
  config.eval_every_steps = 0  # Not evaluated: COCO AP is tests/train/test_mask_rcnn_train.py's.
  config.checkpoint_every_steps = 20
  config.dataset.train_kwargs.num_examples = 16
  config.dataset.eval_kwargs.num_examples = 4
  config.model.rpn.update(
    dict(
      pre_nms_topk_train=64,
      pre_nms_topk_test=32,
      post_nms_topk_train=48,
      post_nms_topk_test=24,
      batch_size_per_image=64,
    )
  )
  config.model.roi_heads.update(dict(batch_size_per_image=32, detections_per_image=8))
  return config


def flat(tree):
  return {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(tree).items()}


def start_params(flat_variables):
  return traverse_util.unflatten_dict(
    {tuple(k.split("/")[1:]): v for k, v in flat_variables.items() if k.startswith("params/")}
  )


@long_test  # In CI, init_from: tests/weights/test_unet_resnet_import.py.
def test_fine_tuning_starts_from_the_import_and_trains(
  tmp_path, tv_mask_rcnn, imported_workdir, capsys, monkeypatch
):
  import_dir, _ = imported_workdir
  config = small_config(import_dir)
  imported = flat(tvw.convert(tvw.read_state_dict(tv_mask_rcnn[1]), MASK_RCNN))

  # The state the loop starts from, before step 1, copied before the first step donates it.
  seen = {}

  def load(config, state):
    seen["fresh"] = flat({"params": jax.tree.map(np.asarray, state.params)})
    state = load_pretrained(config, state)
    seen["start"] = flat(
      jax.tree.map(np.asarray, {"params": state.params, "batch_stats": state.batch_stats})
    )
    return state

  load_pretrained = init_from.maybe_load_pretrained
  monkeypatch.setattr(init_from, "maybe_load_pretrained", load)
  workdir = str(tmp_path / "fine_tuned")
  loop.train_and_evaluate(config, workdir)
  start, fresh = seen["start"], seen["fresh"]
  assert start.keys() == imported.keys()
  for name, value in start.items():
    if name.rsplit("/", 1)[0] in PREDICTORS:  # Shape changed: the fresh initialisation.
      np.testing.assert_array_equal(value, fresh[name])
      assert value.shape != imported[name].shape
    else:  # Backbone, FPN, RPN, box-head trunk, mask-head convs: the imported tensors.
      np.testing.assert_array_equal(value, imported[name], err_msg=name)
  out = capsys.readouterr().out
  assert f"Initialised from {import_dir} (step 0): 301 loaded" in out
  assert "6 re-initialised (shape changed)" in out
  for p in PREDICTORS:
    assert f"  re-initialised: {p}/kernel" in out
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  logs = [r for r in records if "loss" in r]
  assert not any(k.startswith("eval/") for r in records for k in r)  # eval_every_steps=0
  assert [r["step"] for r in logs] == [5, 10, 15, 20]
  assert logs[-1]["loss"] < 0.8 * logs[0]["loss"], [r["loss"] for r in logs]

  # Frozen: the stem and res2 (freeze_at=2, as torchvision's trainable_backbone_layers=3).
  model = build_model(config)
  frozen = {k for k, v in flat(frozen_params(model, start_params(start))).items() if v}
  assert frozen == {
    k.removeprefix("params/")
    for k in start
    if k.startswith(("params/backbone/stem", "params/backbone/res2_"))
  }

  # Frozen parameters got neither gradients nor weight decay; trained ones moved.
  trained, step = evaluation.restore_variables(config, workdir, model, parallel.make_mesh())
  assert step == 20
  trained = flat(jax.tree.map(np.asarray, trained))
  for name in frozen:
    np.testing.assert_array_equal(trained[f"params/{name}"], imported[f"params/{name}"])
  assert not np.array_equal(
    trained["params/backbone/res3_0/conv1/kernel"], imported["params/backbone/res3_0/conv1/kernel"]
  )

  # A workdir's own checkpoint wins: resuming does not reload init_from.
  config.num_train_steps = 20
  loop.train_and_evaluate(config, workdir)
  assert "Initialised from" not in capsys.readouterr().out


def test_init_from_without_a_checkpoint_fails_naming_it(tmp_path):
  with pytest.raises(FileNotFoundError, match="holds no checkpoint"):
    init_from.read_variables(str(tmp_path))


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_frozen_parameters_get_no_weight_decay_and_the_state_keeps_its_structure(optimizer):
  import types

  import ml_collections
  import optax

  from segjax.train import state as state_lib

  model = types.SimpleNamespace(backbone=types.SimpleNamespace(freeze_at=2))
  params = {
    "backbone": {
      name: {"kernel": np.ones((2, 2), np.float32)}
      for name in ("stem_conv", "res2_0", "res2_1", "res3_0", "res5_2")
    },
    "fpn": {"lateral_2": {"kernel": np.ones((3,), np.float32)}},
  }
  frozen = flat(state_lib.frozen_params(model, params))
  assert {k for k, v in frozen.items() if v} == {
    "backbone/stem_conv/kernel",
    "backbone/res2_0/kernel",
    "backbone/res2_1/kernel",
  }
  config = ml_collections.ConfigDict(
    dict(
      optimizer=optimizer,
      learning_rate=0.1,
      weight_decay=0.5,
      schedule="constant",
      warmup_steps=0,
      num_train_steps=10,
      grad_clip_norm=1.0,
    )
  )
  tx = state_lib.make_optimizer(
    config, decay_mask=lambda p: jax.tree.map(lambda f: not f, state_lib.frozen_params(model, p))
  )
  # The unmasked optimizer, as before frozen parameters were excluded from weight decay:
  # checkpoints written with it must still restore, so the state's structure is the same.
  schedule = state_lib.learning_rate_schedule(config)
  plain = (
    optax.adamw(schedule, weight_decay=0.5)
    if optimizer == "adamw"
    else optax.chain(optax.add_decayed_weights(0.5), optax.sgd(schedule, momentum=0.9))
  )
  plain = optax.chain(optax.clip_by_global_norm(1.0), plain)
  assert jax.tree.structure(plain.init(params)) == jax.tree.structure(tx.init(params))
  zero = jax.tree.map(np.zeros_like, params)
  updates, _ = jax.jit(tx.update)(zero, tx.init(params), params)
  plain_updates, _ = jax.jit(plain.update)(zero, plain.init(params), params)
  for name, value in flat(updates).items():  # Decay only; unfrozen ones as the plain optimizer.
    expected = 0.0 if frozen[name] else flat(plain_updates)[name]
    np.testing.assert_allclose(value, expected, err_msg=name)
    assert frozen[name] or np.all(value != 0), name

"""Tests for segjax/models/mask_rcnn.py: the torchvision parameter count, R50 shapes (traced
only), a toy model's predictions and a few training steps on a synthetic batch."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from configs import mask_rcnn_shapes
from segjax.data import instance_pipeline
from segjax.models import create_model, mask_rcnn
from segjax.models.fpn import FPN
from segjax.models.resnet import ResNet
from segjax.models.roi_heads import ROIHeads
from segjax.models.rpn import RPN
from segjax.train import steps
from segjax.train.state import TrainState
from tests.markers import long_test

KEY = jax.random.key(0, impl="rbg")  # rbg keys compile much faster on CPU than threefry
H = W = 64


def num_params(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def toy_model(**roi_overrides):
  return mask_rcnn.MaskRCNN(
    backbone=ResNet(depth=18, base_width=8, norm="bn", freeze_at=0),
    fpn=FPN(out_channels=16),
    rpn=RPN(
      anchor_sizes=((8,), (16,), (32,), (64,), (128,)),
      pre_nms_topk_train=64,
      pre_nms_topk_test=32,
      post_nms_topk_train=48,
      post_nms_topk_test=24,
      batch_size_per_image=64,
    ),
    roi_heads=ROIHeads(
      num_classes=3,
      batch_size_per_image=32,
      fc_dims=(32, 32),
      mask_conv_dims=(16, 16),
      sampling_ratio=2,
      detections_per_image=8,
      **roi_overrides,
    ),
  )


def synthetic_batch(b=2, g=3):
  """Bright rectangles (classes 1, 2) on noise; the last ground-truth slot is padding."""
  rng = np.random.default_rng(0)
  image = rng.normal(scale=0.1, size=(b, H, W, 3)).astype(np.float32)
  boxes = np.zeros((b, g, 4), np.float32)
  masks = np.zeros((b, g, H, W), np.uint8)
  rects = [[(8, 6, 30, 40), (36, 30, 60, 56)], [(20, 4, 50, 24), (4, 30, 28, 54)]]
  for i in range(b):
    for j, (x1, y1, x2, y2) in enumerate(rects[i % 2]):
      boxes[i, j] = (x1, y1, x2, y2)
      masks[i, j, y1:y2, x1:x2] = 1
      image[i, y1:y2, x1:x2, j] += 1.0
  return {
    "image": jnp.asarray(image),
    "boxes": jnp.asarray(boxes),
    "classes": jnp.asarray([[1, 2] + [0] * (g - 2)] * b, jnp.int32),
    "instance_masks": jnp.asarray(masks),
    "valid": jnp.asarray([[True, True] + [False] * (g - 2)] * b),
    "image_size": jnp.asarray(np.array([[H, W], [H - 8, W - 4]])[np.arange(b) % 2], jnp.int32),
  }


def test_r50_fpn_parameter_count_matches_torchvision():
  # torchvision maskrcnn_resnet50_fpn(num_classes=91) counts 44,401,393 parameters, background
  # included in its 91; here K = 90 foreground classes plus background 0. Its
  # FrozenBatchNorm2d vectors are buffers; here they are "batch_stats", not "params".
  model = mask_rcnn.MaskRCNN(roi_heads=ROIHeads(num_classes=90))
  variables = jax.eval_shape(
    functools.partial(model.init, train=False), KEY, jnp.zeros((1, H, W, 3))
  )
  assert sorted(variables["params"]) == ["backbone", "fpn", "roi_heads", "rpn"]
  assert num_params(variables["params"]) == 44_401_393
  assert num_params(variables["params"]["backbone"]) == 23_508_032 - 2 * 26_560
  assert num_params(variables["batch_stats"]) == 4 * 26_560


def test_r50_default_shapes_traced():
  model = mask_rcnn.MaskRCNN()  # detectron2 1x defaults, K = 80
  batch = synthetic_batch(b=1, g=3)

  def run():
    variables = model.init(KEY, batch["image"], train=False)
    detections, aux = model.apply(variables, batch["image"], batch["image_size"])
    losses = mask_rcnn.loss_fn(variables, batch, KEY, model=model)
    return detections, aux, losses

  detections, aux, (loss, (metrics, _)) = jax.eval_shape(run)
  assert {k: (v.shape, v.dtype) for k, v in detections.items()} == {
    "boxes": ((1, 100, 4), jnp.float32),
    "scores": ((1, 100), jnp.float32),
    "classes": ((1, 100), jnp.int32),
    "mask_probs": ((1, 100, 28, 28), jnp.float32),
    "instance_masks": ((1, 100, H, W), jnp.bool_),
    "valid": ((1, 100), jnp.bool_),
  }
  assert aux["proposals"]["boxes"].shape == (1, 1000, 4)
  assert aux["p6"].shape == (1, 1, 1, 256) and aux["c5"].shape == (1, 2, 2, 2048)
  assert loss.shape == () and loss.dtype == jnp.float32
  for name in ("loss_rpn_cls", "loss_rpn_loc", "loss_cls", "loss_box_reg", "loss_mask"):
    assert metrics[name].shape == ()


@functools.cache
def toy_variables():
  init = functools.partial(toy_model().init, train=False, method=mask_rcnn.MaskRCNN.initialize)
  return jax.jit(init)(KEY, synthetic_batch()["image"])


def test_initialize_creates_the_variables_of_call():
  full = jax.jit(functools.partial(toy_model().init, train=False))(KEY, synthetic_batch()["image"])
  assert jax.tree.structure(full) == jax.tree.structure(toy_variables())
  jax.tree.map(np.testing.assert_array_equal, full, toy_variables())


@long_test  # In CI, prediction: tests/test_predict.py's Mask R-CNN tests.
def test_toy_predict_shapes_and_invariants():
  model, batch = toy_model(score_thresh=0.0), synthetic_batch()
  det = jax.jit(functools.partial(mask_rcnn.predict, model=model))(toy_variables(), batch)
  assert {k: v.shape for k, v in det.items()} == {
    "boxes": (2, 8, 4),
    "scores": (2, 8),
    "classes": (2, 8),
    "mask_probs": (2, 8, 28, 28),
    "instance_masks": (2, 8, H, W),
    "valid": (2, 8),
  }
  valid = np.asarray(det["valid"])
  assert valid.all()  # untrained scores are near 1/4 per class, all above 0
  scores = np.asarray(det["scores"])
  assert np.all(np.diff(scores, axis=1) <= 0)
  assert set(np.unique(det["classes"])) <= {1, 2, 3}
  boxes = np.asarray(det["boxes"])
  size = np.asarray(batch["image_size"])
  assert np.all(boxes[..., 2] <= size[:, None, 1]) and np.all(boxes[..., 3] <= size[:, None, 0])
  # A detection's mask lies inside its box (pasting only spreads half a pixel beyond).
  masks = np.asarray(det["instance_masks"])
  ys, xs = np.mgrid[:H, :W]
  for i, j in zip(*np.nonzero(valid)):
    x1, y1, x2, y2 = boxes[i, j]
    inside = (
      (xs + 0.5 >= x1 - 1) & (xs + 0.5 <= x2 + 1) & (ys + 0.5 >= y1 - 1) & (ys + 0.5 <= y2 + 1)
    )
    assert not np.any(masks[i, j] & ~inside)


@long_test  # tests/train/test_mask_rcnn_train.py trains the toy through the loop in CI.
def test_toy_training_steps_lower_the_loss():
  model, batch = toy_model(), synthetic_batch()
  variables = toy_variables()
  state = TrainState.create(
    apply_fn=model.apply,
    params=variables["params"],
    batch_stats=variables["batch_stats"],
    tx=optax.adam(3e-3),
  )
  step = jax.jit(
    functools.partial(steps.train_step, loss_fn=functools.partial(mask_rcnn.loss_fn, model=model))
  )
  history = []
  for _ in range(6):
    state, metrics = step(state, batch, KEY)
    history.append({k: float(v) for k, v in metrics.items()})
  first, last = history[0], history[-1]
  parts = ("loss_rpn_cls", "loss_rpn_loc", "loss_cls", "loss_box_reg", "loss_mask")
  assert all(np.isfinite(h["loss"]) for h in history)
  np.testing.assert_allclose(first["loss"], sum(first[p] for p in parts), rtol=1e-5)
  assert first["rpn_num_pos_anchors"] > 0 and first["num_fg_rois"] >= 2  # gt boxes are ROIs
  assert last["loss"] < 0.8 * first["loss"], [h["loss"] for h in history]
  # BatchNorm statistics moved (norm="bn").
  assert not np.allclose(
    state.batch_stats["backbone"]["stem_norm"]["mean"],
    variables["batch_stats"]["backbone"]["stem_norm"]["mean"],
  )


def test_create_model_builds_nested_sections():
  config = ml_collections.ConfigDict(
    dict(
      name="mask_rcnn",
      backbone=dict(depth=18, base_width=8, dtype="bfloat16"),
      rpn=dict(anchor_sizes=[[8], [16], [32], [64], [128]], post_nms_topk_train=100),
      roi_heads=dict(num_classes=3),
    )
  )
  model = create_model(config)
  assert isinstance(model, mask_rcnn.MaskRCNN)
  assert (model.backbone.depth, model.backbone.base_width, model.backbone.norm) == (
    18,
    8,
    "frozen_bn",
  )
  assert model.backbone.dtype == jnp.bfloat16
  assert model.rpn.post_nms_topk_train == 100 and model.rpn.pre_nms_topk_train == 2000
  assert model.roi_heads.num_classes == 3 and model.fpn.out_channels == 256
  with pytest.raises(ValueError, match=r"'mask_rcnn'.rpn has no attribute\(s\) \['topk'\]"):
    create_model(ml_collections.ConfigDict(dict(name="mask_rcnn", rpn=dict(topk=3))))


def _matmul_input_dtypes(jaxpr) -> set:
  """Dtypes of the operands of every convolution and matrix product in `jaxpr`, nested
  jaxprs (jit, custom_vjp, ...) included."""
  found = set()
  for eqn in jaxpr.eqns:
    if eqn.primitive.name in ("conv_general_dilated", "dot_general"):
      found |= {v.aval.dtype for v in eqn.invars}
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        sub = getattr(sub, "jaxpr", sub)
        if hasattr(sub, "eqns"):
          found |= _matmul_input_dtypes(sub)
  return found


def test_dtype_reaches_every_section():
  model = toy_model().clone(dtype=jnp.bfloat16)
  parts = (model.backbone, model.fpn, model.rpn, model.roi_heads)
  assert all(part.dtype == jnp.bfloat16 for part in parts)
  # A section with a dtype of its own keeps it.
  assert model.clone(fpn=FPN(out_channels=16, dtype=jnp.float16)).fpn.dtype == jnp.float16
  x = jnp.zeros((1, H, W, 3))
  variables = jax.eval_shape(lambda: model.init(KEY, x, method=mask_rcnn.MaskRCNN.initialize))
  assert {x.dtype for x in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}
  # Every conv and dense layer of the backbone, FPN, RPN and both heads computes in bfloat16.
  jaxpr = jax.make_jaxpr(
    lambda v: model.apply(v, x, method=mask_rcnn.MaskRCNN.initialize, mutable=True)
  )(variables)
  assert _matmul_input_dtypes(jaxpr.jaxpr) == {jnp.dtype(jnp.bfloat16)}


def test_check_batch_fails_early():
  batch = dict(synthetic_batch())
  mask_rcnn.check_batch(batch)
  with pytest.raises(ValueError, match="lacks"):
    mask_rcnn.check_batch({k: v for k, v in batch.items() if k != "image_size"})
  batch["instance_masks"] = batch["instance_masks"][:, :, :32]
  with pytest.raises(ValueError, match="instance_masks"):
    mask_rcnn.check_batch(batch)
  crops = jnp.zeros((2, 3, 16, 16))
  with pytest.raises(ValueError, match="exactly one of"):  # Both mask keys.
    mask_rcnn.check_batch({**synthetic_batch(), "cropped_masks": crops})
  cropped = {k: v for k, v in synthetic_batch().items() if k != "instance_masks"}
  with pytest.raises(ValueError, match="exactly one of"):  # Neither.
    mask_rcnn.check_batch(cropped)
  mask_rcnn.check_batch({**cropped, "cropped_masks": crops})
  for wrong in (crops[:, :2], crops[..., :8], crops[..., 0]):  # G, non-square, rank.
    with pytest.raises(ValueError, match="cropped_masks"):
      mask_rcnn.check_batch({**cropped, "cropped_masks": wrong})


@long_test  # In CI, crops: tests/ops/test_mask_targets_from_crops.py.
def test_loss_with_cropped_masks_is_close_to_the_full_mask_loss():
  # The tiny shapes config's first training batch with full masks and cropped at 56 x 56
  # (dataset.cropped_mask_size); mask logits scaled up so that the loss depends on targets.
  config = mask_rcnn_shapes.get_config("tiny")
  model = create_model(config.model)
  batches = {}
  for size in (0, 56):
    config.dataset.cropped_mask_size = size
    ds = instance_pipeline.instance_train_dataset(config, local_batch_size=2)
    batches[size] = jax.tree.map(jnp.asarray, next(ds.as_numpy_iterator()))
  init = functools.partial(model.init, train=False, method=mask_rcnn.MaskRCNN.initialize)
  variables = jax.jit(init)(KEY, batches[0]["image"])
  variables = jax.tree_util.tree_map_with_path(
    lambda path, x: x * 1000.0 if "predictor" in jax.tree_util.keystr(path) else x, variables
  )
  losses = jax.jit(lambda b: mask_rcnn.loss_fn(variables, b, KEY, model=model)[1][0])
  full, cropped = losses(batches[0]), losses(batches[56])
  inverted = losses({**batches[56], "cropped_masks": 1.0 - batches[56]["cropped_masks"]})
  for name in ("loss_rpn_cls", "loss_rpn_loc", "loss_cls", "loss_box_reg"):
    assert float(full[name]) == float(cropped[name]), name
  assert abs(float(inverted["loss_mask"]) / float(full["loss_mask"]) - 1) > 0.2  # Sensitive.
  # Measured: 1.1637 vs 1.1621 (+0.14 %).
  np.testing.assert_allclose(cropped["loss_mask"], full["loss_mask"], rtol=0.01)


def test_batch_norm_in_fpn_and_heads_trains_its_statistics():
  # torchvision maskrcnn_resnet50_fpn_v2's options on the toy: BN in the FPN and both heads,
  # two RPN convs, a conv box head. Traced only: the losses and the updated statistics.
  model = toy_model(box_conv_dims=(16, 16), norm="bn")
  model = model.clone(
    fpn=FPN(out_channels=16, norm="bn"),
    rpn=model.rpn.clone(num_convs=2),
    roi_heads=model.roi_heads.clone(fc_dims=(32,)),
  )
  batch = synthetic_batch()

  def run():
    variables = model.init(KEY, batch["image"], train=False, method=mask_rcnn.MaskRCNN.initialize)
    return variables, mask_rcnn.loss_fn(variables, batch, KEY, model=model)

  variables, (loss, (metrics, updates)) = jax.eval_shape(run)
  assert loss.shape == () and "loss_mask" in metrics
  stats = updates["batch_stats"]
  assert jax.tree.structure(stats) == jax.tree.structure(variables["batch_stats"])
  assert sorted(stats["fpn"]) == [
    f"{k}_{l}_norm" for k in ("lateral", "output") for l in range(2, 6)
  ]
  assert sorted(stats["roi_heads"]["box_head"]) == ["conv1_norm", "conv2_norm"]
  assert sorted(variables["params"]["rpn"]) == [
    "anchor_deltas",
    "conv",
    "conv2",
    "objectness_logits",
  ]

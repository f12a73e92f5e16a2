"""Tests for segjax/models/roi_heads.py: sampling, head shapes, losses against numpy, inference."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from segjax.models import roi_heads
from tests.markers import long_test

KEY = jax.random.key(0, impl="rbg")


def num_params(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def test_head_shapes_and_torchvision_parameter_counts():
  # torchvision maskrcnn_resnet50_fpn(num_classes=91) heads: TwoMLPHead 13,895,680,
  # FastRCNNPredictor 466,375, MaskRCNNHeads 2,360,320, MaskRCNNPredictor 285,787.
  box, mask = roi_heads.BoxHead(num_classes=90), roi_heads.MaskHead(num_classes=90)
  x7, x14 = jnp.zeros((2, 5, 7, 7, 256)), jnp.zeros((2, 5, 14, 14, 256))
  bv, (logits, deltas) = jax.eval_shape(lambda: box.init_with_output(KEY, x7)[::-1])
  mv, masks = jax.eval_shape(lambda: mask.init_with_output(KEY, x14)[::-1])
  assert (logits.shape, deltas.shape, masks.shape) == (
    (2, 5, 91),
    (2, 5, 91, 4),
    (2, 5, 28, 28, 91),
  )
  assert {logits.dtype, deltas.dtype, masks.dtype} == {jnp.dtype(jnp.float32)}
  assert num_params(bv["params"]) == 13_895_680 + 466_375
  assert num_params(mv["params"]) == 2_360_320 + 285_787


def test_conv_box_head_and_normed_heads_match_torchvision_v2_parameter_counts():
  # maskrcnn_resnet50_fpn_v2: FastRCNNConvFCHead((256, 7, 7), [256] * 4, [1024], BatchNorm2d)
  # 15,207,424; MaskRCNNHeads(256, [256] * 4, 1, BatchNorm2d) 2,361,344; predictors as v1.
  box = roi_heads.BoxHead(num_classes=90, fc_dims=(1024,), conv_dims=(256,) * 4, norm="bn")
  mask = roi_heads.MaskHead(num_classes=90, norm="bn")
  x7, x14 = jnp.zeros((2, 5, 7, 7, 256)), jnp.zeros((2, 5, 14, 14, 256))
  bv, (logits, deltas) = jax.eval_shape(lambda: box.init_with_output(KEY, x7)[::-1])
  mv, masks = jax.eval_shape(lambda: mask.init_with_output(KEY, x14)[::-1])
  assert (logits.shape, deltas.shape, masks.shape) == (
    (2, 5, 91),
    (2, 5, 91, 4),
    (2, 5, 28, 28, 91),
  )
  assert num_params(bv["params"]) == 15_207_424 + 466_375
  assert num_params(mv["params"]) == 2_361_344 + 285_787
  assert sorted(bv["params"]["conv1"]) == ["kernel"]  # Bias-free before a norm.
  assert sorted(bv["batch_stats"]) == [f"conv{i}_norm" for i in range(1, 5)]
  assert sorted(mv["batch_stats"]) == [f"mask_fcn{i}_norm" for i in range(1, 5)]
  gn = roi_heads.MaskHead(num_classes=90, norm="gn")
  gv = jax.eval_shape(lambda: gn.init(KEY, x14))
  assert num_params(gv["params"]) == 2_361_344 + 285_787 and "batch_stats" not in gv


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_mask_predictor_matches_a_1x1_conv_and_its_class_channels(dtype):
  """`ClassMaskPredictor` against the `nn.Conv` it replaced, on all channels and on each
  ROI's class (the training path), values and parameter gradients."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(6, 4, 4, 16)), jnp.float32)
  classes = jnp.asarray([0, 3, 3, 1, 4, 2])  # Background, repeats and the last class.
  conv = nn.Conv(5, (1, 1), dtype=dtype, param_dtype=jnp.float32)
  predictor = roi_heads.ClassMaskPredictor(5, dtype)
  params = predictor.init(KEY, x)["params"]
  params = {"kernel": params["kernel"], "bias": jnp.asarray(rng.normal(size=5), jnp.float32)}
  tol = dict(rtol=2e-2, atol=2e-2) if dtype == jnp.bfloat16 else dict(rtol=1e-5, atol=1e-6)
  full = predictor.apply({"params": params}, x)
  np.testing.assert_allclose(
    np.asarray(full, np.float32),
    np.asarray(conv.apply({"params": params}, x), np.float32),
    **tol,
  )
  picked = lambda p: roi_heads.class_channel(
    predictor.apply({"params": p}, x).astype(jnp.float32), classes
  )
  selected = lambda p: predictor.apply({"params": p}, x, classes).astype(jnp.float32)
  assert selected(params).shape == (6, 4, 4)
  np.testing.assert_allclose(selected(params), picked(params), **tol)
  loss = lambda f: lambda p: jnp.sum(jnp.sin(f(p)))
  grads, ref_grads = jax.grad(loss(selected))(params), jax.grad(loss(picked))(params)
  for name in grads:  # bf16 sums of 96 products: errors scale with the tensor, not the entry.
    scale = float(np.abs(ref_grads[name]).max()) if dtype == jnp.bfloat16 else 1.0
    np.testing.assert_allclose(
      grads[name], ref_grads[name], rtol=tol["rtol"], atol=tol["atol"] * scale
    )
  assert np.all(np.any(grads["kernel"][0, 0] != 0, axis=0))  # Every class's column trains.


def test_mask_head_trains_on_the_class_channels_of_its_full_output():
  head = roi_heads.MaskHead(num_classes=4, conv_dims=(8, 8))
  x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 3, 7, 7, 5)), jnp.float32)
  classes = jnp.asarray([[1, 4, 0], [2, 2, 3]])
  variables = head.init(KEY, x)
  full = head.apply(variables, x)
  selected = head.apply(variables, x, classes=classes)
  assert full.shape == (2, 3, 14, 14, 5) and selected.shape == (2, 3, 14, 14)
  np.testing.assert_allclose(selected, roi_heads.class_channel(full, classes), rtol=1e-5, atol=1e-6)


def test_batch_norm_statistics_count_only_valid_rois():
  head = roi_heads.BoxHead(num_classes=2, fc_dims=(8,), conv_dims=(4,), norm="bn")
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 5, 7, 7, 3)), jnp.float32)
  valid = np.ones((2, 5), bool)
  valid[0, 3:] = valid[1, 1] = False
  variables = head.init(KEY, x)
  run = lambda x, v: head.apply(variables, x, train=True, valid=v, mutable=["batch_stats"])
  (logits, _), stats = run(x.at[~valid].set(100.0), valid)  # Padding must not count.
  (ref_logits, _), ref_stats = run(x[valid], None)
  np.testing.assert_allclose(logits[valid], ref_logits, rtol=1e-4, atol=1e-5)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), stats, ref_stats
  )
  # No valid ROI (no foreground for the mask head): all rows count rather than none (NaN).
  (logits, _), stats = run(x, np.zeros((2, 5), bool))
  assert np.isfinite(logits).all() and all(np.isfinite(v).all() for v in jax.tree.leaves(stats))


def _sample(proposals, proposal_valid, gt_boxes, gt_classes, gt_valid, **kw):
  fn = functools.partial(roi_heads.label_and_sample_proposals, **kw)
  return jax.jit(fn)(
    jnp.asarray(proposals, jnp.float32),
    jnp.asarray(proposal_valid),
    jnp.asarray(gt_boxes, jnp.float32),
    jnp.asarray(gt_classes, jnp.int32),
    jnp.asarray(gt_valid),
    KEY,
  )


def test_label_and_sample_proposals():
  gt = [[0, 0, 20, 20], [40, 40, 60, 60], [0, 0, 0, 0]]
  proposals = [
    [1, 1, 21, 21],  # IoU 0.82 with gt 0 -> class 3
    [0, 0, 10, 20],  # IoU 0.5 with gt 0 -> class 3 (threshold inclusive)
    [41, 40, 60, 60],  # IoU 0.95 with gt 1 -> class 1
    [30, 30, 45, 45],  # IoU < 0.5 -> background
    [1, 1, 21, 21],
  ]  # padding: never sampled
  out = _sample(
    proposals,
    [True, True, True, True, False],
    gt,
    [3, 1, 0],
    [True, True, False],
    num_samples=8,
    positive_fraction=0.75,
  )
  assert out["boxes"].shape == (8, 4) and out["valid"].shape == (8,)
  valid, classes = np.asarray(out["valid"]), np.asarray(out["classes"])
  # 2 ground truths (added as proposals) + 3 foreground proposals = 5 fg, 1 bg, 2 empty.
  np.testing.assert_array_equal(valid, [True] * 6 + [False] * 2)
  assert sorted(classes[:5]) == [1, 1, 3, 3, 3] and classes[5] == 0
  fg_boxes = {tuple(b) for b in np.asarray(out["boxes"][:5]).tolist()}
  assert fg_boxes == {
    (0, 0, 20, 20),
    (40, 40, 60, 60),
    (1, 1, 21, 21),
    (0, 0, 10, 20),
    (41, 40, 60, 60),
  }
  np.testing.assert_array_equal(out["boxes"][5], [30, 30, 45, 45])
  for i in range(5):
    g = int(out["gt_index"][i])
    assert [3, 1][g] == classes[i]
    np.testing.assert_array_equal(out["gt_boxes"][i], gt[g])
  # At most int(S * fraction) foregrounds, always first.
  out = _sample(
    proposals,
    [True] * 4 + [False],
    gt,
    [3, 1, 0],
    [True, True, False],
    num_samples=4,
    positive_fraction=0.5,
  )
  np.testing.assert_array_equal(out["classes"][:2] > 0, True)
  np.testing.assert_array_equal(out["classes"][2:], 0)
  assert int(out["valid"].sum()) == 3  # only one background exists


def test_label_and_sample_without_ground_truth_is_all_background():
  out = _sample(
    [[1, 1, 21, 21], [5, 5, 9, 9]], [True, True], [[0, 0, 0, 0]], [0], [False], num_samples=4
  )
  np.testing.assert_array_equal(out["valid"], [True, True, False, False])
  np.testing.assert_array_equal(out["classes"], 0)


def _box_case(seed=0):
  rng = np.random.default_rng(seed)
  proposals = np.array([[10, 10, 30, 40], [5, 0, 25, 20], [0, 0, 50, 50], [3, 3, 9, 9]], np.float32)
  gt_boxes = np.array([[12, 8, 32, 44], [4, 2, 22, 20], [0, 0, 0, 0], [0, 0, 0, 0]], np.float32)
  classes = np.array([2, 1, 0, 2], np.int32)
  valid = np.array([True, True, True, False])
  logits = rng.normal(size=(4, 3)).astype(np.float32)
  deltas = rng.normal(size=(4, 3, 4)).astype(np.float32)
  return logits, deltas, proposals, classes, gt_boxes, valid


def _encode(g, a, w=(10.0, 10.0, 5.0, 5.0)):
  wa, ha = a[:, 2] - a[:, 0], a[:, 3] - a[:, 1]
  wg, hg = g[:, 2] - g[:, 0], g[:, 3] - g[:, 1]
  return np.stack(
    [
      w[0] * (g[:, 0] + wg / 2 - a[:, 0] - wa / 2) / wa,
      w[1] * (g[:, 1] + hg / 2 - a[:, 1] - ha / 2) / ha,
      w[2] * np.log(wg / wa),
      w[3] * np.log(hg / ha),
    ],
    -1,
  )


def test_box_loss_matches_numpy():
  logits, deltas, proposals, classes, gt_boxes, valid = _box_case()
  losses, metrics = jax.jit(roi_heads.box_loss)(logits, deltas, proposals, classes, gt_boxes, valid)
  log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  ce = -log_p[np.arange(4), classes]
  np.testing.assert_allclose(losses["loss_cls"], ce[:3].mean(), rtol=1e-5)
  fg = [0, 1]
  l1 = np.abs(deltas[fg, classes[fg]] - _encode(gt_boxes[fg], proposals[fg])).sum()
  np.testing.assert_allclose(losses["loss_box_reg"], l1 / 3, rtol=1e-5)
  assert float(metrics["num_fg_rois"]) == 2 and float(metrics["num_bg_rois"]) == 1
  # Leading batch axes are flattened into the normalizer: two copies give the same losses.
  stacked = [np.stack([a, a]) for a in _box_case()]
  losses2, metrics2 = roi_heads.box_loss(*stacked)
  np.testing.assert_allclose(losses2["loss_cls"], losses["loss_cls"], rtol=1e-6)
  np.testing.assert_allclose(losses2["loss_box_reg"], losses["loss_box_reg"], rtol=1e-6)
  assert float(metrics2["num_fg_rois"]) == 2


def test_box_loss_perfect_prediction_is_near_zero():
  _, _, proposals, classes, gt_boxes, valid = _box_case()
  logits = np.where(np.arange(3)[None] == classes[:, None], 30.0, -30.0)
  deltas = np.zeros((4, 3, 4), np.float32)
  deltas[[0, 1], classes[:2]] = _encode(gt_boxes[:2], proposals[:2])
  losses, metrics = roi_heads.box_loss(logits, deltas, proposals, classes, gt_boxes, valid)
  assert float(losses["loss_cls"]) < 1e-6 and float(losses["loss_box_reg"]) < 1e-5
  assert float(metrics["cls_accuracy"]) == 1.0 and float(metrics["fg_cls_accuracy"]) == 1.0


def test_mask_loss_known_values():
  rng = np.random.default_rng(0)
  targets = (rng.uniform(size=(3, 4, 4)) > 0.5).astype(np.float32)
  classes = np.array([1, 2, 0], np.int32)  # third ROI is background: ignored
  valid = np.array([True, True, True])
  # Logits 0 in the ground-truth channel give exactly log 2, whatever the other channels hold.
  logits = rng.normal(size=(3, 4, 4, 3)).astype(np.float32) * 5
  logits[0, ..., 1] = 0.0
  logits[1, ..., 2] = 0.0
  losses, _ = jax.jit(roi_heads.mask_loss)(logits, targets, classes, valid)
  np.testing.assert_allclose(losses["loss_mask"], np.log(2.0), rtol=1e-6)
  # General case against numpy.
  logits = rng.normal(size=(3, 4, 4, 3)).astype(np.float32)
  losses, metrics = roi_heads.mask_loss(logits, targets, classes, valid)
  x = np.stack([logits[0, ..., 1], logits[1, ..., 2]])
  z = targets[:2]
  bce = np.maximum(x, 0) - x * z + np.log1p(np.exp(-np.abs(x)))
  np.testing.assert_allclose(losses["loss_mask"], bce.mean(), rtol=1e-5)
  np.testing.assert_allclose(metrics["mask_accuracy"], ((x > 0) == (z > 0.5)).mean(), rtol=1e-6)
  # Perfect prediction.
  perfect = np.zeros((3, 4, 4, 3), np.float32)
  perfect[0, ..., 1] = np.where(targets[0] > 0, 20.0, -20.0)
  perfect[1, ..., 2] = np.where(targets[1] > 0, 20.0, -20.0)
  losses, _ = roi_heads.mask_loss(perfect, targets, classes, valid)
  assert float(losses["loss_mask"]) < 1e-7


def test_mask_loss_without_foreground_is_zero_with_finite_gradient():
  logits = jnp.ones((2, 4, 4, 3))
  fn = lambda x: roi_heads.mask_loss(
    x, jnp.ones((2, 4, 4)), jnp.array([0, 2]), jnp.array([True, False])
  )[0]["loss_mask"]
  loss, grad = jax.value_and_grad(fn)(logits)
  assert float(loss) == 0.0 and np.all(np.asarray(grad) == 0)


def _postprocess(logits, deltas, proposals, proposal_valid, image_size, **kw):
  fn = functools.partial(roi_heads.postprocess, **kw)
  return jax.jit(fn)(
    jnp.asarray(logits, jnp.float32),
    jnp.asarray(deltas, jnp.float32),
    jnp.asarray(proposals, jnp.float32),
    jnp.asarray(proposal_valid),
    jnp.asarray(image_size),
  )


def _logits_for(probs):
  """Logits whose softmax is `probs` (rows sum to 1)."""
  return np.log(np.asarray(probs, np.float32))


def test_postprocess_threshold_nms_and_static_shapes():
  proposals = [[0, 0, 20, 20], [1, 1, 21, 21], [30, 30, 50, 50], [0, 0, 20, 20], [60, 0, 90, 20]]
  probs = [
    [0.1, 0.8, 0.1],  # class 1, 0.8
    [0.1, 0.6, 0.3],  # class 1 suppressed by the first; class 2 (0.3) kept
    [0.96, 0.03, 0.01],  # below the 0.05 threshold everywhere
    [0.02, 0.01, 0.97],  # invalid proposal: ignored
    [0.5, 0.46, 0.04],
  ]  # class 1 kept; its box is clipped to the image width 80
  out = _postprocess(
    _logits_for(probs),
    np.zeros((5, 3, 4)),
    proposals,
    [True, True, True, False, True],
    [64, 80],
    max_detections=4,
  )
  assert {k: v.shape for k, v in out.items()} == {
    "boxes": (4, 4),
    "scores": (4,),
    "classes": (4,),
    "valid": (4,),
  }
  assert out["classes"].dtype == jnp.int32
  np.testing.assert_array_equal(out["valid"], [True, True, True, False])
  np.testing.assert_allclose(out["scores"], [0.8, 0.46, 0.3, 0.0], rtol=1e-5)
  np.testing.assert_array_equal(out["classes"], [1, 1, 2, 0])
  np.testing.assert_allclose(
    out["boxes"], [[0, 0, 20, 20], [60, 0, 80, 20], [1, 1, 21, 21], [0, 0, 0, 0]], atol=1e-4
  )
  # At most max_detections, best first.
  out = _postprocess(
    _logits_for(probs), np.zeros((5, 3, 4)), proposals, [True] * 5, [64, 80], max_detections=2
  )
  np.testing.assert_allclose(out["scores"], [0.97, 0.8], rtol=1e-5)


def test_postprocess_decodes_class_specific_deltas():
  proposals = np.array([[10, 10, 30, 30]], np.float32)
  deltas = np.zeros((1, 3, 4), np.float32)
  deltas[0, 2] = _encode(np.array([[12, 14, 36, 30]], np.float32), proposals)[0]
  out = _postprocess(
    _logits_for([[0.1, 0.1, 0.8]]), deltas, proposals, [True], [64, 64], max_detections=3
  )
  np.testing.assert_allclose(out["boxes"][0], [12, 14, 36, 30], rtol=1e-5)
  np.testing.assert_allclose(out["boxes"][1], proposals[0], rtol=1e-5)  # class 1, zero deltas
  np.testing.assert_array_equal(out["classes"], [2, 1, 0])


def test_postprocess_masks_select_the_detected_class_and_paste():
  logits = np.full((2, 4, 4, 3), -10.0, np.float32)
  logits[0, ..., 2] = 10.0  # detection 0 is class 2: its channel says "all foreground"
  logits[1, ..., 1] = 10.0  # detection 1 is invalid
  boxes = np.array([[4, 8, 12, 16], [0, 0, 20, 20]], np.float32)
  probs, masks = jax.jit(roi_heads.postprocess_masks, static_argnums=4)(
    logits, jnp.array([2, 1]), boxes, jnp.array([True, False]), (24, 20)
  )
  assert probs.shape == (2, 4, 4) and masks.shape == (2, 24, 20) and masks.dtype == jnp.bool_
  np.testing.assert_allclose(probs[0], 1 / (1 + np.exp(-10.0)), rtol=1e-6)
  np.testing.assert_array_equal(probs[1], 0)
  expected = np.zeros((24, 20), bool)
  expected[8:16, 4:12] = True
  np.testing.assert_array_equal(masks[0], expected)
  assert not masks[1].any()


def test_pool_reads_p2_to_p5_only():
  heads = roi_heads.ROIHeads(num_classes=2)
  # Each level filled with its number: the pooled value tells which level a box read.
  features = {f"p{l}": jnp.full((1, 256 // 2**l, 256 // 2**l, 2), float(l)) for l in range(2, 7)}
  boxes = jnp.asarray([[[0, 0, 16, 16], [0, 0, 112, 112], [0, 0, 256, 256]]], jnp.float32)
  pooled = jax.jit(lambda f, b: heads._pool(f, b, 7))(features, boxes)
  assert pooled.shape == (1, 3, 7, 7, 2)
  # Levels floor(4 + log2(size / 224)) clamped to [2, 5]: 2, 3, 4; P6 is never read.
  np.testing.assert_allclose(pooled[0, :, 3, 3, 0], [2.0, 3.0, 4.0], rtol=1e-6)


def _mask_case(rng, num_fg, num_gt):
  """Two 32 x 32 images, `num_gt` <= 2 ground truths in the top-left quadrant, 12 proposals:
  `num_fg` copies of a ground truth per image, backgrounds in the bottom-right."""
  gt = np.zeros((2, 4, 4), np.float32)
  gt[:, :2, :2] = rng.uniform(0, 4, (2, 2, 2))
  gt[:, :2, 2:] = gt[:, :2, :2] + rng.uniform(6, 12, (2, 2, 2))
  gt_valid = np.zeros((2, 4), bool)
  gt_valid[:, :num_gt] = True
  proposals = np.zeros((2, 12, 4), np.float32)
  proposals[:, :, :2] = rng.uniform(17, 24, (2, 12, 2))
  proposals[:, :, 2:] = proposals[:, :, :2] + rng.uniform(2, 8, (2, 12, 2))
  proposals[:, :num_fg] = gt[:, rng.integers(0, max(num_gt, 1), num_fg)] + rng.uniform(
    -0.3, 0.3, (2, num_fg, 4)
  )
  features = {
    f"p{l}": jnp.asarray(rng.normal(size=(2, 32 >> l, 32 >> l, 3)), jnp.float32)
    for l in range(2, 7)
  }
  targets = {
    "boxes": gt,
    "classes": rng.integers(1, 4, (2, 4)).astype(np.int32),
    "instance_masks": rng.integers(0, 2, (2, 4, 32, 32)).astype(np.uint8),
    "valid": gt_valid,
  }
  return features, {"boxes": proposals, "valid": np.ones((2, 12), bool)}, targets


def _mask_case_heads(**overrides):
  """Small heads for `_mask_case`: 16 sampled ROIs per image, at most 8 foregrounds."""
  kwargs = dict(
    num_classes=3,
    batch_size_per_image=16,
    positive_fraction=0.5,
    box_resolution=2,
    mask_resolution=4,
    fc_dims=(8,),
    mask_conv_dims=(4,),
  )
  return roi_heads.ROIHeads(**{**kwargs, **overrides})


@long_test  # In CI, mask slots: test_mask_slot_buckets_give_the_detections_of_all_slots.
def test_mask_head_on_fewer_slots_equals_all_foreground_slots_when_they_fit():
  # The previous implementation ran the mask head on all int(16 * 0.5) = 8 foreground slots.
  base = _mask_case_heads()
  variables = base.init(KEY, 3, method=roi_heads.ROIHeads.init_heads)

  @functools.partial(jax.jit, static_argnums=0)
  def mask_loss_and_grad(heads, features, proposals, targets):
    def loss(mask_params):
      params = {**variables["params"], "mask_head": mask_params}
      out = heads.apply({"params": params}, features, proposals, targets, KEY, method="losses")
      return out[0]["loss_mask"], out[1]

    return jax.value_and_grad(loss, has_aux=True)(variables["params"]["mask_head"])

  @jax.jit
  def reference(slots, features, proposals, targets):
    """The previous implementation (the mask head on all 8 foreground slots), its loss
    restricted to the first `slots` of them."""
    keys = jax.random.split(KEY, 2)
    rois = jax.vmap(
      functools.partial(roi_heads.label_and_sample_proposals, num_samples=16, positive_fraction=0.5)
    )(
      proposals["boxes"],
      proposals["valid"],
      targets["boxes"],
      targets["classes"],
      targets["valid"],
      keys,
    )
    rois = {k: v[:, :8] for k, v in rois.items()}

    def loss(mask_params):
      params = {**variables["params"], "mask_head": mask_params}
      logits = base.apply({"params": params}, features, rois["boxes"], method="_forward_mask")
      target = jax.vmap(lambda g, i, r: roi_heads.ops.mask_targets(g, i, r, 8))(
        targets["instance_masks"], rois["gt_index"], rois["boxes"]
      )
      kept = rois["valid"] & (jnp.arange(8) < slots)
      return roi_heads.mask_loss(logits, target, rois["classes"], kept)[0]["loss_mask"]

    return jax.value_and_grad(loss)(variables["params"]["mask_head"])

  rng = np.random.default_rng(0)
  heads = base.clone(mask_batch_size_per_image=3)
  assert heads.mask_slots() == 3
  # Foregrounds per image: none; 1 + 1 ground truth (fits); all 12 proposals, 8 sampled (not).
  for num_fg, num_gt, per_image_fg in ((0, 0, 0), (1, 1, 2), (12, 2, 8)):
    case = _mask_case(rng, num_fg, num_gt)
    (new, metrics), new_grad = mask_loss_and_grad(heads, *case)
    np.testing.assert_allclose(metrics["num_fg_rois"], per_image_fg)
    old, old_grad = reference(8, *case)  # the previous implementation
    want, want_grad = (old, old_grad) if per_image_fg <= 3 else reference(3, *case)
    np.testing.assert_allclose(new, want, rtol=1e-5, atol=1e-7)
    jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7), new_grad, want_grad
    )
    if per_image_fg > 3:  # fewer foregrounds kept: a different loss
      assert abs(float(new) - float(old)) > 1e-6
    if per_image_fg == 0:
      assert float(new) == 0.0
  assert base.clone(mask_batch_size_per_image=99).mask_slots() == 8


def test_mask_head_upsampling_variant_from_a_config_key():
  """`model.roi_heads.mask_upsampling` swaps the mask head's 2x deconvolution for a 1x1 conv
  and a fixed resize: the Mask R-CNN's tree differs in that layer only, and the nearest
  variant's logits repeat over each 2x2 block."""
  from configs import mask_rcnn_shapes
  from segjax.models import build_model
  from segjax.models.mask_rcnn import MaskRCNN

  def shapes(config):
    model = build_model(config)
    x = jnp.zeros((1, *config.image_size, 3))
    tree = jax.eval_shape(lambda: model.init(KEY, x, method=MaskRCNN.initialize))["params"]
    return {jax.tree_util.keystr(p): v.shape for p, v in jax.tree_util.tree_leaves_with_path(tree)}

  config = mask_rcnn_shapes.get_config("tiny")
  default = shapes(config)
  config.model.roi_heads.mask_upsampling = "bilinear"
  variant = shapes(config)
  head = "['roi_heads']['mask_head']"
  changed = {k for k in default.keys() ^ variant.keys()}
  assert changed == {
    f"{head}['{name}']['{p}']" for name in ("deconv", "upsample") for p in ("kernel", "bias")
  }
  width = default[f"{head}['deconv']['kernel']"][-1]
  assert default[f"{head}['deconv']['kernel']"] == (2, 2, width, width)
  assert variant[f"{head}['upsample']['kernel']"] == (1, 1, width, width)

  head_module = roi_heads.MaskHead(num_classes=3, conv_dims=(8,), upsampling="nearest")
  x = jax.random.normal(KEY, (2, 4, 7, 7, 6))
  logits, _ = head_module.init_with_output(KEY, x)
  assert logits.shape == (2, 4, 14, 14, 4)
  np.testing.assert_array_equal(logits[..., 0::2, 0::2, :], logits[..., 1::2, 1::2, :])
  config.model.roi_heads.mask_upsampling = "cubic"
  with pytest.raises(ValueError, match="Unknown roi_heads.mask_upsampling 'cubic'"):
    shapes(config)


@long_test  # In CI, mask slots: test_mask_slot_buckets_give_the_detections_of_all_slots.
@pytest.mark.parametrize("norm, cropped", [("none", False), ("gn", True)])
def test_mask_slot_buckets_give_the_losses_and_gradients_of_all_slots(norm, cropped):
  """The mask head on the used foreground slots (`train_mask_slot_buckets`, sizes 1, 2, 8 of
  8, the 8 in windows of 2) equals it on all 8: every loss, metric and the gradient of every
  parameter and feature map."""
  base = _mask_case_heads(norm=norm)
  assert base.clone(train_mask_slot_buckets=3).mask_slot_sizes(8, loss=True) == (1, 2, 8)
  variables = base.init(KEY, 3, method=roi_heads.ROIHeads.init_heads)

  @functools.partial(jax.jit, static_argnums=0)
  def loss_and_grads(heads, features, proposals, targets):
    def total(params, features):
      losses, metrics = heads.apply(
        {**variables, "params": params}, features, proposals, targets, KEY, method="losses"
      )
      return sum(losses.values()), (losses, metrics)

    return jax.value_and_grad(total, argnums=(0, 1), has_aux=True)(variables["params"], features)

  rng = np.random.default_rng(3)
  fg_per_image = set()
  for num_fg, num_gt in ((0, 0), (0, 1), (1, 1), (5, 2), (12, 2)):
    features, proposals, targets = _mask_case(rng, num_fg, num_gt)
    if cropped:
      targets["cropped_masks"] = rng.integers(0, 2, (2, 4, 6, 6)).astype(np.uint8)
      del targets["instance_masks"]
    (_, (losses, metrics)), grads = loss_and_grads(
      base.clone(train_mask_slot_buckets=3), features, proposals, targets
    )
    (_, (want_losses, want_metrics)), want_grads = loss_and_grads(
      base.clone(train_mask_slot_buckets=1), features, proposals, targets
    )
    fg_per_image.add(int(np.max(metrics["num_fg_rois"])))
    for got, want in ((losses, want_losses), (metrics, want_metrics), (grads, want_grads)):
      jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), got, want)
    assert np.any(np.asarray(grads[0]["mask_head"]["predictor"]["kernel"])) == (num_gt > 0)
  assert {0, 1, 2, 8} <= fg_per_image  # the first slot, each bucket's edge, the last bucket


def test_mask_slot_buckets_give_the_detections_of_all_slots():
  base = roi_heads.ROIHeads(
    num_classes=3,
    box_resolution=2,
    mask_resolution=4,
    fc_dims=(8,),
    mask_conv_dims=(4,),
    score_thresh=0.0,
    detections_per_image=16,
  )
  assert base.mask_slot_sizes(16) == (1, 4, 16)
  variables = base.init(KEY, 3, method=roi_heads.ROIHeads.init_heads)
  infer = jax.jit(lambda heads, *args: heads.apply(variables, *args, (32, 32)), static_argnums=0)
  rng = np.random.default_rng(4)
  used = set()
  for num_valid in (0, 1, 12):
    features, proposals, _ = _mask_case(rng, 6, 2)
    proposals["valid"] = np.arange(12)[None].repeat(2, 0) < num_valid
    size = jnp.full((2, 2), 32.0)
    got = infer(base.clone(mask_slot_buckets=3), features, proposals, size)
    want = infer(base.clone(mask_slot_buckets=1), features, proposals, size)
    used.add(int(roi_heads.ops.bucket_index((1, 4, 16), roi_heads.ops.used_slots(got["valid"]))))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), got, want)
    assert not np.any(got["instance_masks"][~got["valid"]])
  assert used == {0, 1, 2}


def test_mask_slot_buckets_check_their_count():
  with pytest.raises(ValueError, match="roi_heads.mask_slot_buckets must be >= 1, got 0"):
    roi_heads.ROIHeads(mask_slot_buckets=0).mask_slot_sizes(8)
  with pytest.raises(ValueError, match="roi_heads.train_mask_slot_buckets must be >= 1, got 0"):
    roi_heads.ROIHeads(train_mask_slot_buckets=0).mask_slot_sizes(8, loss=True)

"""Tests for segjax/models/rpn.py: head shapes, proposals and the loss against numpy."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from segjax import ops
from segjax.models import rpn

KEY = jax.random.key(0, impl="rbg")


def num_params(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def test_head_shapes_anchor_order_and_parameter_count():
  sizes = [(16, 16), (8, 8), (4, 4), (2, 2), (1, 1)]
  features = {f"p{l}": jnp.zeros((2, h, w, 256)) for l, (h, w) in zip(range(2, 7), sizes)}
  model = rpn.RPN()

  def init_and_apply():
    variables = model.init(KEY, features)
    return variables, model.apply(variables, features)

  variables, (objectness, deltas) = jax.eval_shape(init_and_apply)
  counts = [h * w * 3 for h, w in sizes]
  assert [o.shape for o in objectness] == [(2, n) for n in counts]
  assert [d.shape for d in deltas] == [(2, n, 4) for n in counts]
  assert {x.dtype for x in objectness + deltas} == {jnp.dtype(jnp.float32)}
  # torchvision RPNHead(256, 3): 3x3 conv 590,080 + objectness 771 + deltas 3,084.
  assert num_params(variables["params"]) == 593_935
  anchors = model.anchors(features)
  assert [a.shape for a in anchors] == [(n, 4) for n in counts]
  np.testing.assert_array_equal(np.concatenate(anchors), ops.image_anchors((64, 64)))


def test_head_reshape_follows_anchor_order():
  # A 1x1 conv is the identity on 4A channels: delta (i, j, a, k) must land in row
  # (i * W + j) * A + a, column k.
  x = jnp.asarray(np.random.default_rng(0).normal(size=(1, 2, 3, 12)), jnp.float32)
  model = rpn.RPN(anchor_sizes=((32,),), strides=(4,))
  variables = model.init(KEY, {"p2": x})
  params = jax.tree.map(lambda v: v, variables["params"])  # biases are 0 at init
  identity_3x3 = np.zeros((3, 3, 12, 12), np.float32)
  identity_3x3[1, 1] = np.eye(12)
  params["conv"]["kernel"] = jnp.asarray(identity_3x3)
  params["anchor_deltas"]["kernel"] = jnp.eye(12)[None, None]
  _, deltas = model.apply({"params": params}, {"p2": x})
  np.testing.assert_allclose(deltas[0][0], np.maximum(x, 0).reshape(-1, 4), rtol=1e-6)


def test_num_convs_stacks_shared_convs():
  features = {f"p{l}": jnp.zeros((1, 2, 2, 256)) for l in range(2, 7)}
  variables = jax.eval_shape(lambda: rpn.RPN(num_convs=2).init(KEY, features))
  assert sorted(variables["params"]) == ["anchor_deltas", "conv", "conv2", "objectness_logits"]
  # torchvision RPNHead(256, 3, conv_depth=2) (maskrcnn_resnet50_fpn_v2).
  assert num_params(variables["params"]) == 1_184_015
  with pytest.raises(ValueError, match="num_convs >= 1"):
    rpn.RPN(num_convs=0).init(KEY, features)


def _proposals(objectness, deltas, anchors, image_size, **kw):
  fn = functools.partial(rpn.generate_proposals, **kw)
  return jax.jit(fn)(
    [jnp.asarray(o, jnp.float32) for o in objectness],
    [jnp.asarray(d, jnp.float32) for d in deltas],
    [np.asarray(a, np.float32) for a in anchors],
    jnp.asarray(image_size),
  )


def test_generate_proposals_topk_nms_clip_and_padding():
  level0 = [[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30], [40, 40, 50, 50], [60, 60, 70, 70]]
  level1 = [[0, 0, 10, 10], [100, 100, 120, 120]]  # second lies outside the image
  scores0 = [5.0, 4.0, 3.0, 2.0, 1.0]
  scores1 = [0.5, 9.0]
  zeros = [np.zeros((5, 4)), np.zeros((2, 4))]
  out = _proposals(
    [scores0, scores1],
    zeros,
    [level0, level1],
    [64, 64],
    pre_nms_topk=3,
    post_nms_topk=6,
    nms_thresh=0.7,
  )
  assert out["boxes"].shape == (6, 4) and out["valid"].shape == (6,)
  # Level 0 keeps its top 3; boxes 0 and 1 overlap at IoU 81/119 = 0.68 <= 0.7, both stay.
  # Level 1: the out-of-image box clips to an empty box and is dropped; the other box
  # equals level 0's first box but NMS is per level, so both stay.
  np.testing.assert_array_equal(out["valid"], [True, True, True, True, False, False])
  np.testing.assert_allclose(out["scores"][:4], [5.0, 4.0, 3.0, 0.5])
  np.testing.assert_allclose(out["boxes"][:4], [level0[0], level0[1], level0[2], level1[0]])
  np.testing.assert_array_equal(out["boxes"][4:], 0)
  # A tighter threshold suppresses the overlapping box of level 0.
  out = _proposals(
    [scores0, scores1],
    zeros,
    [level0, level1],
    [64, 64],
    pre_nms_topk=3,
    post_nms_topk=6,
    nms_thresh=0.5,
  )
  np.testing.assert_allclose(out["scores"][:3], [5.0, 3.0, 0.5])
  assert int(out["valid"].sum()) == 3


def test_generate_proposals_decodes_and_clips_to_true_size():
  anchors = [[[10, 10, 30, 30]]]
  deltas = [[[0.5, 0.0, np.log(2.0), 0.0]]]  # centre +10 px, width x2 -> [10, 10, 50, 30]
  out = _proposals([[1.0]], deltas, anchors, [60, 40], pre_nms_topk=5, post_nms_topk=2)
  np.testing.assert_allclose(out["boxes"][0], [10, 10, 40, 30], rtol=1e-6)
  np.testing.assert_array_equal(out["valid"], [True, False])


def _numpy_iou(a, b):
  lt = np.maximum(a[:, None, :2], b[None, :, :2])
  rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
  inter = np.prod(np.clip(rb - lt, 0, None), -1)
  area = lambda x: np.prod(x[:, 2:] - x[:, :2], -1)
  return inter / (area(a)[:, None] + area(b)[None] - inter)


def _numpy_encode(g, a):
  wa, ha = a[:, 2] - a[:, 0], a[:, 3] - a[:, 1]
  wg, hg = g[:, 2] - g[:, 0], g[:, 3] - g[:, 1]
  return np.stack(
    [
      (g[:, 0] + wg / 2 - a[:, 0] - wa / 2) / wa,
      (g[:, 1] + hg / 2 - a[:, 1] - ha / 2) / ha,
      np.log(wg / wa),
      np.log(hg / ha),
    ],
    -1,
  )


ANCHORS = np.array(
  [
    [0, 0, 16, 16],
    [2, 2, 18, 18],
    [8, 8, 24, 24],
    [30, 30, 46, 46],
    [0, 0, 32, 32],
    [40, 0, 56, 16],
  ],
  np.float32,
)
GT = np.array([[[1, 1, 17, 17], [0, 0, 0, 0]]], np.float32)
GT_VALID = np.array([[True, False]])


def _rpn_loss(objectness, deltas, beta=0.0):
  fn = functools.partial(
    rpn.rpn_loss, batch_size_per_image=8, positive_fraction=0.5, smooth_l1_beta=beta
  )
  return jax.jit(fn)(
    jnp.asarray(objectness, jnp.float32)[None],
    jnp.asarray(deltas, jnp.float32)[None],
    ANCHORS,
    GT,
    GT_VALID,
    KEY,
  )


def test_rpn_loss_matches_numpy():
  # 8 slots for 6 anchors: every labelled anchor is sampled, so the loss is deterministic.
  iou = _numpy_iou(GT[0, :1], ANCHORS)[0]
  labels = np.where(iou >= 0.7, 1, np.where(iou < 0.3, 0, -1))
  labels[iou == iou.max()] = 1  # low-quality match
  rng = np.random.default_rng(0)
  objectness = rng.normal(size=6).astype(np.float32)
  deltas = rng.normal(size=(6, 4)).astype(np.float32) * 0.3
  losses, metrics = _rpn_loss(objectness, deltas)
  sampled = labels >= 0
  z = (labels == 1).astype(np.float32)
  bce = np.maximum(objectness, 0) - objectness * z + np.log1p(np.exp(-np.abs(objectness)))
  targets = _numpy_encode(np.repeat(GT[0, :1], 6, 0), ANCHORS)
  l1 = np.abs(deltas - targets).sum(-1)
  np.testing.assert_allclose(losses["loss_rpn_cls"], bce[sampled].sum() / 8, rtol=1e-5)
  np.testing.assert_allclose(losses["loss_rpn_loc"], l1[labels == 1].sum() / 8, rtol=1e-5)
  assert float(metrics["rpn_num_pos_anchors"]) == (labels == 1).sum() == 2
  assert float(metrics["rpn_num_neg_anchors"]) == (labels == 0).sum()
  # Smooth L1 with beta 1/9 (torchvision's choice).
  losses_s, _ = _rpn_loss(objectness, deltas, beta=1 / 9)
  r = np.abs(deltas - targets)
  sl1 = np.where(r < 1 / 9, 0.5 * r**2 * 9, r - 0.5 / 9).sum(-1)
  np.testing.assert_allclose(losses_s["loss_rpn_loc"], sl1[labels == 1].sum() / 8, rtol=1e-5)


def test_rpn_loss_perfect_prediction_is_near_zero():
  iou = _numpy_iou(GT[0, :1], ANCHORS)[0]
  positive = (iou >= 0.7) | (iou == iou.max())
  objectness = np.where(positive, 30.0, -30.0)
  deltas = _numpy_encode(np.repeat(GT[0, :1], 6, 0), ANCHORS)
  losses, _ = _rpn_loss(objectness, deltas)
  assert float(losses["loss_rpn_cls"]) < 1e-6
  assert float(losses["loss_rpn_loc"]) < 1e-5

"""Tests for segjax/weights/torchvision.py with torchvision's `maskrcnn_resnet50_fpn_v2`: random,
calibrated weights (`conftest.tv_mask_rcnn_v2`: every batch norm of the backbone, FPN and ROI
heads), saved, converted, and compared stage by stage to rel 1e-4 (`conftest.assert_close`),
then end to end through torchvision's transform.

What v2 adds over v1 (`maskrcnn_resnet50_fpn`): trainable BatchNorm in the backbone (running
statistics at inference), BatchNorm after the FPN's bias-free convs, two 3x3 convs in the RPN
head, the "4conv1fc" box head (four conv + BN + ReLU, one fc) and BN in the mask head.
"""

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import mask_rcnn_torchvision
from segjax.models import build_model, create_model
from segjax.models.roi_heads import BoxHead, MaskHead
from segjax.weights import torchvision as tvw
from tests.markers import long_test
from tests.weights.conftest import MASK_RCNN, MASK_RCNN_V2, assert_close, nhwc, random_rois

try:
  import torch
  import torchvision  # noqa: F401
except ImportError:
  torch = pytest.importorskip("torch")

# One worker builds the torchvision models once for all tests (pytest-xdist --dist loadgroup).
pytestmark = pytest.mark.xdist_group("torchvision_import")
H, W = 352, 416  # Non-square, multiples of 32: every FPN level is an exact 2x of the next.


@pytest.fixture(scope="module")
def imported(tv_mask_rcnn_v2):
  """(segjax model, converted variables, config) of the saved torchvision v2 file."""
  _, path = tv_mask_rcnn_v2
  variables, config, _ = tvw.convert_with_config(tvw.read_state_dict(path), MASK_RCNN_V2)
  model, _ = tvw.abstract_variables(config)
  return model, jax.tree.map(jnp.asarray, variables), config


SCALE = 4.0  # Class scores sharpened alike (see `outputs`).


@pytest.fixture(scope="module")
def outputs(tv_mask_rcnn_v2, imported):
  """Both models, end to end, on the same image, with every intermediate result: backbone
  stages, FPN levels, RPN head, proposals and detections, from one run of each (one compile).

  Random class scores are all near 1/91, under the 0.05 threshold: both models' `cls_score`
  is sharpened by `SCALE` (to 0.25..0.5). torchvision's transform is given the image already
  normalized and sized, so it changes nothing.
  """
  from torchvision.models.detection.transform import GeneralizedRCNNTransform

  model, variables, _ = imported
  tv_model = copy.deepcopy(tv_mask_rcnn_v2[0])
  with torch.no_grad():
    tv_model.roi_heads.box_predictor.cls_score.weight *= SCALE
    tv_model.roi_heads.box_predictor.cls_score.bias *= SCALE
  tv_model.transform = GeneralizedRCNNTransform(
    min_size=H, max_size=W, image_mean=[0.0] * 3, image_std=[1.0] * 3
  ).eval()
  tv = {}
  for name, module in (
    ("stages", tv_model.backbone.body),
    ("pyramid", tv_model.backbone),
    ("rpn_head", tv_model.rpn.head),
  ):
    module.register_forward_hook(lambda m, i, out, name=name: tv.__setitem__(name, out))
  filter_proposals = tv_model.rpn.filter_proposals
  tv_model.rpn.filter_proposals = lambda *a: tv.setdefault("proposals", filter_proposals(*a))
  image = np.random.default_rng(0).normal(size=(1, H, W, 3)).astype(np.float32)
  with torch.no_grad():
    (tv["detections"],) = tv_model([torch.from_numpy(image[0].transpose(2, 0, 1).copy())])

  variables = jax.tree.map(lambda x: x, variables)
  head = variables["params"]["roi_heads"]["box_head"]
  head["cls_score"] = jax.tree.map(lambda x: x * SCALE, head["cls_score"])
  detections, aux = jax.jit(lambda v, x: model.apply(v, x))(variables, image)
  obj, dl = jax.jit(lambda v, f: model.apply(v, f, method=lambda m, f: m.rpn(f)))(
    variables, {f"p{level}": aux[f"p{level}"] for level in range(2, 7)}
  )
  return dict(tv=tv, tv_model=tv_model, detections=detections, aux=aux, obj=obj, dl=dl)


def test_v2_maps_every_tensor_one_to_one(tv_mask_rcnn_v2, imported):
  tv_model, _ = tv_mask_rcnn_v2
  _, variables, config = imported
  counts = {c: len(jax.tree.leaves(t)) for c, t in variables.items()}
  assert counts == {"params": 225, "batch_stats": 138}
  state_dict = tv_model.state_dict()
  dropped = tvw.dropped_keys(state_dict, MASK_RCNN_V2)
  assert len(state_dict) - len(dropped) == 363 and len(dropped) == 69
  assert all(k.endswith("num_batches_tracked") for k in dropped)
  # Trainable BatchNorm: weight and bias are parameters, running statistics batch_stats, as in
  # torchvision, whose parameter count segjax's "params" equals.
  size = lambda tree: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))
  assert size(variables["params"]) == sum(p.numel() for p in tv_model.parameters()) == 46_359_409
  params, stats = variables["params"], variables["batch_stats"]
  for ours, key in (
    (stats["fpn"]["lateral_3_norm"]["var"], "backbone.fpn.inner_blocks.1.1.running_var"),
    (params["fpn"]["output_5_norm"]["scale"], "backbone.fpn.layer_blocks.3.1.weight"),
    (stats["backbone"]["res4_2"]["norm1"]["mean"], "backbone.body.layer3.2.bn1.running_mean"),
    (params["roi_heads"]["box_head"]["conv4_norm"]["bias"], "roi_heads.box_head.3.1.bias"),
    (
      stats["roi_heads"]["mask_head"]["mask_fcn2_norm"]["mean"],
      "roi_heads.mask_head.1.1.running_mean",
    ),
    (params["rpn"]["conv2"]["bias"], "rpn.head.conv.1.0.bias"),
  ):
    np.testing.assert_array_equal(ours, state_dict[key].numpy())
  assert (
    "bias" not in params["fpn"]["lateral_2"]
    and "bias" not in params["roi_heads"]["mask_head"]["mask_fcn1"]
  )
  assert params["roi_heads"]["box_head"]["fc1"]["kernel"].shape == (7 * 7 * 256, 1024)
  assert config.model.roi_heads.num_classes == 90


@long_test  # In CI, v2: test_v2_maps_every_tensor_one_to_one.
def test_v2_backbone_fpn_and_rpn_head_match(outputs):
  tv, aux = outputs["tv"], outputs["aux"]
  for level in range(2, 6):
    assert_close(aux[f"c{level}"], nhwc(tv["stages"][str(level - 2)]))
  for level, name in zip(range(2, 7), ["0", "1", "2", "3", "pool"]):
    assert_close(aux[f"p{level}"], nhwc(tv["pyramid"][name]))
  for level, (obj, dl) in enumerate(zip(*tv["rpn_head"])):
    n, a, h, w = obj.shape
    assert_close(outputs["obj"][level], nhwc(obj).reshape(n, -1))
    ref = dl.view(n, a, 4, h, w).permute(0, 3, 4, 1, 2).reshape(n, -1, 4).numpy()
    assert_close(outputs["dl"][level], ref)


def near_tie_order(got_boxes, ref_boxes, got_scores, ref_scores, tie=5e-5, atol=0.05):
  """`p` with `got[p[i]]` the entry matching `ref[i]`: the identity except where scores within
  `tie` swap places, every box then within `atol`. The two frameworks' float32 kernels (which
  vary by CPU) move scores by up to 2.2e-5 on AMD EPYC."""
  got_boxes, ref_boxes = np.asarray(got_boxes), np.asarray(ref_boxes)
  got_scores, ref_scores = np.asarray(got_scores), np.asarray(ref_scores)
  order = []
  for i, (box, score) in enumerate(zip(ref_boxes, ref_scores)):
    tied = np.flatnonzero(np.abs(got_scores - score) <= tie)
    j = tied[np.argmin(np.abs(got_boxes[tied] - box).max(-1))] if len(tied) else i
    order.append(j)
  assert sorted(order) == list(range(len(ref_boxes))), "not a permutation"
  return np.asarray(order)


@long_test  # In CI, v2: test_v2_maps_every_tensor_one_to_one.
def test_v2_proposals_match(outputs):
  (ref_boxes,), (ref_scores,) = outputs["tv"]["proposals"]  # scores: sigmoid(objectness)
  got = outputs["aux"]["proposals"]
  n = int(got["valid"][0].sum())
  assert n == len(ref_boxes) == 1000
  got_scores = jax.nn.sigmoid(got["scores"][0, :n])
  assert_close(got_scores, ref_scores.numpy())  # Sorted both: the same whatever the order.
  # The best 200 proposals in the same order, but for near-ties (scores 1e-7 apart).
  order = near_tie_order(
    got["boxes"][0, :220],
    ref_boxes[:220].numpy(),
    got_scores[:220],
    ref_scores[:220].numpy(),
    tie=1e-6,
  )[:200]
  assert np.mean(order == np.arange(200)) > 0.9
  assert_close(got["boxes"][0, order], ref_boxes[:200].numpy())


@long_test  # In CI, v2: test_v2_maps_every_tensor_one_to_one.
def test_v2_box_and_mask_heads_match_on_the_same_rois(imported, outputs):
  _, variables, _ = imported
  heads = outputs["tv_model"].roi_heads
  boxes = [torch.from_numpy(random_rois(48, H, W, seed=0))]
  with torch.no_grad():
    pooled = heads.box_roi_pool(outputs["tv"]["pyramid"], boxes, [(H, W)])
    logits, deltas = heads.box_predictor(heads.box_head(pooled))
    mask_pooled = heads.mask_roi_pool(outputs["tv"]["pyramid"], boxes, [(H, W)])
    masks = heads.mask_predictor(heads.mask_head(mask_pooled))
  tree = lambda name: {c: variables[c]["roi_heads"][name] for c in variables}
  box = BoxHead(num_classes=90, fc_dims=(1024,), conv_dims=(256,) * 4, norm="bn")
  sj_logits, sj_deltas = box.apply(tree("box_head"), jnp.asarray(nhwc(pooled)))
  assert_close(sj_logits * SCALE, logits.numpy())  # torchvision's cls_score is sharpened.
  assert_close(sj_deltas.reshape(len(boxes[0]), -1), deltas.numpy())
  sj_masks = MaskHead(num_classes=90, norm="bn").apply(
    tree("mask_head"), jnp.asarray(nhwc(mask_pooled))
  )
  assert_close(sj_masks, nhwc(masks))


def test_v2_end_to_end_detections_match(outputs):
  ref, det = outputs["tv"]["detections"], outputs["detections"]
  n = int(det["valid"][0].sum())
  assert n == len(ref["scores"]) > 10
  order = near_tie_order(
    det["boxes"][0, :n], ref["boxes"].numpy(), det["scores"][0, :n], ref["scores"].numpy()
  )
  np.testing.assert_array_equal(det["classes"][0, order], ref["labels"].numpy())
  np.testing.assert_allclose(det["scores"][0, order], ref["scores"].numpy(), atol=1e-3)
  np.testing.assert_allclose(det["boxes"][0, order], ref["boxes"].numpy(), atol=0.05)
  masks = np.asarray(det["instance_masks"][0])[order]
  assert np.mean(masks != (ref["masks"][:, 0].numpy() >= 0.5)) < 1e-3


def test_v2_model_config_and_arch_mismatch(tv_mask_rcnn, tv_mask_rcnn_v2):
  config = tvw.model_config(MASK_RCNN_V2)
  model = create_model(config.model)
  assert (model.backbone.norm, model.fpn.norm, model.rpn.num_convs) == ("bn", "bn", 2)
  heads = model.roi_heads
  assert (heads.box_conv_dims, heads.fc_dims, heads.norm) == ((256,) * 4, (1024,), "bn")
  assert (heads.num_classes, heads.aligned, heads.mask_paste) == (90, False, "torchvision")
  assert tvw.model_config(MASK_RCNN_V2, num_classes=4).model.roi_heads.norm == "bn"
  v1 = create_model(tvw.model_config(MASK_RCNN).model)
  assert (v1.fpn.norm, v1.rpn.num_convs, v1.roi_heads.box_conv_dims) == ("none", 1, ())
  # configs/mask_rcnn_torchvision.py: ":v2" evaluates, ":v2,shapes" fine-tunes v2.
  assert mask_rcnn_torchvision.get_config("v2").model.to_dict() == config.model.to_dict()
  tuned = create_model(mask_rcnn_torchvision.get_config("v2,shapes").model)
  assert (tuned.roi_heads.num_classes, tuned.roi_heads.norm, tuned.rpn.num_convs) == (4, "bn", 2)
  assert tuned.rpn.anchor_sizes[0] == (8,) and tuned.roi_heads.box_conv_dims == (256,) * 4
  with pytest.raises(ValueError, match=r"Unknown variant\(s\) \['v3'\]"):
    mask_rcnn_torchvision.get_config("v3,shapes")
  # A file of one arch read as the other: every missing and surplus key named, and a hint.
  v2_file = tvw.read_state_dict(tv_mask_rcnn_v2[1])
  assert tvw.detection_arch_of(v2_file) == MASK_RCNN_V2
  with pytest.raises(
    ValueError,
    match=r"keys are those of 'maskrcnn_resnet50_fpn_v2'.*"
    r"missing from the file: \[.*'roi_heads\.box_head\.fc6\.weight",
  ):
    tvw.convert(v2_file, MASK_RCNN)
  v1_file = {k: v.numpy() for k, v in tv_mask_rcnn[0].state_dict().items()}
  with pytest.raises(
    ValueError,
    match=r"keys are those of 'maskrcnn_resnet50_fpn'\).*"
    r"'backbone\.fpn\.inner_blocks\.0\.1\.running_mean",
  ):
    tvw.convert(v1_file, MASK_RCNN_V2)


def test_v2_import_writes_a_workdir_that_evaluation_reads(tmp_path, tv_mask_rcnn_v2, imported):
  from segjax.train import evaluation, parallel

  _, variables, config = imported
  workdir = str(tmp_path / "v2")
  summary = tvw.import_weights(MASK_RCNN_V2, tv_mask_rcnn_v2[1], workdir)
  assert (summary["imported_leaves"], summary["fresh_leaves"]) == (363, 0)
  assert len(summary["dropped_keys"]) == 69
  restored, step = evaluation.restore_variables(
    config, workdir, build_model(config), parallel.make_mesh()
  )
  assert step == 0
  jax.tree.map(np.testing.assert_array_equal, restored, variables)

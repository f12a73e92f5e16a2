"""Tests for segjax/weights/torchvision.py: torchvision models with random weights, saved and
imported, compute what segjax computes.

"rel 1e-4" below: the largest absolute difference is at most 1e-4 times the largest magnitude
of torchvision's output. Batch-norm statistics are calibrated on random images (cumulative
averages in train mode, then eval) and every bias is random, so activations stay O(1) and a
mixed-up scale, bias, mean or variance shows.
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from segjax import ops
from segjax.models import build_model
from segjax.models.resnet import ResNet
from segjax.models.roi_heads import BoxHead, MaskHead
from segjax.weights import torchvision as tvw
from tests.markers import long_test
from tests.weights.conftest import (
  MASK_RCNN,
  assert_close,
  nhwc,
  random_images,
  randomize_and_calibrate,
)

try:
  import torch
  import torchvision
except ImportError:
  # CI installs the `torch` extra (.ci/run), so these tests run there. This fallback only keeps
  # a `pip install -e ".[test]"` without that extra from failing at collection.
  torch = pytest.importorskip("torch")

# One worker builds the torchvision models once for all tests (pytest-xdist --dist loadgroup).
pytestmark = pytest.mark.xdist_group("torchvision_import")
H, W = 352, 416  # Non-square, multiples of 32: every FPN level is an exact 2x of the next.


@pytest.fixture(scope="module")
def imported(tv_mask_rcnn):
  """(segjax model, converted variables, config) of the saved torchvision file."""
  _, path = tv_mask_rcnn
  variables, config, _ = tvw.convert_with_config(tvw.read_state_dict(path), MASK_RCNN)
  model, _ = tvw.abstract_variables(config)
  return model, jax.tree.map(jnp.asarray, variables), config


@pytest.fixture(scope="module")
def outputs(tv_mask_rcnn, imported):
  """Both models on the same image: torchvision's and segjax's backbone, FPN and RPN head."""
  tv_model, _ = tv_mask_rcnn
  model, variables, _ = imported
  image = np.random.default_rng(0).normal(size=(1, H, W, 3)).astype(np.float32)
  x = torch.from_numpy(image.transpose(0, 3, 1, 2).copy())
  with torch.no_grad():
    stages = tv_model.backbone.body(x)
    pyramid = tv_model.backbone(x)
    objectness, deltas = tv_model.rpn.head(list(pyramid.values()))

  def features(m, image):
    feats, aux = m.features(image, train=False)
    return aux, feats, m.rpn(feats)

  aux, feats, (obj, dl) = jax.jit(lambda v, i: model.apply(v, i, method=features))(variables, image)
  return dict(
    stages=stages,
    pyramid=pyramid,
    objectness=objectness,
    deltas=deltas,
    aux=aux,
    feats=feats,
    obj=obj,
    dl=dl,
  )


def test_mask_rcnn_maps_every_tensor_one_to_one(tv_mask_rcnn, imported):
  tv_model, _ = tv_mask_rcnn
  _, variables, config = imported
  counts = {c: len(jax.tree.leaves(t)) for c, t in variables.items()}
  assert counts == {"params": 95, "batch_stats": 212}
  state_dict = tv_model.state_dict()
  dropped = tvw.dropped_keys(state_dict, MASK_RCNN)
  assert len(state_dict) - len(dropped) == 307
  assert all(k.endswith("num_batches_tracked") for k in dropped)
  assert config.model.roi_heads.num_classes == 90
  np.testing.assert_array_equal(
    variables["batch_stats"]["backbone"]["res3_1"]["norm2"]["var"],
    state_dict["backbone.body.layer2.1.bn2.running_var"].numpy(),
  )


def test_backbone_stages_match(outputs):
  for level in range(2, 6):
    assert_close(outputs["aux"][f"c{level}"], nhwc(outputs["stages"][str(level - 2)]))


def test_fpn_levels_match(outputs):
  names = ["0", "1", "2", "3", "pool"]
  for level, name in zip(range(2, 7), names):
    assert_close(outputs["feats"][f"p{level}"], nhwc(outputs["pyramid"][name]))


def test_rpn_head_matches(outputs):
  for level, (obj, dl) in enumerate(zip(outputs["objectness"], outputs["deltas"])):
    n, a, h, w = obj.shape
    assert_close(outputs["obj"][level], nhwc(obj).reshape(n, -1))
    ref = dl.detach().view(n, a, 4, h, w).permute(0, 3, 4, 1, 2).reshape(n, -1, 4).numpy()
    assert_close(outputs["dl"][level], ref)


def rois(n=48, seed=0):
  """Boxes of all sizes (8 to 340 pixels) inside the image, so every FPN level gets some."""
  rng = np.random.default_rng(seed)
  size = np.exp(rng.uniform(np.log(8), np.log(340), size=(n, 2)))
  x1 = rng.uniform(0, W - size[:, 0])
  y1 = rng.uniform(0, H - size[:, 1])
  return np.stack([x1, y1, x1 + size[:, 0], y1 + size[:, 1]], axis=1).astype(np.float32)


def test_box_and_mask_heads_match_on_the_same_rois(tv_mask_rcnn, imported, outputs):
  # torchvision pools with ROIAlign aligned=False, sampling_ratio=2; segjax's heads pool with
  # aligned=True. So the heads are compared on identical pooled features (torchvision's), and
  # segjax's pooler, run in torchvision's mode, against torchvision's separately.
  tv_model, _ = tv_mask_rcnn
  _, variables, _ = imported
  boxes = rois()
  pyramid = outputs["pyramid"]
  with torch.no_grad():
    tb = [torch.from_numpy(boxes)]
    pooled = tv_model.roi_heads.box_roi_pool(pyramid, tb, [(H, W)])
    logits, deltas = tv_model.roi_heads.box_predictor(tv_model.roi_heads.box_head(pooled))
    mask_pooled = tv_model.roi_heads.mask_roi_pool(pyramid, tb, [(H, W)])
    masks = tv_model.roi_heads.mask_predictor(tv_model.roi_heads.mask_head(mask_pooled))
  params = variables["params"]["roi_heads"]
  sj_logits, sj_deltas = BoxHead(num_classes=90).apply(
    {"params": params["box_head"]}, jnp.asarray(nhwc(pooled))
  )
  assert_close(sj_logits, logits.numpy())
  assert_close(sj_deltas.reshape(len(boxes), -1), deltas.numpy())
  sj_masks = MaskHead(num_classes=90).apply(
    {"params": params["mask_head"]}, jnp.asarray(nhwc(mask_pooled))
  )
  assert_close(sj_masks, nhwc(masks))

  maps = {k: v[0] for k, v in outputs["feats"].items() if k != "p6"}
  for size, ref in ((7, pooled), (14, mask_pooled)):
    sj_pooled = ops.multilevel_roi_align(
      maps, jnp.asarray(boxes), (size, size), sampling_ratio=2, aligned=False
    )
    assert_close(sj_pooled, nhwc(ref))


def test_resnet50_classifier_stages_match(tmp_path):
  torch.manual_seed(1)
  tv = torchvision.models.resnet50(weights=None)
  randomize_and_calibrate(tv, tv, random_images(2, 96, 128, seed=3))
  path = str(tmp_path / "resnet50.pth")
  torch.save(tv.state_dict(), path)
  variables = tvw.convert(tvw.read_state_dict(path), "resnet50")
  assert set(variables["params"]) == set(variables["batch_stats"]) == {"backbone"}
  image = np.random.default_rng(5).normal(size=(1, 160, 224, 3)).astype(np.float32)
  x = torch.from_numpy(image.transpose(0, 3, 1, 2).copy())
  with torch.no_grad():
    y = tv.maxpool(tv.relu(tv.bn1(tv.conv1(x))))
    stages = []
    for layer in (tv.layer1, tv.layer2, tv.layer3, tv.layer4):
      y = layer(y)
      stages.append(nhwc(y))
  backbone = {c: variables[c]["backbone"] for c in ("params", "batch_stats")}
  out, _ = jax.jit(lambda v, i: ResNet(depth=50).apply(v, i, train=False))(backbone, image)
  for level, ref in zip(range(2, 6), stages):
    assert_close(out[f"c{level}"], ref)


@pytest.fixture(scope="module")
def resnet18_state_dict():
  torch.manual_seed(2)
  return {k: v.numpy() for k, v in torchvision.models.resnet18(weights=None).state_dict().items()}


def test_file_formats_and_legacy_names_give_the_same_variables(
  tmp_path, resnet18_state_dict, tv_mask_rcnn
):
  from safetensors.numpy import save_file

  sd = resnet18_state_dict
  np.savez(tmp_path / "r18.npz", **sd)
  save_file({k: np.ascontiguousarray(v) for k, v in sd.items()}, str(tmp_path / "r18.safetensors"))
  torch.save({"model": {k: torch.from_numpy(v) for k, v in sd.items()}}, tmp_path / "r18.pt")
  reference = tvw.convert(sd, "resnet18")
  for name in ("r18.npz", "r18.safetensors", "r18.pt"):
    got = tvw.convert(tvw.read_state_dict(str(tmp_path / name)), "resnet18")
    jax.tree.map(np.testing.assert_array_equal, got, reference)
  # Older torchvision names (the published COCO file) and a DataParallel prefix.
  tv_model, path = tv_mask_rcnn
  new = tvw.read_state_dict(path)
  old = {}
  for key, value in new.items():
    key = key.replace("rpn.head.conv.0.0.", "rpn.head.conv.")
    key = key.replace("inner_blocks.0.0.", "inner_blocks.0.").replace(
      "layer_blocks.3.0.", "layer_blocks.3."
    )
    for i in range(4):
      key = key.replace(f"roi_heads.mask_head.{i}.0.", f"roi_heads.mask_head.mask_fcn{i + 1}.")
    old["module." + key] = value
  assert len(set(old) & {"module." + k for k in new}) < len(new) - 10
  jax.tree.map(
    np.testing.assert_array_equal, tvw.convert(old, MASK_RCNN), tvw.convert(new, MASK_RCNN)
  )


def test_classifier_head_is_dropped_and_reported(resnet18_state_dict):
  assert tvw.dropped_keys(resnet18_state_dict, "resnet18") == [
    k for k in sorted(resnet18_state_dict) if k.startswith("fc.") or "num_batches" in k
  ]
  assert "fc.weight" in tvw.dropped_keys(resnet18_state_dict, "resnet18")
  # A ResNet-34 file is not a ResNet-18: every surplus key is named.
  with pytest.raises(ValueError, match=r"map nowhere: \['layer1\.2\.bn1\.bias'"):
    tvw.convert({**resnet18_state_dict, "layer1.2.bn1.bias": np.zeros(64)}, "resnet18")


def test_conversion_errors_name_the_keys(tv_mask_rcnn):
  _, path = tv_mask_rcnn
  sd = tvw.read_state_dict(path)
  broken = {k: v for k, v in sd.items() if k != "roi_heads.box_head.fc7.bias"}
  broken["roi_heads.extra.weight"] = np.zeros(3, np.float32)
  with pytest.raises(
    ValueError,
    match=r"missing from the file: \['roi_heads\.box_head\.fc7\.bias"
    r".*map nowhere: \['roi_heads\.extra\.weight'\]",
  ):
    tvw.convert(broken, MASK_RCNN)
  with pytest.raises(
    ValueError,
    match=r"num_classes.*cls_score\.weight \(91, 1024\) -> "
    r"params/roi_heads/box_head/cls_score/kernel \(1024, 5\)",
  ):
    tvw.convert(sd, MASK_RCNN, num_classes=4)
  with pytest.raises(ValueError, match="Unknown arch"):
    tvw.convert(sd, "maskrcnn_resnet101_fpn")


def test_model_config_records_torchvision_labels():
  config = tvw.model_config(MASK_RCNN)
  meta = torchvision.models.detection.MaskRCNN_ResNet50_FPN_Weights.COCO_V1.meta
  assert list(config.dataset.class_names[1:]) == meta["categories"][1:]
  assert len(config.dataset.class_names) == 91
  assert list(config.dataset.category_ids) == list(range(1, 91))
  assert config.model.roi_heads.num_classes == 90 and config.model.backbone.depth == 50
  assert tvw.model_config(MASK_RCNN, num_classes=4).dataset.get("category_ids") is None
  assert tvw.model_config("resnet18").model.backbone.depth == 18
  from segjax.models import create_model

  model = create_model(config.model)
  assert (model.rpn.rounded_anchors, model.rpn.strides_from_image, model.rpn.min_size) == (
    True,
    True,
    1e-3,
  )
  assert (
    model.roi_heads.aligned,
    model.roi_heads.sampling_ratio,
    model.roi_heads.min_box_size,
    model.roi_heads.mask_paste,
  ) == (False, 2, 1e-2, "torchvision")
  assert model.roi_heads.num_classes == 90
  with pytest.raises(ValueError, match="Unknown conventions 'caffe2'"):
    create_model({**config.model.to_dict(), "conventions": "caffe2"})


def test_import_writes_a_workdir_that_evaluation_reads(tv_mask_rcnn, imported, imported_workdir):
  from segjax.train import evaluation, parallel

  _, path = tv_mask_rcnn
  _, variables, _ = imported
  workdir, summary = imported_workdir
  assert summary["imported_leaves"] == 307 and summary["fresh_leaves"] == 0
  assert len(summary["dropped_keys"]) == 53
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f)["model"]["roi_heads"]["num_classes"] == 90
  config = tvw.model_config(MASK_RCNN)
  restored, step = evaluation.restore_variables(
    config, workdir, build_model(config), parallel.make_mesh()
  )
  assert step == 0
  jax.tree.map(np.testing.assert_array_equal, restored, variables)
  with pytest.raises(FileExistsError, match="already has a checkpoint"):
    tvw.import_weights(MASK_RCNN, path, workdir)


@long_test  # In CI, the import command: the torch tests here.
def test_command_imports_an_npz_without_torch(tmp_path, resnet18_state_dict):
  np.savez(tmp_path / "r18.npz", **resnet18_state_dict)
  workdir = tmp_path / "r18"
  # Blocks `import torch` in the child: .npz files need no torch.
  code = (
    "import sys; sys.modules['torch'] = None; import runpy; "
    "runpy.run_module('segjax.weights.torchvision', run_name='__main__')"
  )
  result = subprocess.run(
    [
      sys.executable,
      "-c",
      code,
      "--arch=resnet18",
      f"--input={tmp_path / 'r18.npz'}",
      f"--workdir={workdir}",
    ],
    capture_output=True,
    text=True,
    timeout=300,
    env={**os.environ, "JAX_PLATFORMS": "cpu"},
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert "Imported 100 variables of resnet18" in result.stdout
  assert "fc.weight" in result.stdout
  assert (workdir / "config.json").is_file() and (workdir / "checkpoints" / "0").is_dir()
  with open(workdir / "import.json") as f:
    assert json.load(f)["num_classes"] == 80


# model.conventions = "torchvision": the same anchors, ROI pooling and proposals as torchvision.


def test_torchvision_anchors(tv_mask_rcnn, imported, outputs):
  from torchvision.models.detection.image_list import ImageList

  tv_model, _ = tv_mask_rcnn
  model, _, _ = imported
  assert model.rpn.rounded_anchors and model.rpn.strides_from_image
  maps = list(outputs["pyramid"].values())
  with torch.no_grad():
    (ref,) = tv_model.rpn.anchor_generator(ImageList(torch.zeros(1, 3, H, W), [(H, W)]), maps)
  anchors = model.rpn.anchors(outputs["feats"], (H, W))
  assert anchors[-1].shape[0] == 6 * 7 * 3  # P6 of 352 x 416: stride 58 x 59, not 64.
  np.testing.assert_array_equal(np.concatenate(anchors), ref.numpy())


def test_box_and_mask_heads_match_from_the_features(tv_mask_rcnn, imported, outputs):
  tv_model, _ = tv_mask_rcnn
  model, variables, _ = imported
  boxes = rois(seed=1)
  with torch.no_grad():
    tb, pyramid = [torch.from_numpy(boxes)], outputs["pyramid"]
    heads = tv_model.roi_heads
    logits, deltas = heads.box_predictor(heads.box_head(heads.box_roi_pool(pyramid, tb, [(H, W)])))
    masks = heads.mask_predictor(heads.mask_head(heads.mask_roi_pool(pyramid, tb, [(H, W)])))

  def forward(m, features, b):
    return m.roi_heads._forward_box(features, b), m.roi_heads._forward_mask(features, b)

  (sj_logits, sj_deltas), sj_masks = model.apply(
    variables, outputs["feats"], jnp.asarray(boxes)[None], method=forward
  )
  assert_close(sj_logits[0], logits.numpy())
  assert_close(sj_deltas[0].reshape(len(boxes), -1), deltas.numpy())
  assert_close(sj_masks[0], nhwc(masks))


@long_test  # In CI, torchvision parity: test_end_to_end_detections_match.
def test_rpn_proposals_match(tv_mask_rcnn, imported, outputs):
  from torchvision.models.detection.image_list import ImageList

  tv_model, _ = tv_mask_rcnn
  model, variables, _ = imported
  with torch.no_grad():
    proposals, _ = tv_model.rpn(ImageList(torch.zeros(1, 3, H, W), [(H, W)]), outputs["pyramid"])
  ref = proposals[0].numpy()

  def propose(m, features):
    objectness, deltas = m.rpn(features)
    return m.rpn.proposals(
      objectness, deltas, m.rpn.anchors(features, (H, W)), jnp.asarray([[H, W]]), train=False
    )

  got = model.apply(variables, outputs["feats"], method=propose)
  n = int(got["valid"][0].sum())
  assert n == len(ref) == tv_model.rpn.post_nms_top_n()
  # The best proposals, in the same order (the tail's order can flip on scores 1e-7 apart).
  assert_close(got["boxes"][0, :200], ref[:200])


@long_test  # In CI, torchvision parity: test_end_to_end_detections_match.
def test_postprocess_matches_torchvision_with_small_box_filtering(tv_mask_rcnn):
  from segjax.models import roi_heads

  tv_model, _ = tv_mask_rcnn
  rng = np.random.default_rng(7)
  proposals = rois(n=64, seed=7)
  proposals[:8, 2] = proposals[:8, 0] + 0.005  # Thinner than 1e-2 pixels: dropped.
  logits = (rng.normal(size=(64, 91)) * 3).astype(np.float32)
  deltas = (rng.normal(size=(64, 91 * 4)) * 0.5).astype(np.float32)
  with torch.no_grad():
    boxes, scores, labels = tv_model.roi_heads.postprocess_detections(
      torch.from_numpy(logits), torch.from_numpy(deltas), [torch.from_numpy(proposals)], [(H, W)]
    )
  got = roi_heads.postprocess(
    jnp.asarray(logits),
    jnp.asarray(deltas).reshape(64, 91, 4),
    jnp.asarray(proposals),
    jnp.ones(64, bool),
    jnp.asarray([H, W]),
    min_size=1e-2,
  )
  n = int(got["valid"].sum())
  assert n == len(scores[0]) > 20
  assert_close(got["boxes"][:n], boxes[0].numpy())
  assert_close(got["scores"][:n], scores[0].numpy())
  np.testing.assert_array_equal(got["classes"][:n], labels[0].numpy())
  tiny = roi_heads.postprocess(
    jnp.asarray(logits[:8]),
    jnp.asarray(deltas[:8]).reshape(8, 91, 4),
    jnp.asarray(proposals[:8]),
    jnp.ones(8, bool),
    jnp.asarray([H, W]),
    min_size=1e-2,
  )
  assert not tiny["valid"].any()
  assert roi_heads.postprocess(
    jnp.asarray(logits[:8]),
    jnp.asarray(deltas[:8]).reshape(8, 91, 4),
    jnp.asarray(proposals[:8]),
    jnp.ones(8, bool),
    jnp.asarray([H, W]),
  )["valid"].any()  # Kept without min_size.


def test_torchvision_mask_pasting():
  from torchvision.models.detection.roi_heads import paste_masks_in_image

  rng = np.random.default_rng(0)
  h, w = 61, 77
  masks = rng.uniform(size=(200, 28, 28)).astype(np.float32)
  xy = rng.uniform(0, 60, size=(200, 2))
  boxes = np.concatenate([xy, xy + rng.uniform(0.3, 50, size=(200, 2))], axis=1)
  boxes = np.minimum(boxes, [w, h, w, h]).astype(np.float32)  # Detections are clipped.
  boxes[:2] = [[5.2, 6.7, 5.25, 6.9], [0, 0, w, h]]
  ref = paste_masks_in_image(
    torch.from_numpy(masks)[:, None], torch.from_numpy(boxes), (h, w), padding=1
  )[:, 0].numpy()
  got = ops.masks.paste_mask_probs_torchvision(jnp.asarray(masks), jnp.asarray(boxes), (h, w))
  np.testing.assert_allclose(got, ref, atol=1e-5)
  np.testing.assert_array_equal(
    ops.paste_masks(jnp.asarray(masks), jnp.asarray(boxes), (h, w), convention="torchvision"),
    ref >= 0.5,
  )


def test_end_to_end_detections_match(tv_mask_rcnn, imported):
  import copy

  from torchvision.models.detection.transform import GeneralizedRCNNTransform

  tv_model, _ = tv_mask_rcnn
  model, variables, _ = imported
  # Random class scores are all near 1/91, under the 0.05 threshold: sharpen them alike (to
  # 0.25..0.5; much more and float32 saturates them at 1.0, and ties reorder).
  tv_model = copy.deepcopy(tv_model)
  with torch.no_grad():
    tv_model.roi_heads.box_predictor.cls_score.weight *= 4.0
    tv_model.roi_heads.box_predictor.cls_score.bias *= 4.0
  head = variables["params"]["roi_heads"]["box_head"]["cls_score"]
  variables = jax.tree.map(lambda x: x, variables)
  variables["params"]["roi_heads"]["box_head"]["cls_score"] = jax.tree.map(lambda x: x * 4.0, head)
  h, w = 224, 288  # P6: stride 56 x 57 in torchvision's anchors.
  # Images already normalized and sized: torchvision's transform then changes nothing.
  tv_model.transform = GeneralizedRCNNTransform(
    min_size=h, max_size=w, image_mean=[0.0] * 3, image_std=[1.0] * 3
  ).eval()
  image = np.random.default_rng(11).normal(size=(1, h, w, 3)).astype(np.float32)
  with torch.no_grad():
    (ref,) = tv_model([torch.from_numpy(image[0].transpose(2, 0, 1).copy())])
  det, _ = jax.jit(lambda v, x: model.apply(v, x))(variables, image)
  n = int(det["valid"][0].sum())
  assert n == len(ref["scores"]) > 10
  np.testing.assert_array_equal(det["classes"][0, :n], ref["labels"].numpy())
  # The 4x class logits scale float32 differences too: the two frameworks' convolution
  # kernels (which vary by CPU) move these scores by up to 1.3e-4 of their largest on AMD EPYC.
  assert_close(det["scores"][0, :n], ref["scores"].numpy(), rel=3e-4)
  assert_close(det["boxes"][0, :n], ref["boxes"].numpy())
  masks = np.asarray(det["instance_masks"][0, :n])
  ref_masks = ref["masks"][:, 0].numpy() >= 0.5
  assert np.mean(masks != ref_masks) < 1e-4  # Only probabilities within ~1e-6 of 0.5 may flip.

"""Mask R-CNN (He et al. 2017, "Mask R-CNN", arXiv:1703.06870) with a ResNet-FPN backbone.

Composed as detectron2 `modeling/meta_arch/rcnn.py` `GeneralizedRCNN`: backbone (ResNet,
`resnet.py`, + FPN, `fpn.py`) -> proposals (RPN, `rpn.py`) -> ROI heads (`roi_heads.py`).
Defaults are detectron2's `mask_rcnn_R_50_FPN_1x` hyper-parameters, held by the submodule
attributes; a toy model overrides a few, e.g.

  MaskRCNN(backbone=ResNet(depth=18, base_width=8), fpn=FPN(out_channels=32), ...)

or from a config through `segjax.models.create_model` with sections `backbone`, `fpn`, `rpn`
and `roi_heads`.

Three entry points, all static-shape and jittable:
  * `MaskRCNN.__call__(image, image_size, train=False)`: inference, `(detections, aux)`;
    `model.init(rng, image, train=False, method=MaskRCNN.initialize)` creates every
    variable, the same as `model.init(rng, image, train=False)` with less to compile.
  * `MaskRCNN.losses(batch, rng, train=True)`: `(losses, metrics)` of a training batch.
  * `loss_fn` / `predict` below: the same bound for `segjax.train.steps` and evaluation.

Batch contract (the instance data pipeline produces it; B images, G ground-truth slots):
  image (B, H, W, 3) float32 normalized, H and W padded (multiples of 32 keep the FPN exact);
  boxes (B, G, 4) float32 `[x1, y1, x2, y2]` pixels of the padded image; classes (B, G) int32
  in 1..K (0 for padding); instance_masks (B, G, H, W) uint8, or instead cropped_masks
  (B, G, S, S) float32, each mask cropped to its box at S x S on the host
  (`config.dataset.cropped_mask_size`, `segjax.data.instance_ops.crop_and_resize_masks`);
  valid (B, G) bool; image_size (B, 2) int32 true (unpadded) height and width after resizing.

Parameter count: `ROIHeads(num_classes=90)` (labels 0..90 with background 0, torchvision's
`num_classes=91`) gives 44,401,393 parameters in "params", exactly torchvision
`maskrcnn_resnet50_fpn`; the frozen batch-norm vectors (4 x 26,560) are in "batch_stats",
as torchvision keeps them in buffers. torchvision's `maskrcnn_resnet50_fpn_v2` (trainable
BatchNorm in the backbone, FPN and heads, a 2-conv RPN head, the "4conv1fc" box head:
`segjax.weights.torchvision.model_config("maskrcnn_resnet50_fpn_v2")`) has 46,359,409, here
too, with its running means and variances (2 x 30,656) in "batch_stats".
"""

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from segjax.models.fpn import FPN
from segjax.models.resnet import ResNet
from segjax.models.roi_heads import ROIHeads
from segjax.models.rpn import RPN

Array = jax.Array

BATCH_KEYS = ("image", "boxes", "classes", "valid", "image_size")
MASK_KEYS = ("instance_masks", "cropped_masks")  # A batch holds exactly one of them.

# `MaskRCNN.conventions`: the RPN and ROI-head fields each setting overrides. "detectron2"
# keeps the submodules as configured (their defaults are detectron2's). "torchvision" is
# torchvision's `maskrcnn_resnet50_fpn` inference: rounded anchors placed with stride
# image // grid, proposals under 1e-3 pixels dropped, ROIAlign without the half-pixel offset
# and 2 x 2 samples per bin, detections under 1e-2 pixels dropped, masks pasted as
# `paste_masks_in_image` (`segjax.ops.masks`).
CONVENTIONS = {
  "detectron2": ({}, {}),
  "torchvision": (
    dict(rounded_anchors=True, strides_from_image=True, min_size=1e-3),
    dict(aligned=False, sampling_ratio=2, min_box_size=1e-2, mask_paste="torchvision"),
  ),
}


def check_batch(batch: Mapping[str, Array]) -> None:
  """Raises ValueError unless `batch` follows the batch contract (static shapes only)."""
  missing = [k for k in BATCH_KEYS if k not in batch]
  if missing:
    raise ValueError(f"Mask R-CNN batch lacks {missing}; it has {sorted(batch)}.")
  masks = [k for k in MASK_KEYS if k in batch]
  if len(masks) != 1:
    raise ValueError(
      f"Mask R-CNN batch needs exactly one of {list(MASK_KEYS)}; it has {sorted(batch)}."
    )
  b, h, w, _ = batch["image"].shape
  g = batch["boxes"].shape[1]
  if masks == ["cropped_masks"]:
    size = batch["cropped_masks"].shape[-1]
    mask_shape = {"cropped_masks": (b, g, size, size)}
  else:
    mask_shape = {"instance_masks": (b, g, h, w)}
  expected = {
    "boxes": (b, g, 4),
    "classes": (b, g),
    **mask_shape,
    "valid": (b, g),
    "image_size": (b, 2),
  }
  wrong = {k: tuple(batch[k].shape) for k, s in expected.items() if tuple(batch[k].shape) != s}
  if wrong:
    raise ValueError(
      f"Mask R-CNN batch shapes {wrong} disagree with image {batch['image'].shape}"
      f" and boxes {batch['boxes'].shape}: expected {expected}."
    )


class MaskRCNN(nn.Module):
  """Mask R-CNN: ResNet + FPN backbone, RPN, box and mask ROI heads.

  Attributes:
    backbone: the ResNet (default ResNet-50, frozen BN, stem and res2 frozen).
    fpn: the feature pyramid (256 channels, P2..P6).
    rpn: the region proposal network with its anchor, proposal and loss settings.
    roi_heads: the box and mask heads with their sampling, loss and inference settings;
      `roi_heads.num_classes` is K.
    conventions: "detectron2" (the submodules as configured) or "torchvision" (overrides the
      RPN and ROI-head fields in `CONVENTIONS`, for torchvision's weights).
    dtype: computation dtype (e.g. jnp.bfloat16) of every section that leaves its own at
      float32 (a section with another dtype keeps it: a float32 model with a bfloat16
      backbone is `backbone.dtype="bfloat16"`); parameters stay float32 and every output,
      detections and losses, is float32.
  """

  task: ClassVar[str] = "instance"
  stride: ClassVar[int] = 32  # Padded sizes multiples of it keep the FPN's levels aligned.

  backbone: ResNet = dataclasses.field(default_factory=ResNet)
  fpn: FPN = dataclasses.field(default_factory=FPN)
  rpn: RPN = dataclasses.field(default_factory=RPN)
  roi_heads: ROIHeads = dataclasses.field(default_factory=ROIHeads)
  conventions: str = "detectron2"
  dtype: Any = jnp.float32

  def __post_init__(self):
    # Fields derived here are set before flax freezes them, in super().__post_init__.
    if self.conventions not in CONVENTIONS:
      raise ValueError(f"Unknown conventions {self.conventions!r}; known: {list(CONVENTIONS)}.")
    rpn_fields, roi_fields = CONVENTIONS[self.conventions]
    for part, fields in (
      ("backbone", {}),
      ("fpn", {}),
      ("rpn", rpn_fields),
      ("roi_heads", roi_fields),
    ):
      section = getattr(self, part)
      if section.dtype == jnp.float32 and self.dtype != jnp.float32:
        fields = {**fields, "dtype": self.dtype}
      if fields:
        setattr(self, part, section.clone(**fields))
    super().__post_init__()

  def features(self, image: Array, *, train: bool) -> tuple[dict[str, Array], dict[str, Array]]:
    """FPN maps `{"p2": (B, H/4, W/4, C), ..., "p6"}` and `aux` with the ResNet stages."""
    stages, aux = self.backbone(image, train=train)
    features, fpn_aux = self.fpn(stages, train=train)
    return features, {**aux, **stages, **fpn_aux}

  def initialize(self, image: Array, *, train: bool = False) -> None:
    """Runs every layer with parameters once and nothing else (no proposals, NMS or ROIAlign):
    as `init` method, it creates the variables of `__call__` and compiles ~20 % faster (most of
    the rest is the random initializers)."""
    features, _ = self.features(image, train=train)
    self.rpn(features)
    self.roi_heads.init_heads(features["p2"].shape[-1])

  def __call__(
    self, image: Array, image_size: Array | None = None, *, train: bool = False
  ) -> tuple[dict[str, Array], dict[str, Array]]:
    """Detections of images `(B, H, W, 3)` of true sizes `image_size` `(B, 2)` (default H, W).

    Returns `(detections, aux)`: detections `{"boxes": (B, D, 4), "scores": (B, D),
    "classes": (B, D) int32 in 1..K, "mask_probs": (B, D, 28, 28), "instance_masks":
    (B, D, H, W) bool, "valid": (B, D) bool}`, best first, D = `detections_per_image`;
    `aux` holds the backbone and FPN features and the proposals. `train` only switches
    BatchNorm (norm="bn", anywhere); proposals always use the test settings.
    """
    if image_size is None:
      image_size = jnp.broadcast_to(jnp.asarray(image.shape[1:3], jnp.int32), (image.shape[0], 2))
    features, aux = self.features(image, train=train)
    objectness, deltas = self.rpn(features)
    anchors = self.rpn.anchors(features, image.shape[1:3])
    proposals = self.rpn.proposals(objectness, deltas, anchors, image_size, train=False)
    detections = self.roi_heads(features, proposals, image_size, image.shape[1:3], train=train)
    return detections, {**aux, **features, "proposals": proposals}

  def losses(
    self, batch: Mapping[str, Array], rng: Array, *, train: bool = True
  ) -> tuple[dict[str, Array], dict[str, Array]]:
    """`(losses, metrics)` of a batch (see the module docstring for its keys).

    losses: `loss_rpn_cls`, `loss_rpn_loc`, `loss_cls`, `loss_box_reg`, `loss_mask` (their
    sum is the training objective); proposals use the training settings.
    """
    check_batch(batch)
    features, _ = self.features(batch["image"], train=train)
    objectness, deltas = self.rpn(features)
    anchors = self.rpn.anchors(features, batch["image"].shape[1:3])
    rpn_rng, roi_rng = jax.random.split(rng)
    rpn_losses, rpn_metrics = self.rpn.losses(
      objectness, deltas, anchors, batch["boxes"], batch["valid"], rpn_rng
    )
    proposals = self.rpn.proposals(objectness, deltas, anchors, batch["image_size"], train=True)
    roi_losses, roi_metrics = self.roi_heads.losses(
      features, proposals, batch, roi_rng, train=train
    )
    metrics = {
      **rpn_metrics,
      **roi_metrics,
      "num_proposals": jnp.mean(jnp.sum(proposals["valid"], axis=1)),
    }
    return {**rpn_losses, **roi_losses}, metrics


def loss_fn(
  variables: dict, batch: Mapping[str, Array], rng: Array, *, model: MaskRCNN, train: bool = True
) -> tuple:
  """`(loss, (metrics, updates))` for `segjax.train.steps.train_step` (bind `model`).

  `loss` is the sum of the five losses; `metrics` holds each loss and the sampling counts;
  `updates` the new "batch_stats" when training with norm="bn" (frozen BN ones come back
  unchanged).
  """
  has_batch_stats = bool(jax.tree.leaves(variables.get("batch_stats", {})))
  mutable = ["batch_stats"] if train and has_batch_stats else False
  out = model.apply(variables, batch, rng, train=train, method=MaskRCNN.losses, mutable=mutable)
  (losses, metrics), updates = out if mutable else (out, {})
  total = sum(losses.values())
  return total, ({**losses, **metrics}, updates)


def predict(variables: dict, batch: Mapping[str, Array], *, model: MaskRCNN) -> dict[str, Array]:
  """Detections of `batch["image"]` clipped to `batch["image_size"]` (see `MaskRCNN.__call__`)."""
  detections, _ = model.apply(variables, batch["image"], batch.get("image_size"), train=False)
  return detections

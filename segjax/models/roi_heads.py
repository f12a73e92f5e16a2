"""ROI box and mask heads of Mask R-CNN (He et al. 2017, "Mask R-CNN", arXiv:1703.06870).

As detectron2 `modeling/roi_heads/roi_heads.py` `StandardROIHeads` with the 1x settings:

- training (`label_and_sample_proposals`): ground-truth boxes join the proposals, each is
  matched at IoU 0.5 (below: background), 512 per image are sampled at 25 % foreground;
- box branch (`_forward_box`): multi-level ROIAlignV2 7x7 (adaptive sampling), two 1024-d
  fully connected layers with ReLU, class logits and class-specific box deltas (weights 10, 10,
  5, 5); `box_loss`: cross-entropy over the sample and L1 (`SMOOTH_L1_BETA = 0`) of the ground
  truth class's deltas on foregrounds, both divided by the number of sampled ROIs;
- mask branch (`_forward_mask`): ROIAlignV2 14x14, four 3x3 convs of 256 with ReLU, a 2x2
  stride-2 transposed conv with ReLU and a 1x1 conv to per-class 28x28 logits; `mask_loss`:
  per-pixel BCE of the ground-truth class's channel on foregrounds against `mask_targets`
  (the ground-truth mask ROIAligned into the proposal, thresholded at 0.5);
- inference (`postprocess`, `postprocess_masks`): softmax scores, per-class decoded and
  clipped boxes, score > 0.05, per-class NMS 0.5, the 100 best detections, the mask head run
  on them, the detected class's mask probabilities pasted into the image.

Variants (torchvision `maskrcnn_resnet50_fpn_v2`, after Li et al. 2021, "Benchmarking
Detection Transfer Learning with Vision Transformers", arXiv:2111.11429): `box_conv_dims`
puts 3x3 convs + ReLU before the box head's fully connected layers (detectron2 and torchvision
`FastRCNNConvFCHead`, "4conv1fc": four convs of 256, one fc of 1024), and `norm` ("bn" or
"gn", `segjax.layers.norms`) follows every box- and mask-head conv, then without bias.
BatchNorm's batch statistics count only the sampled (training) or valid (inference) ROIs of
the head's input.

Class layout as torchvision: label 0 is background, 1..K the classes; class logits, box deltas
and mask logits all have K + 1 entries (the background's deltas and mask are unused), so
torchvision's `num_classes=91` is `num_classes=90` here (detectron2 omits those unused rows).

Shapes: B batch, K classes (K + 1 with background), P proposals, G ground-truth slots,
S sampled ROIs, F = `ROIHeads.mask_slots()` mask-head slots, D detections, M mask side.
"""

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from segjax import ops
from segjax.layers import norms
from segjax.layers.conv_blocks import conv_stack
from segjax.layers.norms import msra_fill, xavier_fill
from segjax.layers.upsample import check_method, upsample2x
from segjax.losses import smooth_l1_loss
from segjax.ops.nms import DEFAULT_BLOCK_SIZE
from segjax.ops.roi_align import DEFAULT_MAX_SAMPLING_RATIO

Array = jax.Array


def label_and_sample_proposals(
  proposals: Array,
  proposal_valid: Array,
  gt_boxes: Array,
  gt_classes: Array,
  gt_valid: Array,
  rng: Array,
  *,
  num_samples: int = 512,
  positive_fraction: float = 0.25,
  iou_threshold: float = 0.5,
  add_gt: bool = True,
) -> dict[str, Array]:
  """Training ROIs of one image with their targets; `jax.vmap` it for a batch.

  Args:
    proposals: `(P, 4)` RPN proposals; `proposal_valid` `(P,)` bool.
    gt_boxes: `(G, 4)`; gt_classes: `(G,)` int in 1..K; gt_valid: `(G,)` bool.
    rng: PRNG key of the sampling.
    num_samples: static S.
    positive_fraction: at most `int(S * positive_fraction)` foregrounds, placed first.
    iou_threshold: foreground from this IoU with the best ground truth.
    add_gt: add the ground-truth boxes to the proposals (detectron2 and torchvision do).

  Returns:
    `{"boxes": (S, 4) ROIs, "classes": (S,) int32 target class (0 background),
    "gt_index": (S,) int32 matched ground truth, "gt_boxes": (S, 4) its box,
    "valid": (S,) bool}`. Foregrounds fill the first slots, then backgrounds, then padding.
  """
  if add_gt:
    proposals = jnp.concatenate([gt_boxes.astype(proposals.dtype), proposals])
    proposal_valid = jnp.concatenate([gt_valid, proposal_valid])
  matched, labels = ops.match_boxes(
    gt_boxes,
    proposals,
    gt_valid,
    thresholds=(iou_threshold,),
    labels=(0, 1),
    allow_low_quality_matches=False,
  )
  classes = jnp.where(labels == 1, gt_classes[matched], 0).astype(jnp.int32)
  # Padded proposals and padded ground truth must never be sampled: label them ignored.
  idx, valid = ops.sample_balanced(
    rng, jnp.where(proposal_valid, classes, -1), num_samples, positive_fraction, bg_label=0
  )
  gt_index = jnp.where(valid, matched[idx], 0)
  return {
    "boxes": jnp.where(valid[:, None], proposals[idx], 0.0),
    "classes": jnp.where(valid, classes[idx], 0),
    "gt_index": gt_index,
    "gt_boxes": jnp.where(valid[:, None], gt_boxes[gt_index], 0.0),
    "valid": valid,
  }


def box_loss(
  class_logits: Array,
  box_deltas: Array,
  proposals: Array,
  gt_classes: Array,
  gt_boxes: Array,
  valid: Array,
  *,
  weights: Sequence[float] = ops.BOX_HEAD_WEIGHTS,
  smooth_l1_beta: float = 0.0,
) -> tuple[dict[str, Array], dict[str, Array]]:
  """Fast R-CNN losses (detectron2 `FastRCNNOutputLayers.losses`) over all sampled ROIs.

  Args:
    class_logits: `(..., S, K + 1)`.
    box_deltas: `(..., S, K + 1, 4)` class-specific deltas.
    proposals: `(..., S, 4)` the ROIs the deltas apply to.
    gt_classes: `(..., S)` int target classes, 0 background.
    gt_boxes: `(..., S, 4)` matched ground-truth boxes (used on foregrounds only).
    valid: `(..., S)` bool sampled ROIs.
    weights: box-coder weights.
    smooth_l1_beta: 0 for L1.

  Returns:
    `({"loss_cls", "loss_box_reg"}, {"cls_accuracy", "fg_cls_accuracy", "num_fg_rois",
    "num_bg_rois"})`. Both losses are sums over ROIs divided by the number of valid ROIs;
    the counts are per-image means (images being the leading axes).
  """
  logits = class_logits.astype(jnp.float32)
  labels = jnp.where(valid, gt_classes, 0)
  fg = valid & (labels > 0)
  count = jnp.maximum(jnp.sum(valid), 1).astype(jnp.float32)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  deltas = jnp.take_along_axis(box_deltas.astype(jnp.float32), labels[..., None, None], axis=-2)[
    ..., 0, :
  ]
  targets = ops.encode_boxes(gt_boxes, proposals, weights)
  loc = smooth_l1_loss(deltas - targets, smooth_l1_beta).sum(-1)
  pred = jnp.argmax(logits, -1)
  correct = pred == labels
  losses = {
    "loss_cls": jnp.sum(jnp.where(valid, ce, 0.0)) / count,
    "loss_box_reg": jnp.sum(jnp.where(fg, loc, 0.0)) / count,
  }
  num_fg = jnp.sum(fg)
  num_images = valid.size // valid.shape[-1]
  metrics = {
    "cls_accuracy": jnp.sum(correct & valid) / count,
    "fg_cls_accuracy": jnp.sum(correct & fg) / jnp.maximum(num_fg, 1),
    "num_fg_rois": num_fg / num_images,
    "num_bg_rois": jnp.sum(valid & ~fg) / num_images,
  }
  return losses, metrics


def mask_loss(
  mask_logits: Array,
  targets: Array,
  gt_classes: Array,
  valid: Array,
) -> tuple[dict[str, Array], dict[str, Array]]:
  """Mask R-CNN mask loss (detectron2 `mask_rcnn_loss`): mean per-pixel BCE on foregrounds.

  Args:
    mask_logits: `(..., R, M, M, K + 1)` per-class logits, or `(..., R, M, M)` those of
      `gt_classes` (`MaskHead(..., classes=)`).
    targets: `(..., R, M, M)` {0, 1} targets (`ops.mask_targets`).
    gt_classes: `(..., R)` int; only the channel of this class is trained.
    valid: `(..., R)` bool; ROIs with class 0 (background) never count.

  Returns:
    `({"loss_mask"}, {"mask_accuracy"})`: the BCE averaged over the M * M pixels of every
    foreground ROI (0, with zero gradient, when there is none), and the share of those pixels
    predicted right at logit 0.
  """
  fg = valid & (gt_classes > 0)
  logits = class_channel(mask_logits, jnp.where(fg, gt_classes, 0))
  bce = optax.sigmoid_binary_cross_entropy(logits, targets.astype(jnp.float32))
  pixels = jnp.maximum(jnp.sum(fg) * logits.shape[-1] * logits.shape[-2], 1).astype(jnp.float32)
  weight = fg[..., None, None]
  correct = (logits > 0) == (targets > 0.5)
  return (
    {"loss_mask": jnp.sum(jnp.where(weight, bce, 0.0)) / pixels},
    {"mask_accuracy": jnp.sum(correct & weight) / pixels},
  )


def postprocess(
  class_logits: Array,
  box_deltas: Array,
  proposals: Array,
  proposal_valid: Array,
  image_size: Array,
  *,
  weights: Sequence[float] = ops.BOX_HEAD_WEIGHTS,
  score_thresh: float = 0.05,
  nms_thresh: float = 0.5,
  max_detections: int = 100,
  min_size: float = 0.0,
  nms_block_size: int = DEFAULT_BLOCK_SIZE,
) -> dict[str, Array]:
  """Detections of one image (detectron2 `fast_rcnn_inference_single_image`); vmap for a batch.

  Every (proposal, foreground class) pair is a candidate box: class-specific deltas decoded
  and clipped to `image_size`, scored by the softmax probability of that class; candidates
  scoring above `score_thresh` go through per-class NMS and the best `max_detections` stay.

  Args:
    class_logits: `(P, K + 1)`; box_deltas: `(P, K + 1, 4)`.
    proposals: `(P, 4)`; proposal_valid: `(P,)` bool.
    image_size: `(2,)` true height and width.
    min_size: when positive, candidates not wider and taller than this are dropped after
      clipping (torchvision `remove_small_boxes(boxes, 1e-2)`; detectron2 keeps them).

  Returns:
    `{"boxes": (D, 4), "scores": (D,), "classes": (D,) int32 in 1..K, "valid": (D,) bool}`,
    best first; invalid rows are zeros.
  """
  p, k1 = class_logits.shape
  scores = jax.nn.softmax(class_logits.astype(jnp.float32), axis=-1)[:, 1:]
  boxes = ops.decode_boxes(box_deltas[:, 1:].astype(jnp.float32), proposals[:, None], weights)
  boxes = ops.clip_boxes(boxes, image_size)
  finite = jnp.all(jnp.isfinite(boxes), axis=-1) & jnp.isfinite(scores)
  if min_size > 0:
    finite = finite & ops.nonempty_boxes(boxes, min_size)
  boxes = jnp.where(finite[..., None], boxes, 0.0).reshape(p * (k1 - 1), 4)
  scores = jnp.where(finite & proposal_valid[:, None], scores, -jnp.inf).reshape(-1)
  classes = jnp.tile(jnp.arange(1, k1, dtype=jnp.int32), p)
  idx, valid = ops.batched_nms(
    boxes,
    scores,
    classes,
    nms_thresh,
    max_detections,
    score_threshold=score_thresh,
    block_size=nms_block_size,
  )
  return {
    "boxes": jnp.where(valid[:, None], boxes[idx], 0.0),
    "scores": jnp.where(valid, scores[idx], 0.0),
    "classes": jnp.where(valid, classes[idx], 0),
    "valid": valid,
  }


def postprocess_masks(
  mask_logits: Array,
  classes: Array,
  boxes: Array,
  valid: Array,
  image_shape: tuple[int, int],
  threshold: float = 0.5,
  paste: str = "detectron2",
) -> tuple[Array, Array]:
  """Masks of detections of one image (detectron2 `mask_rcnn_inference` + `paste_masks`).

  Args:
    mask_logits: `(D, M, M, K + 1)`, or `(D, M, M)` those of `classes`; classes: `(D,)`
      detected classes; boxes: `(D, 4)`; valid: `(D,)` bool.
    image_shape: static `(H, W)` of the pasted masks.
    threshold: binarization of the pasted probabilities.
    paste: "detectron2" or "torchvision" pasting (`segjax.ops.masks`).

  Returns:
    `mask_probs` `(D, M, M)` float32 sigmoid of the detected class's channel, and
    `masks` `(D, H, W)` bool pasted at the boxes; both zero for invalid rows.
  """
  logits = class_channel(mask_logits, classes)
  probs = jnp.where(valid[:, None, None], jax.nn.sigmoid(logits), 0.0)
  masks = ops.paste_masks(probs, boxes, image_shape, threshold, paste) & valid[:, None, None]
  return probs, masks


def class_channel(mask_logits: Array, classes: Array) -> Array:
  """float32 `(..., M, M)` logits of `classes` `(...)` from per-class `(..., M, M, K + 1)`;
  logits already of those classes `(..., M, M)` as they are."""
  mask_logits = mask_logits.astype(jnp.float32)
  if mask_logits.ndim == classes.ndim + 2:
    return mask_logits
  return jnp.take_along_axis(mask_logits, classes[..., None, None, None], axis=-1)[..., 0]


def _row_mask(valid: Array | None, lead: tuple[int, ...]) -> Array | None:
  """`valid` `lead` as the `(N, 1, 1, 1)` mask of `conv_blocks.conv_norm` over the flattened
  rows."""
  return None if valid is None else jnp.broadcast_to(valid, lead).reshape(-1, 1, 1, 1)


class BoxHead(nn.Module):
  """Optional convs, fully connected layers and the box predictor (detectron2
  `FastRCNNConvFCHead` and `FastRCNNOutputLayers`).

  Attributes:
    num_classes: K; outputs have K + 1 entries with background 0.
    fc_dims: widths of the fully connected layers ("fc1", ...).
    dtype: computation dtype; outputs are float32.
    conv_dims: channels of 3x3 convs + ReLU before them ("conv1", ...; torchvision v2:
      four of 256, then one fc of 1024).
    norm: "none", "bn" or "gn" after each conv (`segjax.layers.conv_blocks.conv_stack`).
  """

  num_classes: int
  fc_dims: tuple[int, ...] = (1024, 1024)
  dtype: Any = jnp.float32
  conv_dims: tuple[int, ...] = ()
  norm: str = "none"

  @nn.compact
  def __call__(
    self, x: Array, *, train: bool = False, valid: Array | None = None
  ) -> tuple[Array, Array]:
    """Pooled `(..., h, w, C)` to logits `(..., K + 1)` and deltas `(..., K + 1, 4)`.

    `train` switches BatchNorm to batch statistics over the rows `valid` `(...)` marks (all
    without it).
    """
    lead = x.shape[:-3]
    x = x.astype(self.dtype)
    if self.conv_dims:
      x = conv_stack(
        x.reshape((-1,) + x.shape[-3:]),
        self.conv_dims,
        prefix="conv",
        norm=self.norm,
        train=train,
        dtype=self.dtype,
        mask=_row_mask(valid, lead),
      )
    # Flattened HWC (torchvision flattens CHW: the weight import reorders fc1's rows).
    x = x.reshape(lead + (-1,))
    for i, d in enumerate(self.fc_dims):
      x = nn.relu(
        nn.Dense(
          d, kernel_init=xavier_fill, dtype=self.dtype, param_dtype=jnp.float32, name=f"fc{i + 1}"
        )(x)
      )
    k1 = self.num_classes + 1
    logits = nn.Dense(
      k1,
      kernel_init=nn.initializers.normal(0.01),
      dtype=self.dtype,
      param_dtype=jnp.float32,
      name="cls_score",
    )(x)
    deltas = nn.Dense(
      4 * k1,
      kernel_init=nn.initializers.normal(0.001),
      dtype=self.dtype,
      param_dtype=jnp.float32,
      name="bbox_pred",
    )(x)
    return logits.astype(jnp.float32), deltas.reshape(lead + (k1, 4)).astype(jnp.float32)


class MaskHead(nn.Module):
  """Mask head (detectron2 `MaskRCNNConvUpsampleHead`): convs, 2x up-convolution, predictor.

  Attributes:
    num_classes: K; K + 1 mask channels with background 0.
    conv_dims: channels of the 3x3 convs.
    dtype: computation dtype; logits are float32.
    norm: "none", "bn" or "gn" after each conv (`segjax.layers.conv_blocks.conv_stack`;
      torchvision v2: "bn").
    upsampling: "transpose" (detectron2's and torchvision's `deconv`), "nearest" or
      "bilinear" (a 1x1 conv named `upsample`, then the resize): `segjax.layers.upsample`.
  """

  num_classes: int
  conv_dims: tuple[int, ...] = (256, 256, 256, 256)
  dtype: Any = jnp.float32
  norm: str = "none"
  upsampling: str = "transpose"

  @nn.compact
  def __call__(
    self,
    x: Array,
    *,
    train: bool = False,
    valid: Array | None = None,
    classes: Array | None = None,
  ) -> Array:
    """Pooled `(..., m, m, C)` to logits `(..., 2m, 2m, K + 1)`, or `(..., 2m, 2m)` of the
    classes `(...)` given; `train` and `valid` `(...)` as `BoxHead`'s."""
    lead, tail = x.shape[:-3], x.shape[-3:]
    x = conv_stack(
      x.reshape((-1,) + tail).astype(self.dtype),
      self.conv_dims,
      prefix="mask_fcn",
      norm=self.norm,
      train=train,
      dtype=self.dtype,
      mask=_row_mask(valid, lead),
    )
    name = "deconv" if self.upsampling == "transpose" else "upsample"
    x = nn.relu(
      upsample2x(
        x, self.conv_dims[-1], self.upsampling, name=name, dtype=self.dtype, kernel_init=msra_fill
      )
    )
    predictor = ClassMaskPredictor(self.num_classes + 1, self.dtype, name="predictor")
    if classes is None:
      x = predictor(x)
    else:
      x = predictor(x, jnp.broadcast_to(classes, lead).reshape(-1))
    return x.reshape(lead + x.shape[1:]).astype(jnp.float32)


class ClassMaskPredictor(nn.Module):
  """The mask head's 1x1 conv to per-class logits (`nn.Conv`'s parameters), or to one class's.

  Given `classes`, only those classes' channels are computed: training reads one channel per
  ROI, and the other K of a `(R, 2m, 2m, K + 1)` output cost a conv's compute and memory.
  """

  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, classes: Array | None = None) -> Array:
    """`(N, h, w, C)` to `(N, h, w, features)` logits, or `(N, h, w)` of `classes` `(N,)`."""
    kernel = self.param(
      "kernel", nn.initializers.normal(0.001), (1, 1, x.shape[-1], self.features), jnp.float32
    )
    bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel[0, 0], bias, dtype=self.dtype)
    if classes is None:
      return jnp.einsum("nhwc,ck->nhwk", x, kernel) + bias
    return jnp.einsum("nhwc,nc->nhw", x, kernel.T[classes]) + bias[classes][:, None, None]


class ROIHeads(nn.Module):
  """Box and mask heads on FPN features with their sampling and inference settings (1x).

  Attributes:
    num_classes: K foreground classes (labels 1..K, 0 background).
    batch_size_per_image: ROIs sampled per image for training.
    positive_fraction: foreground share of the sample.
    mask_batch_size_per_image: ROI slots per image the mask head trains on (TF TPU Mask R-CNN's
      `num_sampled_masks`); None for `int(batch_size_per_image * positive_fraction)`, the most
      foregrounds a sample holds, so the loss is the same as on all foregrounds. Fewer slots
      cost less; when an image has more foregrounds than slots, the first ones of the sample
      (a uniformly random subset) are kept.
    iou_threshold: proposal-to-ground-truth IoU from which a ROI is foreground.
    box_resolution: ROIAlign output side of the box head.
    mask_resolution: ROIAlign output side of the mask head (logits are twice that).
    sampling_ratio: ROIAlign samples per bin and axis; 0 adaptive (detectron2).
    max_sampling_ratio: static cap of the adaptive grid, exact up to it (`ops.roi_align`).
    adaptive_layout: "window" or "pairs" (the previous, slower layout): `ops.roi_align`.
    aligned: ROIAlignV2's half-pixel offset (detectron2); torchvision's is False.
    fc_dims: box head fully connected widths.
    box_conv_dims: box head 3x3 conv widths, before the fully connected layers (torchvision
      v2: (256,) * 4 with fc_dims (1024,)).
    mask_conv_dims: mask head conv widths.
    norm: "none", "bn" or "gn" after every box- and mask-head conv (torchvision v2: "bn").
    mask_upsampling: the mask head's 2x upsampling, "transpose" (detectron2, torchvision),
      "nearest" or "bilinear" (`MaskHead.upsampling`).
    box_reg_weights: box-coder weights of the class-specific deltas.
    smooth_l1_beta: box-delta loss; 0 is L1.
    score_thresh: inference score threshold.
    nms_thresh: inference per-class NMS IoU threshold.
    nms_block_size: boxes per step of its blocked NMS; 0 for the serial loop (`ops.nms`).
    detections_per_image: D, detections kept per image.
    min_box_size: inference drops detections not wider and taller than this (torchvision:
      1e-2; 0 keeps all, as detectron2).
    mask_threshold: binarization of the pasted mask probabilities.
    mask_paste: how masks are pasted into the image: "detectron2" or "torchvision".
    dtype: computation dtype of the heads; outputs are float32.
    mask_slot_buckets: at inference, static sizes the mask head may run on: of the D
      detection slots it runs on the smallest of D, D / 4, D / 16, ... (this many sizes, each
      compiled) that holds every image's valid detections (`segjax.ops.buckets`); the same
      detections as on all D. 1: always all D.
    train_mask_slot_buckets: the same for the mask loss, of the F foreground slots (the
      largest size in windows of the next, so memory is that of F / 4 slots), its gradient
      taken inside the chosen branch; the same losses and gradients as on all F. Not with
      norm="bn" (batch statistics inside a branch). 1: always all F.
  """

  num_classes: int = 80
  batch_size_per_image: int = 512
  positive_fraction: float = 0.25
  mask_batch_size_per_image: int | None = None
  iou_threshold: float = 0.5
  box_resolution: int = 7
  mask_resolution: int = 14
  sampling_ratio: int = 0
  max_sampling_ratio: int = DEFAULT_MAX_SAMPLING_RATIO
  adaptive_layout: str = "window"
  aligned: bool = True
  fc_dims: tuple[int, ...] = (1024, 1024)
  mask_conv_dims: tuple[int, ...] = (256, 256, 256, 256)
  box_reg_weights: tuple[float, ...] = ops.BOX_HEAD_WEIGHTS
  smooth_l1_beta: float = 0.0
  score_thresh: float = 0.05
  nms_thresh: float = 0.5
  nms_block_size: int = DEFAULT_BLOCK_SIZE
  detections_per_image: int = 100
  min_box_size: float = 0.0
  mask_threshold: float = 0.5
  mask_paste: str = "detectron2"
  dtype: Any = jnp.float32
  box_conv_dims: tuple[int, ...] = ()
  norm: str = "none"
  mask_upsampling: str = "transpose"
  mask_slot_buckets: int = 3
  train_mask_slot_buckets: int = 3

  def setup(self):
    norms.check_norm(self.norm, "roi_heads.norm")
    check_method(self.mask_upsampling, "roi_heads.mask_upsampling")
    self.box_head = BoxHead(
      self.num_classes, self.fc_dims, self.dtype, conv_dims=self.box_conv_dims, norm=self.norm
    )
    self.mask_head = MaskHead(
      self.num_classes,
      self.mask_conv_dims,
      self.dtype,
      norm=self.norm,
      upsampling=self.mask_upsampling,
    )

  def mask_slots(self) -> int:
    """Static count of ROI slots per image the mask head trains on."""
    most_fg = max(int(self.batch_size_per_image * self.positive_fraction), 1)
    slots = self.mask_batch_size_per_image
    if slots is None:
      return most_fg
    if slots < 1:
      raise ValueError(f"roi_heads.mask_batch_size_per_image must be >= 1, got {slots}")
    return min(slots, most_fg)

  def _slot_buckets(self, loss: bool) -> int:
    """`train_mask_slot_buckets` (the mask loss) or `mask_slot_buckets` (inference), checked."""
    name = "train_mask_slot_buckets" if loss else "mask_slot_buckets"
    buckets = getattr(self, name)
    if buckets < 1:
      raise ValueError(f"roi_heads.{name} must be >= 1, got {buckets}")
    return buckets

  def mask_slot_sizes(self, slots: int, *, loss: bool = False) -> tuple[int, ...]:
    """Static sizes, increasing, the mask head may run on out of `slots` padded slots: at
    inference (`mask_slot_buckets`) or in the mask loss (`train_mask_slot_buckets`)."""
    return ops.bucket_sizes(slots, self._slot_buckets(loss))

  def _bucketed(self, train: bool, *, loss: bool = False) -> bool:
    """Whether the mask head runs on the used slots only: not while creating its variables,
    nor on batch statistics."""
    return (
      self._slot_buckets(loss) > 1
      and not self.is_initializing()
      and not (train and self.norm == "bn")
    )

  def _mask_head_fn(self) -> tuple[Any, dict]:
    """The mask head as a pure `apply(variables, pooled, **kwargs)` and its variables, to
    run inside `lax.switch` branches (a bound module cannot)."""
    return self.mask_head.clone(parent=None).apply, dict(self.mask_head.variables)

  def init_heads(self, channels: int) -> None:
    """Creates the box and mask heads' parameters from zero pooled features of `channels`."""
    zeros = lambda r: jnp.zeros((1, 1, r, r, channels), self.dtype)
    self.box_head(zeros(self.box_resolution))
    self.mask_head(zeros(self.mask_resolution))

  def _pooler(self, resolution: int) -> Any:
    """ROIAlign as a pure `pool(maps, boxes)`: `(B, R, 4)` boxes on P2..P5 to
    `(B, R, r, r, C)`."""
    return functools.partial(
      ops.batched_multilevel_roi_align,
      output_size=(resolution, resolution),
      sampling_ratio=self.sampling_ratio,
      aligned=self.aligned,
      max_sampling_ratio=self.max_sampling_ratio,
      adaptive_layout=self.adaptive_layout,
    )

  def _pool(self, features: Mapping[str, Array], boxes: Array, resolution: int) -> Array:
    """`(B, R, 4)` boxes on P2..P5 to `(B, R, r, r, C)`; P6 is the RPN's only."""
    return self._pooler(resolution)(roi_maps(features), boxes)

  def _forward_box(
    self,
    features: Mapping[str, Array],
    boxes: Array,
    *,
    train: bool = False,
    valid: Array | None = None,
  ) -> tuple[Array, Array]:
    """Logits `(B, R, K + 1)` and deltas `(B, R, K + 1, 4)` of ROIs `(B, R, 4)`; `valid`
    `(B, R)` marks the ROIs BatchNorm's batch statistics (`train`) count."""
    return self.box_head(self._pool(features, boxes, self.box_resolution), train=train, valid=valid)

  def _forward_mask(
    self,
    features: Mapping[str, Array],
    boxes: Array,
    *,
    train: bool = False,
    valid: Array | None = None,
    classes: Array | None = None,
  ) -> Array:
    """Mask logits `(B, R, 2m, 2m, K + 1)` of ROIs `(B, R, 4)`, or `(B, R, 2m, 2m)` of
    `classes` `(B, R)`; `train`, `valid` as above."""
    pooled = self._pool(features, boxes, self.mask_resolution)
    return self.mask_head(pooled, train=train, valid=valid, classes=classes)

  def __call__(
    self,
    features: Mapping[str, Array],
    proposals: Mapping[str, Array],
    image_size: Array,
    image_shape: tuple[int, int],
    *,
    train: bool = False,
  ) -> dict[str, Array]:
    """Inference: detections of a batch.

    Args:
      features: FPN maps `{"p2": (B, H_2, W_2, C), ...}`.
      proposals: `{"boxes": (B, P, 4), "valid": (B, P)}`.
      image_size: `(B, 2)` true height and width, for clipping.
      image_shape: static `(H, W)` of the input (padded) image, the size masks are pasted at.
      train: BatchNorm (norm="bn") on batch statistics of the valid proposals / detections.

    Returns:
      `{"boxes": (B, D, 4), "scores": (B, D), "classes": (B, D) int32, "mask_probs":
      (B, D, 2m, 2m) float32, "instance_masks": (B, D, H, W) bool, "valid": (B, D) bool}`.
    """
    class_logits, box_deltas = self._forward_box(
      features, proposals["boxes"], train=train, valid=proposals["valid"]
    )
    post = lambda c, d, p, v, s: postprocess(
      c,
      d,
      p,
      v,
      s,
      weights=self.box_reg_weights,
      score_thresh=self.score_thresh,
      nms_thresh=self.nms_thresh,
      max_detections=self.detections_per_image,
      min_size=self.min_box_size,
      nms_block_size=self.nms_block_size,
    )
    detections = jax.vmap(post)(
      class_logits, box_deltas, proposals["boxes"], proposals["valid"], image_size
    )
    probs, masks = self._detection_masks(features, detections, image_shape, train=train)
    return {**detections, "mask_probs": probs, "instance_masks": masks}

  def _detection_masks(
    self,
    features: Mapping[str, Array],
    detections: Mapping[str, Array],
    image_shape: tuple[int, int],
    *,
    train: bool,
  ) -> tuple[Array, Array]:
    """Mask probabilities `(B, D, 2m, 2m)` and pasted masks `(B, D, H, W)` of the
    detections, zero where invalid; the mask head runs on the valid ones' slots (rounded up
    to a `mask_slot_sizes` size)."""
    pool = self._pooler(self.mask_resolution)
    paste = lambda m, c, b, v: postprocess_masks(
      m, c, b, v, image_shape, self.mask_threshold, self.mask_paste
    )
    boxes = {k: detections[k] for k in ("boxes", "classes", "valid")}
    slots = boxes["valid"].shape[1]

    def run(head, n, maps, boxes):
      d = {k: v[:, :n] for k, v in boxes.items()}
      logits = head(pool(maps, d["boxes"]), train=train, valid=d["valid"], classes=d["classes"])
      outputs = jax.vmap(paste)(logits, d["classes"], d["boxes"], d["valid"])
      return tuple(_pad_axis(x, 1, slots) for x in outputs)

    maps = roi_maps(features)
    if not self._bucketed(train):
      return run(self.mask_head, slots, maps, boxes)
    apply, variables = self._mask_head_fn()
    return ops.bucketed_apply(
      lambda n, variables, maps, boxes: run(functools.partial(apply, variables), n, maps, boxes),
      self.mask_slot_sizes(slots),
      ops.used_slots(boxes["valid"]),
      variables,
      maps,
      boxes,
    )

  def losses(
    self,
    features: Mapping[str, Array],
    proposals: Mapping[str, Array],
    targets: Mapping[str, Array],
    rng: Array,
    *,
    train: bool = True,
  ) -> tuple[dict[str, Array], dict[str, Array]]:
    """Training losses of a batch.

    Args:
      features: FPN maps.
      proposals: `{"boxes": (B, P, 4), "valid": (B, P)}` (no gradient).
      targets: the batch's `boxes` `(B, G, 4)`, `classes` `(B, G)`, `instance_masks`
        `(B, G, H, W)` (or `cropped_masks` `(B, G, S, S)`: `ops.mask_targets_from_crops`)
        and `valid` `(B, G)`.
      rng: PRNG key of the ROI sampling.
      train: BatchNorm (norm="bn") on batch statistics of the sampled ROIs (box head) and of
        the foreground ones (mask head), as torchvision, which runs the mask head on those only.

    Returns:
      `({"loss_cls", "loss_box_reg", "loss_mask"}, metrics)`.
    """
    b = proposals["boxes"].shape[0]
    sample = lambda p, pv, gb, gc, gv, key: label_and_sample_proposals(
      p,
      pv,
      gb,
      gc,
      gv,
      key,
      num_samples=self.batch_size_per_image,
      positive_fraction=self.positive_fraction,
      iou_threshold=self.iou_threshold,
    )
    rois = jax.vmap(sample)(
      proposals["boxes"],
      proposals["valid"],
      targets["boxes"],
      targets["classes"],
      targets["valid"],
      jax.random.split(rng, b),
    )
    class_logits, box_deltas = self._forward_box(
      features, rois["boxes"], train=train, valid=rois["valid"]
    )
    losses, metrics = box_loss(
      class_logits,
      box_deltas,
      rois["boxes"],
      rois["classes"],
      rois["gt_boxes"],
      rois["valid"],
      weights=self.box_reg_weights,
      smooth_l1_beta=self.smooth_l1_beta,
    )
    # Foregrounds come first in the sample, then backgrounds (never counted by the mask loss),
    # so the mask head's slots are the first ones.
    fg = {k: v[:, : self.mask_slots()] for k, v in rois.items()}
    gt = {k: targets[k] for k in ("boxes", "instance_masks", "cropped_masks") if k in targets}
    mask_losses, mask_metrics = self._mask_losses(features, fg, gt, train=train)
    return {**losses, **mask_losses}, {**metrics, **mask_metrics}

  def _mask_losses(
    self,
    features: Mapping[str, Array],
    fg: Mapping[str, Array],
    gt: Mapping[str, Array],
    *,
    train: bool,
  ) -> tuple[dict[str, Array], dict[str, Array]]:
    """`mask_loss` of the sampled ROIs' mask slots `fg` (each `(B, F, ...)`) against the
    ground truth `gt`; the mask head runs on the slots up to the last foreground (rounded up
    to a `mask_slot_sizes` size, the largest in windows of the next one), its gradient taken
    there (`ops.bucketed_loss`)."""
    pool = self._pooler(self.mask_resolution)
    maps = roi_maps(features)
    slots = fg["boxes"].shape[1]
    if not self._bucketed(train, loss=True):
      return _mask_loss_on(self.mask_head, pool, maps, fg, gt, train)
    apply, variables = self._mask_head_fn()
    rest = {k: v for k, v in variables.items() if k != "params"}
    sizes = self.mask_slot_sizes(slots, loss=True)
    chunk = sizes[-2] if len(sizes) > 1 else None
    if chunk is not None:  # Padding slots (not valid) up to a multiple of the window.
      padded = -(-slots // chunk) * chunk
      fg = {k: _pad_axis(v, 1, padded) for k, v in fg.items()}
      sizes = (*sizes[:-1], padded)
    is_fg = fg["valid"] & (fg["classes"] > 0)
    num_fg = jnp.maximum(jnp.sum(is_fg), 1).astype(jnp.float32)

    def window_loss(start, size, diff, consts):
      """The loss of slots `[start, start + size)`, its share of all foregrounds'."""
      params, maps = diff
      rest, fg, gt = consts
      window = {k: jax.lax.dynamic_slice_in_dim(v, start, size, 1) for k, v in fg.items()}
      head = functools.partial(apply, {"params": params, **rest})
      losses, metrics = _mask_loss_on(head, pool, maps, window, gt, train)
      share = jnp.sum(window["valid"] & (window["classes"] > 0)) / num_fg
      return losses["loss_mask"] * share, {k: v * share for k, v in metrics.items()}

    loss, metrics = ops.bucketed_loss(
      window_loss,
      sizes,
      ops.used_slots(is_fg),
      (variables["params"], maps),
      (rest, fg, gt),
      chunk=chunk,
    )
    return {"loss_mask": loss}, metrics


def roi_maps(features: Mapping[str, Array]) -> dict[str, Array]:
  """The FPN maps ROIAlign reads: P2..P5 (P6 is the RPN's only)."""
  return {k: v for k, v in features.items() if k != "p6"}


def _pad_axis(x: Array, axis: int, size: int) -> Array:
  """`x` zero-padded at the end of `axis` to `size`."""
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, widths)


def _mask_loss_on(
  head: Any,
  pool: Any,
  maps: Mapping[str, Array],
  fg: Mapping[str, Array],
  gt: Mapping[str, Array],
  train: bool,
) -> tuple[dict[str, Array], dict[str, Array]]:
  """`mask_loss` of the mask slots `fg`: `head(pooled, train=, valid=, classes=)` the mask
  head, `pool(maps, boxes)` its ROIAlign."""
  mask_logits = head(
    pool(maps, fg["boxes"]),
    train=train,
    valid=fg["valid"] & (fg["classes"] > 0),
    classes=fg["classes"],
  )
  m = mask_logits.shape[-2]
  if "cropped_masks" in gt:  # Cropped to their boxes on the host.
    mask_target = jax.vmap(lambda c, g, i, r: ops.mask_targets_from_crops(c, g, i, r, m))(
      gt["cropped_masks"], gt["boxes"], fg["gt_index"], fg["boxes"]
    )
  else:
    mask_target = jax.vmap(lambda g, i, r: ops.mask_targets(g, i, r, m))(
      gt["instance_masks"], fg["gt_index"], fg["boxes"]
    )
  return mask_loss(mask_logits, mask_target, fg["classes"], fg["valid"])

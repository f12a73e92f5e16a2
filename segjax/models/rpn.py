"""Region Proposal Network (Ren et al. 2015, "Faster R-CNN", arXiv:1506.01497) on FPN levels.

As detectron2 `modeling/proposal_generator/rpn.py` with `StandardRPNHead` and the FPN
settings of `Base-RCNN-FPN.yaml` (Lin et al. 2017, Sec. 4.1):

- head: one 3x3 conv + ReLU shared by all levels (`num_convs`; torchvision's
  `maskrcnn_resnet50_fpn_v2` stacks two, `RPNHead(conv_depth=2)`), then 1x1 convs to A
  objectness logits and 4A box deltas per location (A = 3 anchors: one size per level, aspect
  ratios 0.5, 1, 2);
- proposals (`generate_proposals`): per level the top `pre_nms_topk` anchors by objectness
  (2000 train / 1000 test), decoded with weights (1, 1, 1, 1) and clipped to the image, empty
  boxes dropped, NMS at IoU 0.7 within each level (detectron2 and torchvision both), then the
  best `post_nms_topk` of all levels (2000 train as torchvision; detectron2's FPN config keeps
  1000; 1000 test). Padded to that static count with a `valid` mask; no gradient flows
  through them;
- loss (`rpn_loss`): anchors matched to ground truth at IoU 0.3 / 0.7 with low-quality
  matches, 256 anchors sampled per image at 50 % positives, objectness BCE over the sample
  and box-delta L1 (detectron2 `SMOOTH_L1_BETA = 0`; torchvision uses smooth L1 with beta 1/9)
  over its positives, both summed and divided by `batch_size_per_image * B` (detectron2).

Shapes: B batch, K ground-truth slots, level l has `N_l = H_l * W_l * A` anchors ordered
`(i, j, a)` (see `segjax.ops.anchors`), N = sum of N_l, P proposals.
"""

from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from segjax import ops
from segjax.layers.conv import Conv, PlainConv
from segjax.losses import smooth_l1_loss
from segjax.ops import anchors as anchor_lib
from segjax.ops.nms import DEFAULT_BLOCK_SIZE

Array = jax.Array


def generate_proposals(
  objectness: Sequence[Array],
  deltas: Sequence[Array],
  anchors: Sequence[Array],
  image_size: Array,
  *,
  pre_nms_topk: int,
  post_nms_topk: int,
  nms_thresh: float = 0.7,
  min_size: float = 0.0,
  weights: Sequence[float] = ops.RPN_WEIGHTS,
  nms_block_size: int = DEFAULT_BLOCK_SIZE,
) -> dict[str, Array]:
  """Proposals of one image (detectron2 `find_top_rpn_proposals`); `jax.vmap` it for a batch.

  Args:
    objectness: per level `(N_l,)` logits.
    deltas: per level `(N_l, 4)` box deltas.
    anchors: per level `(N_l, 4)` anchors.
    image_size: `(2,)` true (unpadded) height and width to clip to.
    pre_nms_topk: static number of top-scoring anchors kept per level before NMS.
    post_nms_topk: static number P of proposals returned.
    nms_thresh: IoU threshold of the per-level NMS.
    min_size: proposals not wider and taller than this are dropped.
    weights: box-coder weights.
    nms_block_size: boxes per step of the blocked NMS; 0 for the serial loop (`ops.nms`).

  Returns:
    `{"boxes": (P, 4), "scores": (P,) objectness logits, "valid": (P,) bool}`, in descending
    score order; invalid rows are zeros.
  """
  boxes, scores, levels = [], [], []
  for level, (obj, dl, anc) in enumerate(zip(objectness, deltas, anchors)):
    k = min(pre_nms_topk, obj.shape[0])
    top, idx = jax.lax.top_k(obj, k)
    boxes.append(ops.decode_boxes(dl[idx], jnp.asarray(anc)[idx], weights))
    scores.append(top)
    levels.append(jnp.full((k,), level, jnp.int32))
  boxes = ops.clip_boxes(jnp.concatenate(boxes), image_size)
  scores = jnp.concatenate(scores).astype(jnp.float32)
  finite = jnp.all(jnp.isfinite(boxes), axis=-1) & jnp.isfinite(scores)
  boxes = jnp.where(finite[:, None], boxes, 0.0)
  keep = finite & ops.nonempty_boxes(boxes, min_size)
  idx, valid = ops.batched_nms(
    boxes,
    jnp.where(keep, scores, -jnp.inf),
    jnp.concatenate(levels),
    nms_thresh,
    post_nms_topk,
    block_size=nms_block_size,
  )
  return {
    "boxes": jnp.where(valid[:, None], boxes[idx], 0.0),
    "scores": jnp.where(valid, scores[idx], 0.0),
    "valid": valid,
  }


def rpn_loss(
  objectness: Array,
  deltas: Array,
  anchors: Array,
  gt_boxes: Array,
  gt_valid: Array,
  rng: Array,
  *,
  iou_thresholds: tuple[float, float] = (0.3, 0.7),
  batch_size_per_image: int = 256,
  positive_fraction: float = 0.5,
  smooth_l1_beta: float = 0.0,
  weights: Sequence[float] = ops.RPN_WEIGHTS,
) -> tuple[dict[str, Array], dict[str, Array]]:
  """RPN objectness and box-regression losses (detectron2 `RPN.losses`).

  Args:
    objectness: `(B, N)` logits of all anchors, levels concatenated.
    deltas: `(B, N, 4)` predicted deltas.
    anchors: `(N, 4)` anchors of those rows.
    gt_boxes: `(B, K, 4)` ground-truth boxes.
    gt_valid: `(B, K)` bool, False for padding.
    rng: PRNG key of the anchor sampling.
    iou_thresholds: (background below, foreground from); in between is ignored.
    batch_size_per_image: static anchors sampled per image, also the per-image normalizer.
    positive_fraction: at most this share of the sample is foreground.
    smooth_l1_beta: 0 for L1.
    weights: box-coder weights of the targets.

  Returns:
    `({"loss_rpn_cls", "loss_rpn_loc"}, {"rpn_num_pos_anchors", "rpn_num_neg_anchors"})`,
    float32 scalars; counts are per-image means.
  """
  anchors = jnp.asarray(anchors, jnp.float32)
  b = objectness.shape[0]

  def sample(gt_b, gt_v, key):
    matched, labels = ops.match_boxes(
      gt_b,
      anchors,
      gt_v,
      thresholds=iou_thresholds,
      labels=(0, -1, 1),
      allow_low_quality_matches=True,
    )
    idx, ok = ops.sample_balanced(key, labels, batch_size_per_image, positive_fraction)
    targets = ops.encode_boxes(gt_b[matched[idx]], anchors[idx], weights)
    return idx, ok, ok & (labels[idx] == 1), targets

  idx, ok, pos, targets = jax.vmap(sample)(gt_boxes, gt_valid, jax.random.split(rng, b))
  logits = jnp.take_along_axis(objectness.astype(jnp.float32), idx, axis=1)
  pred = jnp.take_along_axis(deltas.astype(jnp.float32), idx[..., None], axis=1)
  bce = optax.sigmoid_binary_cross_entropy(logits, pos.astype(jnp.float32))
  loc = smooth_l1_loss(pred - targets, smooth_l1_beta).sum(-1)
  normalizer = float(batch_size_per_image * b)
  losses = {
    "loss_rpn_cls": jnp.sum(jnp.where(ok, bce, 0.0)) / normalizer,
    "loss_rpn_loc": jnp.sum(jnp.where(pos, loc, 0.0)) / normalizer,
  }
  metrics = {
    "rpn_num_pos_anchors": jnp.sum(pos) / b,
    "rpn_num_neg_anchors": jnp.sum(ok & ~pos) / b,
  }
  return losses, metrics


def _sorted_levels(features: Mapping[str, Array]) -> list[Array]:
  return [features[k] for k in sorted(features, key=lambda k: int(k.lstrip("pP")))]


class RPN(nn.Module):
  """RPN head over FPN levels, with its anchors, proposal and loss settings (detectron2 1x).

  Attributes:
    anchor_sizes: anchor sizes of each level, in pixels, finest first.
    aspect_ratios: anchor height / width ratios, shared by all levels.
    strides: feature stride of each level.
    pre_nms_topk_train, pre_nms_topk_test: proposals per level before NMS.
    post_nms_topk_train, post_nms_topk_test: proposals per image after NMS.
    nms_thresh: NMS IoU threshold.
    nms_block_size: boxes per step of the blocked NMS; 0 for the serial loop (`ops.nms`).
    min_size: proposals must be wider and taller than this.
    iou_thresholds: anchor matching (background below, foreground from).
    batch_size_per_image: anchors sampled per image for the loss.
    positive_fraction: foreground share of the sample.
    smooth_l1_beta: box-delta loss; 0 is L1.
    loss_weight: weight of both RPN losses.
    box_reg_loss_weight: extra weight of the box-delta loss.
    rounded_anchors: cell anchors rounded to whole pixels (torchvision).
    strides_from_image: each level's anchors placed with stride `image_shape // grid_size`
      per axis (torchvision) rather than `strides` (see `segjax.ops.anchors`).
    num_convs: 3x3 conv + ReLU layers of the head, named "conv", "conv2", ... (torchvision
      v2: 2).
    dtype: computation dtype of the head; outputs are float32.
  """

  anchor_sizes: tuple[tuple[float, ...], ...] = anchor_lib.FPN_SIZES
  aspect_ratios: tuple[float, ...] = anchor_lib.ASPECT_RATIOS
  strides: tuple[int, ...] = anchor_lib.FPN_STRIDES
  pre_nms_topk_train: int = 2000
  pre_nms_topk_test: int = 1000
  post_nms_topk_train: int = 2000
  post_nms_topk_test: int = 1000
  nms_thresh: float = 0.7
  nms_block_size: int = DEFAULT_BLOCK_SIZE
  min_size: float = 0.0
  iou_thresholds: tuple[float, float] = (0.3, 0.7)
  batch_size_per_image: int = 256
  positive_fraction: float = 0.5
  smooth_l1_beta: float = 0.0
  loss_weight: float = 1.0
  box_reg_loss_weight: float = 1.0
  rounded_anchors: bool = False
  strides_from_image: bool = False
  num_convs: int = 1
  dtype: Any = jnp.float32

  @property
  def num_cell_anchors(self) -> int:
    """A, anchors per location (the head needs the same count on every level)."""
    counts = {len(s) * len(self.aspect_ratios) for s in self.anchor_sizes}
    if len(counts) != 1:
      raise ValueError(f"every level needs the same number of anchor sizes: {self.anchor_sizes}")
    return counts.pop()

  @nn.compact
  def __call__(self, features: Mapping[str, Array]) -> tuple[list[Array], list[Array]]:
    """FPN maps `{"p2": (B, H_2, W_2, C), ...}` to per-level objectness `(B, N_l)` and deltas
    `(B, N_l, 4)`, float32, rows in anchor order."""
    maps = _sorted_levels(features)
    if len(maps) != len(self.strides):
      raise ValueError(f"got {len(maps)} feature levels for {len(self.strides)} strides")
    if self.num_convs < 1:
      raise ValueError(f"RPN needs num_convs >= 1, got {self.num_convs}.")
    a = self.num_cell_anchors
    init = nn.initializers.normal(0.01)
    convs = [
      Conv(  # On CPU: the kernel gradient as matmuls (`segjax.layers.conv`), 3x faster.
        maps[0].shape[-1],
        (3, 3),
        padding="SAME",
        kernel_init=init,
        dtype=self.dtype,
        param_dtype=jnp.float32,
        name="conv" if i == 0 else f"conv{i + 1}",
      )
      for i in range(self.num_convs)
    ]
    cls = PlainConv(
      a,
      (1, 1),
      kernel_init=init,
      dtype=self.dtype,
      param_dtype=jnp.float32,
      name="objectness_logits",
    )
    box = PlainConv(
      4 * a,
      (1, 1),
      kernel_init=init,
      dtype=self.dtype,
      param_dtype=jnp.float32,
      name="anchor_deltas",
    )
    objectness, deltas = [], []
    for x in maps:
      t = x.astype(self.dtype)
      for conv in convs:
        t = nn.relu(conv(t))
      b = x.shape[0]
      objectness.append(cls(t).reshape(b, -1).astype(jnp.float32))
      deltas.append(box(t).reshape(b, -1, 4).astype(jnp.float32))
    return objectness, deltas

  def anchors(
    self, features: Mapping[str, Array], image_shape: tuple[int, int] | None = None
  ) -> tuple[np.ndarray, ...]:
    """Anchors `(N_l, 4)` of every level for these (static) feature shapes; `image_shape`, the
    padded input's `(H, W)`, is needed with `strides_from_image`."""
    grids = [tuple(x.shape[1:3]) for x in _sorted_levels(features)]
    strides = self.strides
    if self.strides_from_image:
      if image_shape is None:
        raise ValueError("RPN(strides_from_image=True).anchors needs the image shape.")
      strides = anchor_lib.anchor_strides(tuple(image_shape), grids)
    return ops.multilevel_anchors(
      grids, strides, self.anchor_sizes, self.aspect_ratios, rounded=self.rounded_anchors
    )

  def proposals(
    self,
    objectness: Sequence[Array],
    deltas: Sequence[Array],
    anchors: Sequence[np.ndarray],
    image_size: Array,
    *,
    train: bool,
  ) -> dict[str, Array]:
    """`generate_proposals` for a batch: `{"boxes": (B, P, 4), "scores", "valid": (B, P)}`.

    `image_size` is `(B, 2)`; P is `post_nms_topk_train` or `_test` after `train`. The
    proposals are constants to the rest of the model (no gradient), as in detectron2.
    """
    fn = lambda o, d, s: generate_proposals(
      o,
      d,
      anchors,
      s,
      pre_nms_topk=self.pre_nms_topk_train if train else self.pre_nms_topk_test,
      post_nms_topk=self.post_nms_topk_train if train else self.post_nms_topk_test,
      nms_thresh=self.nms_thresh,
      min_size=self.min_size,
      nms_block_size=self.nms_block_size,
    )
    return jax.lax.stop_gradient(jax.vmap(fn)(list(objectness), list(deltas), image_size))

  def losses(
    self,
    objectness: Sequence[Array],
    deltas: Sequence[Array],
    anchors: Sequence[np.ndarray],
    gt_boxes: Array,
    gt_valid: Array,
    rng: Array,
  ) -> tuple[dict[str, Array], dict[str, Array]]:
    """Weighted `rpn_loss` over all levels."""
    losses, metrics = rpn_loss(
      jnp.concatenate(objectness, axis=1),
      jnp.concatenate(deltas, axis=1),
      np.concatenate(anchors),
      gt_boxes,
      gt_valid,
      rng,
      iou_thresholds=self.iou_thresholds,
      batch_size_per_image=self.batch_size_per_image,
      positive_fraction=self.positive_fraction,
      smooth_l1_beta=self.smooth_l1_beta,
    )
    losses = {
      "loss_rpn_cls": losses["loss_rpn_cls"] * self.loss_weight,
      "loss_rpn_loc": losses["loss_rpn_loc"] * self.loss_weight * self.box_reg_loss_weight,
    }
    return losses, metrics

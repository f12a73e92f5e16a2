"""Detection ops: pure, static-shape array functions on boxes, anchors, regions and masks.

Boxes are `[x1, y1, x2, y2]` in absolute pixels throughout; every function runs under `jit`
(sizes such as `max_output` or `output_size` are static) and `vmap` over images.
"""

from segjax.ops.anchors import (
  cell_anchors,
  feature_grid_sizes,
  grid_anchors,
  image_anchors,
  multilevel_anchors,
  num_anchors,
)
from segjax.ops.box_coder import BOX_HEAD_WEIGHTS, RPN_WEIGHTS, decode_boxes, encode_boxes
from segjax.ops.boxes import (
  box_area,
  box_intersection,
  box_iou,
  clip_boxes,
  cxcywh_to_xyxy,
  nonempty_boxes,
  xywh_to_xyxy,
  xyxy_to_cxcywh,
  xyxy_to_xywh,
)
from segjax.ops.buckets import (
  bucket_index,
  bucket_sizes,
  bucketed_apply,
  bucketed_loss,
  used_slots,
)
from segjax.ops.masks import (
  mask_targets,
  mask_targets_from_crops,
  paste_mask_probs,
  paste_masks,
)
from segjax.ops.matcher import match_boxes, match_by_quality
from segjax.ops.nms import batched_nms, nms, nms_per_image
from segjax.ops.poolers import (
  assign_boxes_to_levels,
  batched_multilevel_roi_align,
  multilevel_roi_align,
)
from segjax.ops.roi_align import roi_align, roi_align_flat
from segjax.ops.sampling import mask_unsampled, sample_balanced

__all__ = [
  "cell_anchors",
  "feature_grid_sizes",
  "grid_anchors",
  "image_anchors",
  "multilevel_anchors",
  "num_anchors",
  "bucket_index",
  "bucket_sizes",
  "bucketed_apply",
  "bucketed_loss",
  "used_slots",
  "BOX_HEAD_WEIGHTS",
  "RPN_WEIGHTS",
  "decode_boxes",
  "encode_boxes",
  "box_area",
  "box_intersection",
  "box_iou",
  "clip_boxes",
  "cxcywh_to_xyxy",
  "nonempty_boxes",
  "xywh_to_xyxy",
  "xyxy_to_cxcywh",
  "xyxy_to_xywh",
  "mask_targets",
  "mask_targets_from_crops",
  "paste_mask_probs",
  "paste_masks",
  "match_boxes",
  "match_by_quality",
  "batched_nms",
  "nms",
  "nms_per_image",
  "assign_boxes_to_levels",
  "batched_multilevel_roi_align",
  "multilevel_roi_align",
  "roi_align",
  "roi_align_flat",
  "mask_unsampled",
  "sample_balanced",
]

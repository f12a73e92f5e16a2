"""Detection ops: pure, static-shape array functions on boxes, anchors, regions and masks.

Boxes are `[x1, y1, x2, y2]` in absolute pixels throughout; every function runs under `jit`
(sizes such as `max_output` or `output_size` are static) and `vmap` over images.
"""

from segjax.ops.anchors import cell_anchors
from segjax.ops.anchors import feature_grid_sizes
from segjax.ops.anchors import grid_anchors
from segjax.ops.anchors import image_anchors
from segjax.ops.anchors import multilevel_anchors
from segjax.ops.anchors import num_anchors
from segjax.ops.box_coder import BOX_HEAD_WEIGHTS
from segjax.ops.box_coder import decode_boxes
from segjax.ops.box_coder import encode_boxes
from segjax.ops.box_coder import RPN_WEIGHTS
from segjax.ops.boxes import box_area
from segjax.ops.boxes import box_intersection
from segjax.ops.boxes import box_iou
from segjax.ops.boxes import clip_boxes
from segjax.ops.boxes import cxcywh_to_xyxy
from segjax.ops.boxes import nonempty_boxes
from segjax.ops.boxes import xywh_to_xyxy
from segjax.ops.boxes import xyxy_to_cxcywh
from segjax.ops.boxes import xyxy_to_xywh
from segjax.ops.masks import mask_targets
from segjax.ops.masks import paste_mask_probs
from segjax.ops.masks import paste_masks
from segjax.ops.matcher import match_boxes
from segjax.ops.matcher import match_by_quality
from segjax.ops.nms import batched_nms
from segjax.ops.nms import nms
from segjax.ops.nms import nms_per_image
from segjax.ops.poolers import assign_boxes_to_levels
from segjax.ops.poolers import multilevel_roi_align
from segjax.ops.roi_align import roi_align
from segjax.ops.roi_align import roi_align_flat
from segjax.ops.sampling import mask_unsampled
from segjax.ops.sampling import sample_balanced
